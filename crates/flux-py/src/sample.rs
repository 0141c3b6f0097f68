//! `flux_kernels.sample`: a Rust sampler driving a Python denoiser.
//!
//! The GIL is released for the whole run; each call back into Python (denoiser, noise,
//! per-step callback) re-acquires it. An exception raised by Python code is stored, sampling
//! is aborted with an error, and the stored exception (with its traceback) is raised again.

use crate::arrays::{array_to_tensor, read_f64_vector, read_float_array, tensor_to_numpy};
use crate::errors::{sampler_error, value_error};
use flux_kernels::{Backend, Cpu, DType, SamplerOps, Tensor};
use flux_samplers::noise::reference_noise;
use flux_samplers::sampler::Callback;
use flux_samplers::{
    Denoised, Denoiser, NoiseSource, SampleContext, Sampler, SamplerError, SamplerOptions, StepInfo,
};
use flux_schedulers::ModelSampling;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::str::FromStr;

/// A Python callable `denoiser(x, sigma)` as a [`Denoiser`].
pub struct PyDenoiser {
    callable: Py<PyAny>,
    sampler: Sampler,
    /// The exception that aborted sampling, raised again once the GIL is back.
    pub error: Option<PyErr>,
    /// Calls made so far.
    pub calls: usize,
}

impl PyDenoiser {
    /// Wraps `callable` for `sampler` (named in error messages).
    pub fn new(callable: Py<PyAny>, sampler: Sampler) -> Self {
        Self {
            callable,
            sampler,
            error: None,
            calls: 0,
        }
    }

    fn call(
        &self,
        py: Python<'_>,
        be: Cpu,
        x: &Tensor<Cpu>,
        sigma: f64,
        want_uncond: bool,
    ) -> PyResult<Denoised<Cpu>> {
        let arr = tensor_to_numpy(py, be, x)?;
        let out = self.callable.bind(py).call1((arr, sigma))?;
        let (denoised, uncond) = match out.cast::<PyTuple>() {
            Ok(t) if t.len() == 2 => (t.get_item(0)?, Some(t.get_item(1)?)),
            Ok(t) => {
                return Err(PyValueError::new_err(format!(
                    "denoiser returned a tuple of {} items: expected an array, or a tuple \
                     (denoised, uncond_denoised)",
                    t.len()
                )));
            }
            Err(_) => (out, None),
        };
        let denoised = array_to_tensor(be, &denoised, x.shape(), x.dtype(), "denoiser output")?;
        let uncond = match (want_uncond, uncond) {
            (false, _) => None,
            (true, Some(u)) => Some(array_to_tensor(
                be,
                &u,
                x.shape(),
                x.dtype(),
                "denoiser output (uncond_denoised)",
            )?),
            (true, None) => {
                return Err(PyValueError::new_err(format!(
                    "sampler '{}' uses CFG++ and needs the unconditional prediction: the \
                     denoiser must return a tuple (denoised, uncond_denoised)",
                    self.sampler
                )));
            }
        };
        Ok(Denoised { denoised, uncond })
    }
}

