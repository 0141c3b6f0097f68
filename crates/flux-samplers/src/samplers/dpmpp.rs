//! DPM-Solver++ samplers: `dpmpp_2s_ancestral` (single-step, second order, with ancestral
//! noise), `dpmpp_2m` (multistep, second order) and their CFG++ variants.

use super::common::{self, ancestral_step};
use super::euler::{non_negative, rf_ancestral_step, uncond_of};
use crate::{Result, SampleContext, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `sigma(t) = e^-t` and `t(sigma) = -ln sigma` of the variance-exploding samplers.
fn sigma_fn(t: f64) -> f64 {
    (-t).exp()
}
fn t_fn(sigma: f64) -> f64 {
    -sigma.ln()
}

/// The rectified-flow midpoint sigma of `dpmpp_2s_ancestral_RF` between `s` and `sigma_down`
/// (midpoint in `lambda = ln((1 - s)/s)`; `0.9999` when `s == 1`, where lambda is infinite).
fn rf_mid_sigma(s: f64, sigma_down: f64) -> f64 {
    if s == 1.0 {
        return 0.9999;
    }
    let lambda = |v: f64| ((1.0 - v) / v).ln();
    let (t_i, t_down) = (lambda(s), lambda(sigma_down));
    let h = t_down - t_i;
    let m = t_i + 0.5 * h;
    1.0 / (m.exp() + 1.0)
}

/// `dpmpp_2s_ancestral` (and, with `cfg_pp`, `dpmpp_2s_ancestral_cfg_pp`). Flow models take the
/// rectified-flow variants.
fn two_s_ancestral<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
    cfg_pp: bool,
) -> Result<Tensor<B>> {
    let eta = non_negative("eta", opts.eta, 1.0)?;
    let s_noise = non_negative("s_noise", opts.s_noise, 1.0)?;
    let flow = ctx.model.is_flow();
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let out = common::model(ctx, &x, s, cfg_pp)?;
        let den = out.denoised;
        // cfg++ steps along the unconditional prediction and adds the guidance vector after.
        let (drive, guidance) = if cfg_pp {
            let u = uncond_of(out.uncond)?;
            let g = ctx.backend.lincomb(&[(1.0, &den), (-1.0, &u)])?;
            (Some(u), Some(g))
        } else {
            (None, None)
        };
        let (sigma_down, alpha_ratio, up) = if flow {
            rf_ancestral_step(s, s1, eta)
        } else {
            let (d, u) = ancestral_step(s, s1, eta);
            (d, 1.0, u)
        };
        common::report(ctx, i, sigmas, &x, &den)?;
        let euler_step = if flow { s1 == 0.0 } else { sigma_down == 0.0 };
        if euler_step {
            let target = drive.as_ref().unwrap_or(&den);
            let k = (sigma_down - s) / s;
            ctx.backend
                .lincomb_inplace(&mut x, 1.0 + k, &[(-k, target)])?;
        } else if flow {
            let sigma_s = rf_mid_sigma(s, sigma_down);
            let r = sigma_s / s;
            let target = drive.as_ref().unwrap_or(&den);
            let u = ctx.backend.lincomb(&[(r, &x), (1.0 - r, target)])?;
            let out2 = common::model(ctx, &u, sigma_s, cfg_pp)?;
            let d_i = if cfg_pp {
                uncond_of(out2.uncond)?
            } else {
                out2.denoised
            };
            let rd = sigma_down / s;
            ctx.backend
                .lincomb_inplace(&mut x, rd, &[(1.0 - rd, &d_i)])?;
        } else {
            let (t, t_next) = (t_fn(s), t_fn(sigma_down));
            let h = t_next - t;
            let s_mid = t + 0.5 * h;
            let target = drive.as_ref().unwrap_or(&den);
            let x2 = ctx.backend.lincomb(&[
                (sigma_fn(s_mid) / sigma_fn(t), &x),
                (-(-h * 0.5).exp_m1(), target),
            ])?;
            let out2 = common::model(ctx, &x2, sigma_fn(s_mid), cfg_pp)?;
            let den2 = if cfg_pp {
                uncond_of(out2.uncond)?
            } else {
                out2.denoised
            };
            ctx.backend.lincomb_inplace(
                &mut x,
                sigma_fn(t_next) / sigma_fn(t),
                &[(-(-h).exp_m1(), &den2)],
            )?;
        }
        // The flow variant skips the draw at eta 0; the eps variant draws and multiplies by 0.
        let add_noise = s1 > 0.0 && (!flow || eta > 0.0);
        if add_noise {
            let noise = common::noise(ctx, &x, s, s1)?;
            ctx.backend
                .lincomb_inplace(&mut x, alpha_ratio, &[(s_noise * up, &noise)])?;
        }
        if let Some(g) = guidance {
            let a = if flow { 1.0 - s1 } else { 1.0 };
            ctx.backend.lincomb_inplace(&mut x, 1.0, &[(a, &g)])?;
        }
    }
    Ok(x)
}

