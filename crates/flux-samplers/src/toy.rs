//! An analytic test denoiser: the exact posterior mean of a Gaussian-mixture data distribution.
//!
//! Every element of the clean latent is drawn independently from `x0 ~ sum_k w_k N(mu_k, s_k^2)`
//! and observed as `x = a x0 + sigma eps` (`a = 1 - sigma` for flow models, `a = 1` for the
//! eps models' variance-exploding `x`). The denoiser returns `E[x0 | x]`, so it is a perfect
//! network for that data: samplers can be checked against the reference data to rounding
//! error, and convergence tests have a known answer.

use crate::{Denoised, Denoiser, Result, SamplerError};
use flux_kernels::{Backend, HostData, Tensor};
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
        Posterior { comps }
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
}

impl Posterior {
    /// `E[x0 | x]`.
    #[inline]
    pub fn mean(&self, x: f64) -> f64 {
        match self.comps.as_slice() {
            [c0, c1] => {
                let ((l0, m0), (l1, m1)) = (c0.eval(x), c1.eval(x));
                if !(l0.is_finite() && l1.is_finite()) {
                    return softmax_mean(&[(l0, m0), (l1, m1)]);
                }
                // The larger logit's weight is exp(0) = 1; the other one's is
                // exp(smaller - larger) = exp(-|l0 - l1|) (negating a difference is exact), so
                // one `exp` per element gives the general path's bits.
                let e = (-(l0 - l1).abs()).exp();
                let (e0, e1) = if l0 >= l1 { (1.0, e) } else { (e, 1.0) };
                // Accumulated from zero as the general path does (keeps the sign of a zero).
                (0.0 + e0 * m0 + e1 * m1) / (0.0 + e0 + e1)
            }
            comps => {
                // A softmax-weighted mean; a fixed-size stack buffer avoids a per-element
                // allocation for the usual small mixtures.
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
    }
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
        let cond = map_elements(x, |v| cond_at.mean(v));
        if self.cfg == 1.0 && !want_uncond {
            return (cond, None);
        }
        let uncond_at = self.uncond.at(a, sigma);
        let uncond = map_elements(x, |v| uncond_at.mean(v));
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

/// Applies `f` to every element, on the rayon pool for large latents (the elements are
/// independent, so the result does not depend on the split).
fn map_elements(x: &[f64], f: impl Fn(f64) -> f64 + Sync) -> Vec<f64> {
    if x.len() >= PAR_ELEMENTS {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

/// [`map_elements`] in place.
fn map_in_place(x: &mut [f64], f: impl Fn(f64) -> f64 + Sync) {
    if x.len() >= PAR_ELEMENTS {
        x.par_iter_mut().for_each(|v| *v = f(*v));
    } else {
        for v in x.iter_mut() {
            *v = f(*v);
        }
    }
}

impl<B: Backend> Denoiser<B> for MixtureDenoiser {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> Result<Denoised<B>> {
        let mut host = backend.download_f64(x)?;
        self.calls += 1;
        if self.record.is_none() && self.cfg == 1.0 && !want_uncond {
            // The common unguided call: overwrite the downloaded values with the prediction.
            let at = self.cond.at(self.scale(sigma), sigma);
            map_in_place(&mut host, |v| at.mean(v));
            return Ok(Denoised {
                denoised: backend.upload(HostData::F64(&host), x.shape(), x.dtype())?,
                uncond: None,
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn hoisted_constants_give_the_same_bits() {
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
        let reference = MixtureDenoiser::reference(1.0, true);
        for m in [&reference.cond, &reference.uncond, &three, &ten] {
            for sigma in [1.0, 0.97, 0.5, 0.013, 1e-9] {
                let a = 1.0 - sigma;
                let at = m.at(a, sigma);
                for k in -400..400 {
                    let x = f64::from(k) * 0.0173 + 1e-3;
                    let want = naive_mean(m, x, a, sigma);
                    assert_eq!(at.mean(x).to_bits(), want.to_bits(), "x {x} sigma {sigma}");
                    assert_eq!(m.posterior_mean(x, a, sigma).to_bits(), want.to_bits());
                }
            }
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