impl Denoiser<Cpu> for PyDenoiser {
    fn denoise(
        &mut self,
        backend: &Cpu,
        x: &Tensor<Cpu>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<Cpu>> {
        self.calls += 1;
        match Python::attach(|py| self.call(py, *backend, x, sigma, want_uncond)) {
            Ok(d) => Ok(d),
            Err(e) => {
                self.error = Some(e);
                Err(SamplerError::Denoiser(
                    "the Python denoiser raised an exception".into(),
                ))
            }
        }
    }
}

/// A Python callable `noise(sigma, sigma_next)` as a [`NoiseSource`].
pub struct PyNoise {
    callable: Py<PyAny>,
    /// The exception that aborted sampling.
    pub error: Option<PyErr>,
}

impl NoiseSource<Cpu> for PyNoise {
    fn sample(
        &mut self,
        backend: &Cpu,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> flux_samplers::Result<Tensor<Cpu>> {
        let r = Python::attach(|py| -> PyResult<Tensor<Cpu>> {
            let out = self.callable.bind(py).call1((sigma, sigma_next))?;
            array_to_tensor(*backend, &out, shape, dtype, "noise output")
        });
        r.map_err(|e| {
            self.error = Some(e);
            SamplerError::Noise("the Python noise callable raised an exception".into())
        })
    }
}

/// A Python `callback(step, total, x, denoised)`.
struct PyCallback {
    callable: Py<PyAny>,
    error: Option<PyErr>,
}

impl PyCallback {
    /// Calls back; `false` (stop) when the callback raised.
    fn step(&mut self, be: Cpu, info: &StepInfo<'_, Cpu>) -> bool {
        let r = Python::attach(|py| -> PyResult<()> {
            let x = tensor_to_numpy(py, be, info.x)?;
            let d = tensor_to_numpy(py, be, info.denoised)?;
            self.callable
                .bind(py)
                .call1((info.step, info.total, x, d))?;
            Ok(())
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }
}

/// Sets `field` from `options[key]` when present.
fn opt<'py, T: FromPyObjectOwned<'py>>(
    value: &Bound<'py, PyAny>,
    key: &str,
    expected: &str,
) -> PyResult<Option<T>> {
    value.extract::<T>().map(Some).map_err(|_| {
        value_error(format!(
            "options['{key}']: expected {expected}, got {value}"
        ))
    })
}

/// The option names `sample` accepts.
pub const OPTION_NAMES: &[&str] = &[
    "eta",
    "s_noise",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "r",
    "order",
    "solver_type",
    "max_order",
    "deis_mode",
    "rtol",
    "atol",
    "h_init",
    "pcoeff",
    "icoeff",
    "dcoeff",
    "accept_safety",
    "s_noise_end",
    "noise_clip_std",
    "r_1",
    "r_2",
    "ge_gamma",
    "max_stage",
    "predictor_order",
    "corrector_order",
    "simple_order_2",
];

/// Maps an options dict onto [`SamplerOptions`]; `None` values keep the sampler's default.
pub fn sampler_options(options: Option<&Bound<'_, PyDict>>) -> PyResult<SamplerOptions> {
    let mut o = SamplerOptions::default();
    let Some(options) = options else {
        return Ok(o);
    };
    const NUM: &str = "a number";
    const INT: &str = "a non-negative integer";
    for (k, v) in options.iter() {
        let key: String = k
            .extract()
            .map_err(|_| value_error(format!("options: keys must be strings, got {k}")))?;
        if v.is_none() {
            if !OPTION_NAMES.contains(&key.as_str()) {
                return Err(unknown_option(&key));
            }
            continue;
        }
        let v = &v;
        match key.as_str() {
            "eta" => o.eta = opt(v, &key, NUM)?,
            "s_noise" => o.s_noise = opt(v, &key, NUM)?,
            "s_churn" => o.s_churn = opt(v, &key, NUM)?,
            "s_tmin" => o.s_tmin = opt(v, &key, NUM)?,
            "s_tmax" => o.s_tmax = opt(v, &key, NUM)?,
            "r" => o.r = opt(v, &key, NUM)?,
            "order" => o.order = opt(v, &key, INT)?,
            "solver_type" => o.solver_type = opt(v, &key, "'midpoint' or 'heun'")?,
            "max_order" => o.max_order = opt(v, &key, INT)?,
            "deis_mode" => o.deis_mode = opt(v, &key, "'tab' or 'rhoab'")?,
            "rtol" => o.rtol = opt(v, &key, NUM)?,
            "atol" => o.atol = opt(v, &key, NUM)?,
            "h_init" => o.h_init = opt(v, &key, NUM)?,
            "pcoeff" => o.pcoeff = opt(v, &key, NUM)?,
            "icoeff" => o.icoeff = opt(v, &key, NUM)?,
            "dcoeff" => o.dcoeff = opt(v, &key, NUM)?,
            "accept_safety" => o.accept_safety = opt(v, &key, NUM)?,
            "s_noise_end" => o.s_noise_end = opt(v, &key, NUM)?,
            "noise_clip_std" => o.noise_clip_std = opt(v, &key, NUM)?,
            "r_1" => o.r_1 = opt(v, &key, NUM)?,
            "r_2" => o.r_2 = opt(v, &key, NUM)?,
            "ge_gamma" => o.ge_gamma = opt(v, &key, NUM)?,
            "max_stage" => o.max_stage = opt(v, &key, INT)?,
            "predictor_order" => o.predictor_order = opt(v, &key, INT)?,
            "corrector_order" => o.corrector_order = opt(v, &key, INT)?,
            "simple_order_2" => o.simple_order_2 = opt(v, &key, "True or False")?,
            _ => return Err(unknown_option(&key)),
        }
    }
    Ok(o)
}

fn unknown_option(key: &str) -> PyErr {
    value_error(format!(
        "options: unknown sampler option '{key}'; valid options: {}",
        OPTION_NAMES.join(", ")
    ))
}

/// Where the sampler's noise comes from.
enum NoiseChoice {
    /// ComfyUI's noise for this seed (see [`reference_noise`]).
    Seed(u64),
    /// A Python callable.
    Callable(PyNoise),
}

/// Reads a seed: an integer in `0..2^64`.
pub fn seed_arg(seed: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    seed.extract::<u64>().map_err(|_| {
        value_error(format!(
            "{what}: expected an integer from 0 to 2**64 - 1, got {seed}"
        ))
    })
}

/// Runs `sampler` from `x` along `sigmas` and returns the result (same shape and dtype as `x`).
///
/// `x` is the sampler input, already noise-scaled, float32 or float64. `denoiser(x, sigma)`
/// returns the denoised prediction with x's shape (numpy arrays, or anything with the array
/// protocol such as CPU torch tensors); CFG++ samplers (`*_cfg_pp`) need the tuple
/// `(denoised, uncond_denoised)`. `model` (flux-dev, flux-schnell, sd15; `shift` overrides a Flux
/// model's time shift) selects the model sampling.
///
/// Noise: ComfyUI's own noise for `seed` (0 when not given), or `noise(sigma, sigma_next)`
/// returning a standard-normal array of x's shape. `options`: the sampler's keyword options
/// (eta, s_noise, s_churn, order, solver_type, ...); None keeps a default. `callback(step,
/// total, x, denoised)` runs after every step. With `inverse_noise_scaling` the output is scaled
/// as ComfyUI's KSAMPLER does (flow models divide by `1 - last_sigma`).
///
/// Exceptions raised by the denoiser, noise or callback stop sampling and propagate with their
/// traceback; bad names, shapes, dtypes and options raise ValueError.
#[pyfunction]
#[pyo3(signature = (
    sampler, denoiser, x, sigmas, model = "flux-dev", seed = None, noise = None,
    options = None, callback = None, shift = None, inverse_noise_scaling = true
))]
pub fn sample<'py>(
    py: Python<'py>,
    sampler: &str,
    denoiser: Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    sigmas: &Bound<'py, PyAny>,
    model: &str,
    seed: Option<&Bound<'py, PyAny>>,
    noise: Option<Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
    callback: Option<Bound<'py, PyAny>>,
    shift: Option<f64>,
    inverse_noise_scaling: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let sampler = Sampler::from_str(sampler).map_err(sampler_error)?;
    if !sampler.is_implemented() {
        return Err(value_error(format!(
            "sampler '{sampler}' is not implemented in this build"
        )));
    }
    if !denoiser.is_callable() {
        return Err(value_error(format!(
            "denoiser: expected a callable denoiser(x, sigma) -> denoised, got {denoiser}"
        )));
    }
    let model_sampling =
        ModelSampling::from_name(model, shift).map_err(|e| value_error(e.to_string()))?;
    let x = read_float_array(x, "x")?;
    if x.shape.is_empty() || x.shape.contains(&0) {
        return Err(value_error(format!(
            "x: expected a non-empty array with at least one dimension, got shape {:?}",
            x.shape
        )));
    }
    let sigmas = read_f64_vector(sigmas, "sigmas")?;
    if let Some((i, s)) = sigmas
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
    {
        return Err(value_error(format!(
            "sigmas[{i}] is {s}: expected finite, non-negative values"
        )));
    }
    let options = sampler_options(options)?;
    let noise = match (seed, noise) {
        (Some(_), Some(_)) => {
            return Err(value_error(
                "pass either seed or noise, not both".to_string(),
            ));
        }
        (_, Some(n)) => {
            if !n.is_callable() {
                return Err(value_error(format!(
                    "noise: expected a callable noise(sigma, sigma_next) -> array, got {n}"
                )));
            }
            NoiseChoice::Callable(PyNoise {
                callable: n.unbind(),
                error: None,
            })
        }
        (Some(s), None) => NoiseChoice::Seed(seed_arg(s, "seed")?),
        (None, None) => NoiseChoice::Seed(0),
    };
    let mut callback = match callback {
        Some(c) if !c.is_none() => {
            if !c.is_callable() {
                return Err(value_error(format!(
                    "callback: expected a callable callback(step, total, x, denoised), got {c}"
                )));
            }
            Some(PyCallback {
                callable: c.unbind(),
                error: None,
            })
        }
        _ => None,
    };
    let mut den = PyDenoiser::new(denoiser.unbind(), sampler);
    let dtype = x.data.dtype();
    let shape = x.shape.clone();
    let be = Cpu;
    let input = be
        .upload(x.data.as_host(), &shape, dtype)
        .map_err(|e| value_error(format!("x: {e}")))?;

