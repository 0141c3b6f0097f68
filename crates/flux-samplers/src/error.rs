//! Errors of the samplers.

/// An error raised while sampling.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A backend operation failed.
    #[error(transparent)]
    Kernel(#[from] flux_kernels::KernelError),
    /// The denoiser failed.
    #[error("denoiser failed: {0}")]
    Denoiser(String),
    /// The noise source failed (e.g. a replay source was asked for something else than it holds).
    #[error("noise source: {0}")]
    Noise(String),
    /// An unknown sampler name.
    #[error("unknown sampler '{name}': expected one of {valid}")]
    UnknownSampler { name: String, valid: String },
    /// An option is out of range or does not apply.
    #[error("invalid sampler option {option}: {message}")]
    InvalidOption { option: String, message: String },
    /// The sigma schedule cannot be sampled.
    #[error("invalid sigmas: {0}")]
    InvalidSigmas(String),
    /// The step callback asked to stop.
    #[error("cancelled at step {step} of {total}")]
    Cancelled { step: usize, total: usize },
}

/// Result alias of the samplers.
pub type Result<T> = std::result::Result<T, SamplerError>;
