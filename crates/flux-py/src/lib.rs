//! Python bindings of flux-kernels: the module `flux_kernels`.
//!
//! * `samplers`, `schedulers`, `sigmas`: names and ComfyUI's sigma schedules.
//! * `sample::sample`: any Rust sampler driving a Python denoiser.
//! * `randn` and `Generator`: noise identical to PyTorch's CPU `randn`.
//! * `pipeline::Pipeline` and `pipeline::run`: img2img with the Flux pipeline.
//!
//! The Python-facing documentation lives in the docstrings below and in `flux_kernels.pyi`.

mod arrays;
mod errors;
mod pipeline;
mod sample;

use crate::arrays::{HostVec, to_numpy};
use crate::errors::value_error;
use flux_kernels::DType;
use flux_samplers::Sampler;
use flux_samplers::noise::{HostNoise, TorchGenerator};
use flux_schedulers::{ModelSampling, Scheduler, ksampler_sigmas};
use pyo3::prelude::*;
use std::str::FromStr;

/// Largest number of elements `randn` draws at once (4 GiB of float32).
const MAX_RANDN_ELEMENTS: usize = 1 << 30;

/// Every sampler name, in ComfyUI's order (the hosted API's 26 first).
#[pyfunction]
fn samplers() -> Vec<&'static str> {
    Sampler::ALL
        .iter()
        .filter(|s| s.is_implemented())
        .map(|s| s.name())
        .collect()
}

/// Every scheduler name, as ComfyUI spells them.
#[pyfunction]
fn schedulers() -> Vec<&'static str> {
    Scheduler::ALL.iter().map(|s| s.name()).collect()
}

/// The model names `sigmas` and `sample` accept.
#[pyfunction]
fn models() -> Vec<&'static str> {
    flux_schedulers::MODEL_NAMES.to_vec()
}

/// Reads a non-negative step count.
fn steps_arg(steps: &Bound<'_, PyAny>) -> PyResult<usize> {
    steps.extract::<usize>().map_err(|_| {
        value_error(format!(
            "steps: expected a non-negative integer, got {steps}"
        ))
    })
}

/// The sigma schedule ComfyUI's KSampler runs, as float64 (the values are float32 numbers,
/// as ComfyUI computes them).
#[pyfunction]
#[pyo3(signature = (scheduler, steps, denoise = 1.0, model = "flux-dev", shift = None, sampler = None))]
fn sigmas<'py>(
    py: Python<'py>,
    scheduler: &str,
    steps: &Bound<'py, PyAny>,
    denoise: f64,
    model: &str,
    shift: Option<f64>,
    sampler: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let scheduler = Scheduler::from_str(scheduler).map_err(|e| value_error(e.to_string()))?;
    let steps = steps_arg(steps)?;
    let model = ModelSampling::from_name(model, shift).map_err(|e| value_error(e.to_string()))?;
    let discard = match sampler {
        Some(name) => Sampler::from_str(name)
            .map_err(errors::sampler_error)?
            .discards_penultimate_sigma(),
        None => false,
    };
    let s = ksampler_sigmas(scheduler, &model, steps, denoise, discard)
        .map_err(|e| value_error(e.to_string()))?;
    let n = s.len();
    to_numpy(
        py,
        HostVec::F64(s.into_iter().map(f64::from).collect()),
        &[n],
    )
}

/// Reads a shape: an integer or a sequence of non-negative integers.
fn shape_arg(shape: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let dims = if let Ok(n) = shape.extract::<i64>() {
        vec![n]
    } else {
        shape.extract::<Vec<i64>>().map_err(|_| {
            value_error(format!(
                "shape: expected an integer or a sequence of integers, got {shape}"
            ))
        })?
    };
    let dims = dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                value_error(format!(
                    "shape: dimensions must be non-negative, got {dims:?}"
                ))
            })
        })
        .collect::<PyResult<Vec<usize>>>()?;
    let numel = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    match numel {
        Some(n) if n <= MAX_RANDN_ELEMENTS => Ok(dims),
        _ => Err(value_error(format!(
            "shape {dims:?}: more than {MAX_RANDN_ELEMENTS} elements"
        ))),
    }
}

