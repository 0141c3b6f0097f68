//! Properties of the samplers that hold for any data: determinism for a fixed seed, convergence
//! of the ODE samplers to the exact probability-flow solution, and no noise draws from the
//! deterministic ones.
//!
//! Convergence uses a single-Gaussian data distribution `x0 ~ N(mu, s^2)`, for which the
//! probability-flow ODE `dx/dsigma = (x - D(x, sigma)) / sigma` has a closed-form solution.
//! Derivation: with `x = a x0 + sigma eps` the marginal at `sigma` is `N(a mu, v)`,
//! `v = a^2 s^2 + sigma^2`, and the posterior mean is `D = mu + a s^2 (x - a mu) / v`. For the
//! variance-exploding model (`a = 1`), `y = x - mu` obeys `dy/dsigma = y sigma / (s^2 + sigma^2)`,
//! so `y / sqrt(s^2 + sigma^2)` is constant. For the flow model (`a = 1 - sigma`) the same
//! holds for `(x - a mu) / sqrt(v)`: the ODE transports the Gaussian marginals by the monotone
//! affine map between them (the deterministic flow of a Gaussian family is that map). Hence
//! `x(0) = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + sigma_T^2)`.

use flux_kernels::{Cpu, DType, HostData, SamplerOps, Tensor};
use flux_samplers::noise::DefaultNoise;
use flux_samplers::toy::{Mixture, MixtureDenoiser};
use flux_samplers::{
    NoiseSource, Result, SampleContext, Sampler, SamplerError, SamplerOptions, sample,
};
use flux_schedulers::ModelSampling;
use proptest::prelude::*;

/// A noise source that fails when asked: proves a sampler draws nothing.
struct NoNoise;

