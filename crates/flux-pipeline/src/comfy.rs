//! One img2img run done the ComfyUI way: VAEEncode -> KSampler (cfg 1, `denoise`) -> VAEDecode.
//!
//! Order of operations: encoder mean, `process_in`, the KSampler schedule (scheduler, steps,
//! denoise, penultimate discard for the samplers that need it), `prepare_noise` (torch's CPU
//! `randn` seeded with `seed`, float32, of the latent's shape), CONST noise scaling, the sampler
//! with ComfyUI's noise (default: a generator seeded `seed + 1`; Brownian tree for the SDE
//! samplers), the Flux model through [`FlowDenoiser`], inverse noise scaling, `process_out`,
//! decode.

use crate::model::{Autoencoder, FlowTransformer, HostTensor, TransformerInputs};
use crate::{PipelineError, Result};
use flux_kernels::{Backend, DType, HostData, Tensor};
use flux_samplers::noise::{BrownianTreeNoise, DefaultNoise};
use flux_samplers::{
    Denoised, Denoiser, NoiseSource, SampleContext, Sampler, SamplerError, SamplerOptions, StepInfo,
};
use flux_schedulers::{ModelSampling, Scheduler};

/// ComfyUI's Flux latent format: `process_in(x) = (x - SHIFT) * SCALE`.
pub const LATENT_SCALE: f64 = 0.3611;
/// See [`LATENT_SCALE`].
pub const LATENT_SHIFT: f64 = 0.1159;

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct RunParams {
    /// Sampler.
    pub sampler: Sampler,
    /// Sigma scheduler.
    pub scheduler: Scheduler,
    /// Model calls of a full run (KSampler `steps`).
    pub steps: usize,
    /// KSampler `denoise` in [0, 1].
    pub denoise: f64,
    /// Noise seed (also the sampler's seed).
    pub seed: u64,
    /// Guidance for models with a guidance embedding.
    pub guidance: f64,
    /// Compute precision (f32 in production, f64 for exact checks).
    pub dtype: DType,
}

/// Everything a run computed on the way; the parity checks compare these.
#[derive(Clone, Debug, Default)]
pub struct RunTrace {
    /// Encoder mean.
    pub x0_mean: Option<HostTensor>,
    /// After `process_in`.
    pub x0_latent: Option<HostTensor>,
    /// The KSampler schedule (float32 values).
    pub sigmas_f32: Vec<f32>,
    /// `prepare_noise` output.
    pub noise_init: Option<HostTensor>,
    /// Sampler input after noise scaling.
    pub x_start: Option<HostTensor>,
    /// Every model call.
    pub calls: Vec<CallRecord>,
    /// Every sampler noise draw with its `(sigma, sigma_next)`.
    pub noise: Vec<(HostTensor, f64, f64)>,
    /// Sampler return.
    pub out_raw: Option<HostTensor>,
    /// After `process_out`.
    pub out_latent: Option<HostTensor>,
    /// Decoded image (not clamped).
    pub decoded: Option<HostTensor>,
}

/// One model call as the sampler made it.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// Latent in.
    pub x: HostTensor,
    /// Sigma.
    pub sigma: f64,
    /// Unpacked, cropped velocity.
    pub v: HostTensor,
    /// `x - sigma * v`.
    pub denoised: HostTensor,
}

/// Progress of the sampler loop: `(step, total)`; return `false` to cancel.
pub type StepCallback<'a> = dyn FnMut(usize, usize) -> bool + 'a;

/// The model of a run: transformer and autoencoder, and the model sampling of its kind.
pub struct RunModels<'a> {
    /// Transformer.
    pub transformer: &'a dyn FlowTransformer,
    /// Autoencoder.
    pub vae: &'a dyn Autoencoder,
}

/// The model sampling ComfyUI uses by default for a Flux model (fixed shift 1.15 for dev, 1.0
/// for schnell).
pub fn model_sampling_for(has_guidance: bool) -> ModelSampling {
    if has_guidance {
        ModelSampling::flux_dev()
    } else {
        ModelSampling::flux_schnell()
    }
}

