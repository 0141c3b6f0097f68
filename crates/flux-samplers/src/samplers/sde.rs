//! DPM-Solver++ SDE samplers: `dpmpp_sde`, `dpmpp_2m_sde`, `dpmpp_2m_sde_heun`, `dpmpp_3m_sde`.
//!
//! All of them work in half-logSNR `lambda` (`-logit(sigma)` for flow models, `-ln(sigma)`
//! otherwise) and, for flow models, move a first sigma `>= 1` to `percent_to_sigma(1e-4)`.
//!
//! ComfyUI builds a Brownian-tree noise sampler inside these functions from the seed; here the
//! noise comes from the context's [`crate::NoiseSource`] (a Brownian-tree source in normal use,
//! a replay in parity tests), asked for the same `(sigma, sigma_next)` intervals in the same
//! order as the reference.
//!
//! The `_gpu` twins (`dpmpp_sde_gpu`, `dpmpp_2m_sde_gpu`, `dpmpp_2m_sde_heun_gpu`,
//! `dpmpp_3m_sde_gpu`) differ in ComfyUI only in where the Brownian tree is evaluated (on the
//! latent's device instead of the CPU); their maths is identical, so they share these functions
//! and differ only in the noise source the caller hands in.

use super::common::{self, ancestral_step, half_log_snr, sigma_from_half_log_snr};
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `dpmpp_sde` (and `dpmpp_sde_gpu`): DPM-Solver++ (stochastic), two model calls per step.
pub(crate) fn dpmpp_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let r = opts.r.unwrap_or(0.5);
    if !(r.is_finite() && r > 0.0) {
        return Err(SamplerError::InvalidOption {
            option: "r".into(),
            message: format!("must be a finite number > 0, got {r}"),
        });
    }
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
        let lambda_s_1 = lambda_s + r * h;
        let fac = 1.0 / (2.0 * r);
        let sigma_s_1 = sigma_from_half_log_snr(flow, lambda_s_1);
        let alpha_s = s * lambda_s.exp();
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_t = s_next * lambda_t.exp();

        // Step 1: to the intermediate point.
        let (sd, su) = ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), eta);
        let h_ = -sd.ln() - lambda_s;
        let c_x = alpha_s_1 / alpha_s * (-h_).exp();
        let c_d = -alpha_s_1 * (-h_).exp_m1();
        let x_2 = if inject {
            let n = common::noise(ctx, &x, s, sigma_s_1)?;
            ctx.backend
                .lincomb(&[(c_x, &x), (c_d, &denoised), (alpha_s_1 * s_noise * su, &n)])?
        } else {
            ctx.backend.lincomb(&[(c_x, &x), (c_d, &denoised)])?
        };
        let denoised_2 = common::model(ctx, &x_2, sigma_s_1, false)?.denoised;

        // Step 2: to the next sigma with the blended prediction.
        let (sd, su) = ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), eta);
        let h_ = -sd.ln() - lambda_s;
        let c_x = alpha_t / alpha_s * (-h_).exp();
        let c_d = -alpha_t * (-h_).exp_m1();
        x = if inject {
            // The next step's draws lie below s_next (this step's first draw, within
            // [sigma_s_1, s], is the one that shares nodes with this one).
            ctx.noise.promise_below(s_next);
            let n = common::noise(ctx, &x, s, s_next)?;
            ctx.backend.lincomb(&[
                (c_x, &x),
                (c_d * (1.0 - fac), &denoised),
                (c_d * fac, &denoised_2),
                (alpha_t * s_noise * su, &n),
            ])?
        } else {
            ctx.backend.lincomb(&[
                (c_x, &x),
                (c_d * (1.0 - fac), &denoised),
                (c_d * fac, &denoised_2),
            ])?
        };
    }
    Ok(x)
}

/// Second-order correction of `dpmpp_2m_sde`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

fn solver_type(opts: &SamplerOptions, default: SolverType) -> Result<SolverType> {
    match opts.solver_type.as_deref() {
        None => Ok(default),
        Some("midpoint") => Ok(SolverType::Midpoint),
        Some("heun") => Ok(SolverType::Heun),
        Some(other) => Err(SamplerError::InvalidOption {
            option: "solver_type".into(),
            message: format!("expected 'midpoint' or 'heun', got '{other}'"),
        }),
    }
}

/// `dpmpp_2m_sde` (and `_gpu`): DPM-Solver++(2M) SDE, midpoint correction by default.
pub(crate) fn dpmpp_2m_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let solver = solver_type(opts, SolverType::Midpoint)?;
    multistep_sde(ctx, x, sigmas, opts, 2, solver)
}

