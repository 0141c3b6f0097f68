//! Parsing and validating the JSON body of an img2img request.
//!
//! [`parse_request`] is pure (no network, no disk): it checks every field and decodes inline
//! images (`data:` URIs and raw base64) far enough to know they are PNG, JPEG or WebP of a
//! sane size. Image URLs are fetched later, by the server, under its fetch policy.

use crate::error::ApiError;
use flux_pipeline::Img2ImgRequest;
use flux_pipeline::image_io::{self, ImageSource, OutputFormat, SizeRule};
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most steps a request may ask for (as the hosted API).
pub const MAX_STEPS: u64 = 50;
/// Default steps.
pub const DEFAULT_STEPS: u64 = 20;
/// Default seed.
pub const DEFAULT_SEED: u64 = 46588;
/// Default denoise.
pub const DEFAULT_DENOISE: f64 = 0.75;
/// Most characters of a prompt.
pub const MAX_PROMPT_CHARS: usize = 10_000;
/// Largest output, in megapixels: inputs are scaled down to it.
pub const MAX_MEGAPIXELS: f64 = 1.05;

/// The input image of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageInput {
    /// An `http://` or `https://` URL, fetched by the server.
    Url(String),
    /// Encoded image bytes (from a data URI or base64), already checked to be PNG, JPEG or WebP.
    Bytes(Vec<u8>),
}

/// Every parameter of a job except the image, as stored with the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobParams {
    /// The prompt.
    pub prompt: String,
    /// Steps (1..=[`MAX_STEPS`]).
    pub steps: u64,
    /// Noise seed.
    pub seed: u64,
    /// Denoise in [0, 1].
    pub denoise: f64,
    /// Scheduler name.
    pub scheduler: String,
    /// Sampler name.
    pub sampler_name: String,
    /// Whether the result is returned as base64 (else as image bytes or a URL).
    pub base64: bool,
    /// Output format name (`png`, `jpeg`, `webp`).
    pub image_format: String,
}

impl JobParams {
    /// The output format.
    pub fn format(&self) -> OutputFormat {
        self.image_format.parse().unwrap_or(OutputFormat::Jpeg)
    }

    /// The pipeline request for these parameters and an encoded input image.
    pub fn to_pipeline(&self, image: Vec<u8>) -> Result<Img2ImgRequest, String> {
        let mut req = Img2ImgRequest::new(ImageSource::Bytes(image), self.prompt.clone());
        req.steps = usize::try_from(self.steps).map_err(|e| format!("steps: {e}"))?;
        req.seed = self.seed;
        req.denoise = self.denoise;
        req.scheduler = self
            .scheduler
            .parse::<Scheduler>()
            .map_err(|e| format!("scheduler: {e}"))?;
        req.sampler = self
            .sampler_name
            .parse::<Sampler>()
            .map_err(|e| format!("sampler_name: {e}"))?;
        req.format = self.format();
        req.size = output_rule();
        Ok(req)
    }
}

/// How input images are sized for a job: scaled down to at most [`MAX_MEGAPIXELS`].
pub fn output_rule() -> SizeRule {
    SizeRule {
        target: None,
        max_megapixels: Some(MAX_MEGAPIXELS),
    }
}

/// Checks encoded image bytes before a job is queued: a PNG, JPEG or WebP of a sane size that
/// [`output_rule`] can fit (not too elongated for the cap); `input` names them in errors.
pub fn check_image(bytes: &[u8], input: &str) -> Result<(), image_io::ImageError> {
    let (w, h) = image_io::probe(bytes, input)?;
    output_rule().output_size(w, h)?;
    Ok(())
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedRequest {
    /// The parameters.
    pub params: JobParams,
    /// The image.
    pub image: ImageInput,
}

/// A short description of a JSON value for error messages: its type and (shortened) value.
fn show(v: &Value) -> String {
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => return "an array".into(),
        Value::Object(_) => return "an object".into(),
    };
    let mut text = v.to_string();
    if text.chars().count() > 60 {
        text = text.chars().take(57).collect::<String>() + "...";
    }
    format!("{kind} {text}")
}

fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<Option<&'a str>, ApiError> {
    match get(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::field(
            field,
            format!("expected {what}, got {}", show(v)),
        )),
    }
}

fn integer_field(
    obj: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, ApiError> {
    let allowed = if max == u64::MAX {
        format!("an integer >= {min}")
    } else {
        format!("an integer from {min} to {max}")
    };
    let Some(v) = get(obj, field) else {
        return Ok(default);
    };
    let Value::Number(n) = v else {
        return Err(ApiError::field(
            field,
            format!("expected {allowed}, got {}", show(v)),
        ));
    };
    let value = if let Some(u) = n.as_u64() {
        u
    } else if n.as_i64().is_some() {
        return Err(ApiError::field(
            field,
            format!("{n} is out of range: expected {allowed}"),
        ));
    } else {
        // A float: accept only whole numbers written as such (20.0).
        match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 => f as u64,
            _ => {
                return Err(ApiError::field(
                    field,
                    format!("expected {allowed}, got number {n}"),
                ));
            }
        }
    };
    if !(min..=max).contains(&value) {
        return Err(ApiError::field(
            field,
            format!("{value} is out of range: expected {allowed}"),
        ));
    }
    Ok(value)
}

