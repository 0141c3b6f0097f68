//! img2img with Flux.1: image in -> VAE encode -> seeded noise -> sampler driving the transformer
//! -> VAE decode -> image out, done exactly as ComfyUI does it (see [`comfy`]).
//!
//! * [`image_io`]: inputs from files, URLs, data URIs and base64; the resize rule; PNG, JPEG and
//!   WebP output with metadata.
//! * [`model`]: the traits the pipeline drives the networks through.
//! * [`model_files`]: finding the weights and tokenizers in ComfyUI and diffusers folders.
//! * [`comfy`]: one run, step by step, with an optional trace of every intermediate.
//! * [`pipeline`]: [`Pipeline`], models loaded once and reused across requests.
//! * [`demo`]: a tiny built-in model with deterministic weights, used when none is configured.

pub mod comfy;
pub mod demo;
pub mod error;
pub mod flux;
pub mod image_io;
pub mod model;
pub mod model_files;
pub mod pipeline;

pub use pipeline::{
    Img2Img, Img2ImgRequest, ModelFiles, Output, Pipeline, Progress, schedule_problem,
};

pub use error::{PipelineError, Result};
