//! The transformer with its token-wise layers run over spans of tokens (as on a backend whose
//! activation limit is below the widest projection) against the same model in one piece: the
//! spans change which rows each projection sees at once, nothing else, so the outputs agree
//! up to the rounding of the projections.

use flux_kernels::{Cpu, DType, HostData, SamplerOps, Tensor};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};

fn config() -> FluxConfig {
    FluxConfig {
        in_channels: 16,
        out_channels: 16,
        vec_in_dim: 24,
        context_in_dim: 40,
        hidden_size: 96,
        mlp_hidden: 192,
        num_heads: 3,
        depth: 2,
        depth_single: 2,
        axes_dim: vec![8, 12, 12],
        theta: 10000.0,
        qkv_bias: true,
        guidance_embed: true,
    }
}

/// Pseudo-random values in [-1, 1) (SplitMix64).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// One forward (batch 2, 25 image and 7 text tokens) with activations capped at `limit` bytes.
fn forward(dtype: DType, limit: Option<usize>) -> Vec<f64> {
    let cfg = config();
    let w = random_weights(&cfg, DType::F32, 5).unwrap();
    let mut model = FluxTransformer::load_with_config(&Cpu, &w, cfg, dtype).unwrap();
    if let Some(bytes) = limit {
        model = model.with_max_activation_bytes(bytes);
    }
    let (b, li, lt, side) = (2, 25, 7, 5);
    let up = |v: Vec<f64>, shape: &[usize]| -> Tensor<Cpu> {
        Cpu.upload(HostData::F64(&v), shape, dtype).unwrap()
    };
    let img = up(values(b * li * 16, 1), &[b, li, 16]);
    let txt = up(values(b * lt * 40, 2), &[b, lt, 40]);
    let y = up(values(b * 24, 3), &[b, 24]);
    let img_ids: Vec<f64> = (0..b * li)
        .flat_map(|t| [0.0, ((t % li) / side) as f64, ((t % li) % side) as f64])
        .collect();
    let txt_ids = vec![0.0; b * lt * 3];
    let inp = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &[0.7, 0.3],
        y: &y,
        guidance: Some(&[3.5, 2.0]),
    };
    let out = model.forward(&Cpu, &inp).unwrap();
    Cpu.download_f64(&out).unwrap()
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let d: f64 = b.iter().map(|y| y * y).sum();
    (n / d).sqrt()
}

#[test]
fn spans_of_tokens_give_the_one_piece_result() {
    // Widest rows: single-block linear1, 2 x (3 x 96 + 192) values = 3840 bytes in f32. The
    // limits give spans of 8, 3 and 1 token(s) there, and of up to 14 tokens in the double
    // blocks.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let whole = forward(dtype, None);
        assert!(whole.iter().all(|v| v.is_finite()));
        let es = dtype.size_in_bytes();
        for limit in [8 * 960 * es, 3 * 960 * es, 1] {
            let spans = forward(dtype, Some(limit));
            let e = rel_l2(&spans, &whole);
            assert!(e < tol, "{dtype}, limit {limit} bytes: rel_l2 {e:.3e}");
        }
    }
}
