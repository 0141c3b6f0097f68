//! [`Pipeline`]: models loaded once, then any number of img2img requests.

use crate::comfy::{self, RunModels, RunParams};
use crate::demo;
use crate::flux::{FluxNet, TextNets, VaeNet, sibling_config};
use crate::image_io::{self, ImageSource, OutputFormat, SizeRule};
use crate::model::{HostTensor, PromptTokenizer, TextEncoders};
pub use crate::model_files::ModelFiles;
use crate::{PipelineError, Result};
use flux_kernels::{Backend, Cpu, DType};
use flux_model::Weights;
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;
use std::path::Path;
use std::time::{Duration, Instant};

/// Most steps a request may ask for.
pub const MAX_STEPS: usize = 200;

/// One img2img request.
#[derive(Clone, Debug)]
pub struct Img2ImgRequest {
    /// The input image.
    pub image: ImageSource,
    /// The prompt.
    pub prompt: String,
    /// Model calls (1..=[`MAX_STEPS`]).
    pub steps: usize,
    /// Noise seed.
    pub seed: u64,
    /// How much of the schedule to run, in [0, 1]; 0 returns the input unchanged.
    pub denoise: f64,
    /// Sigma scheduler.
    pub scheduler: Scheduler,
    /// Sampler.
    pub sampler: Sampler,
    /// Guidance (dev models); `None` means 3.5.
    pub guidance: Option<f64>,
    /// How the input is sized.
    pub size: SizeRule,
    /// Output format.
    pub format: OutputFormat,
}

impl Img2ImgRequest {
    /// A request with the defaults (20 steps, seed 46588, denoise 0.75, simple, euler, PNG).
    pub fn new(image: ImageSource, prompt: impl Into<String>) -> Self {
        Self {
            image,
            prompt: prompt.into(),
            steps: 20,
            seed: 46588,
            denoise: 0.75,
            scheduler: Scheduler::Simple,
            sampler: Sampler::Euler,
            guidance: None,
            size: SizeRule::default(),
            format: OutputFormat::Png,
        }
    }

    /// Checks every range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: String| Err(PipelineError::InvalidRequest { field, message });
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return bad(
                "steps",
                format!("{} is outside 1..={MAX_STEPS}", self.steps),
            );
        }
        if !(0.0..=1.0).contains(&self.denoise) {
            return bad("denoise", format!("{} is outside [0, 1]", self.denoise));
        }
        if let Some(g) = self.guidance
            && !(g.is_finite() && (0.0..=100.0).contains(&g))
        {
            return bad("guidance", format!("{g} is outside [0, 100]"));
        }
        if let Some((field, message)) =
            schedule_problem(self.scheduler, self.sampler, self.steps, self.denoise)
        {
            return bad(field, message);
        }
        Ok(())
    }
}

/// What is wrong, if anything, with the schedule a run of these parameters needs, as the
/// request field to blame and a message: a denoise so small that the scaled schedule exceeds
/// [`flux_schedulers::MAX_STEPS`], or `kl_optimal` over a single step (a NaN sigma in the
/// reference). Cheap (nothing is computed); the job API checks it before queueing.
pub fn schedule_problem(
    scheduler: Scheduler,
    sampler: Sampler,
    steps: usize,
    denoise: f64,
) -> Option<(&'static str, String)> {
    use flux_schedulers::ScheduleError;
    let err = flux_schedulers::ksampler_check(
        scheduler,
        steps,
        denoise,
        sampler.discards_penultimate_sigma(),
    )
    .err()?;
    Some(match err {
        ScheduleError::TooManySteps { steps: n, max } => (
            "denoise",
            format!(
                "{denoise} with {steps} steps needs a schedule of {n} steps (steps / denoise), at most {max}: use a denoise of at least {:e}, or 0",
                steps as f64 / max as f64
            ),
        ),
        ScheduleError::UndefinedSchedule { .. } => (
            "steps",
            format!("{err}: use at least 2 steps with {scheduler}, or another scheduler"),
        ),
        other => ("denoise", other.to_string()),
    })
}

/// Progress of a request, handed to the callback.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Time since sampling started.
    pub elapsed: Duration,
    /// Estimated time left.
    pub eta: Duration,
}

/// The result of a request.
#[derive(Clone, Debug)]
pub struct Output {
    /// The encoded image.
    pub bytes: Vec<u8>,
    /// Its format.
    pub format: OutputFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Model calls made.
    pub steps_run: usize,
    /// Time spent sampling.
    pub sampling_time: Duration,
    /// Total time of the request.
    pub total_time: Duration,
    /// Whether the demo model made it.
    pub demo: bool,
}

/// Models loaded once on a backend (the CPU by default), reused by every request.
pub struct Pipeline<B: Backend = Cpu> {
    be: B,
    transformer: FluxNet<B>,
    vae: VaeNet<B>,
    text: TextNets<B>,
    tokenizer: Box<dyn PromptTokenizer>,
    demo: bool,
}

impl<B: Backend> std::fmt::Debug for Pipeline<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("backend", &self.be.name())
            .field("demo", &self.demo)
            .field("dev", &self.is_dev())
            .finish_non_exhaustive()
    }
}

