//! Where samplers get randomness from.

#[cfg(target_arch = "x86_64")]
mod box_muller_x86;
pub mod brownian;
mod cephes;
pub mod default;
pub mod mt19937;
mod reference;
pub mod replay;
mod seed_sequence;
pub mod torch;

pub use brownian::BrownianTreeNoise;
pub use default::DefaultNoise;
pub use mt19937::Mt19937;
pub use reference::reference_noise;
pub use replay::{RecordedDraw, ReplayNoise};
pub use torch::{HostNoise, TorchGenerator, randn, randn_f32, randn_f64};

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

    /// Advances the source as [`NoiseSource::sample`] with the same arguments would, without
    /// making the tensor: for draws a sampler makes only because the reference makes them
    /// (their values are multiplied by zero), so that every later draw is still the
    /// reference's. The default samples and drops the result; sources whose later values
    /// depend on how much was drawn before override it with something cheaper.
    fn skip(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<()> {
        self.sample(backend, shape, dtype, sigma, sigma_next)
            .map(drop)
    }

    /// A promise from the sampler about the rest of its schedule: every draw after the next
    /// one is for an interval within `[0, sigma]`. Samplers that walk the schedule downwards
    /// make it before a step's draw, with the step's lower sigma. A source whose draws share
    /// state (the Brownian tree) may then keep only what such draws can need; the values a
    /// source returns never depend on it, so a broken promise costs time, never correctness.
    /// The default ignores it.
    fn promise_below(&mut self, sigma: f64) {
        let _ = sigma;
    }
}
