//! `flux parity DIR`: one line per case, then `parity: N passed, M failed`.

use anyhow::Result;
use clap::Args;
use flux_parity::{RunOptions, Summary};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `flux parity`.
#[derive(Args, Debug)]
pub struct ParityArgs {
    /// A reference folder (with a manifest.json) or a parent of several, walked recursively.
    pub dir: PathBuf,
    /// Backend to run the cases on.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
}

/// Runs the parity cases and prints the report; exit code 1 on any failure.
pub fn run(args: &ParityArgs) -> Result<ExitCode> {
    let opts = RunOptions {
        backend: Some(args.backend.clone()),
    };
    let results = flux_parity::run_dir(&args.dir, &opts)?;
    for r in &results {
        println!("{r}");
    }
    let s = Summary::of(&results);
    if s.skipped > 0 {
        println!("skipped: {} (not counted as passed)", s.skipped);
    }
    println!("parity: {} passed, {} failed", s.passed, s.failed);
    Ok(if s.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
