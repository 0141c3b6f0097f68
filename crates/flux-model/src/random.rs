//! Random-weight Flux transformers of any shape, for benchmarks and smoke tests.

use crate::transformer::FluxConfig;
use crate::weights::{WeightError, Weights};
use flux_kernels::DType;

/// A small deterministic generator (xorshift64*), uniform in [-1, 1).
#[derive(Clone, Copy)]
struct Rng(u64);

impl Rng {
    /// The xorshift state update (linear over GF(2)).
    fn advance(&mut self) {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
    }

    fn next(&mut self) -> f32 {
        self.advance();
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A number of [`Rng::advance`] steps at once: the update is linear over GF(2), so `k` steps
/// are a 64x64 bit matrix (column `j`: the image of bit `j`). Lets the stream be cut into
/// pieces generated in parallel with the values of the sequential stream.
#[derive(Clone, Copy)]
struct Jump([u64; 64]);

impl Jump {
    fn one_step() -> Self {
        Jump(std::array::from_fn(|j| {
            let mut r = Rng(1u64 << j);
            r.advance();
            r.0
        }))
    }

    fn identity() -> Self {
        Jump(std::array::from_fn(|j| 1u64 << j))
    }

    fn apply(&self, mut s: u64) -> u64 {
        let mut out = 0;
        while s != 0 {
            out ^= self.0[s.trailing_zeros() as usize];
            s &= s - 1;
        }
        out
    }

    /// `self` then `next`.
    fn then(&self, next: &Jump) -> Jump {
        Jump(std::array::from_fn(|j| next.apply(self.0[j])))
    }

    /// `k` steps.
    fn steps(k: u64) -> Self {
        let (mut acc, mut base, mut k) = (Jump::identity(), Jump::one_step(), k);
        while k != 0 {
            if k & 1 == 1 {
                acc = acc.then(&base);
            }
            base = base.then(&base);
            k >>= 1;
        }
        acc
    }
}

/// Fills `out` with the values `value` yields, encoded as `dtype` (f32, bf16 or f16).
fn write_values(out: &mut [u8], dtype: DType, mut value: impl FnMut() -> f32) {
    // Each value's bytes are one fixed-size array store.
    fn put<const N: usize>(out: &mut [u8], mut bytes: impl FnMut() -> [u8; N]) {
        for o in out.as_chunks_mut::<N>().0 {
            *o = bytes();
        }
    }
    match dtype {
        DType::F32 => put(out, || value().to_le_bytes()),
        DType::BF16 => put(out, || half::bf16::from_f32(value()).to_le_bytes()),
        DType::F8E4M3 => put(out, || [flux_kernels::cpu::f32_to_f8e4m3(value())]),
        _ => put(out, || half::f16::from_f32(value()).to_le_bytes()),
    }
}

/// Elements generated per parallel piece.
const PIECE: usize = 1 << 20;

/// Writes the weights' bytes into `out` (laid out tensor after tensor as `list` gives them):
/// one xorshift stream over all tensors in order, each value scaled by its tensor's amplitude
/// (amplitude 0: the constant 1, drawing nothing). Pieces of `piece` values run in parallel,
/// each starting from the stream state a jump ahead gives, so the bytes do not depend on
/// `piece` or the thread count.
fn fill(out: &mut [u8], list: &[(String, Vec<usize>, f32)], dtype: DType, seed: u64, piece: usize) {
    use rayon::prelude::*;
    let size = dtype.size_in_bytes();
    let piece_jump = Jump::steps(piece as u64);
    let mut state = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut rest = out;
    for (_, shape, a) in list {
        let n: usize = shape.iter().product();
        let (bytes, tail) = rest.split_at_mut(n * size);
        rest = tail;
        if *a == 0.0 {
            write_values(bytes, dtype, || 1.0);
            continue;
        }
        let mut starts = Vec::with_capacity(n.div_ceil(piece));
        let mut s = state;
        for _ in 0..n.div_ceil(piece) {
            starts.push(s);
            s = Rng(piece_jump.apply(s.0));
        }
        bytes
            .par_chunks_mut(piece * size)
            .zip(starts)
            .for_each(|(o, mut rng)| write_values(o, dtype, || rng.next() * a));
        state = Rng(Jump::steps(n as u64).apply(state.0));
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

/// Random weights for `cfg` stored as `dtype` (f32, bf16, f16 or fp8 e4m3) in one in-memory safetensors
/// buffer. Norm scales are 1; linear weights uniform with variance 1/fan_in.
pub fn random_weights(cfg: &FluxConfig, dtype: DType, seed: u64) -> Result<Weights, WeightError> {
    let (tag, size) = match dtype {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
        DType::F8E4M3 => ("F8_E4M3", 1),
        d @ DType::F64 => {
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
    // Zeroed allocation: the pages are mapped lazily, and every data byte is written below.
    let mut buf = vec![0u8; 8 + text.len() + off];
    buf[..8].copy_from_slice(&(text.len() as u64).to_le_bytes());
    buf[8..8 + text.len()].copy_from_slice(text.as_bytes());
    fill(&mut buf[8 + text.len()..], &list, dtype, seed, PIECE);
    Weights::from_bytes(buf, "random weights")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream as one sequential loop (how the values are defined).
    fn sequential(list: &[(String, Vec<usize>, f32)], dtype: DType, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut out = Vec::new();
        for (_, shape, a) in list {
            for _ in 0..shape.iter().product::<usize>() {
                let x = if *a == 0.0 { 1.0 } else { rng.next() * a };
                match dtype {
                    DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                    // The nearest e4m3 value by search over the decoded codes (ties: even).
                    DType::F8E4M3 => out.push(
                        (0..=0x7eu8)
                            .min_by(|&a, &b| {
                                let d =
                                    |c: u8| (flux_kernels::cpu::f8e4m3_to_f32(c) - x.abs()).abs();
                                d(a).total_cmp(&d(b)).then((a % 2).cmp(&(b % 2)))
                            })
                            .map_or(0, |c| c | if x < 0.0 { 0x80 } else { 0 }),
                    ),
                    _ => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                }
            }
        }
        out
    }

    #[test]
    fn jumps_compose_like_single_steps() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        let s0 = r.0;
        for _ in 0..1000 {
            r.advance();
        }
        assert_eq!(Jump::steps(1000).apply(s0), r.0);
        assert_eq!(Jump::steps(0).apply(s0), s0);
    }

    #[test]
    fn parallel_pieces_give_the_sequential_stream() {
        let list = vec![
            ("a".to_string(), vec![5, 7], 0.5),
            ("norm".to_string(), vec![9], 0.0),
            ("b".to_string(), vec![23], 2.0),
            ("c".to_string(), vec![1, 64], 0.1),
        ];
        for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
            let want = sequential(&list, dtype, 11);
            for piece in [1, 7, 16, 1 << 20] {
                let mut got = vec![0u8; want.len()];
                fill(&mut got, &list, dtype, 11, piece);
                assert!(got == want, "{dtype:?}, pieces of {piece}: bytes differ");
            }
        }
    }
}