impl NoiseSource<Cpu> for NoNoise {
    fn sample(
        &mut self,
        _: &Cpu,
        _: &[usize],
        _: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<Cpu>> {
        Err(SamplerError::Noise(format!(
            "unexpected draw for {sigma} -> {sigma_next}"
        )))
    }
}

fn run(
    sampler: Sampler,
    model: &ModelSampling,
    denoiser: &mut MixtureDenoiser,
    noise: &mut dyn NoiseSource<Cpu>,
    x: &[f64],
    sigmas: &[f64],
) -> Result<Vec<f64>> {
    let cpu = Cpu::new();
    let x = cpu.upload(HostData::F64(x), &[x.len()], DType::F64)?;
    let mut ctx = SampleContext {
        backend: &cpu,
        model,
        denoiser,
        noise,
        callback: None,
    };
    let out = sample(sampler, &mut ctx, x, sigmas, &SamplerOptions::default())?;
    Ok(cpu.download_f64(&out)?)
}

/// Geometric schedule from `hi` to `lo` in `n` steps, then 0.
fn schedule(hi: f64, lo: f64, n: usize) -> Vec<f64> {
    let mut s: Vec<f64> = (0..n)
        .map(|i| hi * (lo / hi).powf(i as f64 / (n - 1) as f64))
        .collect();
    s.push(0.0);
    s
}

/// Flow schedule from 1 to `lo`, uniform in sigma, then 0.
fn flow_schedule(lo: f64, n: usize) -> Vec<f64> {
    let mut s: Vec<f64> = (0..n)
        .map(|i| 1.0 - (1.0 - lo) * i as f64 / (n - 1) as f64)
        .collect();
    s.push(0.0);
    s
}

const ODE_SAMPLERS: &[Sampler] = &[
    Sampler::Euler,
    Sampler::Heun,
    Sampler::Dpm2,
    Sampler::Lms,
    Sampler::Dpmpp2m,
    Sampler::Ipndm,
    Sampler::IpndmV,
    Sampler::Deis,
];

fn gaussian_denoiser(mu: f64, s: f64, flow: bool) -> MixtureDenoiser {
    MixtureDenoiser::new(
        Mixture::gaussian(mu, s),
        Mixture::gaussian(mu, s),
        1.0,
        flow,
    )
}

fn max_err(out: &[f64], exact: &[f64]) -> f64 {
    out.iter()
        .zip(exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn ode_samplers_converge_to_the_exact_flow(
        mu in -1.0f64..1.0,
        s in 0.3f64..1.5,
        z in proptest::collection::vec(-2.0f64..2.0, 4),
        flow in any::<bool>(),
    ) {
        let model = if flow { ModelSampling::flux(1.0) } else { ModelSampling::sd15() };
        let (sigma_t, a_t) = if flow { (1.0, 0.0) } else { (14.0, 1.0) };
        let v = (a_t * a_t * s * s + sigma_t * sigma_t).sqrt();
        let x_t: Vec<f64> = z.iter().map(|z| a_t * mu + v * z).collect();
        let exact: Vec<f64> = z.iter().map(|z| mu + s * z).collect();
        for &sampler in ODE_SAMPLERS {
            let errs: Vec<f64> = [8usize, 16, 256].iter().map(|&n| {
                let sig = if flow { flow_schedule(1e-3, n) } else { schedule(sigma_t, 1e-3, n) };
                let mut den = gaussian_denoiser(mu, s, flow);
                let out = run(sampler, &model, &mut den, &mut NoNoise, &x_t, &sig)
                    .unwrap_or_else(|e| panic!("{sampler}: {e}"));
                max_err(&out, &exact)
            }).collect();
            // Every one is at least first order: 16x the steps cuts the error well over 3x. The
            // coarse error is the larger of 8 and 16 steps: at one step count the error of a
            // high-order method can cancel by chance (deis lands within 2e-6 at 8 steps on
            // some cases, then 1e-3 at 16).
            let coarse = errs[0].max(errs[1]);
            prop_assert!(errs[2] < 5e-2 * s, "{sampler}: error {} at 256 steps", errs[2]);
            prop_assert!(
                3.0 * errs[2] < coarse || errs[2] < 1e-6,
                "{sampler}: error {} (8 or 16 steps) -> {} (256 steps)", coarse, errs[2]
            );
        }
    }

    #[test]
    fn stochastic_samplers_are_deterministic_for_a_seed(
        seed in 0u64..1_000_000,
        x in proptest::collection::vec(-3.0f64..3.0, 16),
    ) {
        let model = ModelSampling::flux(1.15);
        let sig = flow_schedule(0.05, 5);
        for sampler in [Sampler::EulerAncestral, Sampler::Dpmpp2sAncestral, Sampler::Lcm, Sampler::Ddpm] {
            let mut outs = Vec::new();
            for _ in 0..2 {
                let mut den = MixtureDenoiser::reference(1.0, true);
                let mut noise = DefaultNoise::new(seed);
                outs.push(run(sampler, &model, &mut den, &mut noise, &x, &sig).unwrap());
            }
            prop_assert_eq!(&outs[0], &outs[1], "{}", sampler);
            let mut den = MixtureDenoiser::reference(1.0, true);
            let mut other = DefaultNoise::new(seed + 1);
            let third = run(sampler, &model, &mut den, &mut other, &x, &sig).unwrap();
            prop_assert_ne!(&outs[0], &third, "{} ignores the seed", sampler);
        }
    }
}

/// A source that passes draws to the one it wraps and keeps the trait's defaults for the rest:
/// `skip` samples and drops the tensor (a torch-compatible source then draws even where the
/// sampler only needs the generator to move on), `promise_below` is ignored.
struct Defaults<S>(S);

impl<S: NoiseSource<Cpu>> NoiseSource<Cpu> for Defaults<S> {
    fn sample(
        &mut self,
        backend: &Cpu,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<Cpu>> {
        self.0.sample(backend, shape, dtype, sigma, sigma_next)
    }
}

/// The samplers that skip draws their reference makes but multiplies by zero give, with the
/// torch-compatible source, exactly what drawing them gives, and leave it at the same draw.
#[test]
fn skipped_draws_change_nothing() {
    let model = ModelSampling::flux(1.15);
    let sig = flow_schedule(0.05, 6);
    // 40 elements: the torch generator's block path with a partial last block.
    let x: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin() * 2.0).collect();
    for sampler in [
        Sampler::ResMultistep,
        Sampler::ResMultistepCfgPp,
        Sampler::DpmFast,
        Sampler::DpmAdaptive,
    ] {
        let mut skipping = DefaultNoise::new(3);
        let mut drawing = Defaults(DefaultNoise::new(3));
        let mut den = MixtureDenoiser::reference(2.0, true);
        let a = run(sampler, &model, &mut den, &mut skipping, &x, &sig).unwrap();
        let mut den = MixtureDenoiser::reference(2.0, true);
        let b = run(sampler, &model, &mut den, &mut drawing, &x, &sig).unwrap();
        assert_eq!(a, b, "{sampler}");
        assert_eq!(skipping.draws(), drawing.0.draws(), "{sampler}");
        assert!(skipping.draws() > 0, "{sampler} made no draw to skip");
        let cpu = Cpu::new();
        let next = |n: &mut DefaultNoise| {
            let t = n.sample(&cpu, &[40], DType::F64, 0.5, 0.2).unwrap();
            cpu.download_f64(&t).unwrap()
        };
        assert_eq!(next(&mut skipping), next(&mut drawing.0), "{sampler}");
    }
}

#[test]
fn deterministic_samplers_draw_no_noise() {
    let x = [0.3, -1.2, 2.0, 0.0];
    for (model, sig) in [
        (ModelSampling::flux(1.15), flow_schedule(0.02, 6)),
        (ModelSampling::sd15(), schedule(14.6, 0.03, 6)),
    ] {
        for sampler in [
            Sampler::Euler,
            Sampler::EulerCfgPp,
            Sampler::Heun,
            Sampler::Heunpp2,
            Sampler::Dpm2,
            Sampler::Lms,
            Sampler::Dpmpp2m,
            Sampler::Dpmpp2mCfgPp,
            Sampler::Ipndm,
            Sampler::IpndmV,
            Sampler::Deis,
            Sampler::Ddim,
        ] {
            let mut den = MixtureDenoiser::reference(2.0, model.is_flow());
            let out = run(sampler, &model, &mut den, &mut NoNoise, &x, &sig);
            let out = out.unwrap_or_else(|e| panic!("{sampler}: {e}"));
            assert!(out.iter().all(|v| v.is_finite()), "{sampler}: {out:?}");
        }
    }
}

#[test]
fn the_callback_sees_every_step_and_can_cancel() {
    let cpu = Cpu::new();
    let model = ModelSampling::flux(1.15);
    let sig = flow_schedule(0.02, 6);
    let mut den = MixtureDenoiser::reference(1.0, true);
    let mut steps = Vec::new();
    let mut cb = |info: &flux_samplers::StepInfo<'_, Cpu>| {
        steps.push((info.step, info.total));
        info.step < 2
    };
    let x = cpu
        .upload(HostData::F64(&[0.5; 4]), &[4], DType::F64)
        .unwrap();
    let mut noise = NoNoise;
    let mut ctx = SampleContext {
        backend: &cpu,
        model: &model,
        denoiser: &mut den,
        noise: &mut noise,
        callback: Some(&mut cb),
    };
    let err = sample(
        Sampler::Euler,
        &mut ctx,
        x,
        &sig,
        &SamplerOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, SamplerError::Cancelled { step: 2, total: 6 }),
        "{err}"
    );
    assert_eq!(steps, [(0, 6), (1, 6), (2, 6)]);
}

