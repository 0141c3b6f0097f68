//! Random-weight Flux transformers of any shape, for benchmarks and smoke tests.

use crate::transformer::FluxConfig;
use crate::weights::{WeightError, Weights};
use flux_kernels::DType;

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Names and shapes of every tensor of a model with this configuration (BFL names), with the
/// uniform range of its values.
fn tensor_list(cfg: &FluxConfig) -> Vec<(String, Vec<usize>, f32)> {
    let (h, m, d) = (cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim());
    let mut v: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let mut lin = |name: String, out: usize, inp: usize, gain: f32| {
        let a = gain * (3.0 / inp as f32).sqrt();
        v.push((format!("{name}.weight"), vec![out, inp], a));
        v.push((format!("{name}.bias"), vec![out], 0.05));
    };
    lin("img_in".into(), h, cfg.in_channels, 1.0);
    lin("txt_in".into(), h, cfg.context_in_dim, 1.0);
    let mut embedders = vec![("time_in", 256), ("vector_in", cfg.vec_in_dim)];
    if cfg.guidance_embed {
        embedders.push(("guidance_in", 256));
    }
    for (e, inp) in embedders {
        lin(format!("{e}.in_layer"), h, inp, 1.0);
        lin(format!("{e}.out_layer"), h, h, 1.0);
    }
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            lin(format!("{p}_mod.lin"), 6 * h, h, 0.5);
            lin(format!("{p}_attn.qkv"), 3 * h, h, 1.0);
            lin(format!("{p}_attn.proj"), h, h, 1.0);
            lin(format!("{p}_mlp.0"), m, h, 1.0);
            lin(format!("{p}_mlp.2"), h, m, 1.0);
        }
    }
    for i in 0..cfg.depth_single {
        let p = format!("single_blocks.{i}");
        lin(format!("{p}.modulation.lin"), 3 * h, h, 0.5);
        lin(format!("{p}.linear1"), 3 * h + m, h, 1.0);
        lin(format!("{p}.linear2"), h, h + m, 1.0);
    }
    lin("final_layer.adaLN_modulation.1".into(), 2 * h, h, 0.5);
    lin("final_layer.linear".into(), cfg.out_channels, h, 1.0);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                v.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![d],
                    0.0,
                ));
            }
        }
    }
    for i in 0..cfg.depth_single {
        for n in ["query_norm", "key_norm"] {
            v.push((format!("single_blocks.{i}.norm.{n}.scale"), vec![d], 0.0));
        }
    }
    v
}

/// Random weights for `cfg` stored as `dtype` (f32, bf16 or f16) in one in-memory safetensors
/// buffer. Norm scales are 1; linear weights uniform with variance 1/fan_in.
pub fn random_weights(cfg: &FluxConfig, dtype: DType, seed: u64) -> Result<Weights, WeightError> {
    let (tag, size) = match dtype {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
        d => {
            return Err(WeightError::Config(format!(
                "random weights in {d} are not supported"
            )));
        }
    };
    let list = tensor_list(cfg);
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, _) in &list {
        let n: usize = shape.iter().product::<usize>() * size;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": tag, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut buf = Vec::with_capacity(8 + text.len() + off);
    buf.extend_from_slice(&(text.len() as u64).to_le_bytes());
    buf.extend_from_slice(text.as_bytes());
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for (_, shape, a) in &list {
        let n: usize = shape.iter().product();
        for _ in 0..n {
            let x = if *a == 0.0 { 1.0 } else { rng.next() * a };
            match dtype {
                DType::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                DType::BF16 => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                _ => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            }
        }
    }
    Weights::from_bytes(buf, "random weights")
}
