//! UniPC multistep predictor-corrector (`uni_pc` = variant bh1, `uni_pc_bh2` = bh2), run as
//! ComfyUI runs it for every model type: the VE ODE in VP form.
//!
//! - `x_vp = x / sqrt(1 + sigma_0^2)`; the denoiser becomes an eps-predictor at
//!   `x_ve = x_vp * sqrt(1 + s^2)`; schedule `alpha(s) = 1 / sqrt(1 + s^2)`,
//!   `std(s) = sqrt(1 - alpha^2)`, `lambda(s) = ln alpha - ln std`, data prediction.
//! - A final sigma of 0 is replaced by 0.001 (where the ODE is still defined); ComfyUI does that
//!   in the caller's schedule, so its `inverse_noise_scaling` then sees 0.001 (see
//!   [`crate::Sampler::effective_last_sigma`]). The result is `x_vp / alpha(last)`.
//! - `order = min(3, len(sigmas) - 2)`, lower orders at the start and at the end, a corrector on
//!   every step but the last, no model call at the final time (`steps` calls in all).
//!   Order-1 corrector and order-2 predictor use `rho = 0.5`; otherwise `rho` solves the
//!   Vandermonde system `R rho = b`, `B(h) = h` (bh1) or `e^h - 1` (bh2).
//!
//! With f32 latents the schedule functions are evaluated in f32, as in ComfyUI, because
//! `std(0.001)` cancels catastrophically in f32 and that shapes the result.
//!
//! Memory traffic: the predicted point is only the model's input, so it is written in VE form
//! directly; the data prediction overwrites the denoiser's output; each corrector writes the
//! next step's prediction in the same pass ([`flux_kernels::SamplerOps::lincomb_pair`]). Ten
//! latent-sized reads and writes per order-3 step, where the reference's sequence of tensor
//! operations makes seventeen.

use super::common;
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, DType, Tensor};

/// `B(h)` of the UniPC update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Bh1,
    Bh2,
}

/// The sigma ComfyUI's UniPC puts in place of a final 0, in the latent's precision.
pub(crate) fn replacement_last_sigma(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        f64::from(0.001f32)
    } else {
        0.001
    }
}

/// `uni_pc` (bh1).
pub(crate) fn uni_pc<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, Variant::Bh1)
}

/// `uni_pc_bh2`.
pub(crate) fn uni_pc_bh2<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, Variant::Bh2)
}

/// The VP view of a sigma: `(ln alpha, alpha, std, lambda)`, evaluated in f32 for f32 latents.
#[derive(Clone, Copy, Debug)]
struct Vp {
    alpha: f64,
    std: f64,
    lambda: f64,
}

fn vp(sigma: f64, f32_mode: bool) -> Vp {
    if f32_mode {
        let s = sigma as f32;
        let lmc = 0.5f32 * (1.0f32 / (s * s + 1.0f32)).ln();
        let e = (2.0f32 * lmc).exp();
        Vp {
            alpha: f64::from(lmc.exp()),
            std: f64::from((1.0f32 - e).sqrt()),
            lambda: f64::from(lmc - 0.5f32 * (1.0f32 - e).ln()),
        }
    } else {
        let lmc = 0.5 * (1.0 / (sigma * sigma + 1.0)).ln();
        let e = (2.0 * lmc).exp();
        Vp {
            alpha: lmc.exp(),
            std: (1.0 - e).sqrt(),
            lambda: lmc - 0.5 * (1.0 - e).ln(),
        }
    }
}

/// `sqrt(s^2 + 1)` in the latent's precision.
fn ve_scale(sigma: f64, f32_mode: bool) -> f64 {
    if f32_mode {
        let s = sigma as f32;
        f64::from((s * s + 1.0f32).sqrt())
    } else {
        (sigma * sigma + 1.0).sqrt()
    }
}

