//! An analytic test denoiser: the exact posterior mean of a Gaussian-mixture data distribution.
//!
//! Every element of the clean latent is drawn independently from `x0 ~ sum_k w_k N(mu_k, s_k^2)`
//! and observed as `x = a x0 + sigma eps` (`a = 1 - sigma` for flow models, `a = 1` for the
//! eps models' variance-exploding `x`). The denoiser returns `E[x0 | x]`, so it is a perfect
//! network for that data: samplers can be checked against the reference data to rounding
//! error, and convergence tests have a known answer.

use crate::{Denoised, Denoiser, Result, SamplerError};
use flux_kernels::{Backend, HostData, Tensor, simd_dispatch};
use rayon::prelude::*;

/// A Gaussian mixture over one scalar: weights, means and standard deviations.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixture {
    /// Component weights (positive; they need not sum to 1, only their ratios matter).
    pub w: Vec<f64>,
    /// Component means.
    pub mu: Vec<f64>,
    /// Component standard deviations.
    pub s: Vec<f64>,
}

impl Mixture {
    /// A mixture from its components; all three lists must have the same non-zero length,
    /// weights must be positive and deviations non-negative.
    pub fn new(w: Vec<f64>, mu: Vec<f64>, s: Vec<f64>) -> Result<Self> {
        if w.is_empty() || w.len() != mu.len() || w.len() != s.len() {
            return Err(SamplerError::Denoiser(format!(
                "mixture needs equally long, non-empty w/mu/s (got {}, {}, {})",
                w.len(),
                mu.len(),
                s.len()
            )));
        }
        if w.iter().any(|&v| !(v > 0.0 && v.is_finite())) {
            return Err(SamplerError::Denoiser(format!(
                "mixture weights must be positive and finite, got {w:?}"
            )));
        }
        if s.iter().any(|&v| !(v >= 0.0 && v.is_finite())) || mu.iter().any(|v| !v.is_finite()) {
            return Err(SamplerError::Denoiser(format!(
                "mixture means must be finite and deviations non-negative, got mu {mu:?} s {s:?}"
            )));
        }
        Ok(Self { w, mu, s })
    }

    /// A single Gaussian `N(mu, s^2)`.
    pub fn gaussian(mu: f64, s: f64) -> Self {
        Self {
            w: vec![1.0],
            mu: vec![mu],
            s: vec![s],
        }
    }

    /// `E[x0 | a x0 + sigma eps = x]`.
    pub fn posterior_mean(&self, x: f64, a: f64, sigma: f64) -> f64 {
        self.at(a, sigma).mean(x)
    }

    /// The posterior at one `(a, sigma)`: every quantity that does not depend on `x`, computed
    /// once per call instead of once per element (the same operations in the same order, so
    /// the means are bit for bit those of the per-element formula).
    pub fn at(&self, a: f64, sigma: f64) -> Posterior {
        let comps = (0..self.w.len())
            .map(|i| {
                let s2 = self.s[i] * self.s[i];
                let v = a * a * s2 + sigma * sigma;
                Component {
                    log_norm: self.w[i].ln() - 0.5 * v.ln(),
                    a_mu: a * self.mu[i],
                    v,
                    mu: self.mu[i],
                    gain: a * s2,
                }
            })
            .collect();
        Posterior::new(comps)
    }
}

/// One mixture component's constants at a fixed `(a, sigma)`.
#[derive(Clone, Copy, Debug)]
struct Component {
    /// `ln w - ln v / 2`.
    log_norm: f64,
    /// `a mu`.
    a_mu: f64,
    /// `a^2 s^2 + sigma^2`, the variance of `x` under the component.
    v: f64,
    /// `mu`.
    mu: f64,
    /// `a s^2`.
    gain: f64,
}

impl Component {
    /// Log responsibility (unnormalised) and posterior mean at `x`.
    #[inline]
    fn eval(&self, x: f64) -> (f64, f64) {
        let r = x - self.a_mu;
        (
            self.log_norm - 0.5 * r * r / self.v,
            self.mu + self.gain * r / self.v,
        )
    }
}

