//! Safe wrapper over the `gemm` crate: strided matrices given as slices, with every index the
//! kernel may touch checked against the slice lengths before the call.

pub use gemm::Parallelism;

/// A strided read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// Largest index touched by a `rows x cols` matrix with these strides, if any.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

fn fits(rows: usize, cols: usize, rs: usize, cs: usize, len: usize) -> bool {
    extent(rows, cols, rs, cs).is_some_and(|e| e <= len)
        && isize::try_from(rs).is_ok()
        && isize::try_from(cs).is_ok()
}

/// `dst = (accumulate ? dst : 0) + alpha * lhs * rhs` for `lhs` `m x k`, `rhs` `k x n`, `dst`
/// `m x n` (row stride `dst_rs`, unit column stride).
///
/// Panics if a matrix does not fit its slice (an internal bug, never input-dependent: callers
/// check shapes first).
pub fn gemm<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    alpha: T,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(fits(m, n, dst_rs, 1, dst.len()), "gemm: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::G_ZERO);
            }
        }
        return;
    }
    assert!(
        fits(m, k, lhs.rs, lhs.cs, lhs.data.len()),
        "gemm: lhs out of bounds"
    );
    assert!(
        fits(k, n, rhs.rs, rhs.cs, rhs.data.len()),
        "gemm: rhs out of bounds"
    );
    // The crate computes dst = a * dst + b * lhs * rhs and only reads dst when asked to.
    #[allow(unsafe_code)]
    // SAFETY: every index the kernel touches, (rows-1)*rs + (cols-1)*cs for each operand, was
    // checked above to lie inside its slice; dst is borrowed mutably, so it cannot alias lhs/rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::G_ONE,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Element types the GEMM runs on.
pub trait GemmElem: Copy + Send + Sync + 'static {
    /// Zero.
    const G_ZERO: Self;
    /// One.
    const G_ONE: Self;
}

impl GemmElem for f32 {
    const G_ZERO: Self = 0.0;
    const G_ONE: Self = 1.0;
}

impl GemmElem for f64 {
    const G_ZERO: Self = 0.0;
    const G_ONE: Self = 1.0;
}

/// The parallelism to use for one large GEMM on the current rayon pool.
pub fn pool_parallelism() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}
