//! `flux bench sampler`: the whole sampler loop, denoiser time measured separately.

use super::{LatentArgs, median, shape_text};
use anyhow::{Context, Result};
use clap::Args;
use flux_kernels::{Backend, Cpu, SamplerOps, Tensor};
use flux_samplers::noise::{randn, reference_noise};
use flux_samplers::toy::MixtureDenoiser;
use flux_samplers::{Denoised, Denoiser, SampleContext, Sampler, SamplerOptions, sample};
use flux_schedulers::{ModelSampling, Scheduler, ksampler_sigmas};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `flux bench sampler`.
#[derive(Args, Debug)]
pub struct SamplerBenchArgs {
    /// Sampler name (as the API spells it).
    #[arg(long)]
    sampler: String,
    /// Number of steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[command(flatten)]
    latent: LatentArgs,
    /// Seed of the initial and sampler noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Wraps a denoiser and adds up the time spent inside it.
struct Timed<D> {
    inner: D,
    spent: Duration,
}

impl<B: Backend, D: Denoiser<B>> Denoiser<B> for Timed<D> {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        let t = Instant::now();
        let out = self.inner.denoise(backend, x, sigma, want_uncond);
        self.spent += t.elapsed();
        out
    }
}

/// One timed run: (total seconds, seconds inside the denoiser).
fn run_once(
    backend: Cpu,
    sampler: Sampler,
    model: &ModelSampling,
    x0: &Tensor<Cpu>,
    sigmas: &[f64],
    seed: u64,
) -> Result<(f64, f64)> {
    let mut denoiser = Timed {
        inner: MixtureDenoiser::reference(1.0, true),
        spent: Duration::ZERO,
    };
    let mut noise = reference_noise::<Cpu>(sampler, seed, sigmas)?;
    let start = Instant::now();
    let x = backend.copy(x0)?;
    let mut ctx = SampleContext {
        backend: &backend,
        model,
        denoiser: &mut denoiser,
        noise: noise.as_mut(),
        callback: None,
    };
    let out = sample(sampler, &mut ctx, x, sigmas, &SamplerOptions::default())
        .with_context(|| format!("sampler {sampler} failed"))?;
    let total = start.elapsed().as_secs_f64();
    // Keep the result observable so the loop cannot be optimised away.
    std::hint::black_box(backend.max_abs(&out)?);
    Ok((total, denoiser.spent.as_secs_f64()))
}

/// Runs the measurement and prints its one line.
pub fn run(args: &SamplerBenchArgs) -> Result<ExitCode> {
    let sampler: Sampler = args.sampler.parse()?;
    let (shape, dtype) = args.latent.parse()?;
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    args.latent.set_threads()?;
    let model = ModelSampling::flux_dev();
    let sigmas: Vec<f64> = ksampler_sigmas(
        Scheduler::Simple,
        &model,
        args.steps,
        1.0,
        sampler.discards_penultimate_sigma(),
    )?
    .into_iter()
    .map(f64::from)
    .collect();
    let backend = Cpu::new();
    let noise = randn(&shape, args.seed, dtype)?;
    // sigma_0 is 1 for flux-dev's full schedule, so the start latent is the noise itself.
    let x0 = backend.upload(noise.as_host(), &shape, dtype)?;
    // Each run is made on a thread of the rayon pool, as an embedder that calls the sampler
    // from its own parallel code does: the CPU backend's parallel ops then split their work
    // with the other workers directly, instead of handing every op from this thread to the
    // pool and waiting for it (a few microseconds per op, which would be counted as overhead).
    let once = || rayon::scope(|_| run_once(backend, sampler, &model, &x0, &sigmas, args.seed));
    once()?;
    let mut totals = Vec::new();
    let mut overheads = Vec::new();
    for _ in 0..5 {
        let (total, inside) = once()?;
        totals.push(total);
        overheads.push((total - inside).max(0.0) / args.steps as f64);
    }
    println!(
        "sampler={sampler} shape={} steps={} total_s={:.6e} overhead_per_step_s={:.6e}",
        shape_text(&shape),
        args.steps,
        median(totals),
        median(overheads)
    );
    Ok(ExitCode::SUCCESS)
}
