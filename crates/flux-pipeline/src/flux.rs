//! The `flux-model` networks behind the pipeline's model traits, and the configuration of each
//! network derived from its tensors (plus a `config.json` beside the file where sizes cannot be
//! read off the tensors, e.g. head counts of non-standard models).

use crate::model::{Autoencoder, FlowTransformer, HostTensor, TextEncoders, TransformerInputs};
use crate::{PipelineError, Result};
use flux_kernels::{Backend, DType, HostData, Tensor};
use flux_model::clip::{ClipConfig, ClipTextModel};
use flux_model::t5::{T5Config, T5Encoder};
use flux_model::tensor_source::MapSource;
use flux_model::vae::{Vae, VaeConfig};
use flux_model::{FluxConfig, FluxInputs, FluxTransformer, Weights};
use serde_json::Value;

fn model_err(what: &str, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Model(format!("{what}: {e}"))
}

/// The prefix (one of `prefixes`) under which `probe` is stored.
fn find_prefix<'p>(w: &Weights, prefixes: &[&'p str], probe: &str) -> Option<&'p str> {
    prefixes
        .iter()
        .copied()
        .find(|p| w.contains(&format!("{p}{probe}")))
}

fn shape_of(w: &Weights, name: &str, what: &str) -> Result<Vec<usize>> {
    w.shape(name)
        .map(<[usize]>::to_vec)
        .ok_or_else(|| PipelineError::Model(format!("{what}: tensor `{name}` not found")))
}

fn dim(w: &Weights, name: &str, axis: usize, what: &str) -> Result<usize> {
    let s = shape_of(w, name, what)?;
    s.get(axis).copied().ok_or_else(|| {
        PipelineError::Model(format!(
            "{what}: tensor `{name}` has shape {s:?}, expected at least {} dims",
            axis + 1
        ))
    })
}

fn count(w: &Weights, prefix: &str) -> usize {
    let names = w.names();
    let mut n = 0;
    while names
        .iter()
        .any(|k| k.starts_with(&format!("{prefix}.{n}.")))
    {
        n += 1;
    }
    n
}

fn json_usize(json: Option<&Value>, keys: &[&str]) -> Option<usize> {
    let j = json?;
    keys.iter()
        .find_map(|k| j.get(*k).and_then(Value::as_u64))
        .map(|v| v as usize)
}

fn json_f64(json: Option<&Value>, keys: &[&str]) -> Option<f64> {
    let j = json?;
    keys.iter().find_map(|k| j.get(*k).and_then(Value::as_f64))
}

