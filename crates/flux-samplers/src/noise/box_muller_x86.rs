//! The single-precision Box-Muller block conversion in vector registers: AVX-512 (two blocks
//! of 16 per step) and AVX2 (one block per step, the layout PyTorch's own kernel uses).
//!
//! Every rounded operation is the one [`super::cephes`] performs lane by lane (same constants,
//! same fused multiply-adds, same order), so the values are bit for bit those of the portable
//! code and of PyTorch's AVX2 kernel. What differs is only how exact steps are done, chosen
//! for throughput: the argument checks the uniforms never trigger are left out, the
//! logarithm's exponent adjustments are integer or masked operations (with AVX-512, exponent
//! and mantissa come from `getexp`/`getmant`), selections are blends, sign flips are applied
//! to the final product, a product by -2 is a doubling of the negated logarithm. The tests
//! below check both kernels on every uniform the generator can produce and on random patterns.

#![allow(unsafe_code)]

use super::cephes::{
    COS_P, FOUR_OVER_PI, LOG_P, LOG_Q1, LOG_Q2, MINUS_DP1, MINUS_DP2, MINUS_DP3, SIN_P, SQRT_HALF,
};
#[allow(
    clippy::wildcard_imports,
    reason = "the module is written in intrinsics; their names say what they are"
)]
use std::arch::x86_64::*;

/// Floats converted per step: two blocks of 16.
pub(super) const STEP: usize = 32;

/// The logarithm's rounded steps after the range reduction (`cephes::log` from `z = x * x`
/// on), negated at the end, written once for both register widths: the last argument names
/// the width's intrinsics `(set1, mul, add, fmadd, fnmadd, fnmsub)`.
macro_rules! minus_log_polynomial {
    (
        $x:expr,
        $e:expr,
        ($set1:ident, $mul:ident, $add:ident, $fmadd:ident, $fnmadd:ident, $fnmsub:ident)
    ) => {{
        let (x, e) = ($x, $e);
        let z = $mul(x, x);
        let mut y = $set1(LOG_P[0]);
        for &p in &LOG_P[1..] {
            y = $fmadd(y, x, $set1(p));
        }
        y = $mul(y, x);
        y = $fmadd(y, z, $mul(e, $set1(LOG_Q1)));
        y = $fnmadd(z, $set1(0.5), y);
        let x = $add(x, y);
        // The kernel's last step, `fma(e, q2, x)`, negated: `-(e q2) - x` rounds to exactly
        // the negated value (rounding to nearest is symmetric).
        $fnmsub(e, $set1(LOG_Q2), x)
    }};
}

/// The rounded steps of `cephes::sincos` after the octant `y` is known: the three-part
/// reduction of `x` and both polynomials, as `(cosine polynomial, sine polynomial)`, written
/// once for both register widths (`(set1, mul, add, fmadd, fmsub)` of the width).
macro_rules! sincos_polynomials {
    ($x:expr, $y:expr, ($set1:ident, $mul:ident, $add:ident, $fmadd:ident, $fmsub:ident)) => {{
        let (mut x, y) = ($x, $y);
        x = $fmadd(y, $set1(MINUS_DP1), x);
        x = $fmadd(y, $set1(MINUS_DP2), x);
        x = $fmadd(y, $set1(MINUS_DP3), x);

        let z = $mul(x, x);
        let mut yc = $fmadd($set1(COS_P[0]), z, $set1(COS_P[1]));
        yc = $fmadd(yc, z, $set1(COS_P[2]));
        yc = $mul(yc, z);
        yc = $fmsub(yc, z, $mul(z, $set1(0.5)));
        yc = $add(yc, $set1(1.0));

        let mut ys = $fmadd($set1(SIN_P[0]), z, $set1(SIN_P[1]));
        ys = $fmadd(ys, z, $set1(SIN_P[2]));
        ys = $mul(ys, z);
        ys = $fmadd(ys, x, x);
        (yc, ys)
    }};
}

