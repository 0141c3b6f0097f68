//! The model seen by a sampler.

use crate::Result;
use flux_kernels::{Backend, Tensor};

/// What a denoiser returns for one call.
pub struct Denoised<B: Backend> {
    /// The guided prediction of the clean latent (after CFG).
    pub denoised: Tensor<B>,
    /// The unconditional prediction, when the caller asked for it (cfg++ samplers).
    pub uncond: Option<Tensor<B>>,
}

/// `x, sigma -> denoised`: the one interface samplers have to a model.
///
/// `sigma` is the same for every batch item (as in every ComfyUI sampler).
pub trait Denoiser<B: Backend> {
    /// Evaluates the model at `(x, sigma)`. With `want_uncond` the unconditional prediction is
    /// returned too (and must be computed even when guidance is 1).
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> Result<Denoised<B>>;
}
