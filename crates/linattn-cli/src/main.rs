//! The `linattn` command.
//!
//! - `linattn run` computes one attention call on q, k, v read from .npy files.
//! - `linattn bench` times every method over a sweep of sequence lengths.
//! - `linattn decode` generates token by token with each method's recurrent state.
//! - `linattn explore` serves a local page that measures and compares the methods.
//!
//! Every failure is a [`CliError`]: one line on stderr and exit status 2.

mod alloc;
mod bench;
mod decode;
mod decode_report;
mod dtype;
mod error;
mod explore;
mod gates;
mod gpu;
mod measure;
mod method_options;
mod npy;
mod plot;
mod report;
mod run;
mod table;
mod window_span;

use clap::{Parser, Subcommand};
use error::CliError;
use std::process::ExitCode;

/// Linear attention and the exact attention it is measured against.
#[derive(Debug, Parser)]
#[command(name = "linattn", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compute attention on .npy inputs and write the output as .npy
    // Boxed: its many input files make it several times the size of the others.
    Run(Box<run::RunArgs>),
    /// Time methods over sequence lengths: median time, tokens/s, extra memory, error
    Bench(bench::BenchArgs),
    /// Prefill a prompt, then generate token by token: step latency and state memory
    Decode(decode::DecodeArgs),
    /// Serve a local page that measures the methods as the sequence grows
    Explore(explore::ExploreArgs),
    /// Measures the cases `explore` hands it on stdin (its child processes)
    #[command(hide = true)]
    ExploreWorker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::bench(args),
        Command::Decode(args) => decode::decode(args),
        Command::Explore(args) => explore::explore(args),
        Command::ExploreWorker => explore::worker::work(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("linattn: error: {error}");
            ExitCode::from(CliError::EXIT_CODE)
        }
    }
}