/// `-log` of 16 lanes (`cephes::log`, negated) for the arguments Box-Muller passes it: `1 - u`
/// for a uniform `u = k / 2^24`, so every lane is a normal number in `[2^-24, 1]` and the
/// kernel's handling of zero, negative and subnormal arguments (a NaN, a clamp) never
/// applies; it is left out. `every_uniform_converts_as_the_lane_by_lane_code` checks all 2^24
/// arguments.
///
/// The exponent and mantissa come from `getexp`/`getmant` (exact for normal numbers, so the
/// same values the kernel's integer shifts and masks give), and the kernel's conditional
/// adjustments (adding a masked-out zero) are masked operations.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn minus_log16(v: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    // `floor(log2 v)` and the mantissa scaled into [0.5, 1).
    let exponent = _mm512_getexp_ps(v);
    let m = _mm512_getmant_ps::<_MM_MANT_NORM_P5_1, _MM_MANT_SIGN_SRC>(v);
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(m, _mm512_set1_ps(SQRT_HALF));
    // The kernel's `e = exponent + 1`, less one where the mantissa is below sqrt(1/2); both
    // sums are exact.
    let e = _mm512_mask_add_ps(exponent, !below, exponent, one);
    // `m - 1`, plus `m` again where below (the kernel adds +0 elsewhere; `m - 1` is never 0).
    let x = _mm512_sub_ps(m, one);
    let x = _mm512_mask_add_ps(x, below, x, m);

    minus_log_polynomial!(
        x,
        e,
        (
            _mm512_set1_ps,
            _mm512_mul_ps,
            _mm512_add_ps,
            _mm512_fmadd_ps,
            _mm512_fnmadd_ps,
            _mm512_fnmsub_ps
        )
    )
}

/// Sine and cosine of 16 lanes (`cephes::sincos`) for the arguments Box-Muller passes it:
/// `2 pi u` for a uniform `u`, never negative, so the kernel's sign handling of the argument
/// (taking its absolute value, flipping the sine back) is left out.
///
/// Returns the magnitudes' polynomial results `(sin, cos)` and the lanes where each must be
/// negated, as masks: the caller applies the signs. The kernel selects between its two
/// polynomials by masking both and adding; a blend gives the same values, except that the
/// sign of a zero may differ, which the caller's final `+ 0` erases.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn sincos16(x: __m512) -> (__m512, __m512, __mmask16, __mmask16) {
    let mut j = _mm512_cvttps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(FOUR_OVER_PI)));
    j = _mm512_and_si512(
        _mm512_add_epi32(j, _mm512_set1_epi32(1)),
        _mm512_set1_epi32(!1),
    );
    let y = _mm512_cvtepi32_ps(j);
    // The octant `j` is one of 0, 2, 4, 6, 8 here. The sine is negated for j & 4, the sine
    // polynomial gives the sine where j & 2 is clear, and the cosine is negated where
    // (j - 2) & 4 is clear, i.e. for j = 2 and 4: exactly where the other two masks agree.
    let negate_sin = _mm512_test_epi32_mask(j, _mm512_set1_epi32(4));
    let sin_poly_for_sin = _mm512_testn_epi32_mask(j, _mm512_set1_epi32(2));
    let negate_cos = !(sin_poly_for_sin ^ negate_sin);

    let (yc, ys) = sincos_polynomials!(
        x,
        y,
        (
            _mm512_set1_ps,
            _mm512_mul_ps,
            _mm512_add_ps,
            _mm512_fmadd_ps,
            _mm512_fmsub_ps
        )
    );

    (
        _mm512_mask_blend_ps(sin_poly_for_sin, yc, ys),
        _mm512_mask_blend_ps(sin_poly_for_sin, ys, yc),
        negate_sin,
        negate_cos,
    )
}