/// A one-step schedule (what a request for one step gets: `[1, 0]`, or `[0.00063, 0]` from
/// `ddim_uniform`) runs on every sampler, the SDE ones with their Brownian tree built over its
/// single positive sigma as the reference builds it; `dpm_adaptive`, whose smallest and
/// largest sigma are then the same, returns its input unchanged, as the reference does.
#[test]
fn every_sampler_takes_a_one_step_schedule() {
    let model = ModelSampling::flux_dev();
    let x = [0.3, -1.2, 0.8, 2.0, -0.1, 0.05];
    for sigmas in [vec![1.0, 0.0], vec![0.000_631_366_041_488_945_5, 0.0]] {
        for &sampler in Sampler::ALL.iter().filter(|s| s.is_implemented()) {
            let mut denoiser = gaussian_denoiser(0.2, 0.7, true);
            let mut tree;
            let mut default;
            let noise: &mut dyn NoiseSource<Cpu> = if sampler.uses_brownian_tree() {
                tree = flux_samplers::noise::BrownianTreeNoise::new(7, sigmas[0], sigmas[0])
                    .expect("a tree over one point");
                &mut tree
            } else {
                default = DefaultNoise::new(7);
                &mut default
            };
            let out = run(sampler, &model, &mut denoiser, noise, &x, &sigmas)
                .unwrap_or_else(|e| panic!("{sampler} on {sigmas:?}: {e}"));
            assert!(out.iter().all(|v| v.is_finite()), "{sampler}: {out:?}");
            if sampler == Sampler::DpmAdaptive {
                assert_eq!(out, x, "dpm_adaptive on {sigmas:?}");
            }
        }
    }
}

