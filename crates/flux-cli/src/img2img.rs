//! `flux img2img`: one image through the pipeline, with a progress bar and a one-line summary.

use crate::backend::{BackendKind, Job, run_on};
use anyhow::{Context, Result, bail};
use clap::Args;
use flux_kernels::Backend;
use flux_pipeline::image_io::{ImageSource, OutputFormat};
use flux_pipeline::{Img2Img, Img2ImgRequest, ModelFiles, Pipeline};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `flux img2img`.
#[derive(Args, Debug)]
pub struct Img2ImgArgs {
    /// Input image: a file, an http(s) URL, a data: URI or raw base64 (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: String,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Model calls (1 to 200).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Noise seed (the same seed gives the same image).
    #[arg(long, default_value_t = 46588)]
    pub seed: u64,
    /// How much to change the image, 0 (not at all) to 1 (completely).
    #[arg(long, default_value_t = 0.75)]
    pub denoise: f64,
    /// Sigma scheduler (see `flux schedulers`).
    #[arg(long, default_value = "simple")]
    pub scheduler: String,
    /// Sampler (see `flux samplers`).
    #[arg(long, default_value = "euler")]
    pub sampler: String,
    /// Guidance of flux-dev models (default 3.5; ignored by schnell).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Fit the image into WIDTHxHEIGHT (or NxN), keeping the aspect ratio; sides become
    /// multiples of 16.
    #[arg(long)]
    pub size: Option<String>,
    /// Largest output size in megapixels.
    #[arg(long)]
    pub max_megapixels: Option<f64>,
    /// Output format (default: from the --out extension, else png).
    #[arg(long)]
    pub format: Option<String>,
    /// Output file.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Where the models come from (none given: the built-in demo model).
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A models folder: ComfyUI layout (diffusion_models/ or unet/, vae/, text_encoders/ or
    /// clip/) or diffusers layout (transformer/, vae/, text_encoder/, text_encoder_2/,
    /// tokenizer/, tokenizer_2/, as in the FLUX.1 repositories); the layout is detected.
    #[arg(long, env = "FLUX_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Transformer safetensors file.
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    /// Autoencoder safetensors file.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// T5 encoder safetensors file.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// CLIP text encoder safetensors file.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// T5 tokenizer.json (found in tokenizer_2/ of a diffusers --model-dir).
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// CLIP tokenizer.json (found in tokenizer/ of a diffusers --model-dir).
    #[arg(long)]
    pub clip_tokenizer: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

/// Loads the pipeline the arguments name on the backend `--backend` names, for code that
/// holds it behind [`Img2Img`] (the job server's workers).
pub fn load_pipeline(m: &ModelArgs) -> Result<Box<dyn Img2Img>> {
    struct Load<'a>(&'a ModelArgs);
    impl Job for Load<'_> {
        type Output = Box<dyn Img2Img>;
        fn run<B: Backend>(self, be: &B) -> Result<Self::Output> {
            Ok(Box::new(load_pipeline_on(be, self.0)?))
        }
    }
    run_on(m.backend, Load(m))
}

