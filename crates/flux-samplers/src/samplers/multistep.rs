//! Multistep samplers on `dx/dsigma = (x - D)/sigma` from the diff-solvers collection:
//! `ipndm` (fixed Adams-Bashforth weights), `ipndm_v` (variable-step weights) and `deis`
//! (exponential-integrator weights, `tab` or `rhoab`).

use super::common;
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};
use rayon::prelude::*;
use std::collections::VecDeque;

fn max_order(opts: &SamplerOptions, default: usize) -> Result<usize> {
    let m = opts.max_order.unwrap_or(default);
    if (1..=4).contains(&m) {
        Ok(m)
    } else {
        Err(SamplerError::InvalidOption {
            option: "max_order".into(),
            message: format!("must be 1..=4, got {m}"),
        })
    }
}

/// Weights of the current slope and the stored ones (newest first) for one step.
type Weights = Vec<f64>;

/// The loop shared by the three samplers: `weights(i, order)` gives the multipliers of
/// `d_cur, d_prev1, ...` (already including the step size); `None` means "return the
/// denoised prediction" (the step to sigma 0 of ipndm/ipndm_v).
fn run<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    max_order: usize,
    mut weights: impl FnMut(usize, usize) -> Option<Weights>,
) -> Result<Tensor<B>> {
    let mut buffer: VecDeque<Tensor<B>> = VecDeque::with_capacity(max_order);
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let t_cur = sigmas[i];
        let den = common::model(ctx, &x, t_cur, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let coeffs = (1.0 / t_cur, -1.0 / t_cur);
        let order = max_order.min(i + 1);
        // `d = (x - D) / t`, and the step `x + w_0 d + sum w_k d_k` in the same pass.
        let d = match weights(i, order) {
            None => {
                let d = ctx.backend.lincomb(&[(coeffs.0, &x), (coeffs.1, &den)])?;
                x = den;
                d
            }
            Some(w) => {
                let history: Vec<(f64, &Tensor<B>)> =
                    w[1..].iter().copied().zip(buffer.iter().rev()).collect();
                ctx.backend
                    .derivative_step(&mut x, coeffs, &den, w[0], &history)?
            }
        };
        if max_order > 1 {
            if buffer.len() == max_order - 1 {
                buffer.pop_front();
            }
            buffer.push_back(d);
        }
    }
    Ok(x)
}

/// `ipndm`: improved PNDM, Adams-Bashforth weights for equal steps up to fourth order.
pub(crate) fn ipndm<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let max_order = max_order(opts, 4)?;
    run(ctx, x, sigmas, max_order, |i, order| {
        let (t_cur, t_next) = (sigmas[i], sigmas[i + 1]);
        if t_next == 0.0 {
            return None;
        }
        let h = t_next - t_cur;
        let w: &[f64] = match order {
            1 => &[1.0],
            2 => &[3.0 / 2.0, -1.0 / 2.0],
            3 => &[23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
            _ => &[55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
        };
        Some(w.iter().map(|c| c * h).collect())
    })
}

/// `ipndm_v`: improved PNDM with weights for variable step sizes.
#[allow(clippy::manual_midpoint)] // the weights are written as the reference writes them
pub(crate) fn ipndm_v<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let max_order = max_order(opts, 4)?;
    let t = sigmas;
    run(ctx, x, sigmas, max_order, |i, order| {
        let (t_cur, t_next) = (t[i], t[i + 1]);
        if t_next == 0.0 {
            return None;
        }
        let h = t_next - t_cur;
        let w = match order {
            1 => vec![1.0],
            2 => {
                let h1 = t_cur - t[i - 1];
                vec![(2.0 + h / h1) / 2.0, -(h / h1) / 2.0]
            }
            3 => {
                let h1 = t_cur - t[i - 1];
                let h2 = t[i - 1] - t[i - 2];
                let temp = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0;
                vec![
                    (2.0 + h / h1) / 2.0 + temp,
                    -(h / h1) / 2.0 - (1.0 + h1 / h2) * temp,
                    temp * h1 / h2,
                ]
            }
            _ => {
                let h1 = t_cur - t[i - 1];
                let h2 = t[i - 1] - t[i - 2];
                let h3 = t[i - 2] - t[i - 3];
                let temp1 = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0;
                let temp2 = ((1.0 - h / (3.0 * (h + h1))) / 2.0
                    + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2)))
                    * (h * (h + h1) * (h + h1 + h2))
                    / (h1 * (h1 + h2) * (h1 + h2 + h3));
                let q = h1 * (h1 + h2) / (h2 * (h2 + h3));
                vec![
                    (2.0 + h / h1) / 2.0 + temp1 + temp2,
                    -(h / h1) / 2.0 - (1.0 + h1 / h2) * temp1 - (1.0 + h1 / h2 + q) * temp2,
                    temp1 * h1 / h2 + (h1 / h2 + q * (1.0 + h2 / h3)) * temp2,
                    -temp2 * q * h1 / h2,
                ]
            }
        };
        Some(w.iter().map(|c| c * h).collect())
    })
}

