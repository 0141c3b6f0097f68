//! RES second-order multistep samplers (arXiv 2308.02157): `res_multistep`,
//! `res_multistep_cfg_pp`, `res_multistep_ancestral`, `res_multistep_ancestral_cfg_pp`.
//!
//! They work in `t = -ln(sigma)` for every model type (no flow branch). The non-ancestral
//! variants run with `eta = 0` but the reference still draws one noise tensor per step before
//! the last (scaled by a zero `sigma_up`); they skip past it in the noise source
//! ([`crate::noise::NoiseSource::skip`]), so a shared generator stays in step.
//! The cfg++ variants step with the unconditional prediction and add the guidance difference.

use super::common::{self, ancestral_step};
use crate::{Result, SampleContext, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `res_multistep`: deterministic (eta 0).
pub(crate) fn res_multistep<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    run(ctx, x, sigmas, s_noise, 0.0, false)
}

/// `res_multistep_cfg_pp`: deterministic, cfg++.
pub(crate) fn res_multistep_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    run(ctx, x, sigmas, s_noise, 0.0, true)
}

/// `res_multistep_ancestral`: ancestral steps with `eta` (default 1).
pub(crate) fn res_multistep_ancestral<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    run(ctx, x, sigmas, s_noise, eta, false)
}

/// `res_multistep_ancestral_cfg_pp`: ancestral steps, cfg++.
pub(crate) fn res_multistep_ancestral_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    run(ctx, x, sigmas, s_noise, eta, true)
}

fn phi1(t: f64) -> f64 {
    t.exp_m1() / t
}

fn phi2(t: f64) -> f64 {
    (phi1(t) - 1.0) / t
}

fn nan_to_zero(v: f64) -> f64 {
    if v.is_nan() { 0.0 } else { v }
}

fn run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    s_noise: f64,
    eta: f64,
    cfg_pp: bool,
) -> Result<Tensor<B>> {
    let t_fn = |sigma: f64| -sigma.ln();
    let mut x = x;
    let mut old_sigma_down = None::<f64>;
    let mut old_denoised: Option<Tensor<B>> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let out = common::model(ctx, &x, s, cfg_pp)?;
        let denoised = out.denoised;
        let uncond = if cfg_pp {
            Some(out.uncond.ok_or_else(|| {
                crate::SamplerError::Denoiser(
                    "cfg++ sampler needs the unconditional prediction".into(),
                )
            })?)
        } else {
            None
        };
        let (sigma_down, sigma_up) = ancestral_step(s, s_next, eta);
        common::report(ctx, i, sigmas, &x, &denoised)?;
        let mut terms: Vec<(f64, &Tensor<B>)> = Vec::with_capacity(5);
        match (&old_denoised, old_sigma_down) {
            (Some(old), Some(old_sd)) if sigma_down != 0.0 => {
                let t = t_fn(s);
                let t_old = t_fn(old_sd);
                let t_next = t_fn(sigma_down);
                let t_prev = t_fn(sigmas[i - 1]);
                let h = t_next - t;
                let c2 = (t_prev - t_old) / h;
                let (p1, p2) = (phi1(-h), phi2(-h));
                let b1 = nan_to_zero(p1 - p2 / c2);
                let b2 = nan_to_zero(p2 / c2);
                let decay = (-h).exp();
                if let Some(u) = &uncond {
                    // x + (D - U), then the RES step driven by U.
                    terms.extend([
                        (decay, &x),
                        (decay, &denoised),
                        (h * b1 - decay, u),
                        (h * b2, old),
                    ]);
                } else {
                    terms.extend([(decay, &x), (h * b1, &denoised), (h * b2, old)]);
                }
            }
            _ => {
                if let Some(u) = &uncond {
                    // D + sigma_down (x - U) / sigma
                    let c = sigma_down / s;
                    terms.extend([(c, &x), (1.0, &denoised), (-c, u)]);
                } else {
                    let dt = (sigma_down - s) / s;
                    terms.extend([(1.0 + dt, &x), (-dt, &denoised)]);
                }
            }
        }
        let noise;
        if s_next > 0.0 {
            if sigma_up == 0.0 {
                // The reference draws and adds `0 * noise`: only the generator's position
                // matters.
                common::skip_noise(ctx, &x, s, s_next)?;
            } else {
                noise = common::noise(ctx, &x, s, s_next)?;
                terms.push((s_noise * sigma_up, &noise));
            }
        }
        x = ctx.backend.lincomb(&terms)?;
        old_denoised = Some(match uncond {
            Some(u) => u,
            None => denoised,
        });
        old_sigma_down = Some(sigma_down);
    }
    Ok(x)
}