/// The data prediction at time `t` of the VP point whose model input is `x_ve`
/// (`x_ve = x_vp * sqrt(1 + t^2)`), through the eps form ComfyUI wraps the model in:
/// `x0 = (x_vp - std (x_ve - D) / t) / alpha`.
///
/// Written over `x_ve` and `D` alone, `x0 = c x_ve + k D` with `k = std / (t alpha)` and
/// `c = 1 / (alpha sqrt(1 + t^2)) - k`: one pass that overwrites the denoiser's output. In exact
/// arithmetic `c = 0` and `k = 1`; in f32 `std` cancels for small `t` and the reference's
/// result carries that, so the coefficients keep it.
fn model_x0<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x_ve: &Tensor<B>,
    t: f64,
    f32_mode: bool,
) -> Result<Tensor<B>> {
    let mut denoised = common::model(ctx, x_ve, t, false)?.denoised;
    let v = vp(t, f32_mode);
    let k = v.std / (t * v.alpha);
    let c = 1.0 / (v.alpha * ve_scale(t, f32_mode)) - k;
    ctx.backend
        .lincomb_inplace(&mut denoised, k, &[(c, x_ve)])?;
    Ok(denoised)
}

/// The coefficients of one UniPC update from the last entry of `ts` to `t` at order `order`,
/// over `x` and the model values newest first (`m_0, m_1, ...`, `m_0` at the last entry of
/// `ts`).
struct Coefficients {
    /// Predictor: `[c_x, c_m0, ..., c_m(order-1)]`.
    predictor: Vec<f64>,
    /// Corrector: `[c_x, c_m0, ..., c_m(order-1), c_t]`, `c_t` for the model value at `t`.
    corrector: Vec<f64>,
}

fn coefficients(
    ts: &[f64],
    t: f64,
    order: usize,
    variant: Variant,
    f32_mode: bool,
) -> Result<Coefficients> {
    let last = ts.len() - 1;
    let prev_0 = vp(ts[last], f32_mode);
    let now = vp(t, f32_mode);
    let h = now.lambda - prev_0.lambda;

    let mut rks = Vec::with_capacity(order);
    for i in 1..order {
        let lambda_i = vp(ts[last - i], f32_mode).lambda;
        rks.push((lambda_i - prev_0.lambda) / h);
    }
    rks.push(1.0);

    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial_i = 1.0;
    let b_h = match variant {
        Variant::Bh1 => hh,
        Variant::Bh2 => hh.exp_m1(),
    };
    let mut r = vec![0.0; order * order];
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        for (k, &rk) in rks.iter().enumerate() {
            r[(i - 1) * order + k] = rk.powi(i as i32 - 1);
        }
        b.push(h_phi_k * factorial_i / b_h);
        factorial_i *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
    }

    let c_x = now.std / prev_0.std;
    let c_m0 = -now.alpha * h_phi_1;
    let scale = -now.alpha * b_h;

    // Predictor: x_t_ - alpha_t B(h) sum_k rho_k (m_k - m0) / r_k.
    let mut predictor = vec![c_x, c_m0];
    if order >= 2 {
        let rhos_p = if order == 2 {
            vec![0.5]
        } else {
            let n = order - 1;
            let mut sub = vec![0.0; n * n];
            for row in 0..n {
                sub[row * n..(row + 1) * n].copy_from_slice(&r[row * order..row * order + n]);
            }
            common::solve_linear(sub, b[..n].to_vec(), n, "uni_pc")?
        };
        for k in 0..order - 1 {
            let c = scale * rhos_p[k] / rks[k];
            predictor.push(c);
            predictor[1] -= c;
        }
    }

    // Corrector: the same with the model value at `t` as the newest point.
    let rhos_c = if order == 1 {
        vec![0.5]
    } else {
        common::solve_linear(r, b, order, "uni_pc")?
    };
    let mut corrector = vec![c_x, c_m0];
    for k in 0..order - 1 {
        let c = scale * rhos_c[k] / rks[k];
        corrector.push(c);
        corrector[1] -= c;
    }
    let c_t = scale * rhos_c[order - 1];
    corrector.push(c_t);
    corrector[1] -= c_t;
    Ok(Coefficients {
        predictor,
        corrector,
    })
}

/// Appends `v` to a history of at most `cap` entries, dropping the oldest.
fn push_bounded<T>(history: &mut Vec<T>, v: T, cap: usize) {
    if history.len() == cap {
        history.remove(0);
    }
    history.push(v);
}

