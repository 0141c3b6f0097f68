//! Emulation of the few PyTorch CPU kernels the schedulers depend on, operation by operation, so
//! that schedules come out with the same float32 rounding as ComfyUI's.

/// Arithmetic the linspace kernel needs, for `f32` and `f64`.
pub(crate) trait LinspaceFloat:
    Copy + std::ops::Sub<Output = Self> + std::ops::Div<Output = Self> + std::ops::Neg<Output = Self>
{
    /// Conversion of an integer as C++ does it (`static_cast<scalar_t>(i)`).
    fn from_i64(i: i64) -> Self;
    /// `self * a + b` with one rounding.
    fn fma(self, a: Self, b: Self) -> Self;
}

impl LinspaceFloat for f32 {
    fn from_i64(i: i64) -> Self {
        i as f32
    }
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
}

impl LinspaceFloat for f64 {
    fn from_i64(i: i64) -> Self {
        i as f64
    }
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
}

/// `torch.linspace(start, end, steps)` on the CPU, in the tensor's dtype.
///
/// The kernel computes `step = (end - start) / (steps - 1)` and fills the front half as
/// `start + step * i`, the back half as `end - step * (steps - i - 1)`, one element at a time
/// (current PyTorch has no vectorised linspace). PyTorch's x86 kernels are built for AVX2 with
/// FMA and floating-point contraction, so each `a + step * i` is one fused multiply-add: a
/// single rounding, which is what the reference schedules show.
pub(crate) fn linspace<T: LinspaceFloat>(start: T, end: T, steps: usize) -> Vec<T> {
    match steps {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
    }
    let n = steps as i64;
    let step = (end - start) / T::from_i64(n - 1);
    let halfway = n / 2;
    (0..n)
        .map(|idx| {
            if idx < halfway {
                step.fma(T::from_i64(idx), start)
            } else {
                (-step).fma(T::from_i64(n - idx - 1), end)
            }
        })
        .collect()
}

/// ComfyUI's Flux time shift `e^mu / (e^mu + (1/t - 1))` as PyTorch evaluates it on a float32
/// tensor: Python's `a / tensor` is `tensor.reciprocal() * a`, and the Python-float `e^mu` enters
/// every operation rounded to float32.
pub(crate) fn flux_sigma_f32(e_mu: f32, t: f32) -> f32 {
    let x = (1.0f32 / t) - 1.0;
    (1.0f32 / (e_mu + x)) * e_mu
}

/// The same time shift on a float64 tensor.
pub(crate) fn flux_sigma_f64(e_mu: f64, t: f64) -> f64 {
    let x = (1.0 / t) - 1.0;
    (1.0 / (e_mu + x)) * e_mu
}