/// Whether ComfyUI drives `sampler` with Brownian-tree noise (the SDE family of k-diffusion).
pub fn uses_brownian_noise(sampler: Sampler) -> bool {
    matches!(
        sampler,
        Sampler::DpmppSde
            | Sampler::DpmppSdeGpu
            | Sampler::Dpmpp2mSde
            | Sampler::Dpmpp2mSdeGpu
            | Sampler::Dpmpp3mSde
            | Sampler::Dpmpp3mSdeGpu
            | Sampler::Dpmpp2mSdeHeun
            | Sampler::Dpmpp2mSdeHeunGpu
    )
}

/// The KSampler schedule of `params` for a model with (`true`) or without a guidance embedding.
pub fn schedule(params: &RunParams, has_guidance: bool) -> Result<Vec<f32>> {
    let ms = model_sampling_for(has_guidance);
    Ok(flux_schedulers::ksampler_sigmas(
        params.scheduler,
        &ms,
        params.steps,
        params.denoise,
        params.sampler.discards_penultimate_sigma(),
    )?)
}

/// Runs the latent part: from the encoder mean to the decoded image, given text conditioning.
/// `image` is `[1, 3, H, W]` in [-1, 1]; `txt`, `vec` the encoder outputs.
pub fn run<B: Backend>(
    backend: &B,
    models: &RunModels<'_>,
    image: &HostTensor,
    txt: &HostTensor,
    vec: &HostTensor,
    params: &RunParams,
    trace: Option<&mut RunTrace>,
    on_step: &mut StepCallback<'_>,
) -> Result<HostTensor> {
    let dtype = params.dtype;
    let mut local = RunTrace::default();
    let record = trace.is_some();
    let t = trace.unwrap_or(&mut local);

    let has_guidance = models.transformer.has_guidance();
    let mean = models.vae.encode_mean(image, dtype)?;
    let x0 = map(&mean, dtype, |m| (m - LATENT_SHIFT) * LATENT_SCALE);
    let sigmas_f32 = schedule(params, has_guidance)?;
    let sigmas: Vec<f64> = sigmas_f32.iter().map(|&s| f64::from(s)).collect();
    if record {
        t.x0_mean = Some(mean);
        t.x0_latent = Some(x0.clone());
        t.sigmas_f32.clone_from(&sigmas_f32);
    }

    let out = if sigmas.len() < 2 {
        // denoise 0 (or a schedule with nothing to do): ComfyUI returns the latent untouched.
        x0
    } else {
        let noise = flux_samplers::noise::randn_f32(&x0.shape, params.seed)?;
        let noise = HostTensor::new(
            x0.shape.clone(),
            noise.iter().map(|&v| f64::from(v)).collect(),
        );
        let ms = model_sampling_for(has_guidance);
        let (cn, cl) = ms.noise_scaling_coeffs(sigmas[0], false);
        let x_start = combine(&noise, &x0, cn, cl, dtype);
        if record {
            t.noise_init = Some(noise);
            t.x_start = Some(x_start.clone());
        }

        let mut denoiser = FlowDenoiser::new(
            models.transformer,
            txt,
            vec,
            has_guidance.then_some(params.guidance),
            dtype,
        )?;
        denoiser.record = record;
        let mut default_noise;
        let mut brownian;
        let noise_source: &mut dyn NoiseSource<B> = if uses_brownian_noise(params.sampler) {
            brownian = BrownianTreeNoise::for_schedule(params.seed, &sigmas)?;
            &mut brownian
        } else {
            default_noise = DefaultNoise::new(params.seed);
            &mut default_noise
        };
        let mut recorder = RecordingNoise {
            inner: noise_source,
            record,
            draws: Vec::new(),
        };
        let x = upload(backend, &x_start, dtype)?;
        let mut cb = |info: &StepInfo<'_, B>| on_step(info.step, info.total);
        let mut ctx = SampleContext {
            backend,
            model: &ms,
            denoiser: &mut denoiser,
            noise: &mut recorder,
            callback: Some(&mut cb),
        };
        let raw = flux_samplers::sample(
            params.sampler,
            &mut ctx,
            x,
            &sigmas,
            &SamplerOptions::default(),
        )
        .map_err(|e| match e {
            SamplerError::Cancelled { step, total } => PipelineError::Cancelled { step, total },
            other => PipelineError::Sampler(other),
        })?;
        let raw = download(backend, &raw)?;
        let last = params
            .sampler
            .effective_last_sigma(sigmas[sigmas.len() - 1], dtype);
        let inv = ms.inverse_noise_scaling_coeff(last);
        let out = map(&raw, dtype, |v| v * inv);
        if record {
            t.calls = std::mem::take(&mut denoiser.calls);
            t.noise = std::mem::take(&mut recorder.draws);
            t.out_raw = Some(raw);
        }
        out
    };

    let out_latent = map(&out, dtype, |v| v / LATENT_SCALE + LATENT_SHIFT);
    let decoded = models.vae.decode(&out_latent, dtype)?;
    if record {
        t.out_latent = Some(out_latent);
        t.decoded = Some(decoded.clone());
    }
    Ok(decoded)
}

