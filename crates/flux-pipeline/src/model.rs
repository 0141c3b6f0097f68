//! What the pipeline needs from the networks, as small traits over host tensors.
//!
//! The pipeline moves only latents, text embeddings and images across these traits (small next
//! to the weights), so any executor can sit behind them: the `flux-model` networks on a kernel
//! backend, or an analytic stand-in in tests.

use crate::Result;
use flux_kernels::DType;

/// A dense row-major tensor on the host. In an f32 run every value is an f32 widened to f64.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f64>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data` (lengths are the caller's contract; checked in debug).
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The values rounded to `dtype`'s precision (a no-op for f64).
    pub fn rounded(mut self, dtype: DType) -> Self {
        if dtype == DType::F32 {
            for v in &mut self.data {
                *v = f64::from(*v as f32);
            }
        }
        self
    }
}

/// The inputs of one transformer call (batch 1).
#[derive(Clone, Debug)]
pub struct TransformerInputs<'a> {
    /// Packed latent tokens `[1, L_img, 64]`.
    pub img: &'a HostTensor,
    /// Their positions `[1, L_img, 3]`.
    pub img_ids: &'a HostTensor,
    /// T5 hidden states `[1, L_txt, context_in_dim]`.
    pub txt: &'a HostTensor,
    /// Text positions `[1, L_txt, 3]` (zeros).
    pub txt_ids: &'a HostTensor,
    /// CLIP pooled vector `[1, vec_in_dim]`.
    pub y: &'a HostTensor,
    /// The timestep (equal to sigma for Flux).
    pub timestep: f64,
    /// Guidance strength (models with a guidance embedding only).
    pub guidance: Option<f64>,
}

/// The Flux flow-matching transformer.
pub trait FlowTransformer: Send + Sync {
    /// Whether the weights carry a guidance embedding (flux-dev) or not (flux-schnell).
    fn has_guidance(&self) -> bool;
    /// Width of the T5 hidden states the model expects.
    fn context_dim(&self) -> usize;
    /// Width of the pooled CLIP vector the model expects.
    fn vec_dim(&self) -> usize;
    /// The velocity `[1, L_img, 64]` for `inputs`, computed in `dtype`.
    fn forward(&self, inputs: &TransformerInputs<'_>, dtype: DType) -> Result<HostTensor>;
}

/// The Flux autoencoder, without the latent shift/scale (the pipeline applies it).
pub trait Autoencoder: Send + Sync {
    /// Mean of the latent distribution `[1, 16, H/8, W/8]` of an image `[1, 3, H, W]` in [-1, 1].
    fn encode_mean(&self, image: &HostTensor, dtype: DType) -> Result<HostTensor>;
    /// The image `[1, 3, H, W]` (not clamped) of an unscaled latent `[1, 16, h, w]`.
    fn decode(&self, latent: &HostTensor, dtype: DType) -> Result<HostTensor>;
    /// Downsampling factor between image and latent (8 for Flux).
    fn downsample_factor(&self) -> usize {
        8
    }
}

/// T5 and CLIP together: token ids in, `(txt [1, L, ctx], vec [1, d])` out.
pub trait TextEncoders: Send + Sync {
    /// Encodes already-tokenized ids.
    fn encode_ids(
        &self,
        t5_ids: &[i64],
        clip_ids: &[i64],
        dtype: DType,
    ) -> Result<(HostTensor, HostTensor)>;
}

/// Turns a prompt into T5 and CLIP token ids.
pub trait PromptTokenizer: Send + Sync {
    /// `(t5_ids, clip_ids)` of `prompt`, padded as the encoders expect.
    fn tokenize(&self, prompt: &str) -> Result<(Vec<i64>, Vec<i64>)>;
}
