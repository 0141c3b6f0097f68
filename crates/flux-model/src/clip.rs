//! The CLIP text model (`CLIPTextModel`, CLIP-L) that gives Flux its pooled `vec` conditioning.
//!
//! Pre-LN transformer with a causal mask, quick-GELU MLPs and a final layer norm; the pooled
//! vector is the final hidden state at the first occurrence of the largest token id (the legacy
//! `eos_token_id = 2` rule of the released config, which selects the end token 49407).

use crate::t5::check_ids;
use crate::tensor_source::{NetError, TensorSource, detect_prefix};
use crate::vae::Trace;
use flux_kernels::{Activation, Backend, BinaryOp, DType, HostData, Tensor};

/// Hyperparameters of the text model (`CLIPTextConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Rows of the position embedding (the longest sequence).
    pub max_positions: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl ClipConfig {
    /// `openai/clip-vit-large-patch14`'s text model, as Flux uses it.
    pub fn large() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_layers: 12,
            num_heads: 12,
            max_positions: 77,
            eps: 1e-5,
        }
    }

    fn validate(&self) -> Result<(), NetError> {
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_heads == 0
            || self.max_positions == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
        {
            return Err(NetError::Invalid(format!(
                "CLIP config: sizes must be positive and hidden_size divisible by num_heads, found {self:?}"
            )));
        }
        Ok(())
    }

    /// Every parameter name and shape (`text_model.*`).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, m) = (self.hidden_size, self.intermediate_size);
        let mut v = vec![
            (
                "text_model.embeddings.token_embedding.weight".to_string(),
                vec![self.vocab_size, c],
            ),
            (
                "text_model.embeddings.position_embedding.weight".to_string(),
                vec![self.max_positions, c],
            ),
        ];
        for i in 0..self.num_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.push((format!("{p}.self_attn.{n}.weight"), vec![c, c]));
                v.push((format!("{p}.self_attn.{n}.bias"), vec![c]));
            }
            for n in ["layer_norm1", "layer_norm2"] {
                v.push((format!("{p}.{n}.weight"), vec![c]));
                v.push((format!("{p}.{n}.bias"), vec![c]));
            }
            v.push((format!("{p}.mlp.fc1.weight"), vec![m, c]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![m]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![c, m]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![c]));
        }
        v.push(("text_model.final_layer_norm.weight".into(), vec![c]));
        v.push(("text_model.final_layer_norm.bias".into(), vec![c]));
        v
    }
}

/// Fetches a parameter by (unprefixed) name and expected shape.
type Getter<'a, B> = dyn FnMut(&str, &[usize]) -> Result<Tensor<B>, NetError> + 'a;

struct Linear<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
}

struct Norm<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
}