/// Passes draws through to a Brownian tree and checks the promises the sampler makes: every
/// draw after the one following a promise lies within `[0, promise]`.
struct PromiseChecker {
    inner: flux_samplers::noise::BrownianTreeNoise,
    /// The lowest promise in force (made before an earlier draw than the last one).
    in_force: f64,
    /// The lowest promise made since the last draw.
    pending: Option<f64>,
    promises: usize,
    broken: Vec<String>,
}

impl NoiseSource<Cpu> for PromiseChecker {
    fn sample(
        &mut self,
        backend: &Cpu,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<Cpu>> {
        if sigma.max(sigma_next) > self.in_force {
            self.broken.push(format!(
                "draw {sigma} -> {sigma_next} after a promise below {}",
                self.in_force
            ));
        }
        if let Some(p) = self.pending.take() {
            self.in_force = self.in_force.min(p);
        }
        self.inner.sample(backend, shape, dtype, sigma, sigma_next)
    }

    fn promise_below(&mut self, sigma: f64) {
        self.promises += 1;
        self.pending = Some(self.pending.map_or(sigma, |p| p.min(sigma)));
        NoiseSource::<Cpu>::promise_below(&mut self.inner, sigma);
    }
}

/// The Brownian-tree samplers promise, before their draws, that later draws stay below the
/// step's lower sigma (so the tree keeps only what those need), and they keep the promise,
/// for flow and eps models; the result equals a run whose source ignores promises.
#[test]
fn sde_samplers_keep_their_noise_promises() {
    let x = [
        0.3, -1.2, 0.8, 2.0, -0.1, 0.05, 1.1, -0.4, 0.6, 0.2, -0.9, 1.5, 0.0, 0.7, -0.3, 0.9,
    ];
    for (model, sigmas) in [
        (ModelSampling::flux_dev(), flow_schedule(0.05, 12)),
        (ModelSampling::sd15(), schedule(14.6, 0.03, 12)),
    ] {
        let lo = sigmas
            .iter()
            .copied()
            .filter(|&s| s > 0.0)
            .fold(f64::INFINITY, f64::min);
        let tree =
            || flux_samplers::noise::BrownianTreeNoise::new(11, lo, sigmas[0]).expect("tree");
        for &sampler in Sampler::ALL.iter().filter(|s| s.uses_brownian_tree()) {
            let mut checker = PromiseChecker {
                inner: tree(),
                in_force: f64::INFINITY,
                pending: None,
                promises: 0,
                broken: Vec::new(),
            };
            let mut denoiser = gaussian_denoiser(0.2, 0.7, model.is_flow());
            let out = run(sampler, &model, &mut denoiser, &mut checker, &x, &sigmas)
                .unwrap_or_else(|e| panic!("{sampler}: {e}"));
            assert!(checker.broken.is_empty(), "{sampler}: {:?}", checker.broken);
            assert!(
                checker.promises >= sigmas.len() - 3,
                "{sampler} made {} promises",
                checker.promises
            );
            // A source that ignores promises (the trait's default).
            let mut denoiser = gaussian_denoiser(0.2, 0.7, model.is_flow());
            let plain = run(
                sampler,
                &model,
                &mut denoiser,
                &mut Defaults(tree()),
                &x,
                &sigmas,
            )
            .unwrap_or_else(|e| panic!("{sampler}: {e}"));
            assert_eq!(out, plain, "{sampler}");
        }
    }
}
