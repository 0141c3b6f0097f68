//! The bodies of the fuzz targets (`fuzz/fuzz_targets/`), the seed inputs they start from and
//! a mutator that runs them without libFuzzer.
//!
//! `cargo fuzz` needs a nightly compiler and sanitizers; the same bodies are also run on stable,
//! in the test suite (`tests/smoke.rs`: every seed and 20,000 mutations of them per target,
//! from a fixed seed), so a panic on malformed input fails CI even where no fuzzer runs. Each
//! body panics exactly when an input breaks a promise of the code under test: no panic on any
//! bytes, an error or a result, and results that hold the documented invariants.

pub mod corpus;
pub mod mutate;

use flux_api::{ImageInput, ValidatedRequest, parse_request};
use std::path::PathBuf;

pub use mutate::Mutator;

/// One fuzz target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// JSON request bodies of the job API.
    ApiRequest,
    /// Encoded input images (PNG, JPEG, WebP, anything else).
    ImageDecode,
    /// Safetensors checkpoints, loaded as a Flux transformer.
    SafetensorsHeader,
    /// Prompts through the tokenizers, and `tokenizer.json` files.
    Tokenizer,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 4] = [
        Target::ApiRequest,
        Target::ImageDecode,
        Target::SafetensorsHeader,
        Target::Tokenizer,
    ];

    /// The target's name, as its file in `fuzz/fuzz_targets/`.
    pub fn name(self) -> &'static str {
        match self {
            Target::ApiRequest => "api_request",
            Target::ImageDecode => "image_decode",
            Target::SafetensorsHeader => "safetensors_header",
            Target::Tokenizer => "tokenizer",
        }
    }

    /// Runs the body on one input; panics when the input breaks an invariant.
    pub fn run(self, data: &[u8]) {
        match self {
            Target::ApiRequest => api_request(data),
            Target::ImageDecode => image_decode(data),
            Target::SafetensorsHeader => safetensors_header(data),
            Target::Tokenizer => tokenizer(data),
        }
    }

    /// A mutation of `input` suited to the target: checkpoints larger than 64 KiB keep their
    /// tensor data and have only their length field and JSON header edited (edits in the data
    /// only change weight values, which the loader does not interpret).
    pub fn mutate(self, m: &mut Mutator, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        if self == Target::SafetensorsHeader && input.len() > 1 << 16 {
            let header_end = input
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| n.checked_add(8))
                .filter(|&end| end <= input.len())
                .unwrap_or(input.len());
            let mut out = m.mutate(&input[..header_end], others);
            out.extend_from_slice(&input[header_end..]);
            return out;
        }
        m.mutate(input, others)
    }
}

/// Any bytes as a request body: a validated request or a 400/413 error with a message. A
/// validated request holds its bounds, makes a pipeline request, and written back as JSON is
/// accepted again unchanged.
pub fn api_request(data: &[u8]) {
    match parse_request(data) {
        Ok(req) => {
            let p = &req.params;
            assert!((1..=flux_api::request::MAX_STEPS).contains(&p.steps));
            assert!((0.0..=1.0).contains(&p.denoise));
            assert!(!p.prompt.trim().is_empty());
            let bytes = match &req.image {
                ImageInput::Bytes(b) => b.clone(),
                ImageInput::Url(_) => Vec::new(),
            };
            if let Err(e) = p.to_pipeline(bytes) {
                panic!("an accepted request does not make a pipeline request: {e}");
            }
            let again = match parse_request(&request_json(&req)) {
                Ok(r) => r,
                Err(e) => panic!("an accepted request written back is refused: {e}"),
            };
            // The JSON number parser rounds within an ulp or so; everything else is exact.
            assert!(
                (again.params.denoise - p.denoise).abs() <= 4.0 * f64::EPSILON,
                "denoise {} read back as {}",
                p.denoise,
                again.params.denoise
            );
            let mut again = again;
            again.params.denoise = p.denoise;
            assert_eq!(
                again, req,
                "an accepted request written back reads differently"
            );
        }
        Err(e) => {
            assert!(matches!(e.status.as_u16(), 400 | 413), "{e}");
            assert!(!e.message.is_empty());
        }
    }
}

/// A validated request as the JSON body a client would send for it.
pub fn request_json(req: &ValidatedRequest) -> Vec<u8> {
    use base64::Engine as _;
    let p = &req.params;
    let image = match &req.image {
        ImageInput::Url(u) => u.clone(),
        ImageInput::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b),
    };
    serde_json::json!({
        "prompt": p.prompt,
        "image": image,
        "steps": p.steps,
        "seed": p.seed,
        "denoise": p.denoise,
        "scheduler": p.scheduler,
        "sampler_name": p.sampler_name,
        "base64": p.base64,
        "image_format": p.image_format,
    })
    .to_string()
    .into_bytes()
}

