//! Gradient-estimation sampler (`gradient_estimation`, `gradient_estimation_cfg_pp`): Euler steps
//! on the VE ODE plus `(ge_gamma - 1)` times the change of the derivative since the last step.

use super::common;
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `gradient_estimation`.
pub(crate) fn gradient_estimation<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, opts, false)
}

/// `gradient_estimation_cfg_pp`: the derivative uses the unconditional prediction.
pub(crate) fn gradient_estimation_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, opts, true)
}

fn run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
    cfg_pp: bool,
) -> Result<Tensor<B>> {
    let gamma = opts.ge_gamma.unwrap_or(2.0);
    if !gamma.is_finite() {
        return Err(SamplerError::InvalidOption {
            option: "ge_gamma".into(),
            message: format!("must be finite, got {gamma}"),
        });
    }
    let mut x = x;
    let mut old_d: Option<Tensor<B>> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let out = common::model(ctx, &x, s, cfg_pp)?;
        let denoised = out.denoised;
        // The prediction the derivative is taken from.
        let uncond = if cfg_pp {
            Some(out.uncond.ok_or_else(|| {
                SamplerError::Denoiser("cfg++ sampler needs the unconditional prediction".into())
            })?)
        } else {
            None
        };
        let target = uncond.as_ref().unwrap_or(&denoised);
        let d = ctx.backend.lincomb(&[(1.0 / s, &x), (-1.0 / s, target)])?;
        common::report(ctx, i, sigmas, &x, &denoised)?;
        let dt = s_next - s;
        if s_next == 0.0 {
            x = denoised;
        } else {
            let mut terms: Vec<(f64, &Tensor<B>)> = if cfg_pp {
                vec![(1.0, &denoised), (s_next, &d)]
            } else {
                vec![(1.0, &x), (dt, &d)]
            };
            if i >= 1
                && let Some(old) = &old_d
            {
                let g = (gamma - 1.0) * dt;
                terms.push((g, &d));
                terms.push((-g, old));
            }
            x = ctx.backend.lincomb(&terms)?;
        }
        old_d = Some(d);
    }
    Ok(x)
}
