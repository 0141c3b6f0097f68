//! Sigma schedules and model sampling for Flux.1 (flow matching) and discrete DDPM models,
//! numerically matching ComfyUI.

pub mod model_sampling;

pub use model_sampling::{ModelSampling, Parameterization};
