//! SEEDS (stochastic explicit exponential derivative-free solvers, data prediction):
//! `seeds_2`, `seeds_3`, and the exponential Heun samplers `exp_heun_2_x0` (deterministic) and
//! `exp_heun_2_x0_sde`, which are `seeds_2` with `r = 1` and the `phi_2` update.
//!
//! Half-logSNR time, first flow sigma `>= 1` moved to `percent_to_sigma(1e-4)`. The stochastic
//! part is carried from stage to stage: each stage's noise is the previous one decayed by
//! `exp((r_prev - r) h eta)` plus a fresh draw for the new sub-interval, so the update keeps the
//! coefficient of every draw on the host and adds them in the step's single `lincomb`.

use super::common::{self, ei_h_phi_2, half_log_snr, sigma_from_half_log_snr, torch_lerp};
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// The final update of `seeds_2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Update {
    /// Blend the two predictions with weight `1 / (2r)`.
    Phi1,
    /// Second-order exponential-integrator weights.
    Phi2,
}

fn update_type(opts: &SamplerOptions, default: Update) -> Result<Update> {
    match opts.solver_type.as_deref() {
        None => Ok(default),
        Some("phi_1") => Ok(Update::Phi1),
        Some("phi_2") => Ok(Update::Phi2),
        Some(other) => Err(SamplerError::InvalidOption {
            option: "solver_type".into(),
            message: format!("expected 'phi_1' or 'phi_2', got '{other}'"),
        }),
    }
}

fn ratio(option: &str, value: Option<f64>, default: f64) -> Result<f64> {
    let v = value.unwrap_or(default);
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(SamplerError::InvalidOption {
            option: option.into(),
            message: format!("must be in (0, 1], got {v}"),
        })
    }
}

/// `seeds_2`: two stages per step, intermediate point at `r` of the step in half-logSNR.
pub(crate) fn seeds_2<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let r = ratio("r", opts.r, 0.5)?;
    let update = update_type(opts, Update::Phi1)?;
    seeds_2_run(ctx, x, sigmas, eta, s_noise, r, update)
}

/// `exp_heun_2_x0`: deterministic exponential Heun (`seeds_2` with `eta = 0`, `r = 1`).
pub(crate) fn exp_heun_2_x0<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let update = update_type(opts, Update::Phi2)?;
    seeds_2_run(ctx, x, sigmas, 0.0, 0.0, 1.0, update)
}

/// `exp_heun_2_x0_sde`: stochastic exponential Heun (`seeds_2` with `r = 1`).
pub(crate) fn exp_heun_2_x0_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let update = update_type(opts, Update::Phi2)?;
    seeds_2_run(ctx, x, sigmas, eta, s_noise, 1.0, update)
}

fn seeds_2_run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    eta: f64,
    s_noise: f64,
    r: f64,
    update: Update,
) -> Result<Tensor<B>> {
    let inject = eta > 0.0 && s_noise > 0.0;
    let flow = ctx.model.is_flow();
    let sigmas = common::offset_first_sigma_for_snr(ctx, sigmas);
    let fac = 1.0 / (2.0 * r);
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, &sigmas, &x, &denoised)?;
        if s_next == 0.0 {
            x = denoised;
            continue;
        }
        let lambda_s = half_log_snr(flow, s);
        let lambda_t = half_log_snr(flow, s_next);
        let h = lambda_t - lambda_s;
        let h_eta = h * (eta + 1.0);
        let lambda_s_1 = torch_lerp(lambda_s, lambda_t, r);
        let sigma_s_1 = sigma_from_half_log_snr(flow, lambda_s_1);
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_t = s_next * lambda_t.exp();

        // Stage 1.
        let c_x = sigma_s_1 / s * (-r * h * eta).exp();
        let c_d = -alpha_s_1 * (-r * h_eta).exp_m1();
        let mut n1 = None;
        let x_2 = if inject {
            let n = common::noise(ctx, &x, s, sigma_s_1)?;
            let k1 = (-(-2.0 * r * h * eta).exp_m1()).sqrt();
            let out = ctx.backend.lincomb(&[
                (c_x, &x),
                (c_d, &denoised),
                (k1 * sigma_s_1 * s_noise, &n),
            ])?;
            n1 = Some((k1, n));
            out
        } else {
            ctx.backend.lincomb(&[(c_x, &x), (c_d, &denoised)])?
        };
        let denoised_2 = common::model(ctx, &x_2, sigma_s_1, false)?.denoised;

        // Stage 2.
        let c_x = s_next / s * (-h * eta).exp();
        let (c_d, c_d2) = match update {
            Update::Phi1 => {
                let c = -alpha_t * (-h_eta).exp_m1();
                (c * (1.0 - fac), c * fac)
            }
            Update::Phi2 => {
                let b2 = ei_h_phi_2(-h_eta) / r;
                let b1 = (-h_eta).exp_m1() - b2;
                (-alpha_t * b1, -alpha_t * b2)
            }
        };
        x = if let Some((k1, n1)) = n1 {
            let segment = (r - 1.0) * h * eta;
            let n2 = common::noise(ctx, &x, sigma_s_1, s_next)?;
            let k2 = (-(segment * 2.0).exp_m1()).sqrt();
            let scale = s_next * s_noise;
            ctx.backend.lincomb(&[
                (c_x, &x),
                (c_d, &denoised),
                (c_d2, &denoised_2),
                (k1 * segment.exp() * scale, &n1),
                (k2 * scale, &n2),
            ])?
        } else {
            ctx.backend
                .lincomb(&[(c_x, &x), (c_d, &denoised), (c_d2, &denoised_2)])?
        };
    }
    Ok(x)
}

