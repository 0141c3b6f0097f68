//! `flux bench copy`: the time to read and write a latent once, the unit of the samplers'
//! overhead target (a sampler's own work per step should stay below three such copies).
//!
//! It is measured under the conditions of `flux bench sampler`: the same element type and
//! shape, on a worker of the same rayon pool, the source warm in the cache as a latent is
//! between two passes of a sampler step, split into the same pieces the CPU backend's
//! elementwise passes use.

use super::{LatentArgs, median, shape_text};
use anyhow::Result;
use clap::Args;
use rayon::prelude::*;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

/// Elements per parallel piece, and the size from which a pass is split, as the CPU
/// backend's elementwise passes do.
const PIECE: usize = 1 << 14;
const PARALLEL_FROM: usize = 1 << 16;

/// Arguments of `flux bench copy`.
#[derive(Args, Debug)]
pub struct CopyBenchArgs {
    #[command(flatten)]
    latent: LatentArgs,
    /// Copies per timed run (each run's time is divided by this).
    #[arg(long, default_value_t = 200)]
    reps: usize,
}

/// Seconds per copy of `src` into `dst` (elements of `elem` bytes), averaged over `reps`.
fn time_copies(dst: &mut [u8], src: &[u8], elem: usize, reps: usize) -> f64 {
    let piece = PIECE * elem;
    let start = Instant::now();
    for _ in 0..reps {
        if src.len() >= PARALLEL_FROM * elem {
            dst.par_chunks_mut(piece)
                .zip(black_box(src).par_chunks(piece))
                .for_each(|(d, s)| d.copy_from_slice(s));
        } else {
            dst.copy_from_slice(black_box(src));
        }
        black_box(&mut *dst);
    }
    start.elapsed().as_secs_f64() / reps as f64
}

/// Runs the measurement and prints its one line.
pub fn run(args: &CopyBenchArgs) -> Result<ExitCode> {
    let (shape, dtype) = args.latent.parse()?;
    if args.reps == 0 {
        anyhow::bail!("--reps must be at least 1");
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow::anyhow!("--shape {}: too many elements", shape_text(&shape)))?;
    args.latent.set_threads()?;
    let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; bytes];
    // On a pool worker, as `flux bench sampler` runs its loop.
    let mut once =
        || rayon::scope(|_| time_copies(&mut dst, &src, dtype.size_in_bytes(), args.reps));
    once();
    let per_copy = median((0..5).map(|_| once()).collect());
    println!(
        "bench=copy shape={} dtype={dtype} bytes={bytes} copy_s={per_copy:.6e} three_copies_s={:.6e}",
        shape_text(&shape),
        3.0 * per_copy
    );
    Ok(ExitCode::SUCCESS)
}