/// `deis`: DEIS multistep with coefficients from [`deis_coefficients`]; the step to sigma 0 is
/// an Euler step.
pub(crate) fn deis<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let max_order = max_order(opts, 3)?;
    let mode = match opts.deis_mode.as_deref().unwrap_or("tab") {
        "tab" => DeisMode::Tab,
        "rhoab" => DeisMode::Rhoab,
        other => {
            return Err(SamplerError::InvalidOption {
                option: "deis_mode".into(),
                message: format!("expected 'tab' or 'rhoab', got '{other}'"),
            });
        }
    };
    let coeffs = deis_coefficients(sigmas, max_order, mode);
    run(ctx, x, sigmas, max_order, |i, order| {
        let (t_cur, t_next) = (sigmas[i], sigmas[i + 1]);
        if order == 1 || t_next <= 0.0 {
            return Some(vec![t_next - t_cur]);
        }
        Some(coeffs[i].clone())
    })
}

/// How DEIS integrates its Lagrange polynomials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeisMode {
    /// Numerically, against the VP exponential-integrator weight (`tab`).
    Tab,
    /// Analytically, in sigma (`rhoab`).
    Rhoab,
}

/// Points of the `tab` quadrature (the reference's `N`).
const DEIS_POINTS: usize = 10_000;

/// The VP schedule DEIS maps the sigmas onto (`edm2t` with `sigma_min = 0.002`,
/// `sigma_max = 80`, `epsilon_s = 1e-3`): `beta_d` and `beta_min` as the reference computes them,
/// in float32 (`torch.tensor` of Python floats).
fn deis_vp_betas() -> (f32, f32) {
    let eps_s = 1e-3f32;
    let (smin, smax) = (0.002f32, 80.0f32);
    let lmin = (smin * smin + 1.0).ln();
    let lmax = (smax * smax + 1.0).ln();
    let beta_d = 2.0 * (lmin / eps_s - lmax) / (1e-3f64 - 1.0) as f32;
    let beta_min = lmax - 0.5 * beta_d;
    (beta_d, beta_min)
}

/// `torch.linspace(a, b, n)` in float32 as PyTorch's CPU kernel produces it for long outputs:
/// blocks of 8 lanes (AVX2) `base + k*step` with `base` counted from `a` in the first half and
/// from `b` in the second.
fn linspace_f32_blocks(a: f64, b: f64, n: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let (a, b) = (a as f32, b as f32);
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    let mut out = Vec::with_capacity(n);
    let full = n / (2 * LANES) * (2 * LANES);
    let mut idx = 0;
    while idx < full {
        let base = if idx < half {
            a + step * idx as f32
        } else {
            b - step * (n - idx - 1) as f32
        };
        for k in 0..LANES {
            out.push(base + k as f32 * step);
        }
        idx += LANES;
    }
    for i in full..n {
        out.push(if i < half {
            a + step * i as f32
        } else {
            b - step * (n - i - 1) as f32
        });
    }
    out
}