    let mut noise = noise;
    let result = py.detach(|| {
        run_sampler(
            be,
            sampler,
            &model_sampling,
            &mut den,
            &mut noise,
            callback.as_mut(),
            input,
            &sigmas,
            &options,
            inverse_noise_scaling,
        )
    });
    // Python's own exceptions first: they explain why the sampler stopped.
    if let Some(e) = den.error.take() {
        return Err(e);
    }
    if let NoiseChoice::Callable(n) = &mut noise
        && let Some(e) = n.error.take()
    {
        return Err(e);
    }
    if let Some(e) = callback.as_mut().and_then(|c| c.error.take()) {
        return Err(e);
    }
    let out = result.map_err(sampler_error)?;
    tensor_to_numpy(py, be, &out)
}

/// The part of [`sample`] that runs without the GIL.
fn run_sampler(
    be: Cpu,
    sampler: Sampler,
    model: &ModelSampling,
    den: &mut PyDenoiser,
    noise: &mut NoiseChoice,
    callback: Option<&mut PyCallback>,
    x: Tensor<Cpu>,
    sigmas: &[f64],
    options: &SamplerOptions,
    inverse_noise_scaling: bool,
) -> flux_samplers::Result<Tensor<Cpu>> {
    let mut seeded: Box<dyn NoiseSource<Cpu>>;
    let noise: &mut dyn NoiseSource<Cpu> = match noise {
        NoiseChoice::Seed(seed) => {
            seeded = reference_noise::<Cpu>(sampler, *seed, sigmas)?;
            seeded.as_mut()
        }
        NoiseChoice::Callable(n) => n,
    };
    let dtype = x.dtype();
    let mut step = callback.map(|cb| move |info: &StepInfo<'_, Cpu>| cb.step(be, info));
    let cb: Option<&mut Callback<'_, Cpu>> = match step.as_mut() {
        Some(f) => Some(f),
        None => None,
    };
    let mut ctx = SampleContext {
        backend: &be,
        model,
        denoiser: den,
        noise,
        callback: cb,
    };
    let out = flux_samplers::sample(sampler, &mut ctx, x, sigmas, options)?;
    match sigmas.last() {
        Some(&last) if inverse_noise_scaling && sigmas.len() >= 2 => {
            let c = model.inverse_noise_scaling_coeff(sampler.effective_last_sigma(last, dtype));
            if c == 1.0 {
                Ok(out)
            } else {
                Ok(be.lincomb(&[(c, &out)])?)
            }
        }
        _ => Ok(out),
    }
}