/// `dpmpp_2s_ancestral`: DPM-Solver++(2S) down to `sigma_down`, then ancestral noise.
pub(crate) fn dpmpp_2s_ancestral<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    two_s_ancestral(ctx, x, sigmas, opts, false)
}

/// `dpmpp_2s_ancestral_cfg_pp`: the CFG++ form (steps on the unconditional prediction, adds
/// the guidance vector `D - U`, scaled by `1 - sigma_next` for flow models).
pub(crate) fn dpmpp_2s_ancestral_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    two_s_ancestral(ctx, x, sigmas, opts, true)
}

/// `dpmpp_2m`: DPM-Solver++(2M); first-order on the first step and the step to sigma 0.
pub(crate) fn dpmpp_2m<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let mut x = x;
    let mut old: Option<Tensor<B>> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let den = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let (t, t_next) = (t_fn(s), t_fn(s1));
        let h = t_next - t;
        let ratio = sigma_fn(t_next) / sigma_fn(t);
        let c = -(-h).exp_m1();
        match old.as_ref() {
            Some(prev) if s1 != 0.0 => {
                let h_last = t - t_fn(sigmas[i - 1]);
                let r = h_last / h;
                let w = 1.0 / (2.0 * r);
                // D_d = (1 + w) D - w D_prev
                ctx.backend.lincomb_inplace(
                    &mut x,
                    ratio,
                    &[(c * (1.0 + w), &den), (-c * w, prev)],
                )?;
            }
            _ => ctx.backend.lincomb_inplace(&mut x, ratio, &[(c, &den)])?,
        }
        old = Some(den);
    }
    Ok(x)
}

/// `dpmpp_2m_cfg_pp`: DPM-Solver++(2M) in CFG++ form.
pub(crate) fn dpmpp_2m_cfg_pp<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let mut x = x;
    let mut old_uncond: Option<Tensor<B>> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let out = common::model(ctx, &x, s, true)?;
        let den = out.denoised;
        let uncond = uncond_of(out.uncond)?;
        common::report(ctx, i, sigmas, &x, &den)?;
        let (t, t_next) = (t_fn(s), t_fn(s1));
        let h = t_next - t;
        let e = (-h).exp();
        // x = D + mix + e^-h x
        match old_uncond.as_ref() {
            Some(prev) if s1 != 0.0 => {
                let h_last = t - t_fn(sigmas[i - 1]);
                let r = h_last / h;
                let c = -(-h).exp_m1() * (1.0 / (2.0 * r));
                ctx.backend.lincomb_inplace(
                    &mut x,
                    e,
                    &[(1.0 + c, &den), (-e, &uncond), (-c, prev)],
                )?;
            }
            _ => ctx
                .backend
                .lincomb_inplace(&mut x, e, &[(1.0, &den), (-e, &uncond)])?,
        }
        old_uncond = Some(uncond);
    }
    Ok(x)
}