fn open(path: &Path, what: &str) -> Result<Weights> {
    Weights::open(path).map_err(|e| PipelineError::Model(format!("{what} {}: {e}", path.display())))
}

type Nets<B> = (FluxNet<B>, VaeNet<B>, TextNets<B>);

/// The transformer, autoencoder and text encoders of `files`, on `be`.
fn load_nets<B: Backend>(be: &B, files: &ModelFiles) -> Result<Nets<B>> {
    let tw = open(&files.transformer, "transformer")?;
    let vw = open(&files.vae, "autoencoder")?;
    let t5w = open(&files.t5, "T5 encoder")?;
    let cw = open(&files.clip, "CLIP text encoder")?;
    let tj = sibling_config(&tw);
    let ctx = |what: &str, p: &Path, e: PipelineError| {
        PipelineError::Model(format!("{what} {}: {e}", p.display()))
    };
    let transformer = FluxNet::load(be, &tw, tj.as_ref(), DType::F32)
        .map_err(|e| ctx("transformer", &files.transformer, e))?;
    let vae = VaeNet::load(be, &vw, sibling_config(&vw).as_ref(), DType::F32)
        .map_err(|e| ctx("autoencoder", &files.vae, e))?;
    let text = TextNets::load(
        be,
        &t5w,
        sibling_config(&t5w).as_ref(),
        &cw,
        sibling_config(&cw).as_ref(),
        DType::F32,
    )
    .map_err(|e| ctx("text encoders", &files.t5, e))?;
    Ok((transformer, vae, text))
}

impl Pipeline<Cpu> {
    /// The built-in demo model on the CPU.
    pub fn demo() -> Result<Self> {
        Self::demo_on(&Cpu)
    }

    /// Loads model files with a prompt tokenizer, on the CPU.
    pub fn from_files(files: &ModelFiles, tokenizer: Box<dyn PromptTokenizer>) -> Result<Self> {
        Self::from_files_on(&Cpu, files, tokenizer)
    }

    /// Loads model files and their tokenizers on the CPU (see [`Pipeline::load_on`]).
    pub fn load(files: &ModelFiles) -> Result<Self> {
        Self::load_on(&Cpu, files)
    }
}

impl<B: Backend> Pipeline<B> {
    /// The built-in demo model on `be`.
    pub fn demo_on(be: &B) -> Result<Self> {
        let (tw, vw, t5w, cw) = demo::weights()?;
        Ok(Self {
            be: be.clone(),
            transformer: FluxNet::load_with_config(
                be,
                &tw,
                demo::transformer_config(),
                DType::F32,
            )?,
            vae: VaeNet::load(be, &vw, None, DType::F32)?,
            text: TextNets::load(be, &t5w, None, &cw, None, DType::F32)?,
            tokenizer: Box::new(demo::ByteTokenizer),
            demo: true,
        })
    }

    /// Loads model files with a prompt tokenizer, on `be`.
    pub fn from_files_on(
        be: &B,
        files: &ModelFiles,
        tokenizer: Box<dyn PromptTokenizer>,
    ) -> Result<Self> {
        let (transformer, vae, text) = load_nets(be, files)?;
        Ok(Self {
            be: be.clone(),
            transformer,
            vae,
            text,
            tokenizer,
            demo: false,
        })
    }

    /// Loads model files and the tokenizers they name (`files.t5_tokenizer` and
    /// `files.clip_tokenizer`, both required), on `be`. The T5 sequence length follows the
    /// transformer: 512 for models with a guidance embedding (dev), 256 without (schnell).
    pub fn load_on(be: &B, files: &ModelFiles) -> Result<Self> {
        let need = |p: &Option<std::path::PathBuf>, what: &str, sub: &str| {
            p.clone().ok_or_else(|| {
                PipelineError::Model(format!(
                    "no {what} tokenizer.json: it is {sub}/tokenizer.json of the diffusers layout \
                     of the FLUX.1 repositories (give it by path)"
                ))
            })
        };
        let t5_tok = need(&files.t5_tokenizer, "T5", "tokenizer_2")?;
        let clip_tok = need(&files.clip_tokenizer, "CLIP", "tokenizer")?;
        let (transformer, vae, text) = load_nets(be, files)?;
        let t5_len = if crate::model::FlowTransformer::has_guidance(&transformer) {
            flux_model::tokenizer::T5_LEN_DEV
        } else {
            flux_model::tokenizer::T5_LEN_SCHNELL
        };
        let tokenizer = FileTokenizer::load(&t5_tok, &clip_tok, t5_len)?;
        Ok(Self {
            be: be.clone(),
            transformer,
            vae,
            text,
            tokenizer: Box::new(tokenizer),
            demo: false,
        })
    }

    /// The backend the models run on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Whether this is the demo model.
    pub fn is_demo(&self) -> bool {
        self.demo
    }

    /// Whether the transformer has a guidance embedding (flux-dev) rather than not (schnell).
    pub fn is_dev(&self) -> bool {
        crate::model::FlowTransformer::has_guidance(&self.transformer)
    }

