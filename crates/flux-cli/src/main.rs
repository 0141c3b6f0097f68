//! `flux`: sampling, parity checks and benchmarks from the command line.

mod backend;
mod bench;
mod compare;
mod img2img;
mod parity;
mod serve;
mod sigmas;
mod worker;

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
    /// Compare two images (PSNR, largest difference, exit code by a threshold), or render a
    /// labelled grid of img2img results, one row per scheduler and one column per sampler.
    Compare(Box<compare::CompareArgs>),
    /// Change an image to match a prompt (img2img); the built-in demo model when none is given.
    Img2img(Box<img2img::Img2ImgArgs>),
    /// Check every case of a reference directory against the reference outputs.
    Parity(parity::ParityArgs),
    /// Serve the img2img job API over HTTP (compatible with the hosted API's clients).
    Serve(Box<serve::ServeArgs>),
    /// List the samplers.
    Samplers,
    /// List the sigma schedulers.
    Schedulers,
    /// Print the sigma schedule of a scheduler, as ComfyUI's KSampler computes it.
    Sigmas(sigmas::SigmasArgs),
    /// Run queued jobs from a shared (PostgreSQL) job store; API nodes take the requests.
    Worker(Box<worker::WorkerArgs>),
}

/// mimalloc keeps freed memory mapped for reuse: the sampler loop and the model ops allocate
/// latent- and activation-sized buffers every step, and with the system allocator each of them
/// is fresh memory whose page faults cost as much as the step's arithmetic.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Img2img(args) => img2img::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Parity(args) => parity::run(&args),
        Command::Serve(args) => serve::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Samplers => Ok(sigmas::list_samplers()),
        Command::Schedulers => Ok(sigmas::list()),
        Command::Sigmas(args) => sigmas::run(&args),
        Command::Worker(args) => worker::run(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
