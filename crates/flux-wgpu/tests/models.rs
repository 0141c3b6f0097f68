//! Whole networks on wgpu against the CPU backend, both in f32: a small Flux transformer with
//! random f32 and bf16 weights and a small autoencoder. This exercises the op chains, the
//! shared command encoder and the buffer pool together (buffers freed and reused between ops
//! that are recorded but not yet submitted).

mod common;

use flux_kernels::{Backend, Cpu, DType, HostData, Tensor};
use flux_model::random::random_weights;
use flux_model::tensor_source::random_source;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
use flux_model::vae::{Vae, VaeConfig};

/// Relative L2 distance `|a - b| / |b|`.
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "output lengths differ");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn small_flux() -> FluxConfig {
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

/// One transformer forward on `be` with weights of `wdt`, downloaded as f64.
fn flux_forward<B: Backend>(be: &B, wdt: DType) -> Vec<f64> {
    let cfg = small_flux();
    let w = random_weights(&cfg, wdt, 5).expect("random weights");
    let model = FluxTransformer::load_with_config(be, &w, cfg.clone(), DType::F32).expect("load");
    let (b, li, lt, side) = (2, 25, 7, 5);
    let up = |v: Vec<f32>, shape: &[usize]| -> Tensor<B> {
        be.upload(HostData::F32(&v), shape, DType::F32)
            .expect("upload")
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
    let out = model.forward(be, &inp).expect("forward");
    be.download_f64(&out).expect("download")
}

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn flux_transformer_matches_cpu() {
    let Some(be) = common::backend() else { return };
    for wdt in [DType::F32, DType::BF16] {
        let got = flux_forward(&be, wdt);
        let want = flux_forward(&Cpu, wdt);
        let e = rel_l2(&got, &want);
        assert!(e < 1e-5, "{wdt} weights: rel_l2 {e:.3e} against the CPU");
    }
}

/// The same model on a device whose storage bindings hold 32 KiB: the single blocks' linear1
/// output (120 KiB), the MLP hidden layers (37.5 KiB) and linear2's input (72 KiB) are over it,
/// so the transformer runs those layers over spans of tokens (the backend refuses any binding
/// over its limit, so a forward that did not split would fail), and the weights over it are
/// stored in chunks. The result must still match the CPU's, computed in one piece.
#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn flux_transformer_matches_cpu_within_small_bindings() {
    let Some(be) = common::backend_with(flux_wgpu::WgpuOptions {
        max_binding_bytes: Some(32 << 10),
        ..flux_wgpu::WgpuOptions::default()
    }) else {
        return;
    };
    assert_eq!(flux_kernels::ModelOps::max_activation_bytes(&be), 32 << 10);
    let got = flux_forward(&be, DType::F32);
    let want = flux_forward(&Cpu, DType::F32);
    let e = rel_l2(&got, &want);
    assert!(e < 1e-5, "rel_l2 {e:.3e} against the CPU");
}

fn small_vae() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        ch: 16,
        out_ch: 3,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        z_channels: 4,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
        groups: 4,
        eps: 1e-6,
    }
}

/// Encodes an `h x w` image and decodes the latent on `be`: latent and image as f64.
fn vae_roundtrip<B: Backend>(be: &B, h: usize, w: usize) -> Vec<f64> {
    let cfg = small_vae();
    let img = values(3 * h * w, 7);
    let mut src = random_source(be, &cfg.weight_shapes(), 9, DType::F32).expect("src");
    let vae = Vae::load(cfg, &mut src).expect("load");
    let x = be
        .upload(HostData::F32(&img), &[1, 3, h, w], DType::F32)
        .expect("upload");
    let z = vae.encode(be, &x).expect("encode");
    let y = vae.decode(be, &z).expect("decode");
    let mut v = be.download_f64(&z).expect("z");
    v.extend(be.download_f64(&y).expect("y"));
    v
}

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn autoencoder_matches_cpu() {
    let Some(be) = common::backend() else { return };
    let e = rel_l2(&vae_roundtrip(&be, 18, 14), &vae_roundtrip(&Cpu, 18, 14));
    assert!(e < 1e-5, "rel_l2 {e:.3e} against the CPU");
}

/// The autoencoder on a device whose storage bindings hold 40 KiB: its full-resolution
/// activations (32 channels of 34x30, 127.5 KiB) are over it, so encode and decode run over
/// tiles of 4 latent pixels (a forward that did not tile would be refused), and the result must
/// match the CPU's untiled one. (Its largest weight, 36 KiB, fits.)
#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn autoencoder_matches_cpu_within_small_bindings() {
    let Some(be) = common::backend_with(flux_wgpu::WgpuOptions {
        max_binding_bytes: Some(40 << 10),
        ..flux_wgpu::WgpuOptions::default()
    }) else {
        return;
    };
    let e = rel_l2(&vae_roundtrip(&be, 34, 30), &vae_roundtrip(&Cpu, 34, 30));
    assert!(e < 1e-5, "rel_l2 {e:.3e} against the CPU");
}
