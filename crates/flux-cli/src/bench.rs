//! `flux bench ...`: whole-loop measurements that print exactly one `key=value` line.

mod copy;
mod sampler;
mod transformer;

use anyhow::Result;
use clap::{Args, Subcommand};
use flux_kernels::DType;
use std::process::ExitCode;

/// Arguments of `flux bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    kind: BenchKind,
}

/// What to measure.
#[derive(Subcommand, Debug)]
enum BenchKind {
    /// A whole sampler loop with the analytic denoiser (flux-dev schedule, scheduler `simple`).
    Sampler(sampler::SamplerBenchArgs),
    /// One read and write of a latent (the unit of the samplers' overhead target).
    Copy(copy::CopyBenchArgs),
    /// One forward pass of a random-weight Flux transformer of the given shape (dev style).
    Transformer(transformer::TransformerBenchArgs),
}

/// Runs the chosen measurement.
pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match &args.kind {
        BenchKind::Sampler(a) => sampler::run(a),
        BenchKind::Transformer(a) => transformer::run(a),
        BenchKind::Copy(a) => copy::run(a),
    }
}

/// Sets the size of the global rayon pool (once per process).
pub(crate) fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("could not size the thread pool: {e}"))?;
    }
    Ok(())
}

/// The median of a non-empty list of measurements.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The latent a bench works on, and the pool it runs on (shared by the latent benches).
#[derive(Args, Debug)]
pub(crate) struct LatentArgs {
    /// Latent shape B,C,H,W.
    #[arg(long, default_value = "1,16,128,128")]
    shape: String,
    /// Latent element type: f32 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl LatentArgs {
    /// The shape and element type, checked (f32 or f64 only).
    pub(crate) fn parse(&self) -> Result<(Vec<usize>, DType)> {
        let shape = parse_shape(&self.shape)?;
        let dtype: DType = self
            .dtype
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--dtype: {e}"))?;
        if !dtype.is_compute() {
            anyhow::bail!("--dtype '{}': expected f32 or f64", self.dtype);
        }
        Ok((shape, dtype))
    }

    /// Sizes the global pool to `--threads` (once per process).
    pub(crate) fn set_threads(&self) -> Result<()> {
        set_threads(self.threads)
    }
}

/// A shape as the `shape=` value of a bench line: `B,C,H,W`.
pub(crate) fn shape_text(shape: &[usize]) -> String {
    shape
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `B,C,H,W` (or any comma-separated list of positive sizes).
pub(crate) fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Vec<usize> = s
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!("--shape '{s}': expected comma-separated sizes such as 1,16,128,128")
        })?;
    if dims.is_empty() || dims.contains(&0) {
        anyhow::bail!("--shape '{s}': every size must be at least 1");
    }
    Ok(dims)
}