/// Passes draws through, keeping a host copy of each when recording.
struct RecordingNoise<'a, B: Backend> {
    inner: &'a mut dyn NoiseSource<B>,
    record: bool,
    draws: Vec<(HostTensor, f64, f64)>,
}

impl<B: Backend> NoiseSource<B> for RecordingNoise<'_, B> {
    fn sample(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> flux_samplers::Result<Tensor<B>> {
        // ComfyUI latents are float32, so its noise is drawn in float32 whatever precision the
        // rest of the run uses; wider runs take the same draws widened.
        let mut t = self
            .inner
            .sample(backend, shape, DType::F32, sigma, sigma_next)?;
        if dtype != DType::F32 {
            let v = backend.download_f64(&t)?;
            t = backend.upload(HostData::F64(&v), shape, dtype)?;
        }
        if self.record {
            let host = HostTensor::new(t.shape().to_vec(), backend.download_f64(&t)?);
            self.draws.push((host, sigma, sigma_next));
        }
        Ok(t)
    }

    /// A recorded run keeps every draw the reference makes, skipped ones included; otherwise
    /// the inner source skips (drawn in float32, as [`Self::sample`] draws).
    fn skip(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> flux_samplers::Result<()> {
        if self.record {
            return self
                .sample(backend, shape, dtype, sigma, sigma_next)
                .map(drop);
        }
        self.inner
            .skip(backend, shape, DType::F32, sigma, sigma_next)
    }

    fn promise_below(&mut self, sigma: f64) {
        self.inner.promise_below(sigma);
    }
}

/// `f(x)` elementwise, rounded to `dtype` (f32 maths for f32 runs).
fn map(x: &HostTensor, dtype: DType, f: impl Fn(f64) -> f64) -> HostTensor {
    let data = if dtype == DType::F32 {
        x.data.iter().map(|&v| f64::from(f32_op(v, &f))).collect()
    } else {
        x.data.iter().map(|&v| f(v)).collect()
    };
    HostTensor::new(x.shape.clone(), data)
}

/// The f32 result of an affine map applied the way torch does it in f32: the map's constants
/// rounded to f32 and each operation rounded. Only the two latent-format maps and a plain scale
/// reach here, so evaluating in f64 and rounding once differs from torch by at most one ulp in
/// rare ties; this is inside every tolerance the reference gives for f32 runs.
fn f32_op(v: f64, f: &impl Fn(f64) -> f64) -> f32 {
    f(f64::from(v as f32)) as f32
}

/// `a * x + b * y`, in `dtype`.
fn combine(x: &HostTensor, y: &HostTensor, a: f64, b: f64, dtype: DType) -> HostTensor {
    let data = if dtype == DType::F32 {
        let (a, b) = (a as f32, b as f32);
        x.data
            .iter()
            .zip(&y.data)
            .map(|(&p, &q)| f64::from(a * p as f32 + b * q as f32))
            .collect()
    } else {
        x.data
            .iter()
            .zip(&y.data)
            .map(|(&p, &q)| a * p + b * q)
            .collect()
    };
    HostTensor::new(x.shape.clone(), data)
}

fn upload<B: Backend>(backend: &B, t: &HostTensor, dtype: DType) -> Result<Tensor<B>> {
    Ok(backend.upload(HostData::F64(&t.data), &t.shape, dtype)?)
}

fn download<B: Backend>(backend: &B, t: &Tensor<B>) -> Result<HostTensor> {
    Ok(HostTensor::new(
        t.shape().to_vec(),
        backend.download_f64(t)?,
    ))
}

/// Packs a latent `[1, C, h, w]` into tokens `[1, ceil(h/2)*ceil(w/2), 4C]`, padding odd sides
/// circularly (the last row/column is a copy of the first), feature `c*4 + dy*2 + dx`.
pub fn pack(latent: &HostTensor) -> Result<(HostTensor, HostTensor)> {
    let [b, c, h, w] = dims4(latent, "latent")?;
    if b != 1 {
        return Err(PipelineError::Shape(format!(
            "latent batch {b}: the pipeline runs batch 1"
        )));
    }
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    let mut tokens = vec![0.0; hp * wp * c * 4];
    let mut ids = vec![0.0; hp * wp * 3];
    for r in 0..hp {
        for q in 0..wp {
            let tok = r * wp + q;
            ids[tok * 3 + 1] = r as f64;
            ids[tok * 3 + 2] = q as f64;
            for ch in 0..c {
                for dy in 0..2 {
                    for dx in 0..2 {
                        let y = (2 * r + dy) % h;
                        let x = (2 * q + dx) % w;
                        tokens[tok * c * 4 + ch * 4 + dy * 2 + dx] =
                            latent.data[(ch * h + y) * w + x];
                    }
                }
            }
        }
    }
    Ok((
        HostTensor::new(vec![1, hp * wp, c * 4], tokens),
        HostTensor::new(vec![1, hp * wp, 3], ids),
    ))
}

/// Inverse of [`pack`]: tokens `[1, L, 4C]` back to `[1, C, h, w]`, cropping the padding.
pub fn unpack(tokens: &HostTensor, c: usize, h: usize, w: usize) -> Result<HostTensor> {
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    if tokens.shape != [1, hp * wp, c * 4] {
        return Err(PipelineError::Shape(format!(
            "transformer output {:?}, expected [1, {}, {}]",
            tokens.shape,
            hp * wp,
            c * 4
        )));
    }
    let mut out = vec![0.0; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let tok = (y / 2) * wp + x / 2;
                out[(ch * h + y) * w + x] = tokens.data[tok * c * 4 + ch * 4 + (y % 2) * 2 + x % 2];
            }
        }
    }
    Ok(HostTensor::new(vec![1, c, h, w], out))
}