/// A [`Mixture`]'s posterior mean at one `(a, sigma)`, ready to evaluate per element.
#[derive(Clone, Debug)]
pub struct Posterior {
    comps: Vec<Component>,
    /// The two-component fast path's constants, when it applies (computed once per call).
    pair: Option<Pair>,
}

impl Posterior {
    /// `E[x0 | x]`.
    #[inline]
    pub fn mean(&self, x: f64) -> f64 {
        if let Some(pair) = &self.pair
            && x.abs() <= Pair::MAX_ABS_X
        {
            return pair.mean(x);
        }
        self.general_mean(x)
    }

    /// Replaces every value of `block` with its posterior mean; the same values as [`mean`]
    /// element by element, vectorised for two-component mixtures.
    ///
    /// [`mean`]: Posterior::mean
    pub fn mean_in_place(&self, block: &mut [f64]) {
        match &self.pair {
            Some(pair) => pair.apply(block, self),
            None => block.iter_mut().for_each(|v| *v = self.general_mean(*v)),
        }
    }

    fn new(comps: Vec<Component>) -> Self {
        let pair = match comps.as_slice() {
            [c0, c1] => Pair::new(c0, c1),
            _ => None,
        };
        Self { comps, pair }
    }

    /// The softmax-weighted mean of any number of components, for any inputs (infinities and
    /// NaN included).
    fn general_mean(&self, x: f64) -> f64 {
        let comps = self.comps.as_slice();
        // A fixed-size stack buffer avoids a per-element allocation for the usual small
        // mixtures.
        let mut buf = [(0.0f64, 0.0f64); 8];
        if comps.len() > buf.len() {
            let parts: Vec<(f64, f64)> = comps.iter().map(|c| c.eval(x)).collect();
            return softmax_mean(&parts);
        }
        for (b, c) in buf.iter_mut().zip(comps) {
            *b = c.eval(x);
        }
        softmax_mean(&buf[..comps.len()])
    }
}

/// A two-component posterior with every per-call constant hoisted, including the reciprocal
/// variances, so an element costs one `exp` and one division. Only built when every constant
/// is finite and both variances are positive; with `|x| <= MAX_ABS_X` the logits are then
/// finite too.
#[derive(Clone, Copy, Debug)]
struct Pair {
    log_norm: [f64; 2],
    a_mu: [f64; 2],
    /// `1 / (2 v)`.
    half_inv_v: [f64; 2],
    mu: [f64; 2],
    /// `a s^2 / v`.
    gain_over_v: [f64; 2],
}

impl Pair {
    /// Inputs beyond this magnitude (or NaN) take the general path: `x^2` stays finite below.
    const MAX_ABS_X: f64 = 1e100;

    fn new(c0: &Component, c1: &Component) -> Option<Pair> {
        let pair = Pair {
            log_norm: [c0.log_norm, c1.log_norm],
            a_mu: [c0.a_mu, c1.a_mu],
            half_inv_v: [0.5 / c0.v, 0.5 / c1.v],
            mu: [c0.mu, c1.mu],
            gain_over_v: [c0.gain / c0.v, c1.gain / c1.v],
        };
        let consts = [
            pair.log_norm,
            pair.a_mu,
            pair.half_inv_v,
            pair.mu,
            pair.gain_over_v,
        ];
        let ok = c0.v > 0.0
            && c1.v > 0.0
            && consts
                .iter()
                .flatten()
                .all(|v| v.is_finite() && v.abs() < 1e100);
        ok.then_some(pair)
    }

    /// The posterior mean of one finite `x` with `|x| <= MAX_ABS_X`.
    #[allow(clippy::inline_always)] // inlined into the feature-compiled block loops
    #[inline(always)]
    fn mean(&self, x: f64) -> f64 {
        let r0 = x - self.a_mu[0];
        let r1 = x - self.a_mu[1];
        let l0 = self.log_norm[0] - r0 * r0 * self.half_inv_v[0];
        let l1 = self.log_norm[1] - r1 * r1 * self.half_inv_v[1];
        let m0 = self.mu[0] + self.gain_over_v[0] * r0;
        let m1 = self.mu[1] + self.gain_over_v[1] * r1;
        // Softmax of two logits: the larger one's weight is 1, the other's exp(-|l0 - l1|).
        let d = l0 - l1;
        let e = exp_nonpositive(-d.abs());
        let (big, small) = if d >= 0.0 { (m0, m1) } else { (m1, m0) };
        (big + e * small) / (1.0 + e)
    }