/// `config.json` beside the weights, when there is one and it parses.
pub fn sibling_config(w: &Weights) -> Option<Value> {
    let path = w.dir()?.join("config.json");
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The autoencoder configuration read off the tensors.
pub fn vae_config(w: &Weights, json: Option<&Value>) -> Result<VaeConfig> {
    const WHAT: &str = "autoencoder";
    let p = find_prefix(
        w,
        &["", "vae.", "first_stage_model."],
        "encoder.conv_in.weight",
    )
    .ok_or_else(|| {
        PipelineError::Model(format!(
            "{WHAT}: tensor `encoder.conv_in.weight` not found (is this an autoencoder file?)"
        ))
    })?;
    let ch = dim(w, &format!("{p}encoder.conv_in.weight"), 0, WHAT)?;
    let in_channels = dim(w, &format!("{p}encoder.conv_in.weight"), 1, WHAT)?;
    let levels = count(w, &format!("{p}encoder.down"));
    let num_res_blocks = count(w, &format!("{p}encoder.down.0.block"));
    let mut ch_mult = Vec::with_capacity(levels);
    for l in 0..levels {
        let c = dim(
            w,
            &format!("{p}encoder.down.{l}.block.0.conv1.weight"),
            0,
            WHAT,
        )?;
        ch_mult.push(c / ch.max(1));
    }
    let flux = VaeConfig::flux();
    Ok(VaeConfig {
        in_channels,
        ch,
        out_ch: dim(w, &format!("{p}decoder.conv_out.weight"), 0, WHAT)?,
        ch_mult,
        num_res_blocks,
        z_channels: dim(w, &format!("{p}decoder.conv_in.weight"), 1, WHAT)?,
        scale_factor: json_f64(json, &["scale_factor", "scaling_factor"])
            .unwrap_or(flux.scale_factor),
        shift_factor: json_f64(json, &["shift_factor"]).unwrap_or(flux.shift_factor),
        groups: json_usize(json, &["groupnorm_groups", "norm_num_groups"]).unwrap_or(flux.groups),
        eps: json_f64(json, &["groupnorm_eps"]).unwrap_or(flux.eps),
    })
}

/// The T5 encoder configuration read off the tensors.
pub fn t5_config(w: &Weights, json: Option<&Value>) -> Result<T5Config> {
    const WHAT: &str = "T5 encoder";
    let p = find_prefix(
        w,
        &["", "text_encoders.t5xxl.transformer."],
        "encoder.final_layer_norm.weight",
    )
    .ok_or_else(|| {
        PipelineError::Model(format!(
            "{WHAT}: tensor `encoder.final_layer_norm.weight` not found (is this a T5 file?)"
        ))
    })?;
    let emb = if w.contains(&format!("{p}shared.weight")) {
        format!("{p}shared.weight")
    } else {
        format!("{p}encoder.embed_tokens.weight")
    };
    let a = format!("{p}encoder.block.0.layer.0.SelfAttention");
    let rel = format!("{a}.relative_attention_bias.weight");
    let num_heads = dim(w, &rel, 1, WHAT)?;
    let xxl = T5Config::xxl();
    Ok(T5Config {
        vocab_size: dim(w, &emb, 0, WHAT)?,
        d_model: dim(w, &emb, 1, WHAT)?,
        d_kv: dim(w, &format!("{a}.q.weight"), 0, WHAT)? / num_heads.max(1),
        d_ff: dim(
            w,
            &format!("{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
            0,
            WHAT,
        )?,
        num_layers: count(w, &format!("{p}encoder.block")),
        num_heads,
        num_buckets: dim(w, &rel, 0, WHAT)?,
        max_distance: json_usize(json, &["relative_attention_max_distance"])
            .unwrap_or(xxl.max_distance),
        eps: json_f64(json, &["layer_norm_epsilon"]).unwrap_or(xxl.eps),
    })
}

/// The CLIP text model configuration read off the tensors (heads from `config.json`, else one
/// head per 64 channels as in CLIP-L).
pub fn clip_config(w: &Weights, json: Option<&Value>) -> Result<ClipConfig> {
    const WHAT: &str = "CLIP text model";
    let p = find_prefix(
        w,
        &[
            "text_model.",
            "",
            "text_encoders.clip_l.transformer.text_model.",
        ],
        "final_layer_norm.weight",
    )
    .ok_or_else(|| {
        PipelineError::Model(format!(
            "{WHAT}: tensor `text_model.final_layer_norm.weight` not found (is this a CLIP file?)"
        ))
    })?;
    let tok = format!("{p}embeddings.token_embedding.weight");
    let hidden = dim(w, &tok, 1, WHAT)?;
    let large = ClipConfig::large();
    Ok(ClipConfig {
        vocab_size: dim(w, &tok, 0, WHAT)?,
        hidden_size: hidden,
        intermediate_size: dim(w, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0, WHAT)?,
        num_layers: count(w, &format!("{p}encoder.layers")),
        num_heads: json_usize(json, &["num_attention_heads"]).unwrap_or((hidden / 64).max(1)),
        max_positions: dim(
            w,
            &format!("{p}embeddings.position_embedding.weight"),
            0,
            WHAT,
        )?,
        eps: json_f64(json, &["layer_norm_eps"]).unwrap_or(large.eps),
    })
}

/// Every tensor of `w` uploaded in the compute dtype, for the networks that take a source.
fn source<B: Backend>(be: &B, w: &Weights, dtype: DType, what: &str) -> Result<MapSource<B>> {
    let mut src = MapSource::new();
    for name in w.names() {
        let shape = w.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        let t = w
            .get_as(be, name, &shape, dtype)
            .map_err(|e| model_err(what, e))?;
        src.insert(name, t);
    }
    Ok(src)
}

fn to_host<B: Backend>(be: &B, t: &Tensor<B>) -> Result<HostTensor> {
    Ok(HostTensor::new(t.shape().to_vec(), be.download_f64(t)?))
}

fn to_device<B: Backend>(be: &B, t: &HostTensor, dtype: DType) -> Result<Tensor<B>> {
    Ok(be.upload(HostData::F64(&t.data), &t.shape, dtype)?)
}

fn check_dtype(expected: DType, found: DType, what: &str) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(PipelineError::Model(format!(
            "{what} was loaded for {expected} compute, asked to run in {found}"
        )))
    }
}

