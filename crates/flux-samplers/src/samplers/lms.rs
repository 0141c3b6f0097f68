//! `lms`: the linear multistep method of k-diffusion on `dx/dsigma = (x - D)/sigma`.

use super::common;
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, MAX_LINCOMB_TERMS, Tensor};
use std::collections::VecDeque;

/// Nodes and weights of the `n`-point Gauss-Legendre rule on `[-1, 1]` (exact for polynomials
/// of degree `2n - 1`), by Newton iteration on the Legendre polynomial.
pub(crate) fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    if n <= 1 {
        return vec![(0.0, 2.0)];
    }
    (0..n)
        .map(|i| {
            // Chebyshev-like first guess, then Newton on P_n.
            let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
            let mut dp = 1.0;
            for _ in 0..100 {
                let (mut p0, mut p1) = (1.0, z);
                for k in 2..=n {
                    let k = k as f64;
                    let p2 = ((2.0 * k - 1.0) * z * p1 - (k - 1.0) * p0) / k;
                    p0 = p1;
                    p1 = p2;
                }
                dp = n as f64 * (z * p1 - p0) / (z * z - 1.0);
                let dz = p1 / dp;
                z -= dz;
                if dz.abs() < 1e-16 {
                    break;
                }
            }
            (z, 2.0 / ((1.0 - z * z) * dp * dp))
        })
        .collect()
}

/// `integral over [t[i], t[i+1]]` of the Lagrange basis polynomial of node `t[i - j]` among the
/// nodes `t[i], t[i-1], ..., t[i-order+1]`. The reference integrates numerically
/// (`scipy.integrate.quad`); the integrand is a polynomial of degree `order - 1`, so a
/// Gauss-Legendre rule with enough points gives the exact value.
pub(crate) fn linear_multistep_coeff(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    let basis = |tau: f64| {
        let mut prod = 1.0;
        for k in 0..order {
            if k != j {
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k]);
            }
        }
        prod
    };
    let (a, b) = (t[i], t[i + 1]);
    let (mid, half) = (0.5 * (a + b), 0.5 * (b - a));
    gauss_legendre(order.div_ceil(2).max(1))
        .iter()
        .map(|&(z, w)| w * basis(mid + half * z))
        .sum::<f64>()
        * half
}

/// `lms`: linear multistep of order up to `order` (default 4) over the stored slopes; the step to
/// sigma 0 returns the denoised prediction.
pub(crate) fn lms<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let order = opts.order.unwrap_or(4);
    if order == 0 || order > MAX_LINCOMB_TERMS - 1 {
        return Err(SamplerError::InvalidOption {
            option: "order".into(),
            message: format!(
                "lms supports order 1..={}, got {order}",
                MAX_LINCOMB_TERMS - 1
            ),
        });
    }
    let mut ds: VecDeque<Tensor<B>> = VecDeque::with_capacity(order + 1);
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let s = sigmas[i];
        let den = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let to_d = (1.0 / s, -1.0 / s);
        let d = if sigmas[i + 1] == 0.0 {
            let d = ctx.backend.lincomb(&[(to_d.0, &x), (to_d.1, &den)])?;
            x = den;
            d
        } else {
            let cur_order = (i + 1).min(order);
            let coeffs: Vec<f64> = (0..cur_order)
                .map(|j| linear_multistep_coeff(cur_order, sigmas, i, j))
                .collect();
            // `d = (x - D) / s` and the step with it and the stored ones in one pass.
            let history: Vec<(f64, &Tensor<B>)> =
                coeffs[1..].iter().copied().zip(ds.iter().rev()).collect();
            ctx.backend
                .derivative_step(&mut x, to_d, &den, coeffs[0], &history)?
        };
        ds.push_back(d);
        if ds.len() > order {
            ds.pop_front();
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        for n in 1..6 {
            let rule = gauss_legendre(n);
            for deg in 0..(2 * n) {
                let got: f64 = rule.iter().map(|&(z, w)| w * z.powi(deg as i32)).sum();
                let exact = if deg % 2 == 1 {
                    0.0
                } else {
                    2.0 / (deg as f64 + 1.0)
                };
                assert!(
                    (got - exact).abs() < 1e-14,
                    "n {n} deg {deg}: {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn second_order_coefficients_match_adams_bashforth() {
        // Equal steps h: AB2 weights are (3/2 h, -1/2 h).
        let t = [3.0, 2.0, 1.0];
        let c0 = linear_multistep_coeff(2, &t, 1, 0);
        let c1 = linear_multistep_coeff(2, &t, 1, 1);
        assert!((c0 - (-1.5)).abs() < 1e-15 && (c1 - 0.5).abs() < 1e-15);
    }
}
