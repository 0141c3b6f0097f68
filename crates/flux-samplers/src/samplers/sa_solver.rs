//! SA-Solver: stochastic Adams predictor-corrector (arXiv 2309.05019), `sa_solver` and
//! `sa_solver_pece` (which re-evaluates the model at the corrected state).
//!
//! Half-logSNR time, first flow sigma `>= 1` moved to `percent_to_sigma(1e-4)`. Noise is injected
//! with `tau = 1` only where the next sigma lies in `[percent_to_sigma(0.8),
//! percent_to_sigma(0.2)]` (`tau = 0` elsewhere, an ODE step). When the schedule ends at 0 the
//! orders drop near the end so no step uses points beyond the schedule.

use super::common::{self, half_log_snr};
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

/// `sa_solver`.
pub(crate) fn sa_solver<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, opts, false)
}

/// `sa_solver_pece`.
pub(crate) fn sa_solver_pece<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    run(ctx, x, sigmas, opts, true)
}

/// `(1 + tau^2) * int_s^t exp((1 + tau^2) u) u^p du` for `p = 0..n`, with `exp((1 + tau^2) t)`
/// factored out, by the integration-by-parts recursion.
fn exponential_coeffs(s: f64, t: f64, n: usize, tau: f64) -> Vec<f64> {
    let tau_mul = 1.0 + tau * tau;
    let h = t - s;
    let decay = (-tau_mul * h).exp();
    let product: Vec<f64> = (0..n)
        .map(|p| {
            let p = p as f64;
            t.powf(p) - s.powf(p) * decay
        })
        .collect();
    let log_factorial: Vec<f64> = (0..n).map(ln_factorial).collect();
    (0..n)
        .map(|i| {
            (0..=i)
                .map(|j| {
                    let depth = (i - j) as f64;
                    let mut c = log_factorial[i] - log_factorial[j];
                    if tau > 0.0 {
                        c -= depth * tau_mul.ln();
                    }
                    let sign = if (i - j) % 2 == 0 { 1.0 } else { -1.0 };
                    c.exp() * sign * product[j]
                })
                .sum()
        })
        .collect()
}

/// `ln(p!)` (what `lgamma(p + 1)` gives for the small `p` used here).
fn ln_factorial(p: usize) -> f64 {
    (2..=p).map(|k| (k as f64).ln()).sum()
}

/// The b coefficients of the stochastic Adams step from `lambda_s` to `lambda_t` over the
/// interpolation points `lambdas` (oldest first).
fn b_coeffs(
    sigma_next: f64,
    lambdas: &[f64],
    lambda_s: f64,
    lambda_t: f64,
    tau: f64,
    simple_order_2: bool,
    corrector: bool,
) -> Result<Vec<f64>> {
    let n = lambdas.len();
    let alpha_t = sigma_next * lambda_t.exp();
    if simple_order_2 && n == 2 {
        let tau_mul = 1.0 + tau * tau;
        let h = lambda_t - lambda_s;
        let full = alpha_t * -(-h * tau_mul).exp_m1();
        return Ok(if corrector {
            let b_1 = alpha_t * (0.5 * tau_mul * h);
            vec![full - b_1, b_1]
        } else {
            let b_2 = alpha_t * (0.5 * tau_mul * h * h) / (lambdas[0] - lambda_s);
            vec![b_2, full - b_2]
        });
    }
    let e = exponential_coeffs(lambda_s, lambda_t, n, tau);
    // Transposed Vandermonde matrix: row p holds lambda_k^p.
    let mut v = vec![0.0; n * n];
    for p in 0..n {
        for (k, &l) in lambdas.iter().enumerate() {
            v[p * n + k] = l.powf(p as f64);
        }
    }
    Ok(common::solve_linear(v, e, n, "sa_solver")?
        .into_iter()
        .map(|c| alpha_t * c)
        .collect())
}

