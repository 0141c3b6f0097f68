//! `flux_kernels.Pipeline` and `flux_kernels.run`: img2img from Python.

use crate::errors::{pipeline_error, value_error};
use crate::sample::seed_arg;
use flux_pipeline::image_io::{ImageSource, OutputFormat, SizeRule, to_base64};
use flux_pipeline::pipeline::FileTokenizer;
use flux_pipeline::{Img2ImgRequest, ModelFiles, Output, Progress};
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;
use pyo3::exceptions::PyImportError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// The model name `run` serves (as the hosted API).
pub const MODEL: &str = "flux-img2img";
/// Most steps `run` accepts (as the hosted API).
pub const RUN_MAX_STEPS: usize = 50;
/// Largest output of `run`, in megapixels (as the hosted API).
pub const RUN_MAX_MEGAPIXELS: f64 = 1.05;

/// Models loaded once (the built-in demo model unless a models folder is given); any number of
/// `img2img` calls reuse them.
#[pyclass(module = "flux_kernels", frozen)]
pub struct Pipeline {
    inner: Arc<flux_pipeline::Pipeline>,
}

/// Encoded image bytes as an image source (base64 text, which every pipeline version reads).
fn bytes_source(bytes: &[u8]) -> ImageSource {
    ImageSource::Base64(to_base64(bytes))
}

/// The input image of a call: a path, URL, data URI or base64 string, `bytes` of an encoded
/// image, an `os.PathLike`, or an object with a PIL-style `save(fp, format=...)`.
fn image_arg(image: &Bound<'_, PyAny>) -> PyResult<ImageSource> {
    if let Ok(s) = image.extract::<String>() {
        return Ok(ImageSource::parse(&s));
    }
    if let Ok(b) = image.cast::<PyBytes>() {
        return Ok(bytes_source(b.as_bytes()));
    }
    if let Ok(b) = image.extract::<Vec<u8>>()
        && image.hasattr("decode")?
    {
        // bytearray
        return Ok(bytes_source(&b));
    }
    let py = image.py();
    let os = py.import("os")?;
    if image.is_instance(&os.getattr("PathLike")?)? {
        let p: PathBuf = image.extract()?;
        return Ok(ImageSource::Path(p));
    }
    if image.hasattr("save")? {
        let io = py.import("io")?;
        let buf = io.call_method0("BytesIO")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("format", "PNG")?;
        image
            .call_method("save", (&buf,), Some(&kwargs))
            .map_err(|e| value_error(format!("image: saving it as PNG failed: {e}")))?;
        let bytes: Vec<u8> = buf.call_method0("getvalue")?.extract()?;
        return Ok(bytes_source(&bytes));
    }
    Err(value_error(format!(
        "image: expected a path, URL, data URI, base64 string, bytes or a PIL image, got {}",
        image.get_type().name()?
    )))
}

fn format_arg(name: &str, field: &str) -> PyResult<OutputFormat> {
    OutputFormat::from_str(name).map_err(|_| {
        value_error(format!(
            "{field}: unknown format '{name}': expected png, jpeg or webp"
        ))
    })
}

/// Runs `req` without the GIL; `callback(step, total)` is called (with the GIL) after each step.
fn run_request(
    py: Python<'_>,
    pipeline: &flux_pipeline::Pipeline,
    req: &Img2ImgRequest,
    callback: Option<&Py<PyAny>>,
) -> PyResult<Output> {
    let error: Mutex<Option<PyErr>> = Mutex::new(None);
    let result = py.detach(|| {
        let mut progress = |p: &Progress| -> bool {
            let Some(cb) = callback else {
                return true;
            };
            match Python::attach(|py| cb.bind(py).call1((p.step, p.total)).map(|_| ())) {
                Ok(()) => true,
                Err(e) => {
                    if let Ok(mut slot) = error.lock() {
                        *slot = Some(e);
                    }
                    false
                }
            }
        };
        pipeline.img2img(req, &mut progress)
    });
    if let Some(e) = error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    result.map_err(pipeline_error)
}

