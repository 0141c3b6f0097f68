//! Where samplers get randomness from.

use crate::Result;
use flux_kernels::{Backend, DType, Tensor};

/// A source of standard-normal noise tensors.
pub trait NoiseSource<B: Backend> {
    /// A tensor of shape `shape` and dtype `dtype` of independent N(0, 1) draws, for the step
    /// from `sigma` to `sigma_next` (SDE sources use the interval; others ignore it).
    fn sample(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<B>>;
}
