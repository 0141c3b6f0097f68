//! Errors of the pipeline.

use crate::image_io::ImageError;

/// An error raised while loading models or running img2img.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The input image could not be read, or the output not written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A request parameter is out of range.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    /// A model file is missing, unreadable or does not match the expected architecture.
    #[error("model: {0}")]
    Model(String),
    /// A tensor has an unexpected shape.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The schedule could not be computed.
    #[error(transparent)]
    Schedule(#[from] flux_schedulers::ScheduleError),
    /// The sampler failed.
    #[error(transparent)]
    Sampler(#[from] flux_samplers::SamplerError),
    /// A backend operation failed.
    #[error(transparent)]
    Kernel(#[from] flux_kernels::KernelError),
    /// The progress callback asked to stop.
    #[error("cancelled at step {step} of {total}")]
    Cancelled { step: usize, total: usize },
}

/// Result alias of the pipeline.
pub type Result<T> = std::result::Result<T, PipelineError>;