/// Reads a dtype (`"float32"`, `numpy.float64`, `numpy.dtype("float32")`, ...).
fn dtype_arg(dtype: &Bound<'_, PyAny>) -> PyResult<DType> {
    let np = dtype.py().import("numpy")?;
    let name: String = np
        .call_method1("dtype", (dtype,))
        .and_then(|d| d.getattr("name"))
        .and_then(|n| n.extract())
        .map_err(|_| value_error(format!("dtype: expected float32 or float64, got {dtype}")))?;
    match name.as_str() {
        "float32" => Ok(DType::F32),
        "float64" => Ok(DType::F64),
        other => Err(value_error(format!(
            "dtype: expected float32 or float64, got {other}"
        ))),
    }
}

fn noise_to_numpy<'py>(
    py: Python<'py>,
    noise: HostNoise,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let data = match noise {
        HostNoise::F32(v) => HostVec::F32(v),
        HostNoise::F64(v) => HostVec::F64(v),
    };
    to_numpy(py, data, shape)
}

/// `torch.randn(shape, generator=torch.manual_seed(seed), dtype=dtype)` on the CPU, bit for bit.
#[pyfunction]
#[pyo3(signature = (shape, seed, dtype = None))]
fn randn<'py>(
    py: Python<'py>,
    shape: &Bound<'py, PyAny>,
    seed: &Bound<'py, PyAny>,
    dtype: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = shape_arg(shape)?;
    let seed = sample::seed_arg(seed, "seed")?;
    let dtype = dtype.map_or(Ok(DType::F32), dtype_arg)?;
    let noise = py
        .detach(|| flux_samplers::noise::randn(&shape, seed, dtype))
        .map_err(errors::sampler_error)?;
    noise_to_numpy(py, noise, &shape)
}

/// A torch-compatible CPU generator: successive `randn` draws continue one stream, like
/// `torch.Generator().manual_seed(seed)`.
#[pyclass(module = "flux_kernels")]
struct Generator {
    inner: TorchGenerator,
    seed: u64,
}

#[pymethods]
impl Generator {
    #[new]
    fn new(seed: &Bound<'_, PyAny>) -> PyResult<Self> {
        let seed = sample::seed_arg(seed, "seed")?;
        Ok(Self {
            inner: TorchGenerator::new(seed),
            seed,
        })
    }

    /// The next `randn(shape, dtype=dtype)` draw of this generator.
    #[pyo3(signature = (shape, dtype = None))]
    fn randn<'py>(
        &mut self,
        py: Python<'py>,
        shape: &Bound<'py, PyAny>,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shape = shape_arg(shape)?;
        let dtype = dtype.map_or(Ok(DType::F32), dtype_arg)?;
        let inner = &mut self.inner;
        let noise = py
            .detach(|| inner.randn(&shape, dtype))
            .map_err(errors::sampler_error)?;
        noise_to_numpy(py, noise, &shape)
    }

    fn __repr__(&self) -> String {
        format!("Generator(seed={})", self.seed)
    }
}

/// Rust implementations of ComfyUI's Flux samplers and schedulers, torch-compatible noise and
/// the img2img pipeline.
#[pymodule]
#[pyo3(name = "flux_kernels")]
fn flux_kernels_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(samplers, m)?)?;
    m.add_function(wrap_pyfunction!(schedulers, m)?)?;
    m.add_function(wrap_pyfunction!(models, m)?)?;
    m.add_function(wrap_pyfunction!(sigmas, m)?)?;
    m.add_function(wrap_pyfunction!(randn, m)?)?;
    m.add_function(wrap_pyfunction!(sample::sample, m)?)?;
    m.add_function(wrap_pyfunction!(pipeline::run, m)?)?;
    m.add_class::<Generator>()?;
    m.add_class::<pipeline::Pipeline>()?;
    Ok(())
}
