//! The Python package's tests (pytest, the `test_*.py` beside this file) on the extension
//! this build made, so that `cargo test` runs them with the Rust tests: a copy of the
//! package with the extension in it under the target folder, and NumPy and pytest from
//! PyPI in a venv there, made the first time.

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_package_passes_its_tests() {
    let executable = std::env::current_exe().expect("the test knows its path");
    // target/<profile>/deps/<this test>: cargo built the extension beside it, as a
    // dependency of this test (the rlib crate type is what makes it one).
    let deps = executable
        .parent()
        .expect("tests run from target/<profile>/deps");
    let profile = deps.parent().expect("deps is in target/<profile>");
    let extension = deps.join("lib_linattn.so");
    assert!(
        extension.exists(),
        "cargo builds the extension before this test: {} is missing",
        extension.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    let package = profile.join("python-package").join("linattn");
    std::fs::create_dir_all(&package).expect("the package's folder can be made");
    for file in std::fs::read_dir(source.join("linattn")).expect("python/linattn is there") {
        let path = file.expect("a readable entry").path();
        if path.extension().is_some_and(|e| e == "py") {
            let name = path.file_name().expect("a file name");
            std::fs::copy(&path, package.join(name)).expect("the package's files copy");
        }
    }
    std::fs::copy(&extension, package.join("_linattn.abi3.so")).expect("the extension copies");
    let venv = profile.join("py-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "numpy",
            "pytest",
        ]));
    }
    // From the copy's folder: `python -m` puts the working folder first on the path, and
    // python/ holds the package without its extension.
    let packages = package.parent().expect("the package's parent");
    run(Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(source.join("tests"))
        .current_dir(packages)
        .env("PYTHONPATH", packages));
}

/// Runs `command`, failing the test with its output if it fails.
fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} could not start: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    println!("{text}");
}