fn image_field(obj: &Map<String, Value>) -> Result<ImageInput, ApiError> {
    const WHAT: &str = "an http(s) URL, a data: URI or base64-encoded PNG, JPEG or WebP data";
    let s = string_field(obj, "image", WHAT)?
        .ok_or_else(|| ApiError::field("image", format!("required: {WHAT}")))?;
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(ApiError::field("image", format!("empty: expected {WHAT}")));
    }
    let lower: String = trimmed
        .chars()
        .take(10)
        .collect::<String>()
        .to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let rest = trimmed.split_once("://").map_or("", |(_, r)| r);
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || trimmed.chars().any(char::is_whitespace) {
            return Err(ApiError::field(
                "image",
                format!("'{}' is not a valid URL", shorten(trimmed)),
            ));
        }
        return Ok(ImageInput::Url(trimmed.to_string()));
    }
    let source = if lower.starts_with("data:") {
        ImageSource::DataUri(trimmed.to_string())
    } else if let Some((scheme, _)) = trimmed.split_once("://") {
        return Err(ApiError::field(
            "image",
            format!(
                "URL scheme '{}' is not accepted: only http://, https:// and data: URIs (or raw base64)",
                shorten(scheme)
            ),
        ));
    } else {
        ImageSource::Base64(trimmed.to_string())
    };
    let bytes = source.read_bytes_with(&image_io::FetchPolicy::default());
    let bytes = bytes.map_err(|e| match source {
        ImageSource::Base64(_) => ApiError::field(
            "image",
            format!(
                "'{}' is neither an http(s) URL, a data: URI nor valid base64 ({e})",
                shorten(trimmed)
            ),
        ),
        _ => ApiError::image(&e),
    })?;
    check_image(&bytes, &source.describe()).map_err(|e| ApiError::image(&e))?;
    Ok(ImageInput::Bytes(bytes))
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        s.chars().take(37).collect::<String>() + "..."
    } else {
        s.to_string()
    }
}

/// Parses and validates a request body. Every error is a 400 (or 413 for an oversized inline
/// image) whose message names the field, the value given and what is allowed.
pub fn parse_request(body: &[u8]) -> Result<ValidatedRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_request(format!(
            "request body: expected a JSON object, got {}",
            show(&value)
        )));
    };
    let prompt = string_field(&obj, "prompt", "a non-empty string")?
        .ok_or_else(|| ApiError::field("prompt", "required: a non-empty string"))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::field(
            "prompt",
            "must not be empty: expected a non-empty string",
        ));
    }
    let chars = prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::field(
            "prompt",
            format!("{chars} characters: at most {MAX_PROMPT_CHARS} allowed"),
        ));
    }
    let image = image_field(&obj)?;
    let steps = integer_field(&obj, "steps", 1, MAX_STEPS, DEFAULT_STEPS)?;
    let seed = integer_field(&obj, "seed", 0, u64::MAX, DEFAULT_SEED)?;
    let denoise = match get(&obj, "denoise") {
        None => DEFAULT_DENOISE,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(d) if (0.0..=1.0).contains(&d) => d,
            _ => {
                return Err(ApiError::field(
                    "denoise",
                    format!("{n} is out of range: expected a number from 0 to 1"),
                ));
            }
        },
        Some(v) => {
            return Err(ApiError::field(
                "denoise",
                format!("expected a number from 0 to 1, got {}", show(v)),
            ));
        }
    };
    let scheduler = match string_field(&obj, "scheduler", "a scheduler name")? {
        None => Scheduler::Simple,
        Some(s) => s
            .parse::<Scheduler>()
            .map_err(|e| ApiError::field("scheduler", e))?,
    };
    let sampler = match string_field(&obj, "sampler_name", "a sampler name")? {
        None => Sampler::Euler,
        Some(s) => s
            .parse::<Sampler>()
            .map_err(|e| ApiError::field("sampler_name", e))?,
    };
    if let Some((field, message)) =
        flux_pipeline::schedule_problem(scheduler, sampler, steps as usize, denoise)
    {
        return Err(ApiError::field(field, message));
    }
    let base64 = match get(&obj, "base64") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::field(
                "base64",
                format!("expected true or false, got {}", show(v)),
            ));
        }
    };
    let format = match string_field(&obj, "image_format", "one of png, jpeg, webp")? {
        None => OutputFormat::Jpeg,
        Some(s) => s.parse::<OutputFormat>().map_err(|_| {
            ApiError::field(
                "image_format",
                format!(
                    "unknown format '{}': expected png, jpeg or webp",
                    shorten(s)
                ),
            )
        })?,
    };
    Ok(ValidatedRequest {
        params: JobParams {
            prompt: prompt.to_string(),
            steps,
            seed,
            denoise,
            scheduler: scheduler.name().to_string(),
            sampler_name: sampler.name().to_string(),
            base64,
            image_format: format.name().to_string(),
        },
        image,
    })
}
