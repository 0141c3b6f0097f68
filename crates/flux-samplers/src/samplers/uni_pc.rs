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

struct Runner<'c, 'a, B: Backend> {
    ctx: &'c mut SampleContext<'a, B>,
    f32_mode: bool,
    variant: Variant,
}

impl<B: Backend> Runner<'_, '_, B> {
    /// The data prediction at time `t` of the VP point whose model input is `x_ve`
    /// (`x_ve = x_vp * sqrt(1 + t^2)`), through the eps form ComfyUI wraps the model in:
    /// `x0 = (x_vp - std (x_ve - D) / t) / alpha`.
    ///
    /// Written over `x_ve` and `D` alone, `x0 = c x_ve + k D` with `k = std / (t alpha)` and
    /// `c = 1 / (alpha scale) - k`: one pass that overwrites the denoiser's output. In exact
    /// arithmetic `c = 0` and `k = 1`; in f32 `std` cancels for small `t` and the reference's
    /// result carries that, so the coefficients keep it.
    fn model_x0(&mut self, x_ve: &Tensor<B>, t: f64) -> Result<Tensor<B>> {
        let mut denoised = common::model(self.ctx, x_ve, t, false)?.denoised;
        let v = vp(t, self.f32_mode);
        let k = v.std / (t * v.alpha);
        let c = 1.0 / (v.alpha * ve_scale(t, self.f32_mode)) - k;
        self.ctx
            .backend
            .lincomb_inplace(&mut denoised, k, &[(c, x_ve)])?;
        Ok(denoised)
    }

    /// One multistep UniPC update from the last entry of `ts` to `t`, with the corrector when
    /// `use_corrector` (returning the model value at the new point).
    fn update(
        &mut self,
        x: &Tensor<B>,
        models: &[Tensor<B>],
        ts: &[f64],
        t: f64,
        order: usize,
        use_corrector: bool,
    ) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        let f32_mode = self.f32_mode;
        let last = ts.len() - 1;
        let prev_0 = vp(ts[last], f32_mode);
        let now = vp(t, f32_mode);
        let m0 = &models[models.len() - 1];
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
        let b_h = match self.variant {
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
        let mut terms: Vec<(f64, &Tensor<B>)> = vec![(c_x, x), (c_m0, m0)];
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
                terms.push((c, &models[models.len() - 2 - k]));
                terms[1].0 -= c;
            }
        }
        if !use_corrector {
            return Ok((self.ctx.backend.lincomb(&terms)?, None));
        }
        // The predicted point is only needed as the model's input: write it scaled to VE.
        let to_ve = ve_scale(t, f32_mode);
        for term in &mut terms {
            term.0 *= to_ve;
        }
        let x_ve = self.ctx.backend.lincomb(&terms)?;

        let rhos_c = if order == 1 {
            vec![0.5]
        } else {
            common::solve_linear(r, b, order, "uni_pc")?
        };
        let model_t = self.model_x0(&x_ve, t)?;
        let mut terms: Vec<(f64, &Tensor<B>)> = vec![(c_x, x), (c_m0, m0)];
        for k in 0..order - 1 {
            let c = scale * rhos_c[k] / rks[k];
            terms.push((c, &models[models.len() - 2 - k]));
            terms[1].0 -= c;
        }
        let c_t = scale * rhos_c[order - 1];
        terms.push((c_t, &model_t));
        terms[1].0 -= c_t;
        let x_t = self.ctx.backend.lincomb(&terms)?;
        Ok((x_t, Some(model_t)))
    }
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
    let mut runner = Runner {
        ctx,
        f32_mode,
        variant,
    };
    let x_ve = x;
    let x = runner
        .ctx
        .backend
        .lincomb(&[(1.0 / ve_scale(timesteps[0], f32_mode), &x_ve)])?;
    let mut models: Vec<Tensor<B>> = Vec::with_capacity(order.max(1));
    let mut ts: Vec<f64> = Vec::with_capacity(order.max(1));
    // The first model input is the start latent itself (the VE form of `x`).
    models.push(runner.model_x0(&x_ve, timesteps[0])?);
    drop(x_ve);
    ts.push(timesteps[0]);
    let mut x = x;
    for step_index in 0..steps {
        if step_index == 0 {
            // The model value at the start was computed above.
        } else if step_index < order {
            // The warm-up steps raise the order one at a time (`step_index < steps - 1`, so a
            // corrector always follows).
            let t = timesteps[step_index];
            let (next, model) = runner.update(&x, &models, &ts, t, step_index, true)?;
            x = next;
            models.extend(model);
            ts.push(t);
        } else {
            let last = if step_index == steps - 1 {
                steps
            } else {
                step_index
            };
            for step in step_index..=last {
                let t = timesteps[step];
                let step_order = order.min(steps + 1 - step);
                // No corrector (and no model value) at the final time.
                let use_corrector = step != steps;
                let (next, model) =
                    runner.update(&x, &models, &ts, t, step_order, use_corrector)?;
                x = next;
                if ts.len() == order {
                    ts.remove(0);
                }
                ts.push(t);
                if let Some(model) = model {
                    if models.len() == order {
                        models.remove(0);
                    }
                    models.push(model);
                }
            }
        }
        if let Some(last) = models.last() {
            common::report(runner.ctx, step_index, sigmas, &x, last)?;
        }
    }
    let alpha_last = vp(timesteps[n - 1], f32_mode).alpha;
    Ok(runner.ctx.backend.lincomb(&[(1.0 / alpha_last, &x)])?)
}