/// `radius * trig`, negated in the lanes of `negate`, plus zero: the kernel's product of the
/// radius with the signed sine or cosine followed by its `fma(n, std = 1, mean = 0)`. The
/// product is rounded once either way (the fused multiply-add adds an exact zero), negation
/// commutes with rounding to nearest, and a zero comes out as +0 in both.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn signed_product(radius: __m512, trig: __m512, negate: __mmask16) -> __m512 {
    let zero = _mm512_setzero_ps();
    let n = _mm512_fmadd_ps(radius, trig, zero);
    _mm512_mask_sub_ps(n, negate, zero, n)
}

/// 8 floats at `p` and 8 at `p + 16` as one register (`f64` casts keep it within AVX-512F).
///
/// # Safety
/// `p..p + 24` must be readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_halves(p: *const f32) -> __m512 {
    // SAFETY: the caller guarantees both 8-float ranges are readable.
    let (lo, hi) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(16))) };
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// Stores the low 8 floats of `v` at `p` and the high 8 at `p + 16`.
///
/// # Safety
/// `p..p + 24` must be writable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_halves(p: *mut f32, v: __m512) {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    // SAFETY: the caller guarantees both 8-float ranges are writable.
    unsafe {
        _mm256_storeu_ps(p, _mm512_castps512_ps256(v));
        _mm256_storeu_ps(p.add(16), hi);
    }
}

/// The normals of one step: `(r cos, r sin)` for the first values `u1` and second values `u2`
/// of 16 pairs.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn pairs16(u1: __m512, u2: __m512) -> (__m512, __m512) {
    // `-2 log(1 - u1)` as `-log + -log`: the doubling is exact, as the kernel's product by -2
    // is, and it runs on the adders, leaving the multipliers one operation fewer.
    let minus_log = minus_log16(_mm512_sub_ps(_mm512_set1_ps(1.0), u1));
    let radius = _mm512_sqrt_ps(_mm512_add_ps(minus_log, minus_log));
    let two_pi = _mm512_set1_ps((2.0 * std::f64::consts::PI) as f32);
    let (sin, cos, negate_sin, negate_cos) = sincos16(_mm512_mul_ps(two_pi, u2));
    (
        signed_product(radius, cos, negate_cos),
        signed_product(radius, sin, negate_sin),
    )
}

/// Converts the uniforms of `chunk` in place, [`STEP`] at a time; returns how many it
/// converted (a multiple of [`STEP`]; the caller converts the rest).
///
/// Lanes 0..8 of each block are the first values of its pairs, lanes 8..16 the second: the
/// first halves of two blocks go into one register, the second halves into another.
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn convert_f32_avx512(chunk: &mut [f32]) -> usize {
    let len = chunk.len();
    let mut steps = chunk.chunks_exact_mut(STEP);
    for step in &mut steps {
        let p = step.as_mut_ptr();
        // SAFETY: `step` holds exactly 32 floats: p..p + 24 and p + 8..p + 32 are in it.
        unsafe {
            let (cos, sin) = pairs16(load_halves(p), load_halves(p.add(8)));
            store_halves(p, cos);
            store_halves(p.add(8), sin);
        }
    }
    len - steps.into_remainder().len()
}

/// Floats converted per step of the AVX2 kernel: one block.
pub(super) const STEP_AVX2: usize = 16;

