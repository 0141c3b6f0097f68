//! `flux`: sampling, parity checks and benchmarks from the command line.

mod bench;
mod parity;
mod sigmas;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Flux.1 sampling kernels: schedulers, samplers, parity checks and benchmarks.
#[derive(Parser, Debug)]
#[command(name = "flux", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure a whole loop and print one `key=value` line.
    Bench(bench::BenchArgs),
    /// Check every case of a reference directory against the reference outputs.
    Parity(parity::ParityArgs),
    /// List the sigma schedulers.
    Schedulers,
    /// Print the sigma schedule of a scheduler, as ComfyUI's KSampler computes it.
    Sigmas(sigmas::SigmasArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Parity(args) => parity::run(&args),
        Command::Schedulers => Ok(sigmas::list()),
        Command::Sigmas(args) => sigmas::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