fn dims4(t: &HostTensor, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape.as_slice())
        .map_err(|_| PipelineError::Shape(format!("{what} has shape {:?}, expected 4-D", t.shape)))
}

/// The Flux model as ComfyUI calls it, seen by a sampler: pad and pack the latent, call the
/// transformer at `timestep = sigma`, unpack and crop the velocity, `denoised = x - sigma * v`.
pub struct FlowDenoiser<'a> {
    transformer: &'a dyn FlowTransformer,
    txt: &'a HostTensor,
    txt_ids: HostTensor,
    vec: &'a HostTensor,
    guidance: Option<f64>,
    dtype: DType,
    /// Whether to keep every call in [`FlowDenoiser::calls`].
    pub record: bool,
    /// The calls made so far (when recording).
    pub calls: Vec<CallRecord>,
}

impl<'a> FlowDenoiser<'a> {
    /// A denoiser over `transformer` with the given conditioning.
    pub fn new(
        transformer: &'a dyn FlowTransformer,
        txt: &'a HostTensor,
        vec: &'a HostTensor,
        guidance: Option<f64>,
        dtype: DType,
    ) -> Result<Self> {
        let l_txt = match txt.shape.as_slice() {
            [1, l, d] if *d == transformer.context_dim() => *l,
            s => {
                return Err(PipelineError::Shape(format!(
                    "text embedding {s:?}, expected [1, L, {}]",
                    transformer.context_dim()
                )));
            }
        };
        if vec.shape != [1, transformer.vec_dim()] {
            return Err(PipelineError::Shape(format!(
                "pooled vector {:?}, expected [1, {}]",
                vec.shape,
                transformer.vec_dim()
            )));
        }
        Ok(Self {
            transformer,
            txt,
            txt_ids: HostTensor::new(vec![1, l_txt, 3], vec![0.0; l_txt * 3]),
            vec,
            guidance,
            dtype,
            record: false,
            calls: Vec::new(),
        })
    }

