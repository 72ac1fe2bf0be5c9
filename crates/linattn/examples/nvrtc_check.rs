//! Compiles every CUDA kernel module with NVRTC alone, as a GPU would at first use, for
//! Hopper (`sm_90a`) or the architecture given: the compile check of CI, which has no GPU.
//! Prints each module and the bytes of its PTX; exits non-zero on any compile error.
//!
//! ```text
//! cargo run --release --example nvrtc_check -p linattn --features cuda [-- sm_90a]
//! ```
//!
//! Needs libnvrtc on the library path and CUDA's headers under `$CUDA_HOME/include`
//! (`.ci/nvrtc_check.sh` installs both from PyPI).

use std::process::ExitCode;

fn main() -> ExitCode {
    let architecture = std::env::args().nth(1).unwrap_or_else(|| "sm_90a".into());
    let start = std::time::Instant::now();
    match linattn::cuda::compile_all_kernels(&architecture) {
        Ok(modules) => {
            for (module, bytes) in &modules {
                println!("{module:<20} {bytes:>9} bytes of PTX");
            }
            println!(
                "{} modules compiled for {architecture} in {:.1} s",
                modules.len(),
                start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            // NVRTC's log arrives escaped, one line: put its lines back.
            eprintln!("{}", error.to_string().replace("\\n", "\n"));
            ExitCode::FAILURE
        }
    }
}