    /// [`Pair::mean`] over a block, compiled for the widest vector unit the CPU has (the
    /// values do not depend on it).
    fn apply(&self, block: &mut [f64], post: &Posterior) {
        let pair = self;
        simd_dispatch!(pair_apply, pair_apply_avx512, pair_apply_avx2, (pair: &Pair, block: &mut [f64], post: &Posterior) -> ());
    }
}

/// [`Pair::apply`]'s loop: chunks with an input the fast path does not take go to the general
/// path.
#[allow(clippy::inline_always)] // inlined into the feature-compiled variants
#[inline(always)]
fn pair_apply(pair: &Pair, block: &mut [f64], post: &Posterior) {
    for chunk in block.chunks_mut(64) {
        // `max` skips NaN, so NaN is looked for on its own.
        let largest = chunk.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if largest > Pair::MAX_ABS_X || chunk.iter().any(|v| v.is_nan()) {
            for v in chunk.iter_mut() {
                *v = post.mean(*v);
            }
            continue;
        }
        for v in chunk.iter_mut() {
            *v = pair.mean(*v);
        }
    }
}

/// `exp(x)` for `x <= 0` (0 below -708, where the result would be subnormal), written so a
/// loop over it vectorises: Cody-Waite reduction by `n ln 2`, the degree-13 Taylor polynomial
/// on `|r| <= ln(2)/2` (truncation below 1e-17 relative), and `2^n` built from its bits.
/// Within 2 ulp of the correctly rounded value; fused multiply-adds make it the same on every
/// CPU.
#[allow(clippy::inline_always)] // inlined into the feature-compiled block loops
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact for every |n| < 2^11.
    const LN2_HI: f64 = 6.931_471_803_691_238_2e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // 1/k! for k = 13 down to 2.
    const C: [f64; 12] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    let xc = if x < -708.0 { -708.0 } else { x };
    let n = (xc * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, xc);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = C[0];
    for &c in &C[1..] {
        p = p.mul_add(r, c);
    }
    let p = p.mul_add(r, 1.0).mul_add(r, 1.0);
    // 2^n: n + 1023 lands in the low mantissa bits of 2^52 + n + 1023; shifted into the
    // exponent field it is the power of two (n is in [-1022, 0] here).
    let biased = (n + 1023.0 + 4_503_599_627_370_496.0).to_bits();
    let scale = f64::from_bits(biased << 52);
    if x < -708.0 { 0.0 } else { p * scale }
}

/// `exp(l - max)`; the largest logit gives exactly 1 (`exp(0)`), without calling `exp`.
#[inline]
fn exp_shifted(l: f64, max: f64) -> f64 {
    let d = l - max;
    if d == 0.0 { 1.0 } else { d.exp() }
}

fn softmax_mean(parts: &[(f64, f64)]) -> f64 {
    let max = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (num, den) = parts.iter().fold((0.0, 0.0), |(n, d), &(l, m)| {
        let e = exp_shifted(l, max);
        (n + e * m, d + e)
    });
    num / den
}

/// One recorded denoiser call.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    /// The input latent.
    pub x: Vec<f64>,
    /// The sigma it was called at.
    pub sigma: f64,
    /// What was returned (after guidance).
    pub denoised: Vec<f64>,
    /// The unconditional prediction, when it was evaluated.
    pub uncond: Option<Vec<f64>>,
}

/// The exact posterior-mean denoiser of two mixtures (conditional and unconditional) with
/// ComfyUI's classifier-free guidance `uncond + (cond - uncond) * cfg`.
///
/// As in ComfyUI, with `cfg == 1` the unconditional mixture is not evaluated unless the
/// sampler asks for it (cfg++ samplers), and the result is the conditional prediction.
#[derive(Clone, Debug)]
pub struct MixtureDenoiser {
    cond: Mixture,
    uncond: Mixture,
    cfg: f64,
    flow: bool,
    calls: usize,
    record: Option<Vec<RecordedCall>>,
}

