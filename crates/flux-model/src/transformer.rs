//! The Flux.1 flow-matching MMDiT (double-stream and single-stream blocks) on any backend.
//!
//! Weights are loaded under the BFL names; ComfyUI (`model.diffusion_model.` prefix) and
//! diffusers layouts are mapped onto them first (see [`normalize_layout`]). The configuration
//! is read off the tensor shapes; heads, RoPE axes and theta come from a `config.json` beside the
//! weights when there is one, else from the released defaults.

use crate::weights::{WeightError, Weights, upload};
use flux_kernels::{Activation, Backend, DType, Tensor};
use std::path::Path;

type Result<T> = std::result::Result<T, WeightError>;

/// Hyperparameters of a Flux transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Packed latent features per token (64).
    pub in_channels: usize,
    /// Output features per token (64).
    pub out_channels: usize,
    /// Pooled text vector width (CLIP: 768).
    pub vec_in_dim: usize,
    /// Text token width (T5: 4096).
    pub context_in_dim: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// MLP hidden size `M`.
    pub mlp_hidden: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single: usize,
    /// RoPE dims per position axis (sum = head dim).
    pub axes_dim: Vec<usize>,
    /// RoPE base.
    pub theta: f64,
    /// Whether the qkv linears have a bias.
    pub qkv_bias: bool,
    /// Whether the model has the guidance embedder (dev) or not (schnell).
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// The released FLUX.1-dev configuration.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_hidden: 12288,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<()> {
        let d = self.head_dim();
        if self.num_heads == 0 || d * self.num_heads != self.hidden_size {
            return Err(WeightError::Config(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden_size, self.num_heads
            )));
        }
        if self.axes_dim.iter().sum::<usize>() != d || self.axes_dim.iter().any(|a| a % 2 != 0) {
            return Err(WeightError::Config(format!(
                "RoPE axes {:?} must be even and sum to the head dim {d}",
                self.axes_dim
            )));
        }
        Ok(())
    }

    /// Derives the configuration from the tensors (BFL names) and an optional `config.json`.
    pub fn detect(w: &Weights, json: Option<&serde_json::Value>) -> Result<Self> {
        let shape = |n: &str| {
            w.shape(n)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| WeightError::Missing {
                    name: n.to_string(),
                    files: format!("{w:?}"),
                })
        };
        let dim2 = |n: &str| -> Result<(usize, usize)> {
            let s = shape(n)?;
            match s.as_slice() {
                [a, b] => Ok((*a, *b)),
                _ => Err(WeightError::Config(format!(
                    "tensor {n}: expected a matrix, found {s:?}"
                ))),
            }
        };
        let (hidden, in_ch) = dim2("img_in.weight")?;
        let (_, ctx) = dim2("txt_in.weight")?;
        let (_, vec_in) = dim2("vector_in.in_layer.weight")?;
        let (out_ch, _) = dim2("final_layer.linear.weight")?;
        let count = |prefix: &str| {
            let mut n = 0;
            while w
                .names()
                .iter()
                .any(|k| k.starts_with(&format!("{prefix}.{n}.")))
            {
                n += 1;
            }
            n
        };
        let depth = count("double_blocks");
        let depth_single = count("single_blocks");
        let mlp_hidden = if depth > 0 {
            dim2("double_blocks.0.img_mlp.0.weight")?.0
        } else if depth_single > 0 {
            dim2("single_blocks.0.linear1.weight")?
                .0
                .checked_sub(3 * hidden)
                .ok_or_else(|| {
                    WeightError::Config(
                        "single_blocks.0.linear1.weight is narrower than 3 x hidden".into(),
                    )
                })?
        } else {
            4 * hidden
        };
        let get = |keys: &[&str]| json.and_then(|j| keys.iter().find_map(|k| j.get(*k)));
        let num_heads = get(&["num_heads", "num_attention_heads"])
            .and_then(serde_json::Value::as_u64)
            .map_or(24, |v| v as usize);
        let axes_dim = get(&["axes_dim", "axes_dims_rope"])
            .and_then(serde_json::Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or_else(|| vec![16, 56, 56]);
        let theta = get(&["theta"])
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(10000.0);
        let cfg = Self {
            in_channels: in_ch,
            out_channels: out_ch,
            vec_in_dim: vec_in,
            context_in_dim: ctx,
            hidden_size: hidden,
            mlp_hidden,
            num_heads,
            depth,
            depth_single,
            axes_dim,
            theta,
            qkv_bias: w.contains("double_blocks.0.img_attn.qkv.bias")
                || w.contains("single_blocks.0.linear1.bias"),
            guidance_embed: w.contains("guidance_in.in_layer.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Maps ComfyUI and diffusers key layouts onto the BFL names.
pub fn normalize_layout(w: &Weights) -> Result<Weights> {
    const COMFY: &str = "model.diffusion_model.";
    if w.names().iter().any(|k| k.starts_with(COMFY)) {
        return Ok(w.strip_prefix(COMFY));
    }
    if w.contains("x_embedder.weight") {
        return from_diffusers(w);
    }
    Ok(w.clone())
}

fn from_diffusers(w: &Weights) -> Result<Weights> {
    let mut plan: Vec<(String, Vec<String>, bool)> = Vec::new();
    let lin = |plan: &mut Vec<_>, bfl: &str, src: &[String], swap: bool| {
        for suffix in ["weight", "bias"] {
            let srcs: Vec<String> = src.iter().map(|s| format!("{s}.{suffix}")).collect();
            if srcs.iter().all(|s| w.contains(s)) {
                plan.push((format!("{bfl}.{suffix}"), srcs, swap));
            }
        }
    };
    let one = |s: &str| vec![s.to_string()];
    lin(&mut plan, "img_in", &one("x_embedder"), false);
    lin(&mut plan, "txt_in", &one("context_embedder"), false);
    for (bfl, d) in [
        ("time_in", "time_text_embed.timestep_embedder"),
        ("guidance_in", "time_text_embed.guidance_embedder"),
        ("vector_in", "time_text_embed.text_embedder"),
    ] {
        lin(
            &mut plan,
            &format!("{bfl}.in_layer"),
            &one(&format!("{d}.linear_1")),
            false,
        );
        lin(
            &mut plan,
            &format!("{bfl}.out_layer"),
            &one(&format!("{d}.linear_2")),
            false,
        );
    }
    let mut i = 0;
    while w.contains(&format!("transformer_blocks.{i}.norm1.linear.weight")) {
        let d = format!("transformer_blocks.{i}");
        let b = format!("double_blocks.{i}");
        let p = |s: &str| format!("{d}.{s}");
        lin(
            &mut plan,
            &format!("{b}.img_mod.lin"),
            &[p("norm1.linear")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.txt_mod.lin"),
            &[p("norm1_context.linear")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.img_attn.qkv"),
            &[p("attn.to_q"), p("attn.to_k"), p("attn.to_v")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.txt_attn.qkv"),
            &[
                p("attn.add_q_proj"),
                p("attn.add_k_proj"),
                p("attn.add_v_proj"),
            ],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.img_attn.proj"),
            &[p("attn.to_out.0")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.txt_attn.proj"),
            &[p("attn.to_add_out")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.img_mlp.0"),
            &[p("ff.net.0.proj")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.img_mlp.2"),
            &[p("ff.net.2")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.txt_mlp.0"),
            &[p("ff_context.net.0.proj")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.txt_mlp.2"),
            &[p("ff_context.net.2")],
            false,
        );
        for (bn, dn) in [
            ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
            ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
            ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
            ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
        ] {
            plan.push((format!("{b}.{bn}"), vec![p(dn)], false));
        }
        i += 1;
    }
    let mut i = 0;
    while w.contains(&format!("single_transformer_blocks.{i}.norm.linear.weight")) {
        let d = format!("single_transformer_blocks.{i}");
        let b = format!("single_blocks.{i}");
        let p = |s: &str| format!("{d}.{s}");
        lin(
            &mut plan,
            &format!("{b}.modulation.lin"),
            &[p("norm.linear")],
            false,
        );
        lin(
            &mut plan,
            &format!("{b}.linear1"),
            &[
                p("attn.to_q"),
                p("attn.to_k"),
                p("attn.to_v"),
                p("proj_mlp"),
            ],
            false,
        );
        lin(&mut plan, &format!("{b}.linear2"), &[p("proj_out")], false);
        plan.push((
            format!("{b}.norm.query_norm.scale"),
            vec![p("attn.norm_q.weight")],
            false,
        ));
        plan.push((
            format!("{b}.norm.key_norm.scale"),
            vec![p("attn.norm_k.weight")],
            false,
        ));
        i += 1;
    }
    // diffusers stores the final adaLN linear as (scale, shift); BFL as (shift, scale).
    lin(
        &mut plan,
        "final_layer.adaLN_modulation.1",
        &one("norm_out.linear"),
        true,
    );
    lin(&mut plan, "final_layer.linear", &one("proj_out"), false);
    w.remap(&plan)
}

/// Reads `config.json` beside the weights, if there is one.
pub fn read_config_json(dir: Option<&Path>) -> Result<Option<serde_json::Value>> {
    let Some(dir) = dir else { return Ok(None) };
    for p in [
        dir.join("config.json"),
        dir.join("transformer").join("config.json"),
    ] {
        if p.is_file() {
            let text = std::fs::read_to_string(&p).map_err(|e| WeightError::Io {
                path: p.clone(),
                message: e.to_string(),
            })?;
            let v = serde_json::from_str(&text).map_err(|e| WeightError::Io {
                path: p.clone(),
                message: format!("invalid JSON: {e}"),
            })?;
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// A linear layer: weight in its stored dtype, bias in the compute dtype.
pub struct Linear<B: Backend> {
    w: Tensor<B>,
    b: Option<Tensor<B>>,
}

impl<B: Backend> Linear<B> {
    fn load(
        be: &B,
        w: &Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dt: DType,
    ) -> Result<Self> {
        let wt = w.get(be, &format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(w.get_as(be, &format!("{name}.bias"), &[out], dt)?)
        } else {
            None
        };
        Ok(Self { w: wt, b })
    }

    /// A linear layer from tensors already on the backend.
    pub fn new(w: Tensor<B>, b: Option<Tensor<B>>) -> Self {
        Self { w, b }
    }

    fn fwd(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(be.linear(x, &self.w, self.b.as_ref())?)
    }

    /// The layer followed by `act` (fused into the GEMM where the backend can).
    fn fwd_act(&self, be: &B, x: &Tensor<B>, act: Activation) -> Result<Tensor<B>> {
        Ok(be.linear_act(x, &self.w, self.b.as_ref(), act)?)
    }
}

struct MlpEmbedder<B: Backend> {
    in_layer: Linear<B>,
    out_layer: Linear<B>,
}

impl<B: Backend> MlpEmbedder<B> {
    fn load(be: &B, w: &Weights, name: &str, inp: usize, h: usize, dt: DType) -> Result<Self> {
        Ok(Self {
            in_layer: Linear::load(be, w, &format!("{name}.in_layer"), h, inp, true, dt)?,
            out_layer: Linear::load(be, w, &format!("{name}.out_layer"), h, h, true, dt)?,
        })
    }

    fn fwd(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = self.in_layer.fwd_act(be, x, Activation::Silu)?;
        self.out_layer.fwd(be, &h)
    }
}

struct StreamWeights<B: Backend> {
    modulation: Linear<B>,
    qkv: Linear<B>,
    q_norm: Tensor<B>,
    k_norm: Tensor<B>,
    proj: Linear<B>,
    mlp0: Linear<B>,
    mlp2: Linear<B>,
}

struct DoubleBlock<B: Backend> {
    img: StreamWeights<B>,
    txt: StreamWeights<B>,
}

struct SingleBlock<B: Backend> {
    modulation: Linear<B>,
    linear1: Linear<B>,
    linear2: Linear<B>,
    q_norm: Tensor<B>,
    k_norm: Tensor<B>,
}

/// Inputs of one forward pass (batch `B`).
pub struct FluxInputs<'a, B: Backend> {
    /// Packed image tokens `[B, L_img, in_channels]`.
    pub img: &'a Tensor<B>,
    /// Image position ids `[B, L_img, 3]`, row-major on the host.
    pub img_ids: &'a [f64],
    /// Text tokens `[B, L_txt, context_in_dim]`.
    pub txt: &'a Tensor<B>,
    /// Text position ids `[B, L_txt, 3]` (zeros for Flux).
    pub txt_ids: &'a [f64],
    /// Timesteps (= sigma) per batch item.
    pub timesteps: &'a [f64],
    /// Pooled text vector `[B, vec_in_dim]`.
    pub y: &'a Tensor<B>,
    /// Guidance per batch item (dev models; ignored by schnell).
    pub guidance: Option<&'a [f64]>,
}

/// The Flux transformer with its weights on a backend.
pub struct FluxTransformer<B: Backend> {
    cfg: FluxConfig,
    dtype: DType,
    img_in: Linear<B>,
    txt_in: Linear<B>,
    time_in: MlpEmbedder<B>,
    guidance_in: Option<MlpEmbedder<B>>,
    vector_in: MlpEmbedder<B>,
    double: Vec<DoubleBlock<B>>,
    single: Vec<SingleBlock<B>>,
    final_mod: Linear<B>,
    final_linear: Linear<B>,
    /// Caps the backend's [`ModelOps::max_activation_bytes`] (see
    /// [`FluxTransformer::with_max_activation_bytes`]).
    max_activation_bytes: usize,
}

/// Token spans `(start, len)` covering `0..len` in as few equal pieces as keep
/// `row_bytes * piece` within `limit` (one span when everything fits; at least one token per
/// span, so a single token wider than the limit is left to the backend to refuse).
fn token_spans(len: usize, row_bytes: usize, limit: usize) -> Vec<(usize, usize)> {
    let per = (limit / row_bytes.max(1)).max(1);
    let pieces = len.div_ceil(per).max(1);
    let size = len.div_ceil(pieces).max(1);
    (0..len)
        .step_by(size)
        .map(|start| (start, size.min(len - start)))
        .collect()
}

/// Concatenation along `dim`, without a copy for a single piece.
fn cat<B: Backend>(be: &B, mut parts: Vec<Tensor<B>>, dim: usize) -> Result<Tensor<B>> {
    if parts.len() == 1
        && let Some(t) = parts.pop()
    {
        return Ok(t);
    }
    Ok(be.concat(&parts.iter().collect::<Vec<_>>(), dim)?)
}

/// `f` of the rows `start..start + len` of dim 1 of `x` (`x` itself when that is all of it).
fn with_rows<B: Backend, T>(
    be: &B,
    x: &Tensor<B>,
    (start, len): (usize, usize),
    f: impl FnOnce(&Tensor<B>) -> Result<T>,
) -> Result<T> {
    if start == 0 && len == x.shape()[1] {
        f(x)
    } else {
        f(&be.narrow(x, 1, start, len)?)
    }
}

/// Callback receiving named intermediate activations.
pub type Tap<'a, B> = &'a mut dyn FnMut(&str, &Tensor<B>);

/// The 256-d sinusoidal embedding of `t * 1000` (cos half first), computed in f64.
pub fn timestep_embedding(t: &[f64]) -> Vec<f64> {
    const DIM: usize = 256;
    let half = DIM / 2;
    let mut out = Vec::with_capacity(t.len() * DIM);
    for &tv in t {
        let s = 1000.0 * tv;
        let args: Vec<f64> = (0..half)
            .map(|i| s * (-(10000f64.ln()) * i as f64 / half as f64).exp())
            .collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    out
}

/// The RoPE table `[B, L, D/2, 2]` of `(cos, sin)` for position ids `[B, L, 3]`, in f64.
pub fn rope_table(
    ids: &[f64],
    batch: usize,
    len: usize,
    axes_dim: &[usize],
    theta: f64,
) -> Vec<f64> {
    let d2: usize = axes_dim.iter().sum::<usize>() / 2;
    let mut out = Vec::with_capacity(batch * len * d2 * 2);
    for t in 0..batch * len {
        for (a, &dim) in axes_dim.iter().enumerate() {
            let pos = ids.get(t * axes_dim.len() + a).copied().unwrap_or(0.0);
            for j in 0..dim / 2 {
                let omega = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                let ang = pos * omega;
                out.push(ang.cos());
                out.push(ang.sin());
            }
        }
    }
    out
}

impl<B: Backend> FluxTransformer<B> {
    /// Loads the model from `w` (any supported layout) computing in `dtype` (f32 or f64).
    pub fn load(be: &B, w: &Weights, dtype: DType) -> Result<Self> {
        let w = normalize_layout(w)?;
        let json = read_config_json(w.dir())?;
        let cfg = FluxConfig::detect(&w, json.as_ref())?;
        Self::load_with_config(be, &w, cfg, dtype)
    }

    /// Loads the model from BFL-named weights with a known configuration.
    pub fn load_with_config(be: &B, w: &Weights, cfg: FluxConfig, dt: DType) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let m = cfg.mlp_hidden;
        let d = cfg.head_dim();
        let stream = |p: &str| -> Result<StreamWeights<B>> {
            Ok(StreamWeights {
                modulation: Linear::load(be, w, &format!("{p}_mod.lin"), 6 * h, h, true, dt)?,
                qkv: Linear::load(be, w, &format!("{p}_attn.qkv"), 3 * h, h, cfg.qkv_bias, dt)?,
                q_norm: w.get_as(be, &format!("{p}_attn.norm.query_norm.scale"), &[d], dt)?,
                k_norm: w.get_as(be, &format!("{p}_attn.norm.key_norm.scale"), &[d], dt)?,
                proj: Linear::load(be, w, &format!("{p}_attn.proj"), h, h, true, dt)?,
                mlp0: Linear::load(be, w, &format!("{p}_mlp.0"), m, h, true, dt)?,
                mlp2: Linear::load(be, w, &format!("{p}_mlp.2"), h, m, true, dt)?,
            })
        };
        let double = (0..cfg.depth)
            .map(|i| {
                Ok(DoubleBlock {
                    img: stream(&format!("double_blocks.{i}.img"))?,
                    txt: stream(&format!("double_blocks.{i}.txt"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.depth_single)
            .map(|i| {
                let p = format!("single_blocks.{i}");
                Ok(SingleBlock {
                    modulation: Linear::load(
                        be,
                        w,
                        &format!("{p}.modulation.lin"),
                        3 * h,
                        h,
                        true,
                        dt,
                    )?,
                    linear1: Linear::load(be, w, &format!("{p}.linear1"), 3 * h + m, h, true, dt)?,
                    linear2: Linear::load(be, w, &format!("{p}.linear2"), h, h + m, true, dt)?,
                    q_norm: w.get_as(be, &format!("{p}.norm.query_norm.scale"), &[d], dt)?,
                    k_norm: w.get_as(be, &format!("{p}.norm.key_norm.scale"), &[d], dt)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            img_in: Linear::load(be, w, "img_in", h, cfg.in_channels, true, dt)?,
            txt_in: Linear::load(be, w, "txt_in", h, cfg.context_in_dim, true, dt)?,
            time_in: MlpEmbedder::load(be, w, "time_in", 256, h, dt)?,
            guidance_in: if cfg.guidance_embed {
                Some(MlpEmbedder::load(be, w, "guidance_in", 256, h, dt)?)
            } else {
                None
            },
            vector_in: MlpEmbedder::load(be, w, "vector_in", cfg.vec_in_dim, h, dt)?,
            double,
            single,
            final_mod: Linear::load(be, w, "final_layer.adaLN_modulation.1", 2 * h, h, true, dt)?,
            final_linear: Linear::load(be, w, "final_layer.linear", cfg.out_channels, h, true, dt)?,
            cfg,
            dtype: dt,
            max_activation_bytes: usize::MAX,
        })
    }

    /// Keeps every token-wise activation (the qkv and MLP projections) within `bytes`, below
    /// what the backend allows, by running those layers over spans of tokens. The result is
    /// the same up to the rounding of the projections; peak memory goes down.
    #[must_use]
    pub fn with_max_activation_bytes(mut self, bytes: usize) -> Self {
        self.max_activation_bytes = bytes;
        self
    }

    /// The largest activation a token-wise layer may produce on `be`.
    fn activation_limit(&self, be: &B) -> usize {
        self.max_activation_bytes.min(be.max_activation_bytes())
    }

    /// The configuration.
    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The velocity `[B, L_img, out_channels]`.
    pub fn forward(&self, be: &B, inp: &FluxInputs<'_, B>) -> Result<Tensor<B>> {
        self.forward_tapped(be, inp, &mut |_, _| {})
    }

    /// [`FluxTransformer::forward`], reporting intermediate activations to `tap` under the
    /// reference names (`img_in`, `vec`, `double_blocks.0.img`, ...).
    pub fn forward_tapped(
        &self,
        be: &B,
        inp: &FluxInputs<'_, B>,
        tap: Tap<'_, B>,
    ) -> Result<Tensor<B>> {
        let cfg = &self.cfg;
        let dt = self.dtype;
        let (h, nh, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim());
        let s = inp.img.shape();
        if s.len() != 3 || s[2] != cfg.in_channels {
            return Err(WeightError::Config(format!(
                "img: expected [B, L, {}], found {s:?}",
                cfg.in_channels
            )));
        }
        let (b, li) = (s[0], s[1]);
        let lt = inp.txt.shape().get(1).copied().unwrap_or(0);
        if inp.txt.shape() != [b, lt, cfg.context_in_dim] {
            return Err(WeightError::Config(format!(
                "txt: expected [{b}, L, {}], found {:?}",
                cfg.context_in_dim,
                inp.txt.shape()
            )));
        }
        if inp.timesteps.len() != b
            || inp.img_ids.len() != b * li * 3
            || inp.txt_ids.len() != b * lt * 3
        {
            return Err(WeightError::Config(format!(
                "inputs: {} timesteps, {} img ids, {} txt ids for batch {b}, {li} image and {lt} text tokens",
                inp.timesteps.len(),
                inp.img_ids.len(),
                inp.txt_ids.len()
            )));
        }
        let img = self.img_in.fwd(be, inp.img)?;
        tap("img_in", &img);
        let t_emb = upload(be, &timestep_embedding(inp.timesteps), &[b, 256], dt)?;
        tap("t_emb", &t_emb);
        let time = self.time_in.fwd(be, &t_emb)?;
        tap("time_in", &time);
        let mut vec = time;
        if let Some(g_in) = &self.guidance_in {
            let g = inp
                .guidance
                .ok_or_else(|| WeightError::Config("this model needs a guidance value".into()))?;
            if g.len() != b {
                return Err(WeightError::Config(format!(
                    "{} guidance values for batch {b}",
                    g.len()
                )));
            }
            let g_emb = upload(be, &timestep_embedding(g), &[b, 256], dt)?;
            tap("g_emb", &g_emb);
            let ge = g_in.fwd(be, &g_emb)?;
            tap("guidance_in", &ge);
            vec = be.lincomb(&[(1.0, &vec), (1.0, &ge)])?;
        }
        let yv = self.vector_in.fwd(be, inp.y)?;
        tap("vector_in", &yv);
        vec = be.lincomb(&[(1.0, &vec), (1.0, &yv)])?;
        tap("vec", &vec);
        let mut txt = self.txt_in.fwd(be, inp.txt)?;
        tap("txt_in", &txt);
        let l = lt + li;
        let mut ids = Vec::with_capacity(b * l * 3);
        for bi in 0..b {
            ids.extend_from_slice(&inp.txt_ids[bi * lt * 3..(bi + 1) * lt * 3]);
            ids.extend_from_slice(&inp.img_ids[bi * li * 3..(bi + 1) * li * 3]);
        }
        let pe = upload(
            be,
            &rope_table(&ids, b, l, &cfg.axes_dim, cfg.theta),
            &[b, l, hd / 2, 2],
            dt,
        )?;
        tap("pe", &pe);
        let svec = be.activation(&vec, Activation::Silu)?;
        let mut img = img;
        for (i, blk) in self.double.iter().enumerate() {
            let mut tap_i = |n: &str, t: &Tensor<B>| {
                if i == 0 {
                    tap(&format!("double_blocks.0.{n}"), t);
                }
            };
            let (ni, nt) = self.double_block(be, blk, &img, &txt, &svec, &pe, &mut tap_i)?;
            img = ni;
            txt = nt;
            tap(&format!("double_blocks.{i}.img"), &img);
            tap(&format!("double_blocks.{i}.txt"), &txt);
        }
        let mut x = be.concat(&[&txt, &img], 1)?;
        for (i, blk) in self.single.iter().enumerate() {
            let mut tap_i = |n: &str, t: &Tensor<B>| {
                if i == 0 {
                    tap(&format!("single_blocks.0.{n}"), t);
                }
            };
            x = self.single_block(be, blk, &x, &svec, &pe, &mut tap_i)?;
            tap(&format!("single_blocks.{i}"), &x);
        }
        let img = be.narrow(&x, 1, lt, li)?;
        tap("final_layer_in", &img);
        let md = self.final_mod.fwd(be, &svec)?;
        tap("final_layer.adaLN_modulation", &md);
        let (shift, scale) = (be.narrow(&md, 1, 0, h)?, be.narrow(&md, 1, h, h)?);
        let xn = be.layer_norm_modulate(&img, &shift, &scale, 1e-6)?;
        let _ = nh;
        self.final_linear.fwd(be, &xn)
    }

    /// q, k, v `[B, L, nh, D]` from a qkv projection (the first `3H` channels of `qkv`
    /// `[B, L, C]`, read in place), with q and k RMS-normalised.
    fn split_qkv(
        &self,
        be: &B,
        qkv: &Tensor<B>,
        q_norm: &Tensor<B>,
        k_norm: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>, Tensor<B>)> {
        let (nh, d) = (self.cfg.num_heads, self.cfg.head_dim());
        let s = qkv.shape();
        let (b, l) = (s[0], s[1]);
        let part = |i: usize| -> Result<Tensor<B>> {
            let t = be.narrow(qkv, 2, i * nh * d, nh * d)?;
            Ok(t.reshape(&[b, l, nh, d])?)
        };
        let q = be.rms_norm(&part(0)?, Some(q_norm), 1e-6)?;
        let k = be.rms_norm(&part(1)?, Some(k_norm), 1e-6)?;
        Ok((q, k, part(2)?))
    }

    fn double_block(
        &self,
        be: &B,
        blk: &DoubleBlock<B>,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        svec: &Tensor<B>,
        pe: &Tensor<B>,
        tap: Tap<'_, B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let h = self.cfg.hidden_size;
        let lt = txt.shape()[1];
        let li = img.shape()[1];
        let b = img.shape()[0];
        let chunks = |m: &Tensor<B>| -> Result<Vec<Tensor<B>>> {
            (0..6).map(|i| Ok(be.narrow(m, 1, i * h, h)?)).collect()
        };
        let img_mod = blk.img.modulation.fwd(be, svec)?;
        tap("img_mod.lin", &img_mod);
        let im = chunks(&img_mod)?;
        let tm = chunks(&blk.txt.modulation.fwd(be, svec)?)?;
        // The qkv and MLP projections run over spans of tokens when their outputs would be
        // larger than the backend's activation limit.
        let limit = self.activation_limit(be);
        let row_bytes = b * (3 * h).max(self.cfg.mlp_hidden) * img.dtype().size_in_bytes();
        let pre = |x: &Tensor<B>, m: &[Tensor<B>], sw: &StreamWeights<B>| -> Result<_> {
            let x1 = be.layer_norm_modulate(x, &m[0], &m[1], 1e-6)?;
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for span in token_spans(x.shape()[1], row_bytes, limit) {
                let qkv = with_rows(be, &x1, span, |t| sw.qkv.fwd(be, t))?;
                let (q, k, v) = self.split_qkv(be, &qkv, &sw.q_norm, &sw.k_norm)?;
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            Ok((cat(be, qs, 1)?, cat(be, ks, 1)?, cat(be, vs, 1)?))
        };
        let (iq, ik, iv) = pre(img, &im, &blk.img)?;
        let (tq, tk, tv) = pre(txt, &tm, &blk.txt)?;
        let q = be.rope(&be.concat(&[&tq, &iq], 1)?, pe)?;
        let k = be.rope(&be.concat(&[&tk, &ik], 1)?, pe)?;
        let v = be.concat(&[&tv, &iv], 1)?;
        let att = be
            .attention(&q, &k, &v, None, None)?
            .reshape(&[b, lt + li, h])?;
        let t_att = be.narrow(&att, 1, 0, lt)?;
        let i_att = be.narrow(&att, 1, lt, li)?;
        tap("img_attn_out", &i_att);
        tap("txt_attn_out", &t_att);
        let post = |x: &Tensor<B>,
                    a: &Tensor<B>,
                    m: &[Tensor<B>],
                    sw: &StreamWeights<B>|
         -> Result<Tensor<B>> {
            let x = be.gated_add(x, &sw.proj.fwd(be, a)?, &m[2])?;
            let x2 = be.layer_norm_modulate(&x, &m[3], &m[4], 1e-6)?;
            let mut ys = Vec::new();
            for span in token_spans(x.shape()[1], row_bytes, limit) {
                let hmid = with_rows(be, &x2, span, |t| {
                    sw.mlp0.fwd_act(be, t, Activation::GeluTanh)
                })?;
                ys.push(sw.mlp2.fwd(be, &hmid)?);
            }
            Ok(be.gated_add(&x, &cat(be, ys, 1)?, &m[5])?)
        };
        Ok((
            post(img, &i_att, &im, &blk.img)?,
            post(txt, &t_att, &tm, &blk.txt)?,
        ))
    }

    fn single_block(
        &self,
        be: &B,
        blk: &SingleBlock<B>,
        x: &Tensor<B>,
        svec: &Tensor<B>,
        pe: &Tensor<B>,
        tap: Tap<'_, B>,
    ) -> Result<Tensor<B>> {
        let (h, m) = (self.cfg.hidden_size, self.cfg.mlp_hidden);
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let md = blk.modulation.fwd(be, svec)?;
        tap("modulation.lin", &md);
        let (shift, scale, gate) = (
            be.narrow(&md, 1, 0, h)?,
            be.narrow(&md, 1, h, h)?,
            be.narrow(&md, 1, 2 * h, h)?,
        );
        let x1 = be.layer_norm_modulate(x, &shift, &scale, 1e-6)?;
        // linear1's output is the widest activation of the model: over the backend's limit it
        // is computed for spans of tokens, and linear2 runs over the same spans.
        let row_bytes = b * (3 * h + m) * x.dtype().size_in_bytes();
        let spans = token_spans(l, row_bytes, self.activation_limit(be));
        let (mut qs, mut ks, mut vs, mut mlps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &span in &spans {
            let lin1 = with_rows(be, &x1, span, |t| blk.linear1.fwd(be, t))?;
            let mlp = be.narrow(&lin1, 2, 3 * h, m)?;
            mlps.push(be.activation(&mlp, Activation::GeluTanh)?);
            let (q, k, v) = self.split_qkv(be, &lin1, &blk.q_norm, &blk.k_norm)?;
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let q = be.rope(&cat(be, qs, 1)?, pe)?;
        let k = be.rope(&cat(be, ks, 1)?, pe)?;
        let att = be
            .attention(&q, &k, &cat(be, vs, 1)?, None, None)?
            .reshape(&[b, l, h])?;
        let mut outs = Vec::with_capacity(spans.len());
        for (&span, mlp) in spans.iter().zip(&mlps) {
            let l2in = with_rows(be, &att, span, |a| Ok(be.concat(&[a, mlp], 2)?))?;
            if spans.len() == 1 {
                tap("linear2_in", &l2in);
            }
            outs.push(blk.linear2.fwd(be, &l2in)?);
        }
        Ok(be.gated_add(x, &cat(be, outs, 1)?, &gate)?)
    }
}

#[cfg(test)]
mod tests {
    use super::token_spans;

    #[test]
    fn token_spans_tile_the_tokens_within_the_limit() {
        for len in [1usize, 7, 25, 4608] {
            for (row, limit) in [
                (100usize, usize::MAX),
                (100, 1000),
                (100, 999),
                (100, 50),
                (3, 7),
            ] {
                let spans = token_spans(len, row, limit);
                let per = (limit / row).max(1);
                assert_eq!(spans.len(), len.div_ceil(per), "len {len}, {row} x {limit}");
                let mut next = 0;
                for &(start, n) in &spans {
                    assert_eq!(start, next);
                    assert!(n >= 1 && n <= per, "len {len}: span of {n} > {per}");
                    next += n;
                }
                assert_eq!(next, len);
            }
        }
    }
}