/// `dpmpp_2m_sde_heun` (and `_gpu`): DPM-Solver++(2M) SDE, Heun correction by default.
pub(crate) fn dpmpp_2m_sde_heun<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let solver = solver_type(opts, SolverType::Heun)?;
    multistep_sde(ctx, x, sigmas, opts, 2, solver)
}

/// `dpmpp_3m_sde` (and `_gpu`): DPM-Solver++(3M) SDE.
pub(crate) fn dpmpp_3m_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    multistep_sde(ctx, x, sigmas, opts, 3, SolverType::Midpoint)
}

/// The multistep SDE loop shared by the 2M (`order` 2) and 3M (`order` 3) samplers.
fn multistep_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
    order: usize,
    solver: SolverType,
) -> Result<Tensor<B>> {
    let eta = common::non_negative("eta", opts.eta, 1.0)?;
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let flow = ctx.model.is_flow();
    let sigmas = common::offset_first_sigma_for_snr(ctx, sigmas);
    let mut x = x;
    // Previous predictions and step sizes, newest first.
    let mut d_1: Option<Tensor<B>> = None;
    let mut d_2: Option<Tensor<B>> = None;
    let mut h = None::<f64>;
    let mut h_1 = None::<f64>;
    let mut h_2 = None::<f64>;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, &sigmas, &x, &denoised)?;
        if s_next == 0.0 {
            x = ctx.backend.copy(&denoised)?;
        } else {
            let lambda_s = half_log_snr(flow, s);
            let lambda_t = half_log_snr(flow, s_next);
            let hh = lambda_t - lambda_s;
            h = Some(hh);
            let h_eta = hh * (eta + 1.0);
            let alpha_t = s_next * lambda_t.exp();
            let c_x = s_next / s * (-hh * eta).exp();
            let mut c_d = alpha_t * -(-h_eta).exp_m1();
            let mut c_d1 = 0.0;
            let mut c_d2 = 0.0;
            let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
            match (&d_1, &d_2, h_1, h_2) {
                (Some(_), Some(_), Some(h1), Some(h2)) if order >= 3 => {
                    let r0 = h1 / hh;
                    let r1 = h2 / hh;
                    let phi_3 = phi_2 / h_eta - 0.5;
                    let a = alpha_t * phi_2;
                    let b = alpha_t * phi_3;
                    let w = r0 / (r0 + r1);
                    // a * d1 - b * d2 written over d1_0 = (D - D1) / r0 and d1_1 = (D1 - D2) / r1.
                    let p = a * (1.0 + w) - b / (r0 + r1);
                    let q = -a * w + b / (r0 + r1);
                    c_d += p / r0;
                    c_d1 += -p / r0 + q / r1;
                    c_d2 += -q / r1;
                }
                (Some(_), _, Some(h1), _) => {
                    let r = h1 / hh;
                    let k = if order >= 3 {
                        alpha_t * phi_2 / r
                    } else {
                        match solver {
                            SolverType::Heun => {
                                alpha_t * (-(-h_eta).exp_m1() / (-h_eta) + 1.0) * (1.0 / r)
                            }
                            SolverType::Midpoint => 0.5 * alpha_t * -(-h_eta).exp_m1() * (1.0 / r),
                        }
                    };
                    c_d += k;
                    c_d1 -= k;
                }
                _ => {}
            }
            let noise = if eta > 0.0 && s_noise > 0.0 {
                // Every later step draws below s_next.
                ctx.noise.promise_below(s_next);
                let n = common::noise(ctx, &x, s, s_next)?;
                Some((s_next * (-(-2.0 * hh * eta).exp_m1()).sqrt() * s_noise, n))
            } else {
                None
            };
            let mut terms: Vec<(f64, &Tensor<B>)> = vec![(c_x, &x), (c_d, &denoised)];
            if c_d1 != 0.0
                && let Some(t) = &d_1
            {
                terms.push((c_d1, t));
            }
            if c_d2 != 0.0
                && let Some(t) = &d_2
            {
                terms.push((c_d2, t));
            }
            if let Some((c, n)) = &noise {
                terms.push((*c, n));
            }
            x = ctx.backend.lincomb(&terms)?;
        }
        d_2 = d_1.take();
        d_1 = Some(denoised);
        h_2 = h_1;
        h_1 = h;
    }
    Ok(x)
}