struct Layer<B: Backend> {
    ln1: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    ln2: Norm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// Output of the text model.
#[derive(Debug)]
pub struct ClipOutput<B: Backend> {
    /// Final-layer-normed hidden states `[batch, L, hidden]`.
    pub last_hidden_state: Tensor<B>,
    /// The row at each sequence's end token `[batch, hidden]` (Flux's `y`).
    pub pooled: Tensor<B>,
}

/// The CLIP text model on backend `B`.
pub struct ClipTextModel<B: Backend> {
    cfg: ClipConfig,
    token_embedding: Tensor<B>,
    position_embedding: Tensor<B>,
    layers: Vec<Layer<B>>,
    final_ln: Norm<B>,
}

impl<B: Backend> std::fmt::Debug for ClipTextModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Prefixes of the text model in known layouts: `clip_l.safetensors` and diffusers
/// `text_encoder/` (`text_model.`), transformers 5.x exports (none), ComfyUI checkpoints.
const PREFIXES: [&str; 3] = [
    "text_model.",
    "",
    "text_encoders.clip_l.transformer.text_model.",
];

impl<B: Backend> ClipTextModel<B> {
    /// Builds the model from `src`; extra tensors (`position_ids`, `text_projection`) are ignored.
    pub fn load(cfg: ClipConfig, src: &mut dyn TensorSource<B>) -> Result<Self, NetError> {
        cfg.validate()?;
        let prefix =
            detect_prefix(src, &PREFIXES, "final_layer_norm.weight").unwrap_or("text_model.");
        let (c, m) = (cfg.hidden_size, cfg.intermediate_size);
        let mut get = |name: &str, shape: &[usize]| src.tensor(&format!("{prefix}{name}"), shape);
        let token_embedding = get("embeddings.token_embedding.weight", &[cfg.vocab_size, c])?;
        let position_embedding = get(
            "embeddings.position_embedding.weight",
            &[cfg.max_positions, c],
        )?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.layers.{i}");
            let a = format!("{p}.self_attn");
            layers.push(Layer {
                ln1: norm(&mut get, &format!("{p}.layer_norm1"), c)?,
                q: lin(&mut get, &format!("{a}.q_proj"), c, c)?,
                k: lin(&mut get, &format!("{a}.k_proj"), c, c)?,
                v: lin(&mut get, &format!("{a}.v_proj"), c, c)?,
                out: lin(&mut get, &format!("{a}.out_proj"), c, c)?,
                ln2: norm(&mut get, &format!("{p}.layer_norm2"), c)?,
                fc1: lin(&mut get, &format!("{p}.mlp.fc1"), m, c)?,
                fc2: lin(&mut get, &format!("{p}.mlp.fc2"), c, m)?,
            });
        }
        let final_ln = norm(&mut get, "final_layer_norm", c)?;
        Ok(Self {
            cfg,
            token_embedding,
            position_embedding,
            layers,
            final_ln,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Runs `batch` rows of token ids in `dtype`; intermediates go to `trace` (`embeddings`,
    /// `layer.{i}`).
    pub fn forward_traced(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        dtype: DType,
        trace: Trace<'_, B>,
    ) -> Result<ClipOutput<B>, NetError> {
        let len = check_ids(ids, batch, self.cfg.vocab_size, "CLIP")?;
        if len > self.cfg.max_positions {
            return Err(NetError::Invalid(format!(
                "CLIP: sequences of {len} tokens exceed the {} positions of the model",
                self.cfg.max_positions
            )));
        }
        let (c, nh) = (self.cfg.hidden_size, self.cfg.num_heads);
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let tok = be
            .gather_rows(&self.token_embedding, &rows, dtype)?
            .reshape(&[batch, len, c])?;
        let positions: Vec<usize> = (0..len).collect();
        let pos = be.gather_rows(&self.position_embedding, &positions, dtype)?;
        let mut h = be.binary(&tok, &pos, BinaryOp::Add)?;
        trace("embeddings", &h);
        let mut mask = vec![0.0; len * len];
        for i in 0..len {
            for j in i + 1..len {
                mask[i * len + j] = f64::NEG_INFINITY;
            }
        }
        let mask = be.upload(HostData::F64(&mask), &[len, len], dtype)?;
        let eps = self.cfg.eps;
        let linear = |x: &Tensor<B>, l: &Linear<B>| be.linear(x, &l.w, Some(&l.b));
        for (i, l) in self.layers.iter().enumerate() {
            let x = be.layer_norm(&h, Some(&l.ln1.w), Some(&l.ln1.b), eps)?;
            let heads = |p: &Linear<B>| -> Result<Tensor<B>, NetError> {
                Ok(linear(&x, p)?.reshape(&[batch, len, nh, c / nh])?)
            };
            let (q, k, v) = (heads(&l.q)?, heads(&l.k)?, heads(&l.v)?);
            let a = eager_attention(be, &q, &k, &v, &mask)?;
            let a = linear(&a.reshape(&[batch, len, c])?, &l.out)?;
            be.lincomb_inplace(&mut h, 1.0, &[(1.0, &a)])?;
            let x = be.layer_norm(&h, Some(&l.ln2.w), Some(&l.ln2.b), eps)?;
            let y = be.activation(&linear(&x, &l.fc1)?, Activation::QuickGelu)?;
            let y = linear(&y, &l.fc2)?;
            be.lincomb_inplace(&mut h, 1.0, &[(1.0, &y)])?;
            trace(&format!("layer.{i}"), &h);
        }
        let last = be.layer_norm(&h, Some(&self.final_ln.w), Some(&self.final_ln.b), eps)?;
        // Pooling picks one row per sequence: a host gather of `batch` rows.
        let host = be.download_f64(&last)?;
        let mut pooled = Vec::with_capacity(batch * c);
        for (b, row) in ids.chunks_exact(len).enumerate() {
            let at = end_token_index(row);
            let off = (b * len + at) * c;
            pooled.extend_from_slice(&host[off..off + c]);
        }
        let pooled = be.upload(HostData::F64(&pooled), &[batch, c], dtype)?;
        Ok(ClipOutput {
            last_hidden_state: last,
            pooled,
        })
    }

    /// Runs `batch` rows of token ids in `dtype`.
    pub fn forward(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        dtype: DType,
    ) -> Result<ClipOutput<B>, NetError> {
        self.forward_traced(be, ids, batch, dtype, &mut |_, _| {})
    }
}

/// Masked self-attention as the reference's eager CLIP attention computes it:
/// `softmax(q k^T * scale + mask)` with the softmax **in float32** whatever the compute dtype
/// (transformers calls `softmax(..., dtype=torch.float32)` and casts the weights back), then the
/// weighted sum of `v` in the compute dtype. `q`, `k`, `v` are `[B, L, H, D]`, `mask [L, L]`;
/// the result is `[B, L, H, D]`. CLIP sequences are short (77 tokens), so the whole score
/// matrix is formed.
fn eager_attention<B: Backend>(
    be: &B,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    mask: &Tensor<B>,
) -> Result<Tensor<B>, NetError> {
    let dtype = q.dtype();
    let head_dim = q.shape().last().copied().unwrap_or(1);
    let heads_first = |t: &Tensor<B>| be.permute(t, &[0, 2, 1, 3]);
    let (qh, kh, vh) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
    // The reference multiplies the product by the scale (not q before the product).
    let scores = be.affine(
        &be.matmul(&qh, &kh, true)?,
        (head_dim as f64).powf(-0.5),
        0.0,
    )?;
    let scores = be.binary(&scores, mask, BinaryOp::Add)?;
    let weights = if dtype == DType::F32 {
        be.softmax(&scores)?
    } else {
        be.cast(&be.softmax(&be.cast(&scores, DType::F32)?)?, dtype)?
    };
    Ok(be.permute(&be.matmul(&weights, &vh, false)?, &[0, 2, 1, 3])?)
}

/// Index of the first occurrence of the largest id (`argmax` as torch returns it).
pub fn end_token_index(ids: &[u32]) -> usize {
    let mut best = 0;
    for (i, &id) in ids.iter().enumerate() {
        if id > ids[best] {
            best = i;
        }
    }
    best
}

fn norm<B: Backend>(get: &mut Getter<'_, B>, n: &str, c: usize) -> Result<Norm<B>, NetError> {
    Ok(Norm {
        w: get(&format!("{n}.weight"), &[c])?,
        b: get(&format!("{n}.bias"), &[c])?,
    })
}

fn lin<B: Backend>(
    get: &mut Getter<'_, B>,
    n: &str,
    o: usize,
    i: usize,
) -> Result<Linear<B>, NetError> {
    Ok(Linear {
        w: get(&format!("{n}.weight"), &[o, i])?,
        b: get(&format!("{n}.bias"), &[o])?,
    })
}
