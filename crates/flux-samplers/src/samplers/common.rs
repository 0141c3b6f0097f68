//! Helpers shared by every sampler: model calls with the step callback, ancestral step sizes,
//! noise draws, and the half-logSNR conversions.

use crate::{Denoised, Result, SampleContext, SamplerError, StepInfo};
use flux_kernels::{Backend, Tensor};

/// Calls the denoiser at `(x, sigma)`.
pub(crate) fn model<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: &Tensor<B>,
    sigma: f64,
    want_uncond: bool,
) -> Result<Denoised<B>> {
    ctx.denoiser.denoise(ctx.backend, x, sigma, want_uncond)
}

/// Reports step `step` of `sigmas.len() - 1` to the callback; a `false` answer cancels.
pub(crate) fn report<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    step: usize,
    sigmas: &[f64],
    x: &Tensor<B>,
    denoised: &Tensor<B>,
) -> Result<()> {
    let total = sigmas.len() - 1;
    if let Some(cb) = ctx.callback.as_mut() {
        let info = StepInfo {
            step,
            total,
            sigma: sigmas[step],
            sigma_next: sigmas[step + 1],
            x,
            denoised,
        };
        if !cb(&info) {
            return Err(SamplerError::Cancelled { step, total });
        }
    }
    Ok(())
}

/// Draws a noise tensor shaped like `like` for the interval `(sigma, sigma_next)`.
pub(crate) fn noise<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    like: &Tensor<B>,
    sigma: f64,
    sigma_next: f64,
) -> Result<Tensor<B>> {
    ctx.noise
        .sample(ctx.backend, like.shape(), like.dtype(), sigma, sigma_next)
}

/// `(sigma_down, sigma_up)` of a variance-exploding ancestral step from `s0` to `s1`.
pub(crate) fn ancestral_step(s0: f64, s1: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (s1, 0.0);
    }
    let up = s1.min(eta * (s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0)).sqrt());
    let down = (s1 * s1 - up * up).sqrt();
    (down, up)
}

/// Half-logSNR `lambda(sigma)`: `-logit(sigma)` for flow models, `-ln(sigma)` otherwise.
pub(crate) fn half_log_snr(flow: bool, sigma: f64) -> f64 {
    if flow {
        (1.0 - sigma).ln() - sigma.ln()
    } else {
        -sigma.ln()
    }
}

/// Inverse of [`half_log_snr`].
pub(crate) fn sigma_from_half_log_snr(flow: bool, lambda: f64) -> f64 {
    if flow {
        1.0 / (1.0 + lambda.exp())
    } else {
        (-lambda).exp()
    }
}
