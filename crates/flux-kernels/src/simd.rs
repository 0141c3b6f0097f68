//! Run-time selection of the widest x86-64 vector unit for a plain Rust loop.

/// Calls `$body($args)` compiled for AVX-512 (with FMA) or AVX2 + FMA when the CPU has them
/// (detected at run time; the baseline x86-64 target has 4-lane vectors and no FMA
/// instruction), else for the baseline. `$body` should be `#[inline(always)]` so the loop is
/// compiled inside each variant. The variants perform the same IEEE operations (a `mul_add`
/// is fused on every path: an instruction or the software `fma`), so they give the same bits.
/// Used as a function's whole body; `$avx512` and `$avx2` name the generated variants, which
/// take the generic parameters listed after them: type parameters in `<...>`, or any
/// parameters, const ones included, in `[...]` (when there is such a list).
#[macro_export]
macro_rules! simd_dispatch {
    ($body:ident, $avx512:ident, $avx2:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $crate::simd_dispatch!($body, $avx512, $avx2, [], ($($arg: $ty),*) -> $ret)
    };
    // With generic parameters of any form, const ones included: `[T: Elem, const N: usize]`.
    ($body:ident, $avx512:ident, $avx2:ident, [$($gen:tt)*],
     ($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn $avx512<$($gen)*>($($arg: $ty),*) -> $ret {
            $body($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2<$($gen)*>($($arg: $ty),*) -> $ret {
            $body($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("fma");
            if fma && std::arch::is_x86_feature_detected!("avx512f") {
                #[allow(unsafe_code)]
                // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
                return unsafe { $avx512($($arg),*) };
            }
            if fma && std::arch::is_x86_feature_detected!("avx2") {
                #[allow(unsafe_code)]
                // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $body($($arg),*)
    }};
    // With type parameters of the variants: `<T, F: Fn(u32) -> T>`.
    ($body:ident, $avx512:ident, $avx2:ident, <$($g:ident $(: $bound:path)?),*>,
     ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $crate::simd_dispatch!($body, $avx512, $avx2, [$($g $(: $bound)?),*],
            ($($arg: $ty),*) -> $ret)
    };
}
