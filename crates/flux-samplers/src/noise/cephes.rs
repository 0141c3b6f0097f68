//! Single-precision `log` and `sincos` exactly as PyTorch's AVX2 normal-fill kernel computes
//! them: the Cephes-derived polynomials of `avx_mathfun.h`, with the fused multiply-adds that
//! GCC's default `-ffp-contract=fast` forms when PyTorch is built with AVX2 and FMA.
//!
//! Written lane by lane in portable code; every rounding step of the vector code is kept, so
//! the results agree bit for bit with the vector kernel.

pub(super) const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
pub(super) const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
pub(super) const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
pub(super) const LOG_Q2: f32 = 0.693359375_f64 as f32;

pub(super) const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
pub(super) const MINUS_DP1: f32 = -0.78515625_f64 as f32;
pub(super) const MINUS_DP2: f32 = -2.4187564849853515625e-4_f64 as f32;
pub(super) const MINUS_DP3: f32 = -3.77489497744594108e-8_f64 as f32;
pub(super) const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];
pub(super) const COS_P: [f32; 3] = [
    2.443315711809948E-005_f64 as f32,
    -1.388731625493765E-003_f64 as f32,
    4.166664568298827E-002_f64 as f32,
];

pub(super) const SIGN: u32 = 0x8000_0000;

/// Natural logarithm of one lane (`log256_ps`); NaN for `v <= 0`.
#[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
#[inline(always)]
pub(crate) fn log(v: f32) -> f32 {
    let invalid = v <= 0.0;
    // Denormals are flushed up to the smallest normal number first.
    let v = if v < f32::MIN_POSITIVE {
        f32::MIN_POSITIVE
    } else {
        v
    };
    let bits = v.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Mantissa with the exponent of 0.5: a value in [0.5, 1).
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < SQRT_HALF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;

    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    // `y*z + e*q1`: the compiler fuses the first product and rounds the second.
    y = y.mul_add(z, e * LOG_Q1);
    // `y - z*0.5` becomes one negated fused multiply-add.
    y = (-z).mul_add(0.5, y);
    x += y;
    x = e.mul_add(LOG_Q2, x);
    if invalid { f32::NAN } else { x }
}

/// Sine and cosine of one lane (`sincos256_ps`), as `(sin, cos)`.
#[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
#[inline(always)]
pub(crate) fn sincos(v: f32) -> (f32, f32) {
    let sign_in = v.to_bits() & SIGN;
    let mut x = f32::from_bits(v.to_bits() & !SIGN);

    // Octant index, rounded up to even (truncating conversion, as cvttps does).
    let mut j = (x * FOUR_OVER_PI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let use_sin_poly_for_sin = (j & 2) == 0;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sign_sin;

    // Extended-precision reduction x - y*pi/4 in three fused steps.
    x = y.mul_add(MINUS_DP1, x);
    x = y.mul_add(MINUS_DP2, x);
    x = y.mul_add(MINUS_DP3, x);

    let z = x * x;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]);
    yc = yc.mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;

    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]);
    ys = ys.mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(x, x);

    // The vector code blends with bit masks and additions; masked-out terms are +0.
    let (sin_from_sin_poly, sin_from_cos_poly) = if use_sin_poly_for_sin {
        (ys, 0.0)
    } else {
        (0.0, yc)
    };
    let cos_from_sin_poly = ys - sin_from_sin_poly;
    let cos_from_cos_poly = yc - sin_from_cos_poly;
    let s = sin_from_cos_poly + sin_from_sin_poly;
    let c = cos_from_cos_poly + cos_from_sin_poly;
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    /// The approximations must stay within a few ulp of the correctly rounded functions.
    #[test]
    fn close_to_libm() {
        for i in 1..=4096u32 {
            let u = i as f32 / 4096.0;
            let l = super::log(u);
            assert!((f64::from(l) - f64::from(u).ln()).abs() <= 4e-7 * (1.0 + f64::from(l).abs()));
            let t = u * std::f32::consts::TAU;
            let (s, c) = super::sincos(t);
            assert!((f64::from(s) - f64::from(t).sin()).abs() <= 3e-7);
            assert!((f64::from(c) - f64::from(t).cos()).abs() <= 3e-7);
        }
        assert!(super::log(0.0).is_nan());
        assert!(super::log(-1.0).is_nan());
    }
}