/// [`minus_log16`] on 8 lanes with AVX2: the exponent and mantissa from shifts and masks as
/// the kernel takes them; its exponent `e = (exponent + 1) - [mantissa < sqrt(1/2)]` is
/// summed in integers (the comparison mask is -1 where it holds), which is exact as the
/// kernel's float sums are.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn minus_log8(v: __m256) -> __m256 {
    let bits = _mm256_castps_si256(v);
    let one = _mm256_set1_ps(1.0);
    let x = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_andnot_si256(_mm256_set1_epi32(0x7f80_0000), bits),
        _mm256_set1_epi32(0.5f32.to_bits() as i32),
    ));
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(SQRT_HALF));
    let exponent_plus_one =
        _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(0x7e));
    let e = _mm256_cvtepi32_ps(_mm256_add_epi32(
        exponent_plus_one,
        _mm256_castps_si256(below),
    ));
    let x = _mm256_add_ps(_mm256_sub_ps(x, one), _mm256_and_ps(below, x));

    minus_log_polynomial!(
        x,
        e,
        (
            _mm256_set1_ps,
            _mm256_mul_ps,
            _mm256_add_ps,
            _mm256_fmadd_ps,
            _mm256_fnmadd_ps,
            _mm256_fnmsub_ps
        )
    )
}

/// [`sincos16`] on 8 lanes with AVX2; returns the sine and cosine with their signs applied
/// (a sign flip is an exact `xor`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sincos8(x: __m256) -> (__m256, __m256) {
    let mut j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(FOUR_OVER_PI)));
    j = _mm256_and_si256(
        _mm256_add_epi32(j, _mm256_set1_epi32(1)),
        _mm256_set1_epi32(!1),
    );
    let y = _mm256_cvtepi32_ps(j);
    // As in `sincos16`: the sine's sign bit is j & 4, the sine polynomial serves the sine
    // where j & 2 is clear, and the cosine is negated where those two agree.
    let sign_sin = _mm256_slli_epi32::<29>(_mm256_and_si256(j, _mm256_set1_epi32(4)));
    let sin_poly_for_sin = _mm256_cmpeq_epi32(
        _mm256_and_si256(j, _mm256_set1_epi32(2)),
        _mm256_setzero_si256(),
    );
    let sign_cos = _mm256_andnot_si256(
        _mm256_xor_si256(sin_poly_for_sin, sign_sin),
        _mm256_set1_epi32(i32::MIN),
    );

    let (yc, ys) = sincos_polynomials!(
        x,
        y,
        (
            _mm256_set1_ps,
            _mm256_mul_ps,
            _mm256_add_ps,
            _mm256_fmadd_ps,
            _mm256_fmsub_ps
        )
    );

    let select = _mm256_castsi256_ps(sin_poly_for_sin);
    let sin = _mm256_blendv_ps(yc, ys, select);
    let cos = _mm256_blendv_ps(ys, yc, select);
    (
        _mm256_xor_ps(sin, _mm256_castsi256_ps(sign_sin)),
        _mm256_xor_ps(cos, _mm256_castsi256_ps(sign_cos)),
    )
}

/// Converts the uniforms of `chunk` in place, [`STEP_AVX2`] at a time, with AVX2 and FMA;
/// returns how many it converted (the caller converts the rest). Each block's first 8 values
/// are one register, its last 8 another, as in PyTorch's kernel.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn convert_f32_avx2(chunk: &mut [f32]) -> usize {
    let two_pi = _mm256_set1_ps((2.0 * std::f64::consts::PI) as f32);
    let one = _mm256_set1_ps(1.0);
    let zero = _mm256_setzero_ps();
    let len = chunk.len();
    let mut blocks = chunk.chunks_exact_mut(STEP_AVX2);
    for block in &mut blocks {
        let p = block.as_mut_ptr();
        // SAFETY: `block` holds exactly 16 floats: two unaligned loads and stores of 8.
        let (u1, u2) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
        let minus_log = minus_log8(_mm256_sub_ps(one, u1));
        let radius = _mm256_sqrt_ps(_mm256_add_ps(minus_log, minus_log));
        let (sin, cos) = sincos8(_mm256_mul_ps(two_pi, u2));
        // `r * trig` rounded once, plus zero: a zero comes out as +0, as in the kernel.
        // SAFETY: as for the loads.
        unsafe {
            _mm256_storeu_ps(p, _mm256_fmadd_ps(radius, cos, zero));
            _mm256_storeu_ps(p.add(8), _mm256_fmadd_ps(radius, sin, zero));
        }
    }
    len - blocks.into_remainder().len()
}

