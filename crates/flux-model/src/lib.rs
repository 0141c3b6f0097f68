//! Safetensors loading and the Flux.1 networks (transformer, autoencoder, T5, CLIP) executed
//! on any [`flux_kernels::Backend`].

pub mod denoiser;
pub mod random;
pub mod transformer;
pub mod weights;

pub use denoiser::{Conditioning, FluxDenoiser};
pub use transformer::{FluxConfig, FluxInputs, FluxTransformer};
pub use weights::{WeightError, Weights};

pub mod clip;
pub mod t5;
pub mod tensor_source;
pub mod tokenizer;
pub mod vae;
pub mod vae_names;
