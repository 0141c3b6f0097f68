//! Heun samplers: `heun` (Karras et al. 2022, Algorithm 2) and `heunpp2` (Heun++ with a third
//! evaluation and sigma-weighted slopes).

use super::common;
use super::euler::Churn;
use crate::{Result, SampleContext, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `heun`: second-order Heun steps; the last step (to sigma 0) is an Euler step.
pub(crate) fn heun<B: Backend>(
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
        let s1 = sigmas[i + 1];
        let den = common::model(ctx, &x, sigma_hat, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let dt = s1 - sigma_hat;
        let k = dt / sigma_hat;
        if s1 == 0.0 {
            ctx.backend
                .lincomb_inplace(&mut x, 1.0 + k, &[(-k, &den)])?;
        } else {
            let x2 = ctx.backend.lincomb(&[(1.0 + k, &x), (-k, &den)])?;
            let den2 = common::model(ctx, &x2, s1, false)?.denoised;
            // x + (d + d2)/2 dt with d = (x - D)/sigma_hat, d2 = (x2 - D2)/s1
            let k2 = dt / s1;
            ctx.backend.lincomb_inplace(
                &mut x,
                1.0 + 0.5 * k,
                &[(-0.5 * k, &den), (0.5 * k2, &x2), (-0.5 * k2, &den2)],
            )?;
        }
    }
    Ok(x)
}

/// `heunpp2`: Euler on the last step, weighted Heun on the one before, Heun++ (three slopes
/// weighted by `sigma / (3 sigma_0)`) elsewhere. "Last" means the schedule's last sigma, as in the
/// reference, not sigma 0.
///
/// The reference draws one `randn_like` from the global torch RNG per step even without churn
/// (and discards it); this implementation draws churn noise from the sampler's noise source, and
/// only when churn is active.
pub(crate) fn heunpp2<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let churn = Churn::new(opts)?;
    let s_end = sigmas[sigmas.len() - 1];
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let sigma_hat;
        (x, sigma_hat) = churn.apply(ctx, x, sigmas, i)?;
        let s1 = sigmas[i + 1];
        let den = common::model(ctx, &x, sigma_hat, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let dt = s1 - sigma_hat;
        let k = dt / sigma_hat;
        if s1 == s_end {
            ctx.backend
                .lincomb_inplace(&mut x, 1.0 + k, &[(-k, &den)])?;
            continue;
        }
        let x2 = ctx.backend.lincomb(&[(1.0 + k, &x), (-k, &den)])?;
        let den2 = common::model(ctx, &x2, s1, false)?.denoised;
        if sigmas[i + 2] == s_end {
            let w = 2.0 * sigmas[0];
            let w2 = s1 / w;
            let w1 = 1.0 - w2;
            // x + (w1 d + w2 d2) dt
            let (c1, c2) = (w1 * k, w2 * dt / s1);
            ctx.backend.lincomb_inplace(
                &mut x,
                1.0 + c1,
                &[(-c1, &den), (c2, &x2), (-c2, &den2)],
            )?;
        } else {
            let s2 = sigmas[i + 2];
            let dt2 = s2 - s1;
            let k2 = dt2 / s1;
            let x3 = ctx.backend.lincomb(&[(1.0 + k2, &x2), (-k2, &den2)])?;
            let den3 = common::model(ctx, &x3, s2, false)?.denoised;
            let w = 3.0 * sigmas[0];
            let w2 = s1 / w;
            let w3 = s2 / w;
            let w1 = 1.0 - w2 - w3;
            let (c1, c2, c3) = (w1 * k, w2 * dt / s1, w3 * dt / s2);
            ctx.backend.lincomb_inplace(
                &mut x,
                1.0 + c1,
                &[
                    (-c1, &den),
                    (c2, &x2),
                    (-c2, &den2),
                    (c3, &x3),
                    (-c3, &den3),
                ],
            )?;
        }
    }
    Ok(x)
}