/// `seeds_3`: three stages per step at `r_1` and `r_2` of the step in half-logSNR.
pub(crate) fn seeds_3<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let r_1 = ratio("r_1", opts.r_1, 1.0 / 3.0)?;
    let r_2 = ratio("r_2", opts.r_2, 2.0 / 3.0)?;
    let inject = eta > 0.0 && s_noise > 0.0;
    let flow = ctx.model.is_flow();
    let sigmas = common::offset_first_sigma_for_snr(ctx, sigmas);
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, &sigmas, &x, &denoised)?;
        if s_next == 0.0 {
            x = denoised;
            continue;
        }
        let lambda_s = half_log_snr(flow, s);
        let lambda_t = half_log_snr(flow, s_next);
        let h = lambda_t - lambda_s;
        let h_eta = h * (eta + 1.0);
        let lambda_s_1 = torch_lerp(lambda_s, lambda_t, r_1);
        let lambda_s_2 = torch_lerp(lambda_s, lambda_t, r_2);
        let sigma_s_1 = sigma_from_half_log_snr(flow, lambda_s_1);
        let sigma_s_2 = sigma_from_half_log_snr(flow, lambda_s_2);
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_s_2 = sigma_s_2 * lambda_s_2.exp();
        let alpha_t = s_next * lambda_t.exp();

        // Coefficients of the draws n1, n2, n3 in the running SDE noise.
        let mut draws: Vec<Tensor<B>> = Vec::new();
        let mut k = [0.0f64; 3];

        // Stage 1.
        let c_x = sigma_s_1 / s * (-r_1 * h * eta).exp();
        let c_d = -alpha_s_1 * (-r_1 * h_eta).exp_m1();
        let x_2 = if inject {
            draws.push(common::noise(ctx, &x, s, sigma_s_1)?);
            k[0] = (-(-2.0 * r_1 * h * eta).exp_m1()).sqrt();
            let scale = sigma_s_1 * s_noise;
            ctx.backend
                .lincomb(&[(c_x, &x), (c_d, &denoised), (k[0] * scale, &draws[0])])?
        } else {
            ctx.backend.lincomb(&[(c_x, &x), (c_d, &denoised)])?
        };
        let denoised_2 = common::model(ctx, &x_2, sigma_s_1, false)?.denoised;

        // Stage 2.
        let a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta);
        let a3_1 = (-r_2 * h_eta).exp_m1() - a3_2;
        let c_x = sigma_s_2 / s * (-r_2 * h * eta).exp();
        let x_3 = if inject {
            let segment = (r_1 - r_2) * h * eta;
            draws.push(common::noise(ctx, &x, sigma_s_1, sigma_s_2)?);
            k[0] *= segment.exp();
            k[1] = (-(segment * 2.0).exp_m1()).sqrt();
            let scale = sigma_s_2 * s_noise;
            ctx.backend.lincomb(&[
                (c_x, &x),
                (-alpha_s_2 * a3_1, &denoised),
                (-alpha_s_2 * a3_2, &denoised_2),
                (k[0] * scale, &draws[0]),
                (k[1] * scale, &draws[1]),
            ])?
        } else {
            ctx.backend.lincomb(&[
                (c_x, &x),
                (-alpha_s_2 * a3_1, &denoised),
                (-alpha_s_2 * a3_2, &denoised_2),
            ])?
        };
        let denoised_3 = common::model(ctx, &x_3, sigma_s_2, false)?.denoised;

        // Stage 3.
        let b3 = ei_h_phi_2(-h_eta) / r_2;
        let b1 = (-h_eta).exp_m1() - b3;
        let c_x = s_next / s * (-h * eta).exp();
        x = if inject {
            let segment = (r_2 - 1.0) * h * eta;
            draws.push(common::noise(ctx, &x, sigma_s_2, s_next)?);
            k[0] *= segment.exp();
            k[1] *= segment.exp();
            k[2] = (-(segment * 2.0).exp_m1()).sqrt();
            let scale = s_next * s_noise;
            ctx.backend.lincomb(&[
                (c_x, &x),
                (-alpha_t * b1, &denoised),
                (-alpha_t * b3, &denoised_3),
                (k[0] * scale, &draws[0]),
                (k[1] * scale, &draws[1]),
                (k[2] * scale, &draws[2]),
            ])?
        } else {
            ctx.backend.lincomb(&[
                (c_x, &x),
                (-alpha_t * b1, &denoised),
                (-alpha_t * b3, &denoised_3),
            ])?
        };
    }
    Ok(x)
}
