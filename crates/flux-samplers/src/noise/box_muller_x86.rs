//! The single-precision Box-Muller block conversion in AVX-512 registers, two blocks of 16 per
//! step.
//!
//! Each operation is the one [`super::cephes`] performs lane by lane (same constants, same
//! fused multiply-adds, same order), except the argument checks that the uniforms never trigger,
//! so the values are bit for bit those of the portable code and of PyTorch's AVX2 kernel; the
//! tests below check that on every uniform the generator can produce and on random patterns.

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

/// `log` of 16 lanes (`cephes::log`) for the arguments Box-Muller passes it: `1 - u` for a
/// uniform `u = k / 2^24`, so every lane is a normal number in `[2^-24, 1]` and the kernel's
/// handling of zero, negative and subnormal arguments (a NaN, a clamp) never applies; it is
/// left out. `every_uniform_converts_as_the_lane_by_lane_code` checks all 2^24 arguments.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn log16(v: __m512) -> __m512 {
    let bits = _mm512_castps_si512(v);
    let exponent = _mm512_sub_epi32(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(0x7f));
    let one = _mm512_set1_ps(1.0);
    let mut e = _mm512_add_ps(_mm512_cvtepi32_ps(exponent), one);
    let mantissa = _mm512_or_si512(
        _mm512_andnot_si512(_mm512_set1_epi32(0x7f80_0000), bits),
        _mm512_set1_epi32(0.5f32.to_bits() as i32),
    );
    let mut x = _mm512_castsi512_ps(mantissa);
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(SQRT_HALF));
    let tmp = _mm512_maskz_mov_ps(below, x);
    x = _mm512_sub_ps(x, one);
    e = _mm512_sub_ps(e, _mm512_maskz_mov_ps(below, one));
    x = _mm512_add_ps(x, tmp);

    let z = _mm512_mul_ps(x, x);
    let mut y = _mm512_set1_ps(LOG_P[0]);
    for &p in &LOG_P[1..] {
        y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(p));
    }
    y = _mm512_mul_ps(y, x);
    y = _mm512_fmadd_ps(y, z, _mm512_mul_ps(e, _mm512_set1_ps(LOG_Q1)));
    y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5), y);
    x = _mm512_add_ps(x, y);
    _mm512_fmadd_ps(e, _mm512_set1_ps(LOG_Q2), x)
}

/// `(sin, cos)` of 16 lanes (`cephes::sincos`) for the arguments Box-Muller passes it:
/// `2 pi u` for a uniform `u`, never negative, so the kernel's sign handling of the argument
/// (taking its absolute value, flipping the sine back) is left out.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn sincos16(v: __m512) -> (__m512, __m512) {
    let mut x = v;

    let mut j = _mm512_cvttps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(FOUR_OVER_PI)));
    j = _mm512_and_si512(
        _mm512_add_epi32(j, _mm512_set1_epi32(1)),
        _mm512_set1_epi32(!1),
    );
    let y = _mm512_cvtepi32_ps(j);
    let four = _mm512_set1_epi32(4);
    let swap_sign_sin = _mm512_slli_epi32::<29>(_mm512_and_si512(j, four));
    let use_sin_poly_for_sin = _mm512_testn_epi32_mask(j, _mm512_set1_epi32(2));
    let sign_cos = _mm512_slli_epi32::<29>(_mm512_andnot_si512(
        _mm512_sub_epi32(j, _mm512_set1_epi32(2)),
        four,
    ));
    let sign_sin = swap_sign_sin;

    x = _mm512_fmadd_ps(y, _mm512_set1_ps(MINUS_DP1), x);
    x = _mm512_fmadd_ps(y, _mm512_set1_ps(MINUS_DP2), x);
    x = _mm512_fmadd_ps(y, _mm512_set1_ps(MINUS_DP3), x);

    let z = _mm512_mul_ps(x, x);
    let mut yc = _mm512_fmadd_ps(_mm512_set1_ps(COS_P[0]), z, _mm512_set1_ps(COS_P[1]));
    yc = _mm512_fmadd_ps(yc, z, _mm512_set1_ps(COS_P[2]));
    yc = _mm512_mul_ps(yc, z);
    yc = _mm512_fmsub_ps(yc, z, _mm512_mul_ps(z, _mm512_set1_ps(0.5)));
    yc = _mm512_add_ps(yc, _mm512_set1_ps(1.0));

    let mut ys = _mm512_fmadd_ps(_mm512_set1_ps(SIN_P[0]), z, _mm512_set1_ps(SIN_P[1]));
    ys = _mm512_fmadd_ps(ys, z, _mm512_set1_ps(SIN_P[2]));
    ys = _mm512_mul_ps(ys, z);
    ys = _mm512_fmadd_ps(ys, x, x);

    let sin_from_sin_poly = _mm512_maskz_mov_ps(use_sin_poly_for_sin, ys);
    let sin_from_cos_poly = _mm512_maskz_mov_ps(!use_sin_poly_for_sin, yc);
    let cos_from_sin_poly = _mm512_sub_ps(ys, sin_from_sin_poly);
    let cos_from_cos_poly = _mm512_sub_ps(yc, sin_from_cos_poly);
    let s = _mm512_add_ps(sin_from_cos_poly, sin_from_sin_poly);
    let c = _mm512_add_ps(cos_from_cos_poly, cos_from_sin_poly);
    (
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), sign_sin)),
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c), sign_cos)),
    )
}