    /// `(v, denoised)` at `(x, sigma)` on the host.
    pub fn evaluate(&self, x: &HostTensor, sigma: f64) -> Result<(HostTensor, HostTensor)> {
        let [_, c, h, w] = dims4(x, "latent")?;
        let (img, img_ids) = pack(x)?;
        let inputs = TransformerInputs {
            img: &img,
            img_ids: &img_ids,
            txt: self.txt,
            txt_ids: &self.txt_ids,
            y: self.vec,
            timestep: sigma,
            guidance: self.guidance,
        };
        let out = self.transformer.forward(&inputs, self.dtype)?;
        let v = unpack(&out, c, h, w)?;
        let denoised = if self.dtype == DType::F32 {
            let s = sigma as f32;
            x.data
                .iter()
                .zip(&v.data)
                .map(|(&a, &b)| f64::from(a as f32 - b as f32 * s))
                .collect()
        } else {
            x.data
                .iter()
                .zip(&v.data)
                .map(|(&a, &b)| a - b * sigma)
                .collect()
        };
        Ok((v, HostTensor::new(x.shape.clone(), denoised)))
    }
}

impl<B: Backend> Denoiser<B> for FlowDenoiser<'_> {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        let to_sampler = |e: PipelineError| SamplerError::Denoiser(e.to_string());
        let xh = download(backend, x).map_err(to_sampler)?;
        let (v, denoised) = self.evaluate(&xh, sigma).map_err(to_sampler)?;
        let out = upload(backend, &denoised, x.dtype()).map_err(to_sampler)?;
        // cfg 1: the unconditional branch is never evaluated and the cond result stands in.
        let uncond = if want_uncond {
            Some(backend.copy(&out)?)
        } else {
            None
        };
        if self.record {
            self.calls.push(CallRecord {
                x: xh,
                sigma,
                v,
                denoised,
            });
        }
        Ok(Denoised {
            denoised: out,
            uncond,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_pads_circularly_and_unpack_inverts() {
        let (c, h, w) = (2, 3, 5);
        let latent = HostTensor::new(vec![1, c, h, w], (0..c * h * w).map(|v| v as f64).collect());
        let (tok, ids) = pack(&latent).unwrap();
        assert_eq!(tok.shape, vec![1, 6, 8]);
        // Token (row 1, col 2) covers rows 2..4 and cols 4..6 -> row 3 wraps to 0, col 5 to 0.
        let t = 5;
        let at = |ch: usize, y: usize, x: usize| ((ch * h + y) * w + x) as f64;
        assert_eq!(tok.data[t * 8 + 4], at(1, 2, 4));
        assert_eq!(tok.data[t * 8 + 4 + 1], at(1, 2, 0));
        assert_eq!(tok.data[t * 8 + 4 + 2], at(1, 0, 4));
        assert_eq!(tok.data[t * 8 + 4 + 3], at(1, 0, 0));
        assert_eq!(&ids.data[t * 3..t * 3 + 3], &[0.0, 1.0, 2.0]);
        assert_eq!(unpack(&tok, c, h, w).unwrap(), latent);
    }
}
