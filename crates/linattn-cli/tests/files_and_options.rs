//! What the commands protect and refuse: `run` never destroys a file it was not asked
//! to write and never leaves a half-written one; `bench` refuses what `run` refuses,
//! before it measures anything, and says when it measured nothing; `decode` says how a
//! long run is going.

mod common;

use common::{Scratch, linattn};
use linattn::{Attention, Method, Softmax, SoftmaxAlgorithm, Tensor};
use std::fs;
use std::path::Path;
use std::process::Output;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The files of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// q, k, v of `[1, 16, 2, 8]` in `scratch`.
fn inputs(scratch: &Scratch) -> [std::path::PathBuf; 3] {
    ["q", "k", "v"]
        .iter()
        .zip([1, 2, 3])
        .map(|(name, seed)| {
            let tensor = Tensor::<f32>::randn([1, 16, 2, 8], seed).unwrap();
            scratch.tensor(&format!("{name}.npy"), &tensor)
        })
        .collect::<Vec<_>>()
        .try_into()
        .unwrap()
}

#[test]
fn run_refuses_an_output_that_is_an_input_and_leaves_it_whole() {
    let scratch = Scratch::new("out-is-input");
    let [q, k, v] = inputs(&scratch);
    let before = fs::read(&q).unwrap();
    // The same file by another spelling of its path, too.
    let dotted = scratch.0.join(".").join("q.npy");
    for out in [&q, &dotted] {
        let output = linattn([
            "run",
            "--method",
            "linear",
            "--q",
            arg(&q),
            "--k",
            arg(&k),
            "--v",
            arg(&v),
            "--out",
            arg(out),
        ]);
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr(&output).contains("is also an input"),
            "{}",
            stderr(&output)
        );
        assert_eq!(fs::read(&q).unwrap(), before, "q was overwritten");
    }
}