    /// Runs one request. `progress` is called after every step; returning `false` cancels.
    pub fn img2img(
        &self,
        req: &Img2ImgRequest,
        progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Output> {
        let start = Instant::now();
        req.validate()?;
        let img = image_io::load_image(&req.image, &req.size)?;
        let mut metadata = vec![("Software".to_string(), "flux-kernels".to_string())];
        if self.demo {
            metadata.push(("Comment".to_string(), demo::DEMO_LABEL.to_string()));
        }
        let finish = |decoded: &[f64], steps_run, sampling_time| -> Result<Output> {
            let rgb = image_io::tensor_to_rgb(decoded, img.width, img.height)?;
            let bytes = image_io::encode_image(&rgb, req.format, &metadata)?;
            Ok(Output {
                bytes,
                format: req.format,
                width: img.width,
                height: img.height,
                steps_run,
                sampling_time,
                total_time: start.elapsed(),
                demo: self.demo,
            })
        };
        let input: Vec<f64> = img.data.iter().map(|&v| f64::from(v)).collect();
        if req.denoise == 0.0 {
            return finish(&input, 0, Duration::ZERO);
        }
        let (t5_ids, clip_ids) = self.tokenizer.tokenize(&req.prompt)?;
        let (txt, vec) = self.text.encode_ids(&t5_ids, &clip_ids, DType::F32)?;
        let image = HostTensor::new(img.shape().to_vec(), input);
        let params = RunParams {
            sampler: req.sampler,
            scheduler: req.scheduler,
            steps: req.steps,
            denoise: req.denoise,
            seed: req.seed,
            guidance: req.guidance.unwrap_or(3.5),
            dtype: DType::F32,
        };
        let models = RunModels {
            transformer: &self.transformer,
            vae: &self.vae,
        };
        let sampling_start = Instant::now();
        let mut steps_run = 0;
        let mut on_step = |step: usize, total: usize| {
            steps_run = step + 1;
            let elapsed = sampling_start.elapsed();
            let per = elapsed.as_secs_f64() / (step + 1) as f64;
            let eta = Duration::from_secs_f64(per * total.saturating_sub(step + 1) as f64);
            progress(&Progress {
                step: step + 1,
                total,
                elapsed,
                eta,
            })
        };
        let decoded = comfy::run(
            &self.be,
            &models,
            &image,
            &txt,
            &vec,
            &params,
            None,
            &mut on_step,
        )?;
        let sampling_time = sampling_start.elapsed();
        finish(&decoded.data, steps_run, sampling_time)
    }
}
/// A loaded pipeline whose backend is chosen at run time: what servers and job workers hold,
/// so one worker binary runs on whichever device its configuration names.
pub trait Img2Img {
    /// Whether this is the demo model.
    fn is_demo(&self) -> bool;
    /// The backend's name (`cpu`, `wgpu (...)`, `cuda:0 (...)`).
    fn backend_name(&self) -> String;
    /// Runs one request, as [`Pipeline::img2img`].
    fn img2img(
        &self,
        req: &Img2ImgRequest,
        progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Output>;
}

impl<B: Backend> Img2Img for Pipeline<B> {
    fn is_demo(&self) -> bool {
        Pipeline::is_demo(self)
    }

    fn backend_name(&self) -> String {
        self.be.name()
    }

    fn img2img(
        &self,
        req: &Img2ImgRequest,
        progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Output> {
        Pipeline::img2img(self, req, progress)
    }
}

/// The real T5 and CLIP tokenizers from `tokenizer.json` files.
pub struct FileTokenizer {
    t5: flux_model::tokenizer::PromptTokenizer,
    clip: flux_model::tokenizer::PromptTokenizer,
}

impl FileTokenizer {
    /// Loads both; `t5_len` is the T5 sequence length (512 for dev, 256 for schnell).
    pub fn load(t5: &Path, clip: &Path, t5_len: usize) -> Result<Self> {
        use flux_model::tokenizer::{CLIP_LEN, PromptTokenizer as Tok, TokenizerKind};
        let err = |p: &Path, e: flux_model::tokenizer::TokenizerError| {
            PipelineError::Model(format!("tokenizer {}: {e}", p.display()))
        };
        Ok(Self {
            t5: Tok::from_file(t5, TokenizerKind::T5, t5_len).map_err(|e| err(t5, e))?,
            clip: Tok::from_file(clip, TokenizerKind::Clip, CLIP_LEN).map_err(|e| err(clip, e))?,
        })
    }
}

impl PromptTokenizer for FileTokenizer {
    fn tokenize(&self, prompt: &str) -> Result<(Vec<i64>, Vec<i64>)> {
        let enc = |t: &flux_model::tokenizer::PromptTokenizer| {
            t.encode(prompt)
                .map(|v| v.into_iter().map(i64::from).collect::<Vec<_>>())
                .map_err(|e| PipelineError::InvalidRequest {
                    field: "prompt",
                    message: e.to_string(),
                })
        };
        Ok((enc(&self.t5)?, enc(&self.clip)?))
    }
}
