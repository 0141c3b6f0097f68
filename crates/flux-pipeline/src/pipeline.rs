//! [`Pipeline`]: models loaded once, then any number of img2img requests.

use crate::comfy::{self, RunModels, RunParams};
use crate::demo;
use crate::flux::{FluxNet, TextNets, VaeNet, sibling_config};
use crate::image_io::{self, ImageSource, OutputFormat, SizeRule};
use crate::model::{HostTensor, PromptTokenizer, TextEncoders};
use crate::{PipelineError, Result};
use flux_kernels::{Backend, Cpu, DType};
use flux_model::Weights;
use flux_samplers::Sampler;
use flux_schedulers::Scheduler;
use std::path::{Path, PathBuf};
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
        Ok(())
    }
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

/// Where the model files are.
#[derive(Clone, Debug, Default)]
pub struct ModelFiles {
    /// Transformer safetensors.
    pub transformer: PathBuf,
    /// Autoencoder safetensors.
    pub vae: PathBuf,
    /// T5 safetensors.
    pub t5: PathBuf,
    /// CLIP safetensors.
    pub clip: PathBuf,
}

impl ModelFiles {
    /// Finds the files in a ComfyUI-style models folder: the transformer in `diffusion_models/`
    /// or `unet/`, the autoencoder in `vae/`, the text encoders in `text_encoders/` or `clip/`
    /// (T5: a name containing `t5`; CLIP: a name containing `clip`). Each folder must hold
    /// exactly one candidate `.safetensors` file.
    pub fn from_models_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(PipelineError::Model(format!(
                "models folder {} does not exist",
                dir.display()
            )));
        }
        let pick =
            |subdirs: &[&str], filter: &dyn Fn(&str) -> bool, what: &str| -> Result<PathBuf> {
                let mut found = Vec::new();
                for s in subdirs {
                    let Ok(entries) = std::fs::read_dir(dir.join(s)) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let p = e.path();
                        let name = p
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or("")
                            .to_ascii_lowercase();
                        if name.ends_with(".safetensors") && filter(&name) {
                            found.push(p);
                        }
                    }
                }
                found.sort();
                match found.len() {
                    1 => Ok(found.remove(0)),
                    0 => Err(PipelineError::Model(format!(
                        "no {what} .safetensors file in {} ({})",
                        dir.display(),
                        subdirs.join("/ or ") + "/"
                    ))),
                    _ => Err(PipelineError::Model(format!(
                        "several {what} files in {}: {}; pass the one to use explicitly",
                        dir.display(),
                        found
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            };
        Ok(Self {
            transformer: pick(&["diffusion_models", "unet"], &|_| true, "transformer")?,
            vae: pick(&["vae"], &|_| true, "autoencoder")?,
            t5: pick(
                &["text_encoders", "clip"],
                &|n| n.contains("t5"),
                "T5 encoder",
            )?,
            clip: pick(
                &["text_encoders", "clip"],
                &|n| n.contains("clip"),
                "CLIP text encoder",
            )?,
        })
    }
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

impl Pipeline<Cpu> {
    /// The built-in demo model on the CPU.
    pub fn demo() -> Result<Self> {
        Self::demo_on(&Cpu)
    }

    /// Loads model files with a prompt tokenizer, on the CPU.
    pub fn from_files(files: &ModelFiles, tokenizer: Box<dyn PromptTokenizer>) -> Result<Self> {
        Self::from_files_on(&Cpu, files, tokenizer)
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
        let tw = open(&files.transformer, "transformer")?;
        let vw = open(&files.vae, "autoencoder")?;
        let t5w = open(&files.t5, "T5 encoder")?;
        let cw = open(&files.clip, "CLIP text encoder")?;
        let tj = sibling_config(&tw);
        let ctx = |what: &str, p: &Path, e: PipelineError| {
            PipelineError::Model(format!("{what} {}: {e}", p.display()))
        };
        Ok(Self {
            be: be.clone(),
            transformer: FluxNet::load(be, &tw, tj.as_ref(), DType::F32)
                .map_err(|e| ctx("transformer", &files.transformer, e))?,
            vae: VaeNet::load(be, &vw, sibling_config(&vw).as_ref(), DType::F32)
                .map_err(|e| ctx("autoencoder", &files.vae, e))?,
            text: TextNets::load(
                be,
                &t5w,
                sibling_config(&t5w).as_ref(),
                &cw,
                sibling_config(&cw).as_ref(),
                DType::F32,
            )
            .map_err(|e| ctx("text encoders", &files.t5, e))?,
            tokenizer,
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