#[cfg(test)]
mod tests {
    use super::super::torch::box_muller_f32;
    use proptest::prelude::*;

    /// A vector conversion: converts whole steps in place, returns how many values it did.
    type Kernel = unsafe fn(&mut [f32]) -> usize;

    /// The vector kernels this CPU can run, with their names and steps. Every x86-64 machine
    /// the project's CI uses has both.
    fn kernels() -> Vec<(&'static str, Kernel, usize)> {
        let mut k: Vec<(&'static str, Kernel, usize)> = Vec::new();
        if std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512f") {
                k.push(("avx512", super::convert_f32_avx512, super::STEP));
            }
            if std::is_x86_feature_detected!("avx2") {
                k.push(("avx2", super::convert_f32_avx2, super::STEP_AVX2));
            }
        }
        k
    }

    /// Runs `kernel` on `v`.
    fn run(kernel: Kernel, v: &mut [f32]) -> usize {
        // SAFETY: `kernels` lists only kernels whose target features the CPU has.
        #[allow(unsafe_code)]
        unsafe {
            kernel(v)
        }
    }

    /// Every uniform the generator can produce is `k / 2^24`; draw the 24-bit numerators,
    /// with the extremes (0 and 2^24 - 1) forced into some lanes.
    fn uniforms() -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(
            prop_oneof![Just(0u32), Just((1 << 24) - 1), Just(1), 0u32..(1 << 24)],
            64 + 16,
        )
        .prop_map(|k| k.iter().map(|&k| k as f32 / 16_777_216.0).collect())
    }

    /// Every uniform the generator can produce, `k / 2^24`, as the first value of a pair (the
    /// `log` argument) and, in another order, as the second (the `sincos` argument).
    #[test]
    fn every_uniform_converts_as_the_lane_by_lane_code() {
        const COUNT: u32 = 1 << 24;
        for (name, kernel, _) in kernels() {
            let mut mismatches = 0usize;
            let mut block = [0f32; 32];
            for start in (0..COUNT).step_by(16) {
                // Lanes 0..8 of each block of 16 take the first values, lanes 8..16 the
                // second; the second values run through the numerators in an odd stride, a
                // permutation.
                for (j, k) in (start..start + 16).enumerate() {
                    let (b, lane) = (j / 8, j % 8);
                    block[16 * b + lane] = k as f32 / COUNT as f32;
                    block[16 * b + 8 + lane] =
                        (k.wrapping_mul(0x9e37_79b1) % COUNT) as f32 / COUNT as f32;
                }
                let mut fast = block;
                assert_eq!(run(kernel, &mut fast), 32, "{name}");
                let mut slow = block;
                for b in slow.chunks_exact_mut(16) {
                    box_muller_f32(b);
                }
                mismatches += fast
                    .iter()
                    .zip(&slow)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
            }
            assert_eq!(
                mismatches, 0,
                "{name}: values differing from the lane-by-lane code"
            );
        }
    }

    proptest! {
        #[test]
        fn same_bits_as_the_lane_by_lane_code(u in uniforms()) {
            for (name, kernel, step) in kernels() {
                let mut fast = u.clone();
                let done = run(kernel, &mut fast);
                // 80 values: the AVX-512 kernel does two steps of 32, the AVX2 one five of 16.
                let whole = u.len() - u.len() % step;
                prop_assert_eq!(done, whole, "{}", name);
                let mut slow = u.clone();
                for block in slow[..whole].chunks_exact_mut(16) {
                    box_muller_f32(block);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&fast[..whole]), bits(&slow[..whole]), "{}", name);
                // The values past the last whole step are left for the caller.
                prop_assert_eq!(bits(&fast[whole..]), bits(&u[whole..]), "{}", name);
            }
        }
    }
}