/// The Flux transformer on a backend.
pub struct FluxNet<B: Backend> {
    be: B,
    net: FluxTransformer<B>,
}

impl<B: Backend> FluxNet<B> {
    /// Loads the transformer from `w` (configuration from the tensors and `json`).
    pub fn load(be: &B, w: &Weights, json: Option<&Value>, dtype: DType) -> Result<Self> {
        let w = flux_model::transformer::normalize_layout(w)
            .map_err(|e| model_err("transformer", e))?;
        let cfg = FluxConfig::detect(&w, json).map_err(|e| model_err("transformer", e))?;
        Self::load_with_config(be, &w, cfg, dtype)
    }

    /// Loads the transformer with a known configuration.
    pub fn load_with_config(be: &B, w: &Weights, cfg: FluxConfig, dtype: DType) -> Result<Self> {
        let net = FluxTransformer::load_with_config(be, w, cfg, dtype)
            .map_err(|e| model_err("transformer", e))?;
        Ok(Self {
            be: be.clone(),
            net,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FluxConfig {
        self.net.config()
    }
}

impl<B: Backend> FlowTransformer for FluxNet<B> {
    fn has_guidance(&self) -> bool {
        self.net.config().guidance_embed
    }

    fn context_dim(&self) -> usize {
        self.net.config().context_in_dim
    }

    fn vec_dim(&self) -> usize {
        self.net.config().vec_in_dim
    }

    fn forward(&self, inp: &TransformerInputs<'_>, dtype: DType) -> Result<HostTensor> {
        check_dtype(self.net.dtype(), dtype, "transformer")?;
        let be = &self.be;
        let img = to_device(be, inp.img, dtype)?;
        let txt = to_device(be, inp.txt, dtype)?;
        let y = to_device(be, inp.y, dtype)?;
        let g = inp.guidance.map(|g| [g]);
        let out = self
            .net
            .forward(
                be,
                &FluxInputs {
                    img: &img,
                    img_ids: &inp.img_ids.data,
                    txt: &txt,
                    txt_ids: &inp.txt_ids.data,
                    timesteps: &[inp.timestep],
                    y: &y,
                    guidance: g.as_ref().map(<[f64; 1]>::as_slice),
                },
            )
            .map_err(|e| model_err("transformer", e))?;
        to_host(be, &out)
    }
}

/// The autoencoder on a backend.
pub struct VaeNet<B: Backend> {
    be: B,
    dtype: DType,
    net: Vae<B>,
}

impl<B: Backend> VaeNet<B> {
    /// Loads the autoencoder from `w`.
    pub fn load(be: &B, w: &Weights, json: Option<&Value>, dtype: DType) -> Result<Self> {
        // diffusers files hold the same tensors under other names.
        let w =
            &flux_model::vae_names::normalize_layout(w).map_err(|e| model_err("autoencoder", e))?;
        let cfg = vae_config(w, json)?;
        let mut src = source(be, w, dtype, "autoencoder")?;
        let net = Vae::load(cfg, &mut src).map_err(|e| model_err("autoencoder", e))?;
        Ok(Self {
            be: be.clone(),
            dtype,
            net,
        })
    }
}

impl<B: Backend> Autoencoder for VaeNet<B> {
    fn encode_mean(&self, image: &HostTensor, dtype: DType) -> Result<HostTensor> {
        check_dtype(self.dtype, dtype, "autoencoder")?;
        let x = to_device(&self.be, image, dtype)?;
        let mean = self
            .net
            .encode_mean(&self.be, &x)
            .map_err(|e| model_err("autoencoder encode", e))?;
        to_host(&self.be, &mean)
    }

    fn decode(&self, latent: &HostTensor, dtype: DType) -> Result<HostTensor> {
        check_dtype(self.dtype, dtype, "autoencoder")?;
        let z = to_device(&self.be, latent, dtype)?;
        let img = self
            .net
            .decode_unscaled(&self.be, &z, &mut |_, _| {})
            .map_err(|e| model_err("autoencoder decode", e))?;
        to_host(&self.be, &img)
    }

    fn downsample_factor(&self) -> usize {
        self.net.config().downsample_factor()
    }
}

/// T5 and CLIP on a backend.
pub struct TextNets<B: Backend> {
    be: B,
    dtype: DType,
    t5: T5Encoder<B>,
    clip: ClipTextModel<B>,
}

impl<B: Backend> TextNets<B> {
    /// Loads both encoders.
    pub fn load(
        be: &B,
        t5: &Weights,
        t5_json: Option<&Value>,
        clip: &Weights,
        clip_json: Option<&Value>,
        dtype: DType,
    ) -> Result<Self> {
        let t5_cfg = t5_config(t5, t5_json)?;
        let mut src = source(be, t5, dtype, "T5 encoder")?;
        let t5 = T5Encoder::load(be, t5_cfg, &mut src).map_err(|e| model_err("T5 encoder", e))?;
        let clip_cfg = clip_config(clip, clip_json)?;
        let mut src = source(be, clip, dtype, "CLIP text model")?;
        let clip =
            ClipTextModel::load(clip_cfg, &mut src).map_err(|e| model_err("CLIP text model", e))?;
        Ok(Self {
            be: be.clone(),
            dtype,
            t5,
            clip,
        })
    }

    /// T5 vocabulary size.
    pub fn t5_vocab(&self) -> usize {
        self.t5.config().vocab_size
    }

    /// CLIP vocabulary size.
    pub fn clip_vocab(&self) -> usize {
        self.clip.config().vocab_size
    }

    /// CLIP sequence length.
    pub fn clip_len(&self) -> usize {
        self.clip.config().max_positions
    }
}

fn ids_u32(ids: &[i64], what: &str) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&i| {
            u32::try_from(i).map_err(|_| PipelineError::InvalidRequest {
                field: "token ids",
                message: format!("{what} token id {i} out of range"),
            })
        })
        .collect()
}

impl<B: Backend> TextEncoders for TextNets<B> {
    fn encode_ids(
        &self,
        t5_ids: &[i64],
        clip_ids: &[i64],
        dtype: DType,
    ) -> Result<(HostTensor, HostTensor)> {
        check_dtype(self.dtype, dtype, "text encoders")?;
        let t5_ids = ids_u32(t5_ids, "T5")?;
        let clip_ids = ids_u32(clip_ids, "CLIP")?;
        let txt = self
            .t5
            .forward(&self.be, &t5_ids, 1, dtype)
            .map_err(|e| model_err("T5 encoder", e))?;
        let out = self
            .clip
            .forward(&self.be, &clip_ids, 1, dtype)
            .map_err(|e| model_err("CLIP text model", e))?;
        Ok((to_host(&self.be, &txt)?, to_host(&self.be, &out.pooled)?))
    }
}
