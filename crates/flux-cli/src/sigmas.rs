//! `flux schedulers` (the scheduler names) and `flux sigmas` (one schedule, as ComfyUI's KSampler
//! computes it).

use anyhow::{Result, bail};
use clap::Args;
use flux_samplers::Sampler;
use flux_schedulers::{MODEL_NAMES, ModelSampling, Scheduler, ksampler_sigmas};
use std::process::ExitCode;

/// Arguments of `flux sigmas`. Values are taken as text and validated here, so a bad one gives a
/// single line naming the flag and the allowed values.
#[derive(Args, Debug)]
pub struct SigmasArgs {
    /// Scheduler name (see `flux schedulers`).
    #[arg(long)]
    pub scheduler: String,
    /// Number of sampling steps (a positive integer).
    #[arg(long)]
    pub steps: String,
    /// Denoise strength: 1 for the full schedule, less for img2img (the last steps + 1 sigmas of
    /// a longer schedule), 0 or less for none.
    #[arg(long, default_value = "1.0")]
    pub denoise: String,
    /// Model whose sigma table is used.
    #[arg(long, default_value = "flux-dev")]
    pub model: String,
    /// Flow shift override for the Flux models (flux-dev 1.15, flux-schnell 1.0 by default).
    #[arg(long)]
    pub shift: Option<String>,
    /// Sampler the schedule is for; dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2 make ComfyUI
    /// drop the penultimate sigma.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Print a JSON array instead of one sigma per line.
    #[arg(long)]
    pub json: bool,
}

/// Prints every scheduler name with a one-line description.
pub fn list() -> ExitCode {
    let width = Scheduler::ALL
        .iter()
        .map(|s| s.name().len())
        .max()
        .unwrap_or(0);
    for s in Scheduler::ALL {
        println!("{:width$}  {}", s.name(), s.description());
    }
    ExitCode::SUCCESS
}

/// Prints every sampler name with its one-line description.
pub fn list_samplers() -> ExitCode {
    let width = flux_samplers::Sampler::ALL
        .iter()
        .map(|s| s.name().len())
        .max()
        .unwrap_or(0);
    for s in flux_samplers::Sampler::ALL {
        println!("{:width$}  {}", s.name(), s.description());
    }
    ExitCode::SUCCESS
}

fn parse_number(flag: &str, value: &str, what: &str) -> Result<f64> {
    match value.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => bail!("invalid value '{value}' for --{flag}: expected {what}"),
    }
}

/// Computes and prints the schedule.
pub fn run(args: &SigmasArgs) -> Result<ExitCode> {
    let Ok(scheduler) = args.scheduler.parse::<Scheduler>() else {
        bail!(
            "invalid value '{}' for --scheduler: expected one of {}",
            args.scheduler,
            Scheduler::valid_names()
        );
    };
    let steps = match args.steps.trim().parse::<usize>() {
        Ok(n) if (1..=flux_schedulers::MAX_STEPS).contains(&n) => n,
        _ => bail!(
            "invalid value '{}' for --steps: expected an integer from 1 to {}",
            args.steps,
            flux_schedulers::MAX_STEPS
        ),
    };
    let denoise = parse_number("denoise", &args.denoise, "a number (1 = full schedule)")?;
    let shift = args
        .shift
        .as_deref()
        .map(|s| parse_number("shift", s, "a finite number"))
        .transpose()?;
    if !MODEL_NAMES.contains(&args.model.as_str()) {
        bail!(
            "invalid value '{}' for --model: expected one of {}",
            args.model,
            MODEL_NAMES.join(", ")
        );
    }
    if shift.is_some() && args.model == "sd15" {
        bail!("invalid flag --shift for --model sd15: only flux-dev and flux-schnell have a shift");
    }
    let discard = match args.sampler.as_deref() {
        None => false,
        Some(name) => match name.parse::<Sampler>() {
            Ok(s) => s.discards_penultimate_sigma(),
            Err(_) => bail!(
                "invalid value '{name}' for --sampler: expected one of {}",
                Sampler::valid_names()
            ),
        },
    };
    let model = ModelSampling::from_name(&args.model, shift)?;
    let sigmas = ksampler_sigmas(scheduler, &model, steps, denoise, discard)?;
    // Shortest decimal forms that read back as the same float32 values.
    if args.json {
        // NaN (kl_optimal with one step) has no JSON number; it is written as null.
        println!("{}", serde_json::to_string(&sigmas)?);
    } else {
        for v in sigmas {
            println!("{v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