/// Lanes of the DEIS quadrature: points summed side by side, one partial sum per lane.
const DEIS_LANES: usize = 8;

/// The `tab` Riemann sums of one DEIS step before the `dtau` factor: for each node `j` of
/// `prev`, `sum over tau of w(tau) * L_j(tau)`, with the VP exponential-integrator weight
/// `w(tau) = -dlog(tau) / (2 sqrt(alpha (1 - alpha)))`, `alpha = exp(-tau^2 db / 2 - tau b0)`,
/// and the Lagrange basis polynomial `L_j` of the nodes `prev`.
///
/// Written for the vector units: [`DEIS_LANES`] points at a time with a branch-free `exp`
/// ([`exp_in_range`]) and the basis denominators inverted once, the lanes' partial sums added
/// at the end. Against the plain point-by-point loop with `f64::exp` this moves each term by
/// about an ulp and the sums by about 1e-16 relative; the reference itself sums in float32.
fn deis_tab_sums(taus: &[f32], prev: &[f64], db: f64, b0: f64) -> Vec<f64> {
    // The node count is a compile-time constant of the loop, so the basis products unroll
    // into straight vector code with no per-lane branch.
    match prev.len() {
        0 => Vec::new(),
        1 => deis_tab_sums_of::<1>(taus, prev, db, b0),
        2 => deis_tab_sums_of::<2>(taus, prev, db, b0),
        3 => deis_tab_sums_of::<3>(taus, prev, db, b0),
        _ => deis_tab_sums_of::<4>(taus, &prev[..4], db, b0),
    }
}

/// [`deis_tab_sums`] for `O` nodes (`prev.len() == O`).
fn deis_tab_sums_of<const O: usize>(taus: &[f32], prev: &[f64], db: f64, b0: f64) -> Vec<f64> {
    #[allow(clippy::inline_always)] // compiled once per instruction set below
    #[inline(always)]
    fn body<const O: usize>(taus: &[f32], prev: &[f64; O], db: f64, b0: f64) -> Vec<f64> {
        // inv[j][k] = 1 / (prev[j] - prev[k]) for k != j; 1 on the diagonal, which is skipped.
        let mut inv = [[1.0f64; O]; O];
        for j in 0..O {
            for k in 0..O {
                if k != j {
                    inv[j][k] = 1.0 / (prev[j] - prev[k]);
                }
            }
        }
        let mut lanes = [[0.0f64; DEIS_LANES]; O];
        // `DEIS_LANES` points at a time (a short last block is padded with zero weights); the
        // loop body is written out here, not in a closure, so that it is compiled with the
        // caller's instruction set.
        for block in taus.chunks(DEIS_LANES) {
            let mut tau = [0.0f64; DEIS_LANES];
            let mut weight = [0.0f64; DEIS_LANES];
            for (l, &t) in block.iter().enumerate() {
                tau[l] = f64::from(t);
            }
            for l in 0..DEIS_LANES {
                let alpha = exp_in_range(-0.5 * tau[l] * tau[l] * db - tau[l] * b0);
                let dlog = -tau[l] * db - b0;
                weight[l] = -0.5 * dlog / (alpha * (1.0 - alpha)).sqrt();
            }
            for w in &mut weight[block.len()..] {
                *w = 0.0;
            }
            for (j, lane_sums) in lanes.iter_mut().enumerate() {
                for l in 0..DEIS_LANES {
                    let mut basis = 1.0;
                    for k in 0..O {
                        if k != j {
                            basis *= (tau[l] - prev[k]) * inv[j][k];
                        }
                    }
                    lane_sums[l] += weight[l] * basis;
                }
            }
        }
        lanes.iter().map(|l| l.iter().sum()).collect()
    }
    let prev: &[f64; O] = &std::array::from_fn(|k| prev[k]);
    flux_kernels::simd_dispatch!(body, body_avx512, body_avx2, [const O: usize],
        (taus: &[f32], prev: &[f64; O], db: f64, b0: f64) -> Vec<f64>)
}