/// The built-in demo pipeline, loaded on first use by `run`.
static DEMO: Mutex<Option<Arc<flux_pipeline::Pipeline>>> = Mutex::new(None);

fn demo_pipeline(py: Python<'_>) -> PyResult<Arc<flux_pipeline::Pipeline>> {
    if let Some(p) = DEMO.lock().ok().and_then(|g| g.clone()) {
        return Ok(p);
    }
    let p = Arc::new(
        py.detach(flux_pipeline::Pipeline::demo)
            .map_err(pipeline_error)?,
    );
    if let Ok(mut g) = DEMO.lock() {
        *g = Some(Arc::clone(&p));
    }
    Ok(p)
}

#[pymethods]
impl Pipeline {
    /// Loads the models: from a ComfyUI-style models folder (`diffusion_models/` or `unet/`,
    /// `vae/`, `text_encoders/` or `clip/`) with the T5 and CLIP `tokenizer.json` files, or the
    /// built-in demo model (random weights) when `model_dir` is None.
    #[new]
    #[pyo3(signature = (model_dir = None, backend = "cpu", t5_tokenizer = None, clip_tokenizer = None))]
    fn new(
        py: Python<'_>,
        model_dir: Option<PathBuf>,
        backend: &str,
        t5_tokenizer: Option<PathBuf>,
        clip_tokenizer: Option<PathBuf>,
    ) -> PyResult<Self> {
        if backend != "cpu" {
            return Err(value_error(format!(
                "backend: unknown or unavailable backend '{backend}': this build supports cpu"
            )));
        }
        let Some(dir) = model_dir else {
            return Ok(Self {
                inner: demo_pipeline(py)?,
            });
        };
        let (Some(t5), Some(clip)) = (t5_tokenizer, clip_tokenizer) else {
            return Err(value_error(
                "model_dir needs t5_tokenizer and clip_tokenizer: the tokenizer.json files in \
                 tokenizer_2/ (T5) and tokenizer/ (CLIP) of the diffusers layout of the FLUX.1 \
                 repositories"
                    .to_string(),
            ));
        };
        let inner = py
            .detach(|| {
                let files = ModelFiles::from_models_dir(&dir)?;
                let t5_len = if files.transformer.to_string_lossy().contains("schnell") {
                    flux_model::tokenizer::T5_LEN_SCHNELL
                } else {
                    flux_model::tokenizer::T5_LEN_DEV
                };
                let tok = FileTokenizer::load(&t5, &clip, t5_len)?;
                flux_pipeline::Pipeline::from_files(&files, Box::new(tok))
            })
            .map_err(pipeline_error)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Whether this is the built-in demo model.
    #[getter]
    fn is_demo(&self) -> bool {
        self.inner.is_demo()
    }

    /// One img2img run. Returns a PIL image (`output="pil"`, needs Pillow) or the encoded bytes
    /// (`output="bytes"`). `callback(step, total)` is called after every step; an exception
    /// raised there stops the run and propagates.
    #[pyo3(signature = (
        image, prompt, steps = 20, seed = None, denoise = 0.75, scheduler = "simple",
        sampler_name = "euler", guidance = None, width = None, height = None,
        max_megapixels = None, image_format = "png", output = "pil", callback = None
    ))]
    fn img2img<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        prompt: &str,
        steps: i64,
        seed: Option<&Bound<'py, PyAny>>,
        denoise: f64,
        scheduler: &str,
        sampler_name: &str,
        guidance: Option<f64>,
        width: Option<u32>,
        height: Option<u32>,
        max_megapixels: Option<f64>,
        image_format: &str,
        output: &str,
        callback: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if output != "pil" && output != "bytes" {
            return Err(value_error(format!(
                "output: expected 'pil' or 'bytes', got '{output}'"
            )));
        }
        let mut req = Img2ImgRequest::new(image_arg(image)?, prompt);
        req.steps = usize::try_from(steps)
            .map_err(|_| value_error(format!("steps: expected a positive integer, got {steps}")))?;
        if let Some(s) = seed {
            req.seed = seed_arg(s, "seed")?;
        }
        req.denoise = denoise;
        req.scheduler =
            Scheduler::from_str(scheduler).map_err(|e| value_error(format!("scheduler: {e}")))?;
        req.sampler = Sampler::from_str(sampler_name)
            .map_err(|e| value_error(format!("sampler_name: {e}")))?;
        req.guidance = guidance;
        req.format = format_arg(image_format, "image_format")?;
        req.size = SizeRule {
            target: match (width, height) {
                (Some(w), Some(h)) => Some((w, h)),
                (None, None) => None,
                _ => {
                    return Err(value_error(
                        "width and height: give both or neither".to_string(),
                    ));
                }
            },
            max_megapixels,
        };
        let callback = match callback {
            Some(c) if !c.is_none() => {
                if !c.is_callable() {
                    return Err(value_error(format!(
                        "callback: expected a callable callback(step, total), got {c}"
                    )));
                }
                Some(c.unbind())
            }
            _ => None,
        };
        let out = run_request(py, &self.inner, &req, callback.as_ref())?;
        if output == "bytes" {
            return Ok(PyBytes::new(py, &out.bytes).into_any());
        }
        to_pil(py, &out.bytes)
    }

    fn __repr__(&self) -> String {
        format!(
            "Pipeline(backend='cpu', demo={})",
            if self.inner.is_demo() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Opens encoded image bytes with Pillow (loaded fully, so the buffer can go).
fn to_pil<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let image = py.import("PIL.Image").map_err(|_| {
        PyImportError::new_err(
            "output='pil' needs Pillow (pip install pillow); or pass output='bytes'",
        )
    })?;
    let io = py.import("io")?;
    let buf = io.call_method1("BytesIO", (PyBytes::new(py, bytes),))?;
    let img = image.call_method1("open", (buf,))?;
    img.call_method0("load")?;
    Ok(img)
}

/// The hosted API's parameter names.
const RUN_PARAMS: &[&str] = &[
    "image",
    "prompt",
    "steps",
    "seed",
    "denoise",
    "scheduler",
    "sampler_name",
    "base64",
    "image_format",
];

/// Builds the request of `run` from the hosted API's parameters, with its defaults and ranges.
fn run_request_from(params: &Bound<'_, PyDict>) -> PyResult<(Img2ImgRequest, bool)> {
    for key in params.keys() {
        let k: String = key.extract()?;
        if !RUN_PARAMS.contains(&k.as_str()) {
            return Err(value_error(format!(
                "unknown parameter '{k}': expected {}",
                RUN_PARAMS.join(", ")
            )));
        }
    }
    let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(params.get_item(k)?.filter(|v| !v.is_none()))
    };
    let image = get("image")?.ok_or_else(|| {
        value_error(
            "image: required (a path, URL, data URI, base64 string, bytes or PIL image)"
                .to_string(),
        )
    })?;
    let prompt: String = match get("prompt")? {
        None => {
            return Err(value_error(
                "prompt: required, a non-empty string".to_string(),
            ));
        }
        Some(p) => p
            .extract()
            .map_err(|_| value_error(format!("prompt: expected a string, got {p}")))?,
    };
    if prompt.trim().is_empty() {
        return Err(value_error("prompt: must not be empty".to_string()));
    }
    let mut req = Img2ImgRequest::new(image_arg(&image)?, prompt);
    if let Some(s) = get("steps")? {
        let n = s
            .extract::<usize>()
            .ok()
            .filter(|n| (1..=RUN_MAX_STEPS).contains(n));
        req.steps = n.ok_or_else(|| {
            value_error(format!(
                "steps: expected an integer from 1 to {RUN_MAX_STEPS}, got {s}"
            ))
        })?;
    }
    if let Some(s) = get("seed")? {
        req.seed = seed_arg(&s, "seed")?;
    }
    if let Some(d) = get("denoise")? {
        let v = d.extract::<f64>().ok().filter(|v| (0.0..=1.0).contains(v));
        req.denoise = v.ok_or_else(|| {
            value_error(format!("denoise: expected a number from 0 to 1, got {d}"))
        })?;
    }
    if let Some(s) = get("scheduler")? {
        let name: String = s
            .extract()
            .map_err(|_| value_error(format!("scheduler: expected a name, got {s}")))?;
        req.scheduler =
            Scheduler::from_str(&name).map_err(|e| value_error(format!("scheduler: {e}")))?;
    }
    if let Some(s) = get("sampler_name")? {
        let name: String = s
            .extract()
            .map_err(|_| value_error(format!("sampler_name: expected a name, got {s}")))?;
        let sampler =
            Sampler::from_str(&name).map_err(|e| value_error(format!("sampler_name: {e}")))?;
        if !Sampler::API.contains(&sampler) {
            return Err(value_error(format!(
                "sampler_name: '{name}' is not one of the API's samplers: {}",
                Sampler::API
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        req.sampler = sampler;
    }
    let base64 = match get("base64")? {
        None => false,
        Some(b) => b
            .extract::<bool>()
            .map_err(|_| value_error(format!("base64: expected True or False, got {b}")))?,
    };
    req.format = match get("image_format")? {
        None => OutputFormat::Jpeg,
        Some(f) => {
            let name: String = f
                .extract()
                .map_err(|_| value_error(format!("image_format: expected a name, got {f}")))?;
            format_arg(&name, "image_format")?
        }
    };
    req.size = SizeRule {
        target: None,
        max_megapixels: Some(RUN_MAX_MEGAPIXELS),
    };
    Ok((req, base64))
}

/// Runs a job like the hosted API's client: `run("flux-img2img", image=..., prompt=..., ...)`.
///
/// Parameters (the hosted API's names, defaults and ranges): image (required: path, URL, data
/// URI, base64, bytes or PIL image), prompt (required), steps (1..50, default 20), seed (default
/// 46588), denoise (0..1, default 0.75), scheduler (default "simple"), sampler_name (one of the
/// API's 26 samplers, default "euler"), base64 (default False), image_format ("png", "jpeg"
/// (default) or "webp"). Returns `{"status": "COMPLETED", "output": base64 text or image bytes,
/// "metrics": {"inference_time": seconds, "sampling_time": seconds}, "metadata": {...}}`. Runs
/// the built-in demo model unless `pipeline` is given. Bad parameters raise ValueError.
#[pyfunction]
#[pyo3(signature = (model, /, pipeline = None, **params))]
pub fn run<'py>(
    py: Python<'py>,
    model: &str,
    pipeline: Option<&Bound<'py, Pipeline>>,
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    if model != MODEL {
        return Err(value_error(format!(
            "unknown model '{model}': expected '{MODEL}'"
        )));
    }
    let empty = PyDict::new(py);
    let params = params.unwrap_or(&empty);
    let (req, base64) = run_request_from(params)?;
    let inner = match &pipeline {
        Some(p) => Arc::clone(&p.get().inner),
        None => demo_pipeline(py)?,
    };
    let out = run_request(py, &inner, &req, None)?;
    let result = PyDict::new(py);
    result.set_item("status", "COMPLETED")?;
    if base64 {
        result.set_item("output", to_base64(&out.bytes))?;
    } else {
        result.set_item("output", PyBytes::new(py, &out.bytes))?;
    }
    let metrics = PyDict::new(py);
    metrics.set_item("inference_time", out.total_time.as_secs_f64())?;
    metrics.set_item("sampling_time", out.sampling_time.as_secs_f64())?;
    result.set_item("metrics", metrics)?;
    let metadata = PyDict::new(py);
    metadata.set_item("demo", out.demo)?;
    metadata.set_item("image_format", out.format.name())?;
    metadata.set_item("width", out.width)?;
    metadata.set_item("height", out.height)?;
    metadata.set_item("seed", req.seed)?;
    metadata.set_item("steps", req.steps)?;
    result.set_item("metadata", metadata)?;
    Ok(result)
}