/// Converts the uniforms of `chunk` in place, [`STEP`] at a time; returns how many it
/// converted (a multiple of [`STEP`]; the caller converts the rest).
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn convert_f32_avx512(chunk: &mut [f32]) -> usize {
    // Lanes 0..8 of each block are the first values of its pairs, lanes 8..16 the second:
    // gather the first halves of two blocks into one register and the second halves into another.
    let first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    let two_pi = _mm512_set1_ps((2.0 * std::f64::consts::PI) as f32);
    let one = _mm512_set1_ps(1.0);
    let minus_two = _mm512_set1_ps(-2.0);
    let zero = _mm512_setzero_ps();
    let len = chunk.len();
    let mut steps = chunk.chunks_exact_mut(STEP);
    for step in &mut steps {
        let p = step.as_mut_ptr();
        // SAFETY: `step` holds exactly 32 floats; unaligned loads and stores of 16 each.
        let (b0, b1) = unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) };
        let u1 = _mm512_permutex2var_ps(b0, first, b1);
        let u2 = _mm512_permutex2var_ps(b0, second, b1);
        let radius = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, log16(_mm512_sub_ps(one, u1))));
        let (sin, cos) = sincos16(_mm512_mul_ps(two_pi, u2));
        // The kernel's final `fma(n, std = 1, mean = 0)` turns -0 into +0.
        let a = _mm512_add_ps(_mm512_mul_ps(radius, cos), zero);
        let b = _mm512_add_ps(_mm512_mul_ps(radius, sin), zero);
        // SAFETY: as for the loads.
        unsafe {
            _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, first, b));
            _mm512_storeu_ps(p.add(16), _mm512_permutex2var_ps(a, second, b));
        }
    }
    len - steps.into_remainder().len()
}

#[cfg(test)]
mod tests {
    use super::super::torch::box_muller_f32;
    use proptest::prelude::*;

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
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        const COUNT: u32 = 1 << 24;
        let mut mismatches = 0usize;
        let mut block = [0f32; 32];
        for start in (0..COUNT).step_by(16) {
            // Lanes 0..8 of each block of 16 take the first values, lanes 8..16 the second;
            // the second values run through the numerators in an odd stride, a permutation.
            for (j, k) in (start..start + 16).enumerate() {
                let (b, lane) = (j / 8, j % 8);
                block[16 * b + lane] = k as f32 / COUNT as f32;
                block[16 * b + 8 + lane] =
                    (k.wrapping_mul(0x9e37_79b1) % COUNT) as f32 / COUNT as f32;
            }
            let mut fast = block;
            // SAFETY: the CPU supports AVX-512F and FMA, checked above.
            #[allow(unsafe_code)]
            let done = unsafe { super::convert_f32_avx512(&mut fast) };
            assert_eq!(done, 32);
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
        assert_eq!(mismatches, 0, "values differing from the lane-by-lane code");
    }

    proptest! {
        #[test]
        fn same_bits_as_the_lane_by_lane_code(u in uniforms()) {
            if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")) {
                return Ok(());
            }
            let mut fast = u.clone();
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            #[allow(unsafe_code)]
            let done = unsafe { super::convert_f32_avx512(&mut fast) };
            prop_assert_eq!(done, 64);
            let mut slow = u.clone();
            for block in slow[..64].chunks_exact_mut(16) {
                box_muller_f32(block);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&fast[..64]), bits(&slow[..64]));
            // The values past the last whole step are left for the caller.
            prop_assert_eq!(bits(&fast[64..]), bits(&u[64..]));
        }
    }
}