/// `exp(x)` for `x` in [-700, 700] (the DEIS weight's arguments lie in [-11, 0]), in
/// straight-line arithmetic that vectorises: `x = n ln2 + r` with `n` rounded to nearest
/// (Cody-Waite, `ln2` in two parts), a degree-13 Taylor polynomial for `exp(r)` on
/// `|r| <= ln2 / 2` (truncation below 1e-17 relative) and `2^n` put into the exponent bits.
/// Within a few ulp of `f64::exp` (tested).
#[allow(clippy::inline_always)] // inlined into the vectorised quadrature loop
#[inline(always)]
fn exp_in_range(x: f64) -> f64 {
    // 1.5 * 2^52: adding it rounds to an integer and leaves that integer in the low bits.
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    const LN2_HI: f64 = 6.931_471_803_691_238_164_9e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    let x = x.clamp(-700.0, 700.0);
    let shifted = x.mul_add(std::f64::consts::LOG2_E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    // 1/k! for k = 13 down to 0, by Horner.
    let mut p: f64 = 1.0 / 6_227_020_800.0;
    for k in (0..13).rev() {
        p = p.mul_add(r, INV_FACTORIAL[k]);
    }
    let scale = f64::from_bits((shifted.to_bits() << 52).wrapping_add(1023 << 52));
    p * scale
}

/// `1/k!` for k = 0..=12.
const INV_FACTORIAL: [f64; 13] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
];

