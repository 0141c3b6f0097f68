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

/// Moves the noise source past a draw like [`noise`]'s whose values the sampler would only
/// multiply by zero (the reference draws it; see [`crate::noise::NoiseSource::skip`]).
pub(crate) fn skip_noise<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    like: &Tensor<B>,
    sigma: f64,
    sigma_next: f64,
) -> Result<()> {
    ctx.noise
        .skip(ctx.backend, like.shape(), like.dtype(), sigma, sigma_next)
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

/// ComfyUI's `offset_first_sigma_for_snr`: for flow models a first sigma `>= 1` (where the
/// half-logSNR is infinite) becomes `percent_to_sigma(1e-4)`.
pub(crate) fn offset_first_sigma_for_snr<B: Backend>(
    ctx: &SampleContext<'_, B>,
    sigmas: &[f64],
) -> Vec<f64> {
    let mut out = sigmas.to_vec();
    if out.len() > 1 && ctx.model.is_flow() && out[0] >= 1.0 {
        out[0] = ctx.model.percent_to_sigma(1e-4);
    }
    out
}

/// `torch.lerp(start, end, weight)` on scalars, with torch's two formulas (exact at both ends).
pub(crate) fn torch_lerp(start: f64, end: f64, weight: f64) -> f64 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// `h * phi_2(h) = (e^h - 1 - h) / h` of the exponential integrators.
pub(crate) fn ei_h_phi_2(h: f64) -> f64 {
    (h.exp_m1() - h) / h
}

/// The option `value` (or `default`), checked to be finite and non-negative.
pub(crate) fn non_negative(option: &str, value: Option<f64>, default: f64) -> Result<f64> {
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

/// `sum_i c_i * t_i` for any number of terms: one fused `lincomb` when they fit, else further
/// in-place passes for the rest.
pub(crate) fn lincomb_any<B: Backend>(
    backend: &B,
    terms: &[(f64, &Tensor<B>)],
) -> Result<Tensor<B>> {
    let (head, mut rest) = terms.split_at(terms.len().min(flux_kernels::MAX_LINCOMB_TERMS));
    let mut out = backend.lincomb(head)?;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(rest.len().min(flux_kernels::MAX_LINCOMB_TERMS - 1));
        backend.lincomb_inplace(&mut out, 1.0, now)?;
        rest = later;
    }
    Ok(out)
}

/// Solves `a x = b` (row-major `n x n`) by Gaussian elimination with partial pivoting, as
/// LAPACK's `gesv` behind `torch.linalg.solve`; `what` names the caller in the error.
pub(crate) fn solve_linear(
    mut a: Vec<f64>,
    mut b: Vec<f64>,
    n: usize,
    what: &str,
) -> Result<Vec<f64>> {
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p * n + col].abs().total_cmp(&a[q * n + col].abs()))
            .unwrap_or(col);
        if a[pivot * n + col] == 0.0 || !a[pivot * n + col].is_finite() {
            return Err(SamplerError::InvalidSigmas(format!(
                "{what}: singular coefficient system (repeated sigmas?)"
            )));
        }
        if pivot != col {
            for k in 0..n {
                a.swap(col * n + k, pivot * n + k);
            }
            b.swap(col, pivot);
        }
        for row in col + 1..n {
            let f = a[row * n + col] / a[col * n + col];
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let mut acc = b[row];
        for k in row + 1..n {
            acc -= a[row * n + k] * x[k];
        }
        x[row] = acc / a[row * n + row];
    }
    Ok(x)
}
