//! Rust errors as Python exceptions: `ValueError` for bad parameters (with the Rust message),
//! `RuntimeError` for failures while running.

use flux_pipeline::PipelineError;
use flux_samplers::SamplerError;
use pyo3::PyErr;
use pyo3::exceptions::{PyRuntimeError, PyValueError};

/// A `ValueError` with `message`.
pub fn value_error(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// A sampler error: bad names, options and schedules are `ValueError`, the rest `RuntimeError`.
// Taken by value so it can be passed to `map_err` directly.
#[allow(clippy::needless_pass_by_value)]
pub fn sampler_error(e: SamplerError) -> PyErr {
    match e {
        SamplerError::UnknownSampler { .. }
        | SamplerError::InvalidOption { .. }
        | SamplerError::InvalidSigmas(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// A pipeline error: bad requests, images, model files and schedules are `ValueError`, the rest
/// `RuntimeError`.
#[allow(clippy::needless_pass_by_value)]
pub fn pipeline_error(e: PipelineError) -> PyErr {
    match e {
        PipelineError::Sampler(s) => sampler_error(s),
        PipelineError::InvalidRequest { .. }
        | PipelineError::Image(_)
        | PipelineError::Model(_)
        | PipelineError::Schedule(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}
