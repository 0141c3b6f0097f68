//! Euler samplers: `euler` (and `ddim`, which is `euler` in ComfyUI), `euler_ancestral`, and the
//! CFG++ variants `euler_cfg_pp`, `euler_ancestral_cfg_pp`.

use super::common::{self, ancestral_step, half_log_snr};
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// An option's value or its default, checked to be a finite number `>= 0`.
pub(super) fn non_negative(option: &str, value: Option<f64>, default: f64) -> Result<f64> {
    let v = value.unwrap_or(default);
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(SamplerError::InvalidOption {
            option: option.into(),
            message: format!("must be a finite number >= 0, got {v}"),
        })
    }
}

/// Karras et al.'s churn: raises `sigma` to `sigma_hat = sigma (1 + gamma)` and adds the noise
/// that takes `x` there. Returns `sigma_hat`.
///
/// ComfyUI draws this noise from the global torch RNG (`randn_like`); here it comes from the
/// sampler's noise source, so runs with churn are reproducible from the seed alone.
#[allow(clippy::struct_field_names)] // named as the reference's options
pub(super) struct Churn {
    s_churn: f64,
    s_tmin: f64,
    s_tmax: f64,
    s_noise: f64,
}

impl Churn {
    pub(super) fn new(opts: &SamplerOptions) -> Result<Self> {
        let s_tmax = opts.s_tmax.unwrap_or(f64::INFINITY);
        let s_tmin = opts.s_tmin.unwrap_or(0.0);
        if s_tmin.is_nan() || s_tmax.is_nan() {
            return Err(SamplerError::InvalidOption {
                option: "s_tmin/s_tmax".into(),
                message: "must not be NaN".into(),
            });
        }
        Ok(Self {
            s_churn: non_negative("s_churn", opts.s_churn, 0.0)?,
            s_tmin,
            s_tmax,
            s_noise: non_negative("s_noise", opts.s_noise, 1.0)?,
        })
    }

    /// `gamma` of step `sigma` in a schedule of `steps` steps.
    pub(super) fn gamma(&self, sigma: f64, steps: usize) -> f64 {
        if self.s_tmin <= sigma && sigma <= self.s_tmax {
            (self.s_churn / steps as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        }
    }

    /// Applies churn at step `i`; returns `(x, sigma_hat)`.
    pub(super) fn apply<B: Backend>(
        &self,
        ctx: &mut SampleContext<'_, B>,
        x: Tensor<B>,
        sigmas: &[f64],
        i: usize,
    ) -> Result<(Tensor<B>, f64)> {
        if self.s_churn <= 0.0 {
            return Ok((x, sigmas[i]));
        }
        let gamma = self.gamma(sigmas[i], sigmas.len() - 1);
        let sigma_hat = sigmas[i] * (gamma + 1.0);
        if gamma <= 0.0 {
            return Ok((x, sigma_hat));
        }
        let eps = common::noise(ctx, &x, sigmas[i], sigma_hat)?;
        let mut x = x;
        let c = self.s_noise * (sigma_hat * sigma_hat - sigmas[i] * sigmas[i]).sqrt();
        ctx.backend.lincomb_inplace(&mut x, 1.0, &[(c, &eps)])?;
        Ok((x, sigma_hat))
    }
}

/// `euler`: Karras et al. (2022), Algorithm 2 with Euler steps of `dx/dsigma = (x - D)/sigma`.
pub(crate) fn euler<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let churn = Churn::new(opts)?;
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let sigma_hat;
        (x, sigma_hat) = churn.apply(ctx, x, sigmas, i)?;
        let den = common::model(ctx, &x, sigma_hat, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let dt = sigmas[i + 1] - sigma_hat;
        // x + d dt with d = (x - D) / sigma_hat
        let k = dt / sigma_hat;
        ctx.backend
            .lincomb_inplace(&mut x, 1.0 + k, &[(-k, &den)])?;
    }
    Ok(x)
}

/// `euler_ancestral`: Euler step down to `sigma_down`, then fresh noise up to the next sigma.
/// Flow models take the rectified-flow variant (`sample_euler_ancestral_RF`).
pub(crate) fn euler_ancestral<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = non_negative("eta", opts.eta, 1.0)?;
    let s_noise = non_negative("s_noise", opts.s_noise, 1.0)?;
    if ctx.model.is_flow() {
        return euler_ancestral_rf(ctx, x, sigmas, eta, s_noise);
    }
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let den = common::model(ctx, &x, s, false)?.denoised;
        let (sigma_down, sigma_up) = ancestral_step(s, s1, eta);
        common::report(ctx, i, sigmas, &x, &den)?;
        if sigma_down == 0.0 {
            x = den;
        } else {
            let noise = common::noise(ctx, &x, s, s1)?;
            let k = (sigma_down - s) / s;
            ctx.backend.lincomb_inplace(
                &mut x,
                1.0 + k,
                &[(-k, &den), (s_noise * sigma_up, &noise)],
            )?;
        }
    }
    Ok(x)
}

