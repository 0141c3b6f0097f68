//! The built-in demo model: a tiny Flux stack (transformer, autoencoder, T5, CLIP) whose weights
//! are generated deterministically at run time and loaded through the same safetensors loader
//! as real files, plus a byte-level tokenizer. It needs no download, so every command works on
//! a fresh machine; its images are noise-like and every one is labelled as made by the demo.

use crate::model::PromptTokenizer;
use crate::{PipelineError, Result};
use flux_kernels::DType;
use flux_model::clip::ClipConfig;
use flux_model::t5::T5Config;
use flux_model::vae::VaeConfig;
use flux_model::{FluxConfig, Weights};
use flux_samplers::noise::TorchGenerator;

/// Seed of the demo weights.
pub const DEMO_SEED: u64 = 20240801;
/// Text attached to every output of the demo model (log line and image metadata).
pub const DEMO_LABEL: &str =
    "made with the built-in demo model (random weights, not a trained Flux model)";

/// The demo transformer's configuration (flux-dev structure, guidance embedding included).
pub fn transformer_config() -> FluxConfig {
    FluxConfig {
        in_channels: 64,
        out_channels: 64,
        vec_in_dim: 32,
        context_in_dim: 32,
        hidden_size: 64,
        mlp_hidden: 128,
        num_heads: 2,
        depth: 1,
        depth_single: 1,
        axes_dim: vec![8, 12, 12],
        theta: 10000.0,
        qkv_bias: true,
        guidance_embed: true,
    }
}

/// The demo autoencoder's configuration (downsampling 8, 16 latent channels, as Flux).
pub fn vae_config() -> VaeConfig {
    VaeConfig {
        ch: 32,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        ..VaeConfig::flux()
    }
}

/// The demo T5 configuration.
pub fn t5_config() -> T5Config {
    T5Config {
        vocab_size: 260,
        d_model: 32,
        d_kv: 8,
        d_ff: 64,
        num_layers: 1,
        num_heads: 4,
        num_buckets: 32,
        max_distance: 128,
        eps: 1e-6,
    }
}

/// The demo CLIP configuration.
pub fn clip_config() -> ClipConfig {
    ClipConfig {
        vocab_size: 258,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 2,
        max_positions: 77,
        eps: 1e-5,
    }
}

/// T5 sequence length of the demo tokenizer.
pub const T5_LEN: usize = 32;

