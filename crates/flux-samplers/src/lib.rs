//! Every sampler of ComfyUI, numerically matching it, written once over any
//! [`flux_kernels::Backend`].
//!
//! A sampler drives a [`Denoiser`] (`x, sigma -> denoised`) along a sigma schedule and draws
//! randomness from a [`NoiseSource`]. Every update is one fused `lincomb` on the backend with
//! coefficients computed on the host in f64.

pub mod denoiser;
pub mod error;
pub mod noise;
pub mod sampler;
pub mod samplers;
pub mod toy;

pub use denoiser::{Denoised, Denoiser};
pub use error::{Result, SamplerError};
pub use noise::NoiseSource;
pub use sampler::{SampleContext, Sampler, SamplerOptions, StepInfo, sample};