fn run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
    use_pece: bool,
) -> Result<Tensor<B>> {
    let s_noise = common::non_negative("s_noise", opts.s_noise, 1.0)?;
    let predictor_order = opts.predictor_order.unwrap_or(3);
    let corrector_order = opts.corrector_order.unwrap_or(4);
    for (name, v) in [
        ("predictor_order", predictor_order),
        ("corrector_order", corrector_order),
    ] {
        if !(1..=6).contains(&v) {
            return Err(SamplerError::InvalidOption {
                option: name.into(),
                message: format!("must be between 1 and 6, got {v}"),
            });
        }
    }
    let simple_order_2 = opts.simple_order_2.unwrap_or(false);
    let flow = ctx.model.is_flow();
    let sigmas = common::offset_first_sigma_for_snr(ctx, sigmas);
    let lambdas: Vec<f64> = sigmas.iter().map(|&s| half_log_snr(flow, s)).collect();
    let start_sigma = ctx.model.percent_to_sigma(0.2);
    let end_sigma = ctx.model.percent_to_sigma(0.8);
    let tau_fn = |sigma: f64| {
        if start_sigma >= sigma && sigma >= end_sigma {
            1.0
        } else {
            0.0
        }
    };
    let max_used_order = predictor_order.max(corrector_order);
    let n = sigmas.len();
    let lower_order_to_end = sigmas[n - 1] == 0.0;

    let mut x_pred = x;
    let mut x: Option<Tensor<B>> = None;
    let mut h = 0.0;
    let mut tau_t = 0.0;
    // The previous predictor's noise: coefficient and draw.
    let mut noise: Option<(f64, Tensor<B>)> = None;
    let mut preds: Vec<Tensor<B>> = Vec::new();
    for i in 0..n - 1 {
        let denoised = common::model(ctx, &x_pred, sigmas[i], false)?.denoised;
        common::report(ctx, i, &sigmas, &x_pred, &denoised)?;
        preds.push(denoised);
        if preds.len() > max_used_order {
            preds.remove(0);
        }
        let mut p_used = predictor_order.min(preds.len());
        let mut c_used = if i == 0 || (sigmas[i + 1] == 0.0 && !use_pece) {
            0
        } else {
            corrector_order.min(preds.len())
        };
        if lower_order_to_end {
            p_used = p_used.min(n - 2 - i);
            c_used = c_used.min(n - 1 - i);
        }

        // Corrector.
        let x_cur = match (c_used, x.take()) {
            (0, _) | (_, None) => x_pred,
            (c, Some(x_prev)) => {
                let b = b_coeffs(
                    sigmas[i],
                    &lambdas[i + 1 - c..=i],
                    lambdas[i - 1],
                    lambdas[i],
                    tau_t,
                    simple_order_2,
                    true,
                )?;
                let mut terms: Vec<(f64, &Tensor<B>)> = vec![(
                    sigmas[i] / sigmas[i - 1] * (-(tau_t * tau_t) * h).exp(),
                    &x_prev,
                )];
                let used = &preds[preds.len() - c..];
                terms.extend(b.iter().copied().zip(used.iter()));
                if tau_t > 0.0
                    && s_noise > 0.0
                    && let Some((k, n)) = &noise
                {
                    terms.push((*k, n));
                }
                let corrected = common::lincomb_any(ctx.backend, &terms)?;
                if use_pece {
                    let again = common::model(ctx, &corrected, sigmas[i], false)?.denoised;
                    if let Some(last) = preds.last_mut() {
                        *last = again;
                    }
                }
                corrected
            }
        };

        // Predictor.
        if sigmas[i + 1] == 0.0 {
            let last = preds.last().ok_or_else(|| {
                SamplerError::InvalidSigmas("sa_solver: no model prediction".into())
            })?;
            x_pred = ctx.backend.copy(last)?;
        } else {
            tau_t = tau_fn(sigmas[i + 1]);
            let b = b_coeffs(
                sigmas[i + 1],
                &lambdas[i + 1 - p_used..=i],
                lambdas[i],
                lambdas[i + 1],
                tau_t,
                simple_order_2,
                false,
            )?;
            h = lambdas[i + 1] - lambdas[i];
            let mut terms: Vec<(f64, &Tensor<B>)> = vec![(
                sigmas[i + 1] / sigmas[i] * (-(tau_t * tau_t) * h).exp(),
                &x_cur,
            )];
            let used = &preds[preds.len() - p_used..];
            terms.extend(b.iter().copied().zip(used.iter()));
            let fresh = if tau_t > 0.0 && s_noise > 0.0 {
                let draw = common::noise(ctx, &x_cur, sigmas[i], sigmas[i + 1])?;
                let k = sigmas[i + 1] * (-(-2.0 * tau_t * tau_t * h).exp_m1()).sqrt() * s_noise;
                Some((k, draw))
            } else {
                None
            };
            if let Some((k, d)) = &fresh {
                terms.push((*k, d));
            }
            x_pred = common::lincomb_any(ctx.backend, &terms)?;
            if fresh.is_some() {
                noise = fresh;
            }
        }
        x = Some(x_cur);
    }
    Ok(x_pred)
}

#[cfg(test)]
mod tests {
    use super::{b_coeffs, exponential_coeffs};

    /// `(1 + tau^2) int_s^t exp((1 + tau^2)(u - t)) u^p du` by composite Simpson.
    fn quadrature(s: f64, t: f64, p: i32, tau: f64) -> f64 {
        let m = 1.0 + tau * tau;
        let n = 4000;
        let dx = (t - s) / f64::from(n);
        let f = |u: f64| (m * (u - t)).exp() * u.powi(p);
        let mut acc = f(s) + f(t);
        for k in 1..n {
            let w = if k % 2 == 1 { 4.0 } else { 2.0 };
            acc += w * f(s + f64::from(k) * dx);
        }
        m * acc * dx / 3.0
    }

    #[test]
    fn exponential_coeffs_match_quadrature() {
        for (s, t) in [(-1.2, 0.4), (0.3, 1.9), (2.0, 2.6)] {
            for tau in [0.0, 1.0, 0.5] {
                let got = exponential_coeffs(s, t, 4, tau);
                for (p, g) in got.iter().enumerate() {
                    let want = quadrature(s, t, p as i32, tau);
                    assert!(
                        (g - want).abs() <= 1e-10 * want.abs().max(1e-3),
                        "s={s} t={t} tau={tau} p={p}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn b_coeffs_integrate_constants_exactly() {
        // The Lagrange weights sum to one, so a constant prediction gets the full integral.
        let lambdas = [-1.5, -0.9, -0.2, 0.35];
        let (lambda_s, lambda_t, sigma_next) = (0.35, 0.8, 0.3);
        for tau in [0.0, 1.0] {
            for n in 1..=4 {
                let b = b_coeffs(
                    sigma_next,
                    &lambdas[4 - n..],
                    lambda_s,
                    lambda_t,
                    tau,
                    false,
                    false,
                )
                .unwrap();
                let alpha_t = sigma_next * f64::exp(lambda_t);
                let want = alpha_t * -(-(1.0 + tau * tau) * (lambda_t - lambda_s)).exp_m1();
                let sum: f64 = b.iter().sum();
                assert!(
                    (sum - want).abs() < 1e-13,
                    "n={n} tau={tau}: {sum} vs {want}"
                );
            }
        }
    }
}
