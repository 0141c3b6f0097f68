//! Flux transformer on the CPU backend: real-size blocks (hidden 3072, 24 heads, axes 16/56/56,
//! 256 image + 64 text tokens) with random f32 and bf16 weights, the whole tiny reference model,
//! attention alone at 320 and 1024 tokens, the linear layers, and a plain square GEMM of the
//! `gemm` crate for reference. Throughputs are in FLOP ("elements" in criterion's report).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flux_kernels::cpu::gemm::{Mat, gemm, pool_parallelism};
use flux_kernels::{Cpu, DType, HostData, ModelOps, SamplerOps, Tensor};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
use flux_model::weights::Weights;
use std::hint::black_box;
use std::path::Path;

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

fn upload(v: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    Cpu.upload(HostData::F32(v), shape, DType::F32).unwrap()
}

struct Case {
    model: FluxTransformer<Cpu>,
    img: Tensor<Cpu>,
    txt: Tensor<Cpu>,
    y: Tensor<Cpu>,
    img_ids: Vec<f64>,
    txt_ids: Vec<f64>,
    batch: usize,
}

impl Case {
    fn new(model: FluxTransformer<Cpu>, li: usize, lt: usize, batch: usize) -> Self {
        let c = model.config().clone();
        let side = (li as f64).sqrt().ceil() as usize;
        Self {
            img: upload(
                &rand(batch * li * c.in_channels, 1),
                &[batch, li, c.in_channels],
            ),
            txt: upload(
                &rand(batch * lt * c.context_in_dim, 2),
                &[batch, lt, c.context_in_dim],
            ),
            y: upload(&rand(batch * c.vec_in_dim, 3), &[batch, c.vec_in_dim]),
            img_ids: (0..batch * li)
                .flat_map(|t| [0.0, ((t % li) / side) as f64, ((t % li) % side) as f64])
                .collect(),
            txt_ids: vec![0.0; batch * lt * 3],
            batch,
            model,
        }
    }

    fn forward(&self) -> Tensor<Cpu> {
        let ts = vec![0.5; self.batch];
        let g = vec![3.5; self.batch];
        let inp = FluxInputs {
            img: &self.img,
            img_ids: &self.img_ids,
            txt: &self.txt,
            txt_ids: &self.txt_ids,
            timesteps: &ts,
            y: &self.y,
            guidance: Some(&g),
        };
        self.model.forward(&Cpu, &inp).unwrap()
    }
}

fn real_cfg(double: usize, single: usize) -> FluxConfig {
    FluxConfig {
        depth: double,
        depth_single: single,
        ..FluxConfig::dev()
    }
}

fn block_flops(h: f64, l: f64) -> f64 {
    2.0 * (12.0 * h * h * l + 2.0 * l * l * h)
}

fn bench_blocks(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_flux_block");
    g.sample_size(10);
    let (li, lt) = (256, 64);
    let l = (li + lt) as f64;
    for (label, double, single) in [("double", 1, 0), ("single", 0, 1)] {
        for (wname, wdt) in [("f32", DType::F32), ("bf16", DType::BF16)] {
            let cfg = real_cfg(double, single);
            let w = random_weights(&cfg, wdt, 11).unwrap();
            let m = FluxTransformer::load_with_config(&Cpu, &w, cfg, DType::F32).unwrap();
            let case = Case::new(m, li, lt, 1);
            // Per block (the embedders and the final layer add about 3%).
            g.throughput(Throughput::Elements(block_flops(3072.0, l) as u64));
            g.bench_function(format!("cpu_flux_{label}_block_3072_320tok_{wname}"), |b| {
                b.iter(|| black_box(case.forward()));
            });
        }
    }
    g.finish();
}

fn bench_tiny(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/flux-tiny/transformer-dev");
    let Ok(w) = Weights::open(&dir.join("weights.safetensors")) else {
        return;
    };
    let m = FluxTransformer::load(&Cpu, &w, DType::F32).unwrap();
    let case = Case::new(m, 16, 7, 1);
    c.bench_function("cpu_flux_tiny_forward_f32", |b| {
        b.iter(|| black_box(case.forward()));
    });
}

fn bench_attention(c: &mut Criterion) {
    let (h, d) = (24, 128);
    let mut g = c.benchmark_group("cpu_attention");
    g.sample_size(10);
    // The sequence of the real-size block bench (256 image + 64 text tokens), and a longer one.
    for l in [320, 1024] {
        let q = upload(&rand(l * h * d, 4), &[1, l, h, d]);
        let k = upload(&rand(l * h * d, 5), &[1, l, h, d]);
        let v = upload(&rand(l * h * d, 6), &[1, l, h, d]);
        g.throughput(Throughput::Elements((4 * l * l * h * d) as u64));
        g.bench_function(format!("cpu_attention_{l}tok_24x128_f32"), |b| {
            b.iter(|| black_box(Cpu.attention(&q, &k, &v, None, None).unwrap()));
        });
    }
    g.finish();
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_matmul");
    g.sample_size(10);
    let n = 2048;
    let a = rand(n * n, 7);
    let bm = rand(n * n, 8);
    let mut out = vec![0f32; n * n];
    g.throughput(Throughput::Elements((2 * n * n * n) as u64));
    g.bench_function("cpu_gemm_crate_square_2048_f32", |b| {
        b.iter(|| {
            gemm(
                n,
                n,
                n,
                &mut out,
                n,
                false,
                Mat {
                    data: &a,
                    rs: n,
                    cs: 1,
                },
                Mat {
                    data: &bm,
                    rs: n,
                    cs: 1,
                },
                1.0,
                pool_parallelism(),
            );
            black_box(&out);
        });
    });
    // The largest linear of a block: 320 tokens x 3072 -> 12288.
    let (m, k, nn) = (320, 3072, 12288);
    let x = upload(&rand(m * k, 9), &[m, k]);
    let wv = rand(nn * k, 10);
    let w32 = upload(&wv, &[nn, k]);
    let wbytes: Vec<u8> = wv
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let w16 = Cpu
        .upload_weight(
            flux_kernels::ByteView::from_vec(wbytes),
            &[nn, k],
            DType::BF16,
            None,
        )
        .unwrap();
    g.throughput(Throughput::Elements((2 * m * k * nn) as u64));
    for (name, w) in [("f32", &w32), ("bf16", &w16)] {
        g.bench_function(format!("cpu_linear_320x3072x12288_{name}"), |b| {
            b.iter(|| black_box(Cpu.linear(&x, w, None).unwrap()));
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_attention,
    bench_tiny,
    bench_blocks
);
criterion_main!(benches);