/// Loads the pipeline the arguments name on `be`.
pub fn load_pipeline_on<B: Backend>(be: &B, m: &ModelArgs) -> Result<Pipeline<B>> {
    let explicit = [&m.transformer, &m.vae, &m.t5, &m.clip];
    let files = if let Some(dir) = &m.model_dir {
        Some(ModelFiles::from_models_dir(dir)?)
    } else if explicit.iter().any(|p| p.is_some()) {
        let need = |p: &Option<PathBuf>, flag: &str| {
            p.clone().with_context(|| {
                format!("--{flag} is required when model files are given one by one")
            })
        };
        Some(ModelFiles {
            transformer: need(&m.transformer, "transformer")?,
            vae: need(&m.vae, "vae")?,
            t5: need(&m.t5, "t5")?,
            clip: need(&m.clip, "clip")?,
            ..ModelFiles::default()
        })
    } else {
        None
    };
    match files {
        None => {
            eprintln!(
                "note: no model configured: using the built-in demo model (random weights; images are labelled as demo output)"
            );
            Ok(Pipeline::demo_on(be)?)
        }
        Some(mut files) => {
            // Tokenizers given by flag win over the ones found in a diffusers folder.
            if let Some(p) = &m.t5_tokenizer {
                files.t5_tokenizer = Some(p.clone());
            }
            if let Some(p) = &m.clip_tokenizer {
                files.clip_tokenizer = Some(p.clone());
            }
            if files.t5_tokenizer.is_none() || files.clip_tokenizer.is_none() {
                bail!(
                    "model files given without --t5-tokenizer and --clip-tokenizer\nhint: they are the tokenizer.json files in tokenizer_2/ (T5) and tokenizer/ (CLIP) of the diffusers layout of the FLUX.1 repositories; a diffusers --model-dir that holds them needs neither flag"
                );
            }
            Ok(Pipeline::load_on(be, &files)?)
        }
    }
}

/// Builds the request from the arguments.
pub fn request(args: &Img2ImgArgs) -> Result<Img2ImgRequest> {
    let mut req = Img2ImgRequest::new(ImageSource::parse(&args.image), args.prompt.clone());
    req.steps = args.steps;
    req.seed = args.seed;
    req.denoise = args.denoise;
    req.scheduler = args
        .scheduler
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}\nhint: `flux schedulers` lists them"))?;
    req.sampler = args
        .sampler
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}\nhint: `flux samplers` lists them"))?;
    req.guidance = args.guidance;
    if let Some(s) = &args.size {
        req.size = s.parse()?;
    }
    req.size.max_megapixels = args.max_megapixels;
    req.format = match &args.format {
        Some(f) => f.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        None => OutputFormat::from_extension(&args.out).unwrap_or_default(),
    };
    req.validate()?;
    Ok(req)
}

/// The folder a file `path` is written into (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks, before any model is loaded, that `--out` can be written where it points: its folder
/// exists and it is not itself a folder. A run that would fail at its last step fails at once.
pub fn check_out(path: &Path) -> Result<()> {
    let dir = folder_of(path);
    if !dir.is_dir() {
        bail!(
            "invalid --out {}: the folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!(
            "invalid --out {}: it is a folder; expected a file name",
            path.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so an
/// error never leaves a partial file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = folder_of(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Temporary files are private; the result should have the usual permissions of a new file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Runs `flux img2img` on the backend `--backend` names.
pub fn run(args: &Img2ImgArgs) -> Result<()> {
    let req = request(args)?;
    check_out(&args.out)?;
    run_on(args.model.backend, Img2ImgJob { args, req: &req })
}

struct Img2ImgJob<'a> {
    args: &'a Img2ImgArgs,
    req: &'a Img2ImgRequest,
}

impl Job for Img2ImgJob<'_> {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        run_with(be, self.args, self.req)
    }
}

fn run_with<B: Backend>(be: &B, args: &Img2ImgArgs, req: &Img2ImgRequest) -> Result<()> {
    let pipeline = load_pipeline_on(be, &args.model)?;
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out = pipeline.img2img(req, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    });
    bar.finish_and_clear();
    let out = out?;
    write_atomic(&args.out, &out.bytes)?;
    if out.demo {
        eprintln!(
            "note: {} is {}",
            args.out.display(),
            flux_pipeline::demo::DEMO_LABEL
        );
    }
    let per_step = if out.steps_run > 0 {
        format!(
            "{:.3}s/step",
            out.sampling_time.as_secs_f64() / out.steps_run as f64
        )
    } else {
        "no steps".to_string()
    };
    println!(
        "wrote {} ({}x{} {}) in {:.2}s: {} steps, {per_step}",
        args.out.display(),
        out.width,
        out.height,
        out.format,
        out.total_time.as_secs_f64(),
        out.steps_run
    );
    Ok(())
}
