//! The autoencoder and the text encoders on the CPU backend with random f32 weights: VAE encode
//! and decode of a 512x512 image with the released `ae` configuration, T5 v1.1 XXL width
//! (d_model 4096, d_ff 10240, 64 heads) with 2 layers over 256 tokens (the schnell length; the
//! vocabulary is cut to 1024 rows since only the gathered rows cost time), and CLIP-L width
//! (768, 12 heads) with 2 layers over 77 tokens.
//!
//! A VAE pass takes seconds on a 2-core machine, so those benches use criterion's minimum of 10
//! samples.

use criterion::{Criterion, criterion_group, criterion_main};
use flux_kernels::{Conv2dParams, ConvOps, Cpu, DType, HostData, SamplerOps, Tensor};
use flux_model::clip::{ClipConfig, ClipTextModel};
use flux_model::t5::{T5Config, T5Encoder};
use flux_model::tensor_source::random_source;
use flux_model::vae::{Vae, VaeConfig};
use std::hint::black_box;
use std::time::Duration;

fn smooth(shape: &[usize]) -> Tensor<Cpu> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.001).sin() * 0.8).collect();
    Cpu.upload(HostData::F64(&v), shape, DType::F32).unwrap()
}

fn vae(c: &mut Criterion) {
    let cfg = VaeConfig::flux();
    let mut src = random_source(&Cpu, &cfg.weight_shapes(), 1, DType::F32).unwrap();
    let vae = Vae::load(cfg, &mut src).unwrap();
    let image = smooth(&[1, 3, 512, 512]);
    let latent = smooth(&[1, 16, 64, 64]);
    let mut g = c.benchmark_group("cpu_vae_512");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("cpu_vae_encode_512", |b| {
        b.iter(|| black_box(vae.encode(&Cpu, &image).unwrap()));
    });
    g.bench_function("cpu_vae_decode_512", |b| {
        b.iter(|| black_box(vae.decode(&Cpu, &latent).unwrap()));
    });
    g.finish();
}

/// The autoencoder's dominant convolutions on their own: 3x3 at the full-resolution width of a
/// 512x512 decode (128 channels, 512x512, the decoder's last level), and at the latent width
/// (512 channels, 64x64).
fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_vae_conv");
    g.sample_size(10);
    for (ch, side) in [(128usize, 512usize), (512, 64)] {
        let x = smooth(&[1, ch, side, side]);
        let w = smooth(&[ch, ch, 3, 3]);
        let b = smooth(&[ch]);
        g.bench_function(format!("cpu_conv3x3_{ch}ch_{side}"), |bn| {
            bn.iter(|| black_box(Cpu.conv2d(&x, &w, Some(&b), Conv2dParams::same(1)).unwrap()));
        });
    }
    g.finish();
}

fn text(c: &mut Criterion) {
    let t5cfg = T5Config {
        vocab_size: 1024,
        num_layers: 2,
        ..T5Config::xxl()
    };
    let mut src = random_source(&Cpu, &t5cfg.weight_shapes(), 2, DType::F32).unwrap();
    let t5 = T5Encoder::load(&Cpu, t5cfg, &mut src).unwrap();
    let ids: Vec<u32> = (0..256u32).map(|i| (i * 37) % 1024).collect();
    let mut g = c.benchmark_group("cpu_text");
    g.sample_size(10);
    g.bench_function("cpu_t5_xxl_2layers_256tok", |b| {
        b.iter(|| black_box(t5.forward(&Cpu, &ids, 1, DType::F32).unwrap()));
    });
    drop(t5);
    let ccfg = ClipConfig {
        num_layers: 2,
        ..ClipConfig::large()
    };
    let mut src = random_source(&Cpu, &ccfg.weight_shapes(), 3, DType::F32).unwrap();
    let clip = ClipTextModel::load(ccfg, &mut src).unwrap();
    let ids: Vec<u32> = (0..77u32).map(|i| (i * 641) % 49408).collect();
    g.bench_function("cpu_clip_l_2layers_77tok", |b| {
        b.iter(|| black_box(clip.forward(&Cpu, &ids, 1, DType::F32).unwrap()));
    });
    g.finish();
}

criterion_group!(benches, text, conv, vae);
criterion_main!(benches);
