//! The wgpu backend: matmul (FLOP/s), attention and the fused lincomb (bytes/s), and with
//! `FLUX_BENCH_LARGE=1` the real-size cases for a GPU: square matmuls up to 8192, attention at
//! 4096 + 512 tokens with 24 heads of 128, and one full Flux.1-dev transformer forward at
//! 1024x1024 (4096 image + 512 text tokens, random bf16 weights; `FLUX_BENCH_BLOCKS=D,S` picks
//! fewer double/single blocks). Every timed iteration ends with a device synchronisation.
//! Without an adapter the benches print "skipped: no adapter" and measure nothing.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flux_kernels::{DType, HostData, ModelOps, SamplerOps, Tensor};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
use flux_wgpu::Wgpu;
use std::hint::black_box;

fn large() -> bool {
    std::env::var("FLUX_BENCH_LARGE").is_ok_and(|v| v == "1")
}

fn backend() -> Option<Wgpu> {
    match Wgpu::new() {
        Ok(be) => {
            eprintln!(
                "wgpu adapter: {} ({:?}, {:?})",
                be.adapter_info().name,
                be.adapter_info().backend,
                be.adapter_info().device_type
            );
            Some(be)
        }
        Err(e) => {
            eprintln!("skipped: no adapter ({e})");
            None
        }
    }
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn upload(be: &Wgpu, shape: &[usize], seed: u64) -> Tensor<Wgpu> {
    let n = shape.iter().product();
    be.upload(HostData::F32(&rand(n, seed)), shape, DType::F32)
        .expect("upload")
}

fn bf16_weight(be: &Wgpu, n: usize, k: usize) -> Tensor<Wgpu> {
    let bytes: Vec<u8> = rand(n * k, 9)
        .into_iter()
        .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    be.upload_weight(
        flux_kernels::ByteView::from_vec(bytes),
        &[n, k],
        DType::BF16,
        None,
    )
    .expect("weight")
}

fn bench_matmul(c: &mut Criterion) {
    let Some(be) = backend() else { return };
    let sizes: &[usize] = if large() {
        &[1024, 4096, 8192]
    } else {
        &[128, 256]
    };
    let mut g = c.benchmark_group("wgpu_matmul");
    g.sample_size(10);
    for &s in sizes {
        let a = upload(&be, &[s, s], 1);
        let b = upload(&be, &[s, s], 2);
        g.throughput(Throughput::Elements((2 * s * s * s) as u64));
        g.bench_with_input(BenchmarkId::new("wgpu_matmul_f32", s), &s, |bch, _| {
            bch.iter(|| {
                let c = be.matmul(&a, &b, false).expect("matmul");
                be.synchronize().expect("sync");
                black_box(c)
            });
        });
        // A linear layer with a bf16 weight, as the transformer runs them.
        let w = bf16_weight(&be, s, s);
        g.bench_with_input(BenchmarkId::new("wgpu_linear_bf16", s), &s, |bch, _| {
            bch.iter(|| {
                let c = be.linear(&a, &w, None).expect("linear");
                be.synchronize().expect("sync");
                black_box(c)
            });
        });
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let Some(be) = backend() else { return };
    let (l, h, d) = if large() {
        (4608, 24, 128)
    } else {
        (256, 4, 64)
    };
    let q = upload(&be, &[1, l, h, d], 3);
    let k = upload(&be, &[1, l, h, d], 4);
    let v = upload(&be, &[1, l, h, d], 5);
    let mut g = c.benchmark_group("wgpu_attention");
    g.sample_size(10);
    g.throughput(Throughput::Elements((4 * l * l * h * d) as u64));
    g.bench_function(format!("wgpu_attention_{l}tok_{h}x{d}"), |bch| {
        bch.iter(|| {
            let o = be.attention(&q, &k, &v, None, None).expect("attention");
            be.synchronize().expect("sync");
            black_box(o)
        });
    });
    g.finish();
}

fn bench_lincomb(c: &mut Criterion) {
    let Some(be) = backend() else { return };
    let shape: [usize; 4] = if large() {
        [4, 16, 128, 128]
    } else {
        [1, 16, 64, 64]
    };
    let n: usize = shape.iter().product();
    let ts: Vec<Tensor<Wgpu>> = (0..4).map(|i| upload(&be, &shape, 10 + i)).collect();
    let mut out = be.zeros(&shape, DType::F32).expect("zeros");
    let mut g = c.benchmark_group("wgpu_lincomb");
    g.throughput(Throughput::Bytes((5 * n * 4) as u64));
    g.bench_function(format!("wgpu_lincomb_4terms_{n}"), |bch| {
        bch.iter(|| {
            let terms: Vec<(f64, &Tensor<Wgpu>)> = ts
                .iter()
                .enumerate()
                .map(|(i, t)| (0.1 * i as f64 + 0.3, t))
                .collect();
            be.lincomb_into(&mut out, &terms).expect("lincomb");
            be.synchronize().expect("sync");
        });
    });
    g.finish();
}

/// FLOPs of one Flux forward: per block `2 (12 H^2 L + 2 L^2 H)` (linears plus attention);
/// single blocks have the same linear width as double blocks in total.
fn forward_flops(cfg: &FluxConfig, l: usize) -> f64 {
    let (h, l) = (cfg.hidden_size as f64, l as f64);
    let per_block = 2.0 * (12.0 * h * h * l + 2.0 * l * l * h);
    per_block * (cfg.depth + cfg.depth_single) as f64
}

fn bench_flux_step(c: &mut Criterion) {
    if !large() {
        return;
    }
    let Some(be) = backend() else { return };
    let (double, single) = std::env::var("FLUX_BENCH_BLOCKS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .unwrap_or((19, 38));
    let cfg = FluxConfig {
        depth: double,
        depth_single: single,
        ..FluxConfig::dev()
    };
    let (li, lt) = (4096, 512);
    let w = random_weights(&cfg, DType::BF16, 11).expect("random weights");
    let model = FluxTransformer::load_with_config(&be, &w, cfg.clone(), DType::F32).expect("load");
    drop(w);
    let img = upload(&be, &[1, li, cfg.in_channels], 21);
    let txt = upload(&be, &[1, lt, cfg.context_in_dim], 22);
    let y = upload(&be, &[1, cfg.vec_in_dim], 23);
    let img_ids: Vec<f64> = (0..li)
        .flat_map(|t| [0.0, (t / 64) as f64, (t % 64) as f64])
        .collect();
    let txt_ids = vec![0.0; lt * 3];
    let mut g = c.benchmark_group("wgpu_flux_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements(forward_flops(&cfg, li + lt) as u64));
    g.bench_function(
        format!("wgpu_flux_dev_forward_1024px_{double}d{single}s_bf16"),
        |bch| {
            bch.iter(|| {
                let inp = FluxInputs {
                    img: &img,
                    img_ids: &img_ids,
                    txt: &txt,
                    txt_ids: &txt_ids,
                    timesteps: &[0.5],
                    y: &y,
                    guidance: Some(&[3.5]),
                };
                let o = model.forward(&be, &inp).expect("forward");
                be.synchronize().expect("sync");
                black_box(o)
            });
        },
    );
    g.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_attention,
    bench_lincomb,
    bench_flux_step
);
criterion_main!(benches);
