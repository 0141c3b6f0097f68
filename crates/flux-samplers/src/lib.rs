//! Every sampler of ComfyUI, numerically matching it, written once over any
//! [`flux_kernels::Backend`].
//!
//! A sampler drives a [`Denoiser`] (`x, sigma -> denoised`) along a sigma schedule and draws
//! randomness from a [`NoiseSource`]. Every update is one fused `lincomb` on the backend with
//! coefficients computed on the host in f64.
//!
//! # Where this differs from ComfyUI on purpose
//!
//! - The `_gpu` twins (`dpmpp_sde_gpu`, `dpmpp_2m_sde_gpu`, `dpmpp_2m_sde_heun_gpu`,
//!   `dpmpp_3m_sde_gpu`) run the same update as their base sampler. In ComfyUI they differ only
//!   in where the Brownian tree draws its noise (on the GPU instead of the CPU, so the numbers
//!   depend on the device's generator); here both draw from the same [`NoiseSource`], so a
//!   twin and its base give identical results for the same source.
//! - Draws ComfyUI makes from torch's global RNG are not made from a shared stream: `heunpp2`
//!   draws and discards one `randn_like` per step (nothing is drawn here without churn); churn
//!   noise of `euler`/`heun`/`dpm_2`/`heunpp2` (`s_churn > 0`) comes from the sampler's
//!   [`NoiseSource`]; `ddim`'s inpainting noise (unused without a mask) is not drawn.
//! - Draws that ComfyUI multiplies by zero are still made (`dpm_fast`, `dpm_adaptive`,
//!   the eps-model ancestral samplers at `eta = 0`), so a shared generator stays in step with the reference.
//!
//! [`toy::MixtureDenoiser`] is an exact analytic denoiser for tests, benches and parity runs.

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