impl MixtureDenoiser {
    /// A denoiser for a flow model (`a = 1 - sigma`) when `flow`, else an eps model (`a = 1`).
    pub fn new(cond: Mixture, uncond: Mixture, cfg: f64, flow: bool) -> Self {
        Self {
            cond,
            uncond,
            cfg,
            flow,
            calls: 0,
            record: None,
        }
    }

    /// The public reference data's mixtures (cond `w=[0.3,0.7] mu=[-1,0.8] s=[0.25,0.5]`,
    /// uncond `w=[0.5,0.5] mu=[-0.5,0.5] s=[0.6,0.6]`).
    pub fn reference(cfg: f64, flow: bool) -> Self {
        Self::new(
            Mixture {
                w: vec![0.3, 0.7],
                mu: vec![-1.0, 0.8],
                s: vec![0.25, 0.5],
            },
            Mixture {
                w: vec![0.5, 0.5],
                mu: vec![-0.5, 0.5],
                s: vec![0.6, 0.6],
            },
            cfg,
            flow,
        )
    }

    /// Starts recording every call (inputs and outputs), dropping earlier records.
    pub fn with_recording(mut self) -> Self {
        self.record = Some(Vec::new());
        self
    }

    /// The calls recorded so far (empty when not recording).
    pub fn recorded(&self) -> &[RecordedCall] {
        self.record.as_deref().unwrap_or(&[])
    }

