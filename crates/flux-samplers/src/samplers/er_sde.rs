//! `er_sde`: extended reverse-time SDE solver (VP ER-SDE-Solver-3, arXiv 2309.06169).
//!
//! Time is `er_lambda = sigma / alpha = exp(-half_log_snr)`; the first flow sigma `>= 1` moves to
//! `percent_to_sigma(1e-4)`. Stages 2 and 3 integrate `1 / noise_scaler` numerically over 200
//! points. ComfyUI holds those points in a float32 tensor, so the integration runs in f32 even
//! in an f64 run; this module repeats that f32 arithmetic, summation order included (libm's
//! `powf`/`expf` may differ from torch's vectorised ones by an ulp on some points).

use super::common::{self, half_log_snr};
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// Number of integration points of stages 2 and 3.
const POINTS: usize = 200;

/// ComfyUI's default noise scaler `x * (exp(x^0.3) + 10)`.
fn noise_scaler(x: f64) -> f64 {
    x * (x.powf(0.3).exp() + 10.0)
}

fn noise_scaler_f32(x: f32) -> f32 {
    x * (x.powf(0.3).exp() + 10.0)
}

/// `(sum(1 / scaled_pos), sum((pos - er_lambda_s) / scaled_pos))` over the f32 integration
/// points from `er_lambda_t` in steps of `step`, each summed in f32 as torch does.
fn integrals(er_lambda_t: f64, er_lambda_s: f64, step: f64) -> (f64, f64) {
    let start = er_lambda_t as f32;
    let step = step as f32;
    let offset = er_lambda_s as f32;
    let mut inv = [0.0f32; POINTS];
    let mut weighted = [0.0f32; POINTS];
    for k in 0..POINTS {
        let pos = start + (k as f32) * step;
        let scaled = noise_scaler_f32(pos);
        inv[k] = 1.0 / scaled;
        weighted[k] = (pos - offset) / scaled;
    }
    (
        f64::from(torch_sum_f32(&inv)),
        f64::from(torch_sum_f32(&weighted)),
    )
}

/// Lanes of torch's float32 CPU vectors (AVX2).
const LANES: usize = 8;

/// The float32 sum of a contiguous vector in torch's CPU order (`cascade_sum` for short rows):
/// full 8-lane vectors accumulated in four interleaved partial sums, the leftover vectors added
/// to the first, the partials folded, then the lanes and the scalar tail added in order.
fn torch_sum_f32(v: &[f32]) -> f32 {
    let n_vec = v.len() / LANES;
    let lane = |i: usize| -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        out.copy_from_slice(&v[i * LANES..(i + 1) * LANES]);
        out
    };
    let add = |a: &mut [f32; LANES], b: [f32; LANES]| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    };
    let mut acc = [[0.0f32; LANES]; 4];
    let groups = n_vec / 4;
    for g in 0..groups {
        for (k, a) in acc.iter_mut().enumerate() {
            add(a, lane(g * 4 + k));
        }
    }
    let mut total = acc[0];
    for i in groups * 4..n_vec {
        add(&mut total, lane(i));
    }
    for a in &acc[1..] {
        add(&mut total, *a);
    }
    let mut tail = 0.0f32;
    for &x in &v[n_vec * LANES..] {
        tail += x;
    }
    for x in total {
        tail += x;
    }
    tail
}

/// `er_sde` with `max_stage` (default 3) and the default noise scaler.
pub(crate) fn er_sde<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let max_stage = opts.max_stage.unwrap_or(3);
    if !(1..=3).contains(&max_stage) {
        return Err(SamplerError::InvalidOption {
            option: "max_stage".into(),
            message: format!("must be 1, 2 or 3, got {max_stage}"),
        });
    }
    let flow = ctx.model.is_flow();
    let sigmas = common::offset_first_sigma_for_snr(ctx, sigmas);
    let er_lambdas: Vec<f64> = sigmas
        .iter()
        .map(|&s| (-half_log_snr(flow, s)).exp())
        .collect();
    let mut x = x;
    let mut old_denoised: Option<Tensor<B>> = None;
    let mut old_denoised_d: Option<Tensor<B>> = None;
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, &sigmas, &x, &denoised)?;
        let stage_used = max_stage.min(i + 1);
        if s_next == 0.0 {
            x = ctx.backend.copy(&denoised)?;
        } else {
            let er_lambda_s = er_lambdas[i];
            let er_lambda_t = er_lambdas[i + 1];
            let alpha_s = s / er_lambda_s;
            let alpha_t = s_next / er_lambda_t;
            let r_alpha = alpha_t / alpha_s;
            let r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s);
            let ns_t = noise_scaler(er_lambda_t);

            let mut terms_d: Vec<(f64, &Tensor<B>)> = Vec::new();
            let mut denoised_d = None;
            let mut c_dd = 0.0;
            let mut c_du = 0.0;
            if stage_used >= 2
                && let Some(old) = &old_denoised
            {
                let dt = er_lambda_t - er_lambda_s;
                let step = -dt / POINTS as f64;
                let (sum, sum_u) = integrals(er_lambda_t, er_lambda_s, step);
                let s_int = sum * step;
                let c = 1.0 / (er_lambda_s - er_lambdas[i - 1]);
                let dd = ctx.backend.lincomb(&[(c, &denoised), (-c, old)])?;
                c_dd = alpha_t * (dt + s_int * ns_t);
                if stage_used >= 3
                    && let Some(old_d) = &old_denoised_d
                {
                    let s_u = sum_u * step;
                    c_du = alpha_t * (dt * dt / 2.0 + s_u * ns_t);
                    let inv = 1.0 / ((er_lambda_s - er_lambdas[i - 2]) / 2.0);
                    // denoised_u = (dd - old_dd) * inv, folded into the coefficients below.
                    terms_d.push((-c_du * inv, old_d));
                    c_du *= inv;
                }
                denoised_d = Some(dd);
            }
            let noise = if s_noise > 0.0 {
                let n = common::noise(ctx, &x, s, s_next)?;
                let amp = (er_lambda_t * er_lambda_t - er_lambda_s * er_lambda_s * r * r).sqrt();
                let amp = if amp.is_nan() { 0.0 } else { amp };
                Some((alpha_t * s_noise * amp, n))
            } else {
                None
            };
            let mut terms: Vec<(f64, &Tensor<B>)> =
                vec![(r_alpha * r, &x), (alpha_t * (1.0 - r), &denoised)];
            if let Some(dd) = &denoised_d {
                terms.push((c_dd + c_du, dd));
            }
            terms.extend(terms_d.iter().copied());
            if let Some((c, n)) = &noise {
                terms.push((*c, n));
            }
            x = ctx.backend.lincomb(&terms)?;
            if denoised_d.is_some() {
                old_denoised_d = denoised_d;
            }
        }
        old_denoised = Some(denoised);
    }
    Ok(x)
}
