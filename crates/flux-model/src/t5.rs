//! The T5 v1.1 encoder (`T5EncoderModel`) that gives Flux its `txt` conditioning.
//!
//! RMS norms without bias, relative position buckets computed once from block 0's table and
//! added in every layer, attention scores without the `1/sqrt(d_kv)` scaling, gated-GELU
//! (tanh) feed-forward, and no attention mask (padding tokens are attended to, as the Flux
//! reference embedder runs it).

use crate::tensor_source::{NetError, TensorSource, detect_prefix};
use crate::vae::Trace;
use flux_kernels::{Activation, Backend, BinaryOp, DType, HostData, Tensor};

/// Hyperparameters of the encoder (`T5Config` names).
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    /// Vocabulary size (rows of `shared.weight`).
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets.
    pub num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub max_distance: usize,
    /// RMS-norm epsilon.
    pub eps: f64,
}

impl T5Config {
    /// `google/t5-v1_1-xxl`, the encoder Flux uses.
    pub fn xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            num_buckets: 32,
            max_distance: 128,
            eps: 1e-6,
        }
    }

    fn validate(&self) -> Result<(), NetError> {
        if self.vocab_size == 0
            || self.d_model == 0
            || self.d_kv == 0
            || self.d_ff == 0
            || self.num_heads == 0
            || self.num_buckets < 4
            || self.max_distance == 0
        {
            return Err(NetError::Invalid(format!(
                "T5 config: sizes must be positive and num_buckets >= 4, found {self:?}"
            )));
        }
        Ok(())
    }

    /// Every parameter name and shape (with the `shared.weight` embedding).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let inner = self.num_heads * self.d_kv;
        let mut v = vec![(
            "shared.weight".to_string(),
            vec![self.vocab_size, self.d_model],
        )];
        for i in 0..self.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for n in ["q", "k", "v"] {
                v.push((
                    format!("{p}.0.SelfAttention.{n}.weight"),
                    vec![inner, self.d_model],
                ));
            }
            v.push((
                format!("{p}.0.SelfAttention.o.weight"),
                vec![self.d_model, inner],
            ));
            if i == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![self.num_buckets, self.num_heads],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![self.d_model]));
            for n in ["wi_0", "wi_1"] {
                v.push((
                    format!("{p}.1.DenseReluDense.{n}.weight"),
                    vec![self.d_ff, self.d_model],
                ));
            }
            v.push((
                format!("{p}.1.DenseReluDense.wo.weight"),
                vec![self.d_model, self.d_ff],
            ));
            v.push((format!("{p}.1.layer_norm.weight"), vec![self.d_model]));
        }
        v.push(("encoder.final_layer_norm.weight".into(), vec![self.d_model]));
        v
    }
}

/// The bidirectional relative-position bucket of `relative = key - query`, as transformers
/// computes it (the logarithmic part in float32, truncated toward zero).
pub fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    let log_ratio = (n as f32 / max_exact as f32).ln();
    let log_span = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_span * (half - max_exact) as f32) as usize;
    base + large.min(half - 1)
}

struct Block<B: Backend> {
    ln0: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    o: Tensor<B>,
    ln1: Tensor<B>,
    wi0: Tensor<B>,
    wi1: Tensor<B>,
    wo: Tensor<B>,
}

/// The T5 encoder on backend `B`.
pub struct T5Encoder<B: Backend> {
    cfg: T5Config,
    embed: Tensor<B>,
    /// Block 0's `[num_buckets, num_heads]` table, kept on the host (it is tiny).
    rel_bias: Vec<f64>,
    blocks: Vec<Block<B>>,
    final_ln: Tensor<B>,
}

impl<B: Backend> std::fmt::Debug for T5Encoder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Encoder")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Prefixes of the encoder in known checkpoint layouts (tried in order).
const PREFIXES: [&str; 2] = ["", "text_encoders.t5xxl.transformer."];