fn run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    variant: Variant,
) -> Result<Tensor<B>> {
    let f32_mode = x.dtype() == DType::F32;
    let n = sigmas.len();
    let mut timesteps = sigmas.to_vec();
    if timesteps[n - 1] == 0.0 {
        timesteps[n - 1] = replacement_last_sigma(x.dtype());
    }
    if timesteps.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(SamplerError::InvalidSigmas(
            "uni_pc needs positive finite sigmas (a final 0 excepted)".into(),
        ));
    }
    let steps = n - 1;
    let order = 3.min(n - 2);
    // Update `s` (to `timesteps[s]`, 1 <= s <= steps) runs at this order: rising by one from
    // the start, falling to one at the end; every update but the last has a corrector.
    let order_at = |s: usize| s.min(order).min(steps + 1 - s);
    let x_ve = x;
    let mut x = ctx
        .backend
        .lincomb(&[(1.0 / ve_scale(timesteps[0], f32_mode), &x_ve)])?;
    // The first model input is the start latent itself (the VE form of `x`).
    let mut models: Vec<Tensor<B>> = vec![model_x0(ctx, &x_ve, timesteps[0], f32_mode)?];
    drop(x_ve);
    let mut ts: Vec<f64> = vec![timesteps[0]];
    common::report(ctx, 0, sigmas, &x, &models[0])?;

    if steps > 1 {
        // The predicted point of update `s` is written in VE form (the model's input) when a
        // corrector follows, in VP form for the final update.
        let to_ve = |s: usize| {
            if s == steps {
                1.0
            } else {
                ve_scale(timesteps[s], f32_mode)
            }
        };
        let mut now = coefficients(&ts, timesteps[1], order_at(1), variant, f32_mode)?;
        // Update 1 runs at order 1: its prediction reads x and m_0 only.
        let mut predicted = ctx.backend.lincomb(&[
            (to_ve(1) * now.predictor[0], &x),
            (to_ve(1) * now.predictor[1], &models[0]),
        ])?;
        for s in 1..=steps {
            let t = timesteps[s];
            if s == steps {
                // No corrector (and no model value) at the final time.
                x = predicted;
                break;
            }
            let k = order_at(s);
            let model_t = model_x0(ctx, &predicted, t, f32_mode)?;
            // Corrector operands: x, m_0 .. m_(k-1), the model value at t.
            let mut first: Vec<(f64, &Tensor<B>)> = vec![(now.corrector[0], &x)];
            for j in 0..k {
                first.push((now.corrector[1 + j], &models[models.len() - 1 - j]));
            }
            first.push((now.corrector[k + 1], &model_t));
            push_bounded(&mut ts, t, order);
            let next = coefficients(&ts, timesteps[s + 1], order_at(s + 1), variant, f32_mode)?;
            // The corrector writes the next prediction in the same pass (`lincomb_pair`): it
            // reads the corrected point (the pair's link), the model value at t (its newest
            // model value) and m_0 .. (its older ones), no x.
            let scale = to_ve(s + 1);
            let mut second = vec![0.0; first.len()];
            second[k + 1] = scale * next.predictor[1];
            for (j, &c) in next.predictor[2..].iter().enumerate() {
                second[1 + j] = scale * c;
            }
            let (corrected, next_predicted) =
                ctx.backend
                    .lincomb_pair(&first, scale * next.predictor[0], &second)?;
            drop(first);
            x = corrected;
            push_bounded(&mut models, model_t, order);
            predicted = next_predicted;
            now = next;
            // The second-to-last update is reported with the last one, as the reference does.
            if s + 1 < steps {
                common::report(ctx, s, sigmas, &x, &models[models.len() - 1])?;
            }
        }
        common::report(ctx, steps - 1, sigmas, &x, &models[models.len() - 1])?;
    }
    let alpha_last = vp(timesteps[n - 1], f32_mode).alpha;
    Ok(ctx.backend.lincomb(&[(1.0 / alpha_last, &x)])?)
}