/// DEIS coefficients per step (`coeffs[i][j]` multiplies `d` of step `i - j`), as the
/// reference's `get_deis_coeff_list`. `tab` integrates on a float32 grid of 10000 points with a
/// left-inclusive Riemann sum, like the reference (the sum itself is accumulated in f64 here,
/// where the reference sums in float32: the coefficients agree to about 1e-6 relative).
pub(crate) fn deis_coefficients(sigmas: &[f64], max_order: usize, mode: DeisMode) -> Vec<Vec<f64>> {
    let n = sigmas.len();
    let mut out = Vec::with_capacity(n.saturating_sub(1));
    match mode {
        DeisMode::Tab => {
            let (beta_d, beta_min) = deis_vp_betas();
            let (bd, bm) = (f64::from(beta_d), f64::from(beta_min));
            let bm2 = f64::from(beta_min * beta_min);
            let t: Vec<f64> = sigmas
                .iter()
                .map(|&s| ((bm2 + f64::from(2.0 * beta_d) * (s * s + 1.0).ln()).sqrt() - bm) / bd)
                .collect();
            let beta_0 = beta_min;
            let beta_1 = beta_d + beta_min;
            let db = f64::from(beta_1 - beta_0);
            let b0 = f64::from(beta_0);
            // Each step's sums are independent: they are spread over the pool.
            let steps: Vec<Vec<f64>> = (0..n - 1)
                .into_par_iter()
                .map(|i| {
                    let order = (i + 1).min(max_order);
                    if order == 1 {
                        return Vec::new();
                    }
                    let taus = linspace_f32_blocks(t[i], t[i + 1], DEIS_POINTS);
                    let dtau = (t[i + 1] - t[i]) / DEIS_POINTS as f64;
                    let prev: Vec<f64> = (0..order).map(|k| t[i - k]).collect();
                    let sums = deis_tab_sums(&taus, &prev, db, b0);
                    sums.iter().map(|s| s * dtau).collect()
                })
                .collect();
            out.extend(steps);
        }
        DeisMode::Rhoab => {
            let int2 = |a: f64, b: f64, start: f64, end: f64, c: f64| {
                let coeff = (end.powi(3) - start.powi(3)) / 3.0
                    - (end * end - start * start) * (a + b) / 2.0
                    + (end - start) * a * b;
                coeff / ((c - a) * (c - b))
            };
            let int3 = |a: f64, b: f64, c: f64, start: f64, end: f64, d: f64| {
                let coeff = (end.powi(4) - start.powi(4)) / 4.0
                    - (end.powi(3) - start.powi(3)) * (a + b + c) / 3.0
                    + (end * end - start * start) * (a * b + a * c + b * c) / 2.0
                    - (end - start) * a * b * c;
                coeff / ((d - a) * (d - b) * (d - c))
            };
            let t = sigmas;
            for i in 0..n - 1 {
                let (t_cur, t_next) = (t[i], t[i + 1]);
                // The reference uses `min(i, max_order)` previous nodes, one more than the sampler
                // unpacks once `i >= max_order` (it fails there); one fewer keeps the orders equal.
                let order = i.min(max_order - 1);
                let p: Vec<f64> = (0..=order).map(|k| t[i - k]).collect();
                out.push(match order {
                    0 => Vec::new(),
                    1 => vec![
                        ((t_next - p[1]).powi(2) - (t_cur - p[1]).powi(2)) / (2.0 * (t_cur - p[1])),
                        (t_next - t_cur).powi(2) / (2.0 * (p[1] - t_cur)),
                    ],
                    2 => vec![
                        int2(p[1], p[2], t_cur, t_next, t_cur),
                        int2(t_cur, p[2], t_cur, t_next, p[1]),
                        int2(t_cur, p[1], t_cur, t_next, p[2]),
                    ],
                    _ => vec![
                        int3(p[1], p[2], p[3], t_cur, t_next, t_cur),
                        int3(t_cur, p[2], p[3], t_cur, t_next, p[1]),
                        int3(t_cur, p[1], p[3], t_cur, t_next, p[2]),
                        int3(t_cur, p[1], p[2], t_cur, t_next, p[3]),
                    ],
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn exp_in_range_is_within_a_few_ulp_of_exp(x in -700.0f64..700.0) {
            let (got, want) = (exp_in_range(x), x.exp());
            prop_assert!((got - want).abs() <= 4.0 * f64::EPSILON * want, "{x}: {got} vs {want}");
        }

        #[test]
        fn exp_in_range_on_the_deis_arguments(x in -12.0f64..0.5) {
            let (got, want) = (exp_in_range(x), x.exp());
            prop_assert!((got - want).abs() <= 4.0 * f64::EPSILON * want, "{x}: {got} vs {want}");
        }
    }

    /// The quadrature written point by point with `f64::exp`, as the formula reads.
    fn tab_sums_point_by_point(taus: &[f32], prev: &[f64], db: f64, b0: f64) -> Vec<f64> {
        let mut sums = vec![0.0f64; prev.len()];
        for &tau in taus {
            let tau = f64::from(tau);
            let alpha = (-0.5 * tau * tau * db - tau * b0).exp();
            let dlog = -tau * db - b0;
            let integrand = -0.5 * dlog / (alpha * (1.0 - alpha)).sqrt();
            for (j, sum) in sums.iter_mut().enumerate() {
                let mut poly = 1.0;
                for k in 0..prev.len() {
                    if k != j {
                        poly *= (tau - prev[k]) / (prev[j] - prev[k]);
                    }
                }
                *sum += integrand * poly;
            }
        }
        sums
    }

    #[test]
    fn tab_sums_match_the_point_by_point_formula() {
        let (beta_d, beta_min) = deis_vp_betas();
        let (db, b0) = (f64::from(beta_d), f64::from(beta_min));
        // Nodes of a late step (the grid between the first two, the older ones behind) and
        // point counts that leave a partial last block.
        let nodes = [0.31, 0.42, 0.57, 0.74];
        for order in 2..=4 {
            for points in [DEIS_POINTS, 37] {
                let taus = linspace_f32_blocks(nodes[0], 0.25, points);
                let prev = &nodes[..order];
                let fast = deis_tab_sums(&taus, prev, db, b0);
                let slow = tab_sums_point_by_point(&taus, prev, db, b0);
                assert_eq!(fast.len(), order);
                assert_eq!(slow.len(), order);
                for (a, b) in fast.iter().zip(&slow) {
                    assert!(
                        (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                        "order {order}, {points} points: {a} vs {b}"
                    );
                }
            }
        }
    }
}