impl<B: Backend> T5Encoder<B> {
    /// Builds the encoder from `src` (transformers names: `shared.weight` or
    /// `encoder.embed_tokens.weight`, `encoder.block.*`, `encoder.final_layer_norm.weight`).
    pub fn load(be: &B, cfg: T5Config, src: &mut dyn TensorSource<B>) -> Result<Self, NetError> {
        cfg.validate()?;
        let prefix = detect_prefix(src, &PREFIXES, "encoder.final_layer_norm.weight").unwrap_or("");
        let mut get = |name: &str, shape: &[usize]| src.tensor(&format!("{prefix}{name}"), shape);
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let emb_shape = [cfg.vocab_size, d];
        let embed = match get("shared.weight", &emb_shape) {
            Err(NetError::Missing { .. }) => get("encoder.embed_tokens.weight", &emb_shape)?,
            other => other?,
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let mut rel_bias = Vec::new();
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            if i == 0 {
                let t = get(
                    &format!("{a}.relative_attention_bias.weight"),
                    &[cfg.num_buckets, cfg.num_heads],
                )?;
                rel_bias = be.download_f64(&t)?;
            }
            let f = format!("{p}.1.DenseReluDense");
            blocks.push(Block {
                ln0: get(&format!("{p}.0.layer_norm.weight"), &[d])?,
                q: get(&format!("{a}.q.weight"), &[inner, d])?,
                k: get(&format!("{a}.k.weight"), &[inner, d])?,
                v: get(&format!("{a}.v.weight"), &[inner, d])?,
                o: get(&format!("{a}.o.weight"), &[d, inner])?,
                ln1: get(&format!("{p}.1.layer_norm.weight"), &[d])?,
                wi0: get(&format!("{f}.wi_0.weight"), &[cfg.d_ff, d])?,
                wi1: get(&format!("{f}.wi_1.weight"), &[cfg.d_ff, d])?,
                wo: get(&format!("{f}.wo.weight"), &[d, cfg.d_ff])?,
            });
        }
        let final_ln = get("encoder.final_layer_norm.weight", &[d])?;
        Ok(Self {
            cfg,
            embed,
            rel_bias,
            blocks,
            final_ln,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The position bias `[1, heads, L, L]` added to every layer's scores.
    pub fn position_bias(&self, be: &B, len: usize, dtype: DType) -> Result<Tensor<B>, NetError> {
        let h = self.cfg.num_heads;
        let mut v = vec![0.0; h * len * len];
        for i in 0..len {
            for j in 0..len {
                let b = relative_bucket(
                    j as i64 - i as i64,
                    self.cfg.num_buckets,
                    self.cfg.max_distance,
                );
                for hd in 0..h {
                    v[(hd * len + i) * len + j] = self.rel_bias[b * h + hd];
                }
            }
        }
        Ok(be.upload(HostData::F64(&v), &[1, h, len, len], dtype)?)
    }

    /// `last_hidden_state` `[batch, L, d_model]` for `ids` (`batch` rows of `L` token ids, row
    /// major), computed in `dtype`; intermediates go to `trace` (`embeddings`, `position_bias`,
    /// `block.{i}`).
    pub fn forward_traced(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        dtype: DType,
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B>, NetError> {
        let len = check_ids(ids, batch, self.cfg.vocab_size, "T5")?;
        let (d, nh, dk) = (self.cfg.d_model, self.cfg.num_heads, self.cfg.d_kv);
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let mut h = be
            .gather_rows(&self.embed, &rows, dtype)?
            .reshape(&[batch, len, d])?;
        trace("embeddings", &h);
        let bias = self.position_bias(be, len, dtype)?;
        trace("position_bias", &bias);
        let eps = self.cfg.eps;
        for (i, b) in self.blocks.iter().enumerate() {
            let x = be.rms_norm(&h, Some(&b.ln0), eps)?;
            let heads = |w: &Tensor<B>| -> Result<Tensor<B>, NetError> {
                Ok(be.linear(&x, w, None)?.reshape(&[batch, len, nh, dk])?)
            };
            let (q, k, v) = (heads(&b.q)?, heads(&b.k)?, heads(&b.v)?);
            let a = be.attention(&q, &k, &v, Some(&bias), Some(1.0))?;
            let a = be.linear(&a.reshape(&[batch, len, nh * dk])?, &b.o, None)?;
            be.lincomb_inplace(&mut h, 1.0, &[(1.0, &a)])?;
            let x = be.rms_norm(&h, Some(&b.ln1), eps)?;
            let gate = be.linear_act(&x, &b.wi0, None, Activation::GeluTanh)?;
            let up = be.linear(&x, &b.wi1, None)?;
            let y = be.linear(&be.binary(&gate, &up, BinaryOp::Mul)?, &b.wo, None)?;
            be.lincomb_inplace(&mut h, 1.0, &[(1.0, &y)])?;
            trace(&format!("block.{i}"), &h);
        }
        Ok(be.rms_norm(&h, Some(&self.final_ln), eps)?)
    }

    /// `last_hidden_state` `[batch, L, d_model]` (Flux's `txt`).
    pub fn forward(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor<B>, NetError> {
        self.forward_traced(be, ids, batch, dtype, &mut |_, _| {})
    }
}

/// Checks `batch` equal rows of ids below `vocab`; returns the row length.
pub(crate) fn check_ids(
    ids: &[u32],
    batch: usize,
    vocab: usize,
    model: &str,
) -> Result<usize, NetError> {
    if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
        return Err(NetError::Invalid(format!(
            "{model}: {} token ids do not form {batch} non-empty rows",
            ids.len()
        )));
    }
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, i)| **i as usize >= vocab) {
        return Err(NetError::Invalid(format!(
            "{model}: token id {id} at position {pos} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(ids.len() / batch)
}