#[test]
fn run_checks_where_it_writes_before_it_computes() {
    let scratch = Scratch::new("out-missing-dir");
    let [q, k, v] = inputs(&scratch);
    let out = scratch.path("no/such/dir/o.npy");
    // A memory limit no call fits in: had the computation come first, it would fail on
    // memory, not on the directory.
    let output = linattn([
        "run",
        "--method",
        "linear",
        "--q",
        arg(&q),
        "--k",
        arg(&k),
        "--v",
        arg(&v),
        "--out",
        arg(&out),
        "--memory-limit",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("cannot write") && message.contains("no/such/dir"),
        "{message}"
    );
}

#[test]
fn a_failed_run_leaves_existing_outputs_and_no_partial_files() {
    let scratch = Scratch::new("partial");
    let [q, k, v] = inputs(&scratch);
    let out = scratch.path("o.npy");
    fs::write(&out, b"an earlier result").unwrap();
    let d_out = scratch.tensor("do.npy", &Tensor::<f32>::randn([1, 16, 2, 8], 9).unwrap());
    let before = listing(&scratch.0);

    // The gradients' directory is missing: refused before anything is written.
    let missing = scratch.path("missing/grad_");
    let output = linattn([
        "run",
        "--method",
        "linear",
        "--q",
        arg(&q),
        "--k",
        arg(&k),
        "--v",
        arg(&v),
        "--out",
        arg(&out),
        "--grad-out",
        arg(&d_out),
        "--grads-prefix",
        arg(&missing),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(fs::read(&out).unwrap(), b"an earlier result");
    assert_eq!(listing(&scratch.0), before);

    // The forward fits the memory limit but the backward does not: the output computed
    // first is not written either, and no gradient file is left. The limit lies between
    // the two calls' needs as the library estimates them on this machine.
    let naive = Attention::new(Method::Softmax(Softmax {
        algorithm: SoftmaxAlgorithm::Naive,
        ..Softmax::default()
    }));
    let shape = [1, 16, 2, 8];
    let tensor_bytes = 16 * 2 * 8 * 4;
    let forward = tensor_bytes + naive.workspace_bytes(shape, shape, shape, 4).unwrap();
    let backward = 3 * tensor_bytes
        + naive
            .backward_workspace_bytes(shape, shape, shape, 4)
            .unwrap();
    assert!(forward < backward);
    let limit = ((forward + backward) / 2).to_string();
    let grads = scratch.path("grad_");
    let output = linattn([
        "run",
        "--method",
        "softmax",
        "--algorithm",
        "naive",
        "--q",
        arg(&q),
        "--k",
        arg(&k),
        "--v",
        arg(&v),
        "--out",
        arg(&out),
        "--grad-out",
        arg(&d_out),
        "--grads-prefix",
        arg(&grads),
        "--memory-limit",
        &limit,
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("backward"), "{}", stderr(&output));
    assert_eq!(fs::read(&out).unwrap(), b"an earlier result");
    assert_eq!(listing(&scratch.0), before);

    // And when everything succeeds, every file is in place and none is left over.
    let output = linattn([
        "run",
        "--method",
        "linear",
        "--q",
        arg(&q),
        "--k",
        arg(&k),
        "--v",
        arg(&v),
        "--out",
        arg(&out),
        "--grad-out",
        arg(&d_out),
        "--grads-prefix",
        arg(&grads),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut expected = before.clone();
    expected.extend(["grad_dk.npy", "grad_dq.npy", "grad_dv.npy"].map(String::from));
    expected.sort();
    assert_eq!(listing(&scratch.0), expected);
    assert_ne!(fs::read(&out).unwrap(), b"an earlier result");
}

#[test]
fn bench_refuses_what_run_refuses_before_measuring() {
    for (args, expected) in [
        (&["--chunk", "0"][..], "chunk"),
        (&["--features", "0", "--methods", "performer"], "feature"),
        (
            &["--local-heads", "9", "--heads", "8", "--methods", "linear"],
            "--local-heads 9",
        ),
        (&["--seq", "0"], "at least 1"),
        (&["--seq", "-5"], "\"-5\" is not a whole number"),
        (&["--heads", "0"], "at least 1"),
        (&["--max-seconds", "nan"], "not a number of seconds"),
        (&["--max-seconds", "-3"], "not a number of seconds"),
    ] {
        let output = linattn([&["bench", "--seq", "32"][..], args].concat());
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            !stderr(&output).contains("measuring this machine"),
            "{args:?} was refused only after measuring began"
        );
    }
}

#[test]
fn bench_exits_non_zero_when_every_case_was_skipped_and_still_prints_them() {
    let output = linattn([
        "bench",
        "--seq",
        "32",
        "--methods",
        "linformer,fnet",
        "--causal",
        "--heads",
        "2",
        "--dim",
        "8",
    ]);
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("every case was skipped"),
        "{}",
        stderr(&output)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("linformer") && table.contains("no causal form"),
        "{table}"
    );
}

#[test]
fn bench_checks_the_plot_directory_first_and_prints_the_table_when_a_chart_fails() {
    let scratch = Scratch::new("plot-checks");
    // Under a file, no directory can be made: refused before the sweep.
    let file = scratch.bytes("a-file", b"");
    let output = linattn([
        "bench",
        "--seq",
        "32",
        "--methods",
        "linear",
        "--plot",
        arg(&file.join("charts")),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot write"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("measuring this machine"));

    // A chart's file name taken by a directory: the charts fail after the sweep, and
    // the table is printed all the same.
    let charts = scratch.path("charts");
    fs::create_dir_all(charts.join("time.svg")).unwrap();
    let output = linattn([
        "bench",
        "--seq",
        "32",
        "--methods",
        "linear",
        "--heads",
        "2",
        "--dim",
        "8",
        "--plot",
        arg(&charts),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("time.svg"), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("linear"), "no table: {table}");
}

#[test]
fn decode_says_how_a_long_run_is_going() {
    // Exact attention over a long prompt: steps of tens of milliseconds, for seconds.
    let output = linattn([
        "decode",
        "--method",
        "softmax",
        "--prompt-len",
        "16384",
        "--tokens",
        "80",
        "--heads",
        "8",
        "--dim",
        "64",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let progress = stderr(&output);
    assert!(
        progress.contains("step ") && progress.contains("/80"),
        "no progress on stderr: {progress}"
    );
}