/// Rectified-flow ancestral step sizes from `s0` to `s1`: `(sigma_down, alpha_ratio, renoise)`
/// where the Euler move goes to `sigma_down`, then `x <- alpha_ratio x + renoise * noise`.
pub(super) fn rf_ancestral_step(s0: f64, s1: f64, eta: f64) -> (f64, f64, f64) {
    let downstep_ratio = 1.0 + (s1 / s0 - 1.0) * eta;
    let sigma_down = s1 * downstep_ratio;
    let alpha_next = 1.0 - s1;
    let alpha_down = 1.0 - sigma_down;
    let renoise = (s1 * s1
        - sigma_down * sigma_down * alpha_next * alpha_next / (alpha_down * alpha_down))
        .sqrt();
    (sigma_down, alpha_next / alpha_down, renoise)
}

fn euler_ancestral_rf<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    eta: f64,
    s_noise: f64,
) -> Result<Tensor<B>> {
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let den = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        if s1 == 0.0 {
            x = den;
            continue;
        }
        let (sigma_down, alpha_ratio, renoise) = rf_ancestral_step(s, s1, eta);
        let r = sigma_down / s;
        if eta > 0.0 {
            let noise = common::noise(ctx, &x, s, s1)?;
            ctx.backend.lincomb_inplace(
                &mut x,
                alpha_ratio * r,
                &[(alpha_ratio * (1.0 - r), &den), (s_noise * renoise, &noise)],
            )?;
        } else {
            ctx.backend.lincomb_inplace(&mut x, r, &[(1.0 - r, &den)])?;
        }
    }
    Ok(x)
}

/// `euler_cfg_pp`: [`euler_ancestral_cfg_pp`] without noise (`eta = 0`, `s_noise = 0`).
pub(crate) fn euler_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    euler_ancestral_cfg_pp_with(ctx, x, sigmas, 0.0, 0.0)
}

/// `euler_ancestral_cfg_pp`: the CFG++ ancestral Euler step (the noise direction comes from the
/// unconditional prediction), in half-logSNR form so it serves flow and eps models alike.
pub(crate) fn euler_ancestral_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = non_negative("eta", opts.eta, 1.0)?;
    let s_noise = non_negative("s_noise", opts.s_noise, 1.0)?;
    euler_ancestral_cfg_pp_with(ctx, x, sigmas, eta, s_noise)
}

fn euler_ancestral_cfg_pp_with<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    eta: f64,
    s_noise: f64,
) -> Result<Tensor<B>> {
    let flow = ctx.model.is_flow();
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let out = common::model(ctx, &x, s, true)?;
        let den = out.denoised;
        let uncond = uncond_of(out.uncond)?;
        common::report(ctx, i, sigmas, &x, &den)?;
        if s1 == 0.0 {
            x = den;
            continue;
        }
        let alpha_s = s * half_log_snr(flow, s).exp();
        let alpha_t = s1 * half_log_snr(flow, s1).exp();
        let (sd, sigma_up) = ancestral_step(s / alpha_s, s1 / alpha_t, eta);
        let sigma_down = alpha_t * sd;
        // x = alpha_t D + sigma_down d, with d = (x - alpha_s U) / s
        let k = sigma_down / s;
        if eta > 0.0 && s_noise > 0.0 {
            let noise = common::noise(ctx, &x, s, s1)?;
            ctx.backend.lincomb_inplace(
                &mut x,
                k,
                &[
                    (alpha_t, &den),
                    (-k * alpha_s, &uncond),
                    (alpha_t * s_noise * sigma_up, &noise),
                ],
            )?;
        } else {
            ctx.backend
                .lincomb_inplace(&mut x, k, &[(alpha_t, &den), (-k * alpha_s, &uncond)])?;
        }
    }
    Ok(x)
}

/// The unconditional prediction a cfg++ sampler asked for.
pub(super) fn uncond_of<B: Backend>(uncond: Option<Tensor<B>>) -> Result<Tensor<B>> {
    uncond.ok_or_else(|| {
        SamplerError::Denoiser("the denoiser did not return the unconditional prediction".into())
    })
}
