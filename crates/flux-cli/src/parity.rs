//! `flux parity DIR [--backend B]`: one line per case, skipped cases counted on their own line,
//! then `parity: N passed, M failed` as the last line.

use crate::backend::{BackendKind, Job, run_on};
use anyhow::Result;
use clap::Args;
use flux_kernels::Backend;
use flux_parity::Summary;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `flux parity`.
#[derive(Args, Debug)]
pub struct ParityArgs {
    /// A reference folder (with a manifest.json) or a parent of several, walked recursively.
    pub dir: PathBuf,
    /// Backend to run the cases on (the CPU f64 goldens stay the reference).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

struct ParityJob<'a> {
    dir: &'a Path,
}

impl Job for ParityJob<'_> {
    type Output = Vec<flux_parity::CaseResult>;
    const EXACT: bool = true;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
        eprintln!("parity on backend {}", be.name());
        Ok(flux_parity::run_dir(be, self.dir)?)
    }
}

/// Runs the parity cases and prints the report; exit code 1 on any failure.
pub fn run(args: &ParityArgs) -> Result<ExitCode> {
    let results = run_on(args.backend, ParityJob { dir: &args.dir })?;
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