/// Safetensors bytes of `shapes` filled from a seeded generator: 1-D norm weights and scales 1,
/// other 1-D tensors (biases) 0, everything else uniform with variance `1 / fan_in`.
pub fn safetensors_bytes(shapes: &[(String, Vec<usize>)], seed: u64) -> Vec<u8> {
    let mut gen_ = TorchGenerator::new(seed);
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let start = data.len();
        let norm_like = shape.len() == 1
            && (name.contains("norm")
                || name.rsplit('.').next() == Some("scale")
                || name.contains("ln"));
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = (3.0 / fan_in as f64).sqrt();
        for _ in 0..n {
            let v = if norm_like {
                1.0
            } else if shape.len() == 1 {
                0.0
            } else {
                (2.0 * gen_.uniform_f64() - 1.0) * bound
            };
            data.extend_from_slice(&(v as f32).to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// The four demo weight sets: (transformer, vae, t5, clip).
pub fn weights() -> Result<(Weights, Weights, Weights, Weights)> {
    let err =
        |what: &str, e: flux_model::WeightError| PipelineError::Model(format!("demo {what}: {e}"));
    let transformer =
        flux_model::random::random_weights(&transformer_config(), DType::F32, DEMO_SEED)
            .map_err(|e| err("transformer", e))?;
    let vae = Weights::from_bytes(
        safetensors_bytes(&vae_config().weight_shapes(), DEMO_SEED + 1),
        "demo vae",
    )
    .map_err(|e| err("autoencoder", e))?;
    let t5 = Weights::from_bytes(
        safetensors_bytes(&t5_config().weight_shapes(), DEMO_SEED + 2),
        "demo t5",
    )
    .map_err(|e| err("T5", e))?;
    let clip = Weights::from_bytes(
        safetensors_bytes(&clip_config().weight_shapes(), DEMO_SEED + 3),
        "demo clip",
    )
    .map_err(|e| err("CLIP", e))?;
    Ok((transformer, vae, t5, clip))
}

/// One demo weight set written out as a file: what it is, its safetensors bytes, and the
/// `config.json` keys the loaders need beside it (head counts and the like, which the tensor
/// shapes do not tell).
#[derive(Clone, Debug)]
pub struct DemoFile {
    /// `transformer`, `vae`, `t5` or `clip`.
    pub role: &'static str,
    /// The safetensors file (f32 tensors, the same values as [`weights`]).
    pub bytes: Vec<u8>,
    /// Keys for a `config.json` in the same folder.
    pub config: serde_json::Value,
}

/// The demo model as safetensors files, so the file loaders (ComfyUI folders, explicit paths)
/// can be exercised without a download: transformer, autoencoder, T5, CLIP. The config keys of
/// the four do not collide, so files that share a folder can share one merged `config.json`.
pub fn files() -> Result<Vec<DemoFile>> {
    let (tw, vw, t5w, cw) = weights()?;
    let tc = transformer_config();
    let t5c = t5_config();
    let cc = clip_config();
    let vc = vae_config();
    let configs = [
        (
            "transformer",
            &tw,
            serde_json::json!({"num_heads": tc.num_heads, "axes_dim": tc.axes_dim, "theta": tc.theta}),
        ),
        (
            "vae",
            &vw,
            serde_json::json!({"scale_factor": vc.scale_factor, "shift_factor": vc.shift_factor,
                "groupnorm_groups": vc.groups, "groupnorm_eps": vc.eps}),
        ),
        (
            "t5",
            &t5w,
            serde_json::json!({"relative_attention_max_distance": t5c.max_distance,
                "layer_norm_epsilon": t5c.eps}),
        ),
        (
            "clip",
            &cw,
            serde_json::json!({"num_attention_heads": cc.num_heads, "layer_norm_eps": cc.eps}),
        ),
    ];
    configs
        .into_iter()
        .map(|(role, w, config)| {
            Ok(DemoFile {
                role,
                bytes: to_safetensors(w, role)?,
                config,
            })
        })
        .collect()
}

/// `w` as f32 safetensors bytes, tensors in name order.
fn to_safetensors(w: &Weights, what: &str) -> Result<Vec<u8>> {
    use flux_kernels::{Cpu, SamplerOps};
    let err = |e: String| PipelineError::Model(format!("demo {what}: {e}"));
    let mut names = w.names();
    names.sort_unstable();
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for name in names {
        let shape = w.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        let t = w
            .get_as(&Cpu, name, &shape, DType::F32)
            .map_err(|e| err(e.to_string()))?;
        let values = Cpu.download_f32(&t).map_err(|e| err(e.to_string()))?;
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Byte-level tokenizer of the demo model: T5 ids are `byte + 2`, then `</s>` = 1, padded
/// with 0 to [`T5_LEN`]; CLIP ids are bos = 256, `byte`, eos = 257, padded with eos to 77.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteTokenizer;

impl PromptTokenizer for ByteTokenizer {
    fn tokenize(&self, prompt: &str) -> Result<(Vec<i64>, Vec<i64>)> {
        let bytes = prompt.as_bytes();
        let mut t5: Vec<i64> = bytes
            .iter()
            .take(T5_LEN - 1)
            .map(|&b| i64::from(b) + 2)
            .collect();
        t5.push(1);
        t5.resize(T5_LEN, 0);
        let mut clip = vec![256i64];
        clip.extend(bytes.iter().take(75).map(|&b| i64::from(b)));
        clip.resize(77, 257);
        Ok((t5, clip))
    }
}
