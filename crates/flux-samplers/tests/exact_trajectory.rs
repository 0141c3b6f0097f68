//! Deterministic samplers against the closed-form solution of the sampling ODE.
//!
//! When the denoiser always returns the same `c`, the probability-flow ODE has the exact
//! solution `x(sigma) = a(sigma) c + sigma eps` with a constant `eps` (`a = 1` for eps models,
//! `1 - sigma` for flow models in half-logSNR samplers). Exponential integrators, UniPC and the
//! multistep corrections (which vanish on a constant prediction) must follow it to rounding, so
//! every model call's input is checked against that line and the output against `c`.

use flux_kernels::{Cpu, DType, SamplerOps, Tensor};
use flux_samplers::{
    Denoised, Denoiser, NoiseSource, SampleContext, Sampler, SamplerError, SamplerOptions, sample,
};
use flux_schedulers::ModelSampling;

/// Returns `c` for every input and records the inputs it saw.
struct Constant {
    c: Vec<f64>,
    seen: Vec<(f64, Vec<f64>)>,
}

impl Denoiser<Cpu> for Constant {
    fn denoise(
        &mut self,
        backend: &Cpu,
        x: &Tensor<Cpu>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<Cpu>> {
        self.seen.push((sigma, backend.download_f64(x)?));
        let c = || backend.from_vec_f64(self.c.clone(), x.shape());
        Ok(Denoised {
            denoised: c()?,
            uncond: if want_uncond { Some(c()?) } else { None },
        })
    }
}

/// Zero noise (the samplers below either draw none or scale their draws by zero).
struct Zeros;

impl NoiseSource<Cpu> for Zeros {
    fn sample(
        &mut self,
        backend: &Cpu,
        shape: &[usize],
        dtype: DType,
        _sigma: f64,
        _sigma_next: f64,
    ) -> flux_samplers::Result<Tensor<Cpu>> {
        Ok(backend.zeros(shape, dtype)?)
    }
}

const N: usize = 12;

fn run(
    sampler: Sampler,
    model: &ModelSampling,
    sigmas: &[f64],
    opts: &SamplerOptions,
    a0: f64,
) -> (Vec<f64>, Vec<f64>, Constant) {
    let cpu = Cpu::new();
    let c: Vec<f64> = (0..N).map(|i| 0.3 * (i as f64) - 1.1).collect();
    let eps: Vec<f64> = (0..N).map(|i| ((i * 7 % 5) as f64) - 2.0).collect();
    let x0: Vec<f64> = c
        .iter()
        .zip(&eps)
        .map(|(c, e)| a0 * c + sigmas[0] * e)
        .collect();
    let x = cpu.from_vec_f64(x0, &[1, N]).unwrap();
    let mut den = Constant {
        c: c.clone(),
        seen: Vec::new(),
    };
    let mut noise = Zeros;
    let out = {
        let mut ctx = SampleContext {
            backend: &cpu,
            model,
            denoiser: &mut den,
            noise: &mut noise,
            callback: None,
        };
        sample(sampler, &mut ctx, x, sigmas, opts).unwrap()
    };
    let out = cpu.download_f64(&out).unwrap();
    (out, eps, den)
}

fn max_dev(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn check(sampler: Sampler, model: &ModelSampling, sigmas: &[f64], opts: &SamplerOptions) {
    // UniPC runs the VE ODE (in VP form) for every model: its line is the eps-model one.
    let vp = matches!(sampler, Sampler::UniPc | Sampler::UniPcBh2);
    let a = |sigma: f64| {
        if model.is_flow() && !vp {
            1.0 - sigma
        } else {
            1.0
        }
    };
    let (out, eps, den) = run(sampler, model, sigmas, opts, a(sigmas[0]));
    assert!(!den.seen.is_empty(), "{sampler}: no model call");
    let line = |sigma: f64| -> Vec<f64> {
        let a = a(sigma);
        den.c
            .iter()
            .zip(&eps)
            .map(|(c, e)| a * c + sigma * e)
            .collect()
    };
    for (k, (sigma, x)) in den.seen.iter().enumerate() {
        let dev = max_dev(x, &line(*sigma));
        assert!(
            dev < 1e-12,
            "{sampler}: call {k} at sigma {sigma} is {dev:e} off the exact trajectory"
        );
    }
    let expected = if vp { line(0.001) } else { den.c.clone() };
    let dev = max_dev(&out, &expected);
    assert!(
        dev < 1e-12,
        "{sampler}: output {dev:e} off the exact end point"
    );
}

fn eta0() -> SamplerOptions {
    SamplerOptions {
        eta: Some(0.0),
        ..SamplerOptions::default()
    }
}

const DETERMINISTIC: &[Sampler] = &[
    Sampler::DpmppSde,
    Sampler::Dpmpp2mSde,
    Sampler::Dpmpp2mSdeHeun,
    Sampler::Dpmpp3mSde,
    Sampler::ExpHeun2X0,
    Sampler::ExpHeun2X0Sde,
    Sampler::Seeds2,
    Sampler::Seeds3,
    Sampler::UniPc,
    Sampler::UniPcBh2,
];

#[test]
fn eps_model_samplers_follow_the_exact_trajectory() {
    let model = ModelSampling::sd15();
    let sigmas = [14.6, 6.0, 2.5, 1.1, 0.45, 0.1, 0.0];
    for &s in DETERMINISTIC {
        check(s, &model, &sigmas, &eta0());
    }
    // Samplers stepping in -ln(sigma) or sigma: exact on eps models only.
    for s in [
        Sampler::ResMultistep,
        Sampler::ResMultistepCfgPp,
        Sampler::ResMultistepAncestral,
        Sampler::ResMultistepAncestralCfgPp,
        Sampler::GradientEstimation,
        Sampler::GradientEstimationCfgPp,
    ] {
        check(s, &model, &sigmas, &eta0());
    }
}

#[test]
fn flow_model_samplers_follow_the_exact_trajectory() {
    let model = ModelSampling::flux_dev();
    let sigmas = [0.93, 0.8, 0.62, 0.41, 0.22, 0.07, 0.0];
    for &s in DETERMINISTIC {
        check(s, &model, &sigmas, &eta0());
    }
}

#[test]
fn bad_options_are_rejected_with_their_name() {
    let model = ModelSampling::sd15();
    let sigmas = [14.6, 2.5, 0.0];
    let cpu = Cpu::new();
    let cases = [
        (Sampler::Dpmpp2mSde, "solver_type"),
        (Sampler::ExpHeun2X0, "solver_type"),
        (Sampler::DpmppSde, "eta"),
        (Sampler::ErSde, "max_stage"),
        (Sampler::SaSolver, "predictor_order"),
    ];
    for (sampler, option) in cases {
        let opts = SamplerOptions {
            solver_type: Some("bogus".into()),
            eta: Some(-1.0),
            max_stage: Some(7),
            predictor_order: Some(0),
            ..SamplerOptions::default()
        };
        let mut den = Constant {
            c: vec![0.0; N],
            seen: Vec::new(),
        };
        let mut noise = Zeros;
        let mut ctx = SampleContext {
            backend: &cpu,
            model: &model,
            denoiser: &mut den,
            noise: &mut noise,
            callback: None,
        };
        let x = cpu.from_vec_f64(vec![1.0; N], &[1, N]).unwrap();
        match sample(sampler, &mut ctx, x, &sigmas, &opts) {
            Err(SamplerError::InvalidOption { option: o, .. }) => {
                assert_eq!(o, option, "{sampler}");
            }
            other => panic!("{sampler}: expected an invalid {option}, got {other:?}"),
        }
    }
}