/// Any bytes as an input image: decoding, the size rule (multiples of 16) and the scaling to
/// `[-1, 1]` give an error or a well-formed image.
pub fn image_decode(data: &[u8]) {
    use flux_pipeline::image_io::{
        ImageError, SizeRule, decode_rgb, image_from_bytes, rgb_to_tensor,
    };
    let Ok(rgb) = decode_rgb(data, "fuzz input") else {
        return;
    };
    let (w, h) = rgb.dimensions();
    assert_eq!(rgb_to_tensor(&rgb).len(), 3 * w as usize * h as usize);
    let rule = SizeRule {
        target: None,
        max_megapixels: Some(0.25),
    };
    match image_from_bytes(data, "fuzz input", &rule) {
        Ok(img) => {
            assert_eq!(img.width % 16, 0);
            assert_eq!(img.height % 16, 0);
            assert_eq!(img.original, (w, h));
            assert!(f64::from(img.width) * f64::from(img.height) <= 0.25e6);
            assert_eq!(img.data.len(), 3 * img.width as usize * img.height as usize);
            assert!(img.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        }
        // The size rule refuses images too elongated for the cap; nothing else may fail once
        // the image decoded.
        Err(ImageError::Size(_)) => {}
        Err(e) => panic!("decoded as {w}x{h} but not loadable: {e}"),
    }
}

/// Any bytes as a safetensors checkpoint: an error, or tensors that read back within bounds;
/// loading a Flux transformer from them never panics.
pub fn safetensors_header(data: &[u8]) {
    use flux_kernels::{Cpu, DType, SamplerOps};
    use flux_model::transformer::{FluxConfig, FluxTransformer};
    use flux_model::weights::Weights;
    let Ok(w) = Weights::from_bytes(data.to_vec(), "fuzz.safetensors") else {
        return;
    };
    for name in w.names() {
        let Some(shape) = w.shape(name).map(<[usize]>::to_vec) else {
            panic!("tensor {name} is listed but has no shape");
        };
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.is_none_or(|n| n > 1 << 20) {
            continue;
        }
        if let Ok(t) = w.get(&Cpu, name, &shape) {
            let values = Cpu.download_f64(&t).expect("a loaded tensor downloads");
            assert_eq!(Some(values.len()), numel, "{name}");
        }
    }
    let _ = FluxTransformer::load(&Cpu, &w, DType::F32);
    // With the heads and RoPE axes of the tiny test model, checkpoints shaped like it (the seed
    // corpus has one) get past the configuration and load every tensor.
    let tiny_axes = tiny_transformer_config();
    if let Ok(cfg) = FluxConfig::detect(&w, Some(&tiny_axes)) {
        let _ = FluxTransformer::load_with_config(&Cpu, &w, cfg, DType::F32);
    }
}

/// The `config.json` fields of the tiny test transformer (`testdata/flux-tiny`) that its
/// tensors do not tell: its heads and RoPE axes.
pub fn tiny_transformer_config() -> serde_json::Value {
    serde_json::json!({ "num_heads": 3, "axes_dim": [8, 12, 12] })
}

/// The folder the tokenizer target writes its `tokenizer.json` inputs to (one per process).
pub fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("flux-fuzz-tokenizer-{}", std::process::id()))
}

/// The first byte picks the mode. Odd: the rest is a `tokenizer.json`, which loads as an error
/// or a tokenizer whose rows have the requested length. Even: the rest is a prompt, which the
/// T5 seed tokenizer and the demo byte tokenizer turn into rows of their fixed lengths.
pub fn tokenizer(data: &[u8]) {
    use flux_model::tokenizer::{CLIP_LEN, PromptTokenizer, TokenizerKind};
    use flux_pipeline::demo::ByteTokenizer;
    use flux_pipeline::model::PromptTokenizer as _;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let dir = scratch_dir();
        let path = dir.join("tokenizer.json");
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&path, rest).is_ok() {
            for kind in [TokenizerKind::T5, TokenizerKind::Clip] {
                if let Ok(t) = PromptTokenizer::from_file(&path, kind, CLIP_LEN)
                    && let Ok(ids) = t.encode("a photo of a cat")
                {
                    assert_eq!(ids.len(), CLIP_LEN);
                }
            }
        }
        return;
    }
    let prompt = String::from_utf8_lossy(rest);
    if let Ok(ids) = corpus::t5_tokenizer().encode(&prompt) {
        assert_eq!(ids.len(), corpus::T5_SEED_LEN);
    }
    let (t5_ids, clip_ids) = ByteTokenizer
        .tokenize(&prompt)
        .expect("the demo tokenizer is total");
    assert_eq!(t5_ids.len(), flux_pipeline::demo::T5_LEN);
    assert_eq!(clip_ids.len(), CLIP_LEN);
}