    /// Takes the recorded calls, leaving recording on with an empty list.
    pub fn take_recorded(&mut self) -> Vec<RecordedCall> {
        self.record.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// How many times the denoiser was called.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The signal scale `a` at `sigma`.
    fn scale(&self, sigma: f64) -> f64 {
        if self.flow { 1.0 - sigma } else { 1.0 }
    }

    /// Guided and unconditional predictions for host values.
    pub fn denoise_host(
        &self,
        x: &[f64],
        sigma: f64,
        want_uncond: bool,
    ) -> (Vec<f64>, Option<Vec<f64>>) {
        let a = self.scale(sigma);
        let cond_at = self.cond.at(a, sigma);
        let cond = means(&cond_at, x);
        if self.cfg == 1.0 && !want_uncond {
            return (cond, None);
        }
        let uncond_at = self.uncond.at(a, sigma);
        let uncond = means(&uncond_at, x);
        let guided = cond
            .iter()
            .zip(&uncond)
            .map(|(&c, &u)| u + (c - u) * self.cfg)
            .collect();
        (guided, want_uncond.then_some(uncond))
    }
}

/// Below this many elements the per-element work stays on the calling thread.
const PAR_ELEMENTS: usize = 1 << 15;

/// The posterior means of `x`, on the rayon pool for large latents (the elements are
/// independent, so the result does not depend on the split).
fn means(post: &Posterior, x: &[f64]) -> Vec<f64> {
    let mut out = x.to_vec();
    if out.len() >= PAR_ELEMENTS {
        out.par_chunks_mut(PAR_ELEMENTS / 8)
            .for_each(|c| post.mean_in_place(c));
    } else {
        post.mean_in_place(&mut out);
    }
    out
}

impl<B: Backend> Denoiser<B> for MixtureDenoiser {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> Result<Denoised<B>> {
        self.calls += 1;
        if self.record.is_none() && !want_uncond {
            // The common call: the backend streams the latent through the formula block by
            // block, without a host copy of the whole tensor.
            let a = self.scale(sigma);
            let cond = self.cond.at(a, sigma);
            let denoised = if self.cfg == 1.0 {
                backend.map_f64(x, &|b| cond.mean_in_place(b))?
            } else {
                let (uncond, cfg) = (self.uncond.at(a, sigma), self.cfg);
                backend.map_f64(x, &|b| {
                    for v in b.iter_mut() {
                        let (c, u) = (cond.mean(*v), uncond.mean(*v));
                        *v = u + (c - u) * cfg;
                    }
                })?
            };
            return Ok(Denoised {
                denoised,
                uncond: None,
            });
        }
        let host = backend.download_f64(x)?;
        let (denoised, uncond) = self.denoise_host(&host, sigma, want_uncond);
        let up = |v: &[f64]| backend.upload(HostData::F64(v), x.shape(), x.dtype());
        let out = Denoised {
            denoised: up(&denoised)?,
            uncond: uncond.as_deref().map(up).transpose()?,
        };
        if let Some(rec) = self.record.as_mut() {
            rec.push(RecordedCall {
                x: host,
                sigma,
                denoised,
                uncond,
            });
        }
        Ok(out)
    }
}

/// Runs `sampler` with its default options on `backend` over a fixed small case: an 8-step
/// flow schedule (Flux's shift 1.15), a `[1,4,9,7]` f32 start latent with a fixed pattern, the
/// reference mixture denoiser and the sampler's reference noise (seed 42). Returns the result
/// widened to f64. Backends compare their run with the CPU's: every sampler, every op it uses.
pub fn backend_check_run<B: Backend>(backend: &B, sampler: crate::Sampler) -> Result<Vec<f64>> {
    let model = flux_schedulers::ModelSampling::flux(1.15);
    let sigmas: Vec<f64> = (0..=8).map(|i| 1.0 - f64::from(i) / 8.0).collect();
    let shape = [1usize, 4, 9, 7];
    let n: usize = shape.iter().product();
    let start: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let x = backend.upload(HostData::F32(&start), &shape, flux_kernels::DType::F32)?;
    let mut denoiser = MixtureDenoiser::reference(1.0, true);
    let mut noise = crate::noise::reference_noise::<B>(sampler, 42, &sigmas)?;
    let mut ctx = crate::SampleContext {
        backend,
        model: &model,
        denoiser: &mut denoiser,
        noise: noise.as_mut(),
        callback: None,
    };
    let out = crate::sample(
        sampler,
        &mut ctx,
        x,
        &sigmas,
        &crate::SamplerOptions::default(),
    )?;
    Ok(backend.download_f64(&out)?)
}

/// Runs every implemented sampler through [`backend_check_run`] on `backend` and on the CPU
/// and returns how many ran and a line for each that failed on `backend` or differs from the
/// CPU by more than `tolerance` of the CPU result's largest magnitude (or is not finite).
/// The CPU run failing is a panic: that is a bug of the sampler, not of the backend.
pub fn every_sampler_against_cpu<B: Backend>(backend: &B, tolerance: f64) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut failures = Vec::new();
    for &s in crate::Sampler::ALL.iter().filter(|s| s.is_implemented()) {
        let want = match backend_check_run(&flux_kernels::Cpu, s) {
            Ok(v) => v,
            Err(e) => panic!("{} failed on the CPU: {e}", s.name()),
        };
        let got = match backend_check_run(backend, s) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{}: {e}", s.name()));
                continue;
            }
        };
        checked += 1;
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0f64, f64::max);
        if got.len() != want.len() || worst > tolerance || got.iter().any(|v| !v.is_finite()) {
            failures.push(format!(
                "{}: worst relative error {worst:.3e} ({} values, {} expected)",
                s.name(),
                got.len(),
                want.len()
            ));
        }
    }
    (checked, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU against itself: every implemented sampler runs and repeats its result exactly
    /// (the check that backends are held to, with no tolerance).
    #[test]
    fn every_sampler_check_run_repeats_on_the_cpu() {
        let (checked, failures) = super::every_sampler_against_cpu(&flux_kernels::Cpu, 0.0);
        let implemented = crate::Sampler::ALL
            .iter()
            .filter(|s| s.is_implemented())
            .count();
        assert_eq!(checked, implemented);
        assert!(checked >= 44, "{checked}");
        assert!(failures.is_empty(), "{failures:?}");
    }

    #[test]
    fn single_gaussian_posterior_is_linear() {
        // x = a x0 + sigma eps with x0 ~ N(mu, s^2): E[x0|x] = mu + a s^2 (x - a mu)/(a^2 s^2 + sigma^2).
        let g = Mixture::gaussian(0.3, 0.7);
        let (x, a, sigma) = (1.2_f64, 0.6_f64, 0.4_f64);
        let expected = 0.3 + a * 0.49 * (x - a * 0.3) / (a * a * 0.49 + sigma * sigma);
        assert!((g.posterior_mean(x, a, sigma) - expected).abs() < 1e-15);
    }

    #[test]
    fn pure_noise_gives_prior_mean_and_no_noise_gives_input() {
        let m = MixtureDenoiser::reference(1.0, true);
        let (d, _) = m.denoise_host(&[0.37], 1.0, false);
        assert!((d[0] - (-0.3 + 0.7 * 0.8)).abs() < 1e-14);
        let (d, _) = m.denoise_host(&[0.37], 1e-12, false);
        assert!((d[0] - 0.37).abs() < 1e-9);
    }

    /// The per-element formula written out directly, without hoisting anything.
    fn naive_mean(m: &Mixture, x: f64, a: f64, sigma: f64) -> f64 {
        let parts: Vec<(f64, f64)> = (0..m.w.len())
            .map(|i| {
                let s2 = m.s[i] * m.s[i];
                let v = a * a * s2 + sigma * sigma;
                let r = x - a * m.mu[i];
                let logit = m.w[i].ln() - 0.5 * v.ln() - 0.5 * r * r / v;
                (logit, m.mu[i] + a * s2 * r / v)
            })
            .collect();
        let max = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let (mut num, mut den) = (0.0, 0.0);
        for &(l, mean) in &parts {
            let e = (l - max).exp();
            num += e * mean;
            den += e;
        }
        num / den
    }

    #[test]
    fn hoisted_constants_match_the_per_element_formula() {
        let three = Mixture::new(
            vec![0.2, 0.5, 0.3],
            vec![-1.5, 0.1, 2.0],
            vec![0.3, 0.0, 0.8],
        )
        .unwrap();
        let ten = Mixture::new(
            (1..=10).map(f64::from).collect(),
            (0..10).map(|i| f64::from(i) * 0.4 - 2.0).collect(),
            (0..10).map(|i| 0.1 + f64::from(i) * 0.05).collect(),
        )
        .unwrap();
        let zero_s = Mixture::new(vec![0.4, 0.6], vec![-1.0, 1.0], vec![0.0, 0.3]).unwrap();
        let reference = MixtureDenoiser::reference(1.0, true);
        let mut worst = 0.0f64;
        for m in [&reference.cond, &reference.uncond, &zero_s, &three, &ten] {
            let two = m.w.len() == 2;
            for sigma in [1.0, 0.97, 0.5, 0.013, 1e-9] {
                let a = 1.0 - sigma;
                let at = m.at(a, sigma);
                for k in -400..400 {
                    let x = f64::from(k) * 0.0173 + 1e-3;
                    let want = naive_mean(m, x, a, sigma);
                    let got = at.mean(x);
                    assert_eq!(m.posterior_mean(x, a, sigma).to_bits(), got.to_bits());
                    if two {
                        // Reciprocal variances round the logits differently: an error of a
                        // few ulp of |l| in l0 - l1 moves the weight e = exp(-|l0 - l1|) by that
                        // much relative, which moves the mean by at most a quarter of it times
                        // |m0 - m1|; the means themselves carry a few ulp of their size.
                        let parts = [0, 1].map(|i| {
                            let s2 = m.s[i] * m.s[i];
                            let v = a * a * s2 + sigma * sigma;
                            let r = x - a * m.mu[i];
                            (
                                m.w[i].ln() - 0.5 * v.ln() - 0.5 * r * r / v,
                                m.mu[i] + a * s2 * r / v,
                            )
                        });
                        let l_max = parts[0].0.abs().max(parts[1].0.abs());
                        let m_max = parts[0].1.abs().max(parts[1].1.abs()).max(1.0);
                        let scale = f64::EPSILON * m_max * (1.0 + l_max);
                        let err = (got - want).abs() / scale;
                        worst = worst.max(err);
                        assert!(err <= 4.0, "x {x} sigma {sigma}: {got} vs {want} ({err})");
                    } else {
                        // More components take the general path: the same operations exactly.
                        assert_eq!(got.to_bits(), want.to_bits(), "x {x} sigma {sigma}");
                    }
                }
            }
        }
        assert!(
            worst > 0.0,
            "the two paths are expected to round differently somewhere"
        );
    }

    #[test]
    fn polynomial_exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut check = |x: f64| {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = (got - want).abs() / (f64::EPSILON * want);
            worst = worst.max(ulp);
            assert!(ulp <= 2.0, "exp({x}) = {got}, libm {want}");
        };
        for k in 0..=200_000 {
            check(-708.0 * f64::from(k) / 200_000.0);
        }
        for k in 0..=10_000 {
            check(-f64::from(k) * 1e-6);
            check(-(f64::from(k) * 0.5f64.ln().abs() / 5_000.0));
        }
        check(-f64::MIN_POSITIVE);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-708.5), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
        assert!(worst < 2.0);
    }

    #[test]
    fn block_path_gives_the_element_path_bits() {
        let reference = MixtureDenoiser::reference(1.0, true);
        let mut x: Vec<f64> = (0..1_000)
            .map(|k| (f64::from(k) * 0.731).sin() * 4.0)
            .collect();
        // Inputs the fast path leaves to the general one, inside a block of 64.
        x[70] = f64::NAN;
        x[200] = 1e200;
        x[333] = f64::NEG_INFINITY;
        for sigma in [1.0, 0.42, 1e-6] {
            let at = reference.cond.at(1.0 - sigma, sigma);
            let mut block = x.clone();
            at.mean_in_place(&mut block);
            for (i, (&b, &v)) in block.iter().zip(&x).enumerate() {
                let e = at.mean(v);
                assert!(
                    b.to_bits() == e.to_bits() || (b.is_nan() && e.is_nan()),
                    "element {i}: {b} vs {e}"
                );
                if i == 200 || i == 333 || i == 70 {
                    let g = at.general_mean(v);
                    assert!(b.to_bits() == g.to_bits() || (b.is_nan() && g.is_nan()));
                }
            }
        }
    }

    #[test]
    fn streamed_and_host_denoising_agree() {
        use flux_kernels::{Cpu, DType, SamplerOps};
        let be = Cpu::new();
        let x: Vec<f64> = (0..70_001)
            .map(|k| (f64::from(k) * 0.173).cos() * 2.5)
            .collect();
        for (cfg, dtype) in [(1.0, DType::F64), (1.0, DType::F32), (3.5, DType::F64)] {
            let mut m = MixtureDenoiser::reference(cfg, true);
            let t = be.upload(HostData::F64(&x), &[x.len()], dtype).unwrap();
            let d = Denoiser::<Cpu>::denoise(&mut m, &be, &t, 0.37, false).unwrap();
            let host = be.download_f64(&t).unwrap();
            let (want, _) = m.denoise_host(&host, 0.37, false);
            let want = be.upload(HostData::F64(&want), &[x.len()], dtype).unwrap();
            assert_eq!(
                be.download_f64(&d.denoised).unwrap(),
                be.download_f64(&want).unwrap(),
                "cfg {cfg} {dtype}"
            );
            assert_eq!(m.calls(), 1);
        }
    }

    #[test]
    fn guidance_and_cfg1_optimisation() {
        let m = MixtureDenoiser::reference(2.5, false);
        let (g, u) = m.denoise_host(&[0.5, -2.0], 3.0, true);
        let a = MixtureDenoiser::reference(1.0, false);
        let (c, none) = a.denoise_host(&[0.5, -2.0], 3.0, false);
        assert!(none.is_none());
        let u = u.unwrap();
        for i in 0..2 {
            assert!((g[i] - (u[i] + (c[i] - u[i]) * 2.5)).abs() < 1e-14);
        }
        assert!(Mixture::new(vec![1.0], vec![0.0, 1.0], vec![1.0]).is_err());
        assert!(Mixture::new(vec![-1.0], vec![0.0], vec![1.0]).is_err());
    }
}
