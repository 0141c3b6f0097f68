//! Noise sources on a Flux latent of 1024x1024 pixels ([1, 16, 128, 128]): torch-compatible
//! `randn` in f32 and f64 (`cpu_randn_*`), one Brownian-tree draw of an SDE step from a
//! fresh tree (`cpu_brownian_draw_*`, the worst case: every node on the path is computed),
//! and the draw of the middle step of a 20-step flux-dev schedule from a tree that has
//! answered the steps before it (`cpu_brownian_step_*`), also with the promise the SDE samplers
//! make before each draw that later draws stay below the step's lower sigma
//! (`cpu_brownian_step_promised_*`: what an SDE sampler pays per step).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use flux_kernels::{Cpu, DType};
use flux_samplers::NoiseSource;
use flux_samplers::noise::{BrownianTreeNoise, Mt19937, randn};
use flux_schedulers::{ModelSampling, Scheduler, ksampler_sigmas};
use std::hint::black_box;

const LATENT: [usize; 4] = [1, 16, 128, 128];

fn noise(c: &mut Criterion) {
    // The raw engine output one f32 latent draw needs (one 32-bit word per element).
    let numel: usize = LATENT.iter().product();
    let mut words = vec![0u32; numel];
    let mut engine = Mt19937::new(42);
    c.bench_function("mt19937_fill_u32_262144", |b| {
        b.iter(|| engine.fill_u32(black_box(&mut words)));
    });
    for dtype in [DType::F32, DType::F64] {
        c.bench_function(&format!("cpu_randn_{dtype}_1x16x128x128"), |b| {
            b.iter(|| randn(black_box(&LATENT), black_box(42), dtype));
        });
    }
    let mut group = c.benchmark_group("brownian");
    group.sample_size(10);
    group.bench_function("cpu_brownian_draw_f32_1x16x128x128", |b| {
        b.iter(|| {
            let mut tree = BrownianTreeNoise::new(42, 0.000316, 1.0)?;
            tree.draw(black_box(&LATENT), DType::F32, 0.8, 0.7)
        });
    });
    let sigmas: Vec<f64> = ksampler_sigmas(
        Scheduler::Simple,
        &ModelSampling::flux_dev(),
        20,
        1.0,
        false,
    )
    .expect("schedule")
    .into_iter()
    .map(f64::from)
    .collect();
    // The sampler's tree spans its smallest positive sigma to its largest.
    let sigma_min = sigmas[sigmas.len() - 2];
    let middle = 10;
    for promised in [false, true] {
        // The promise an SDE sampler makes before a step's draw (`NoiseSource::promise_below`).
        let promise = |tree: &mut BrownianTreeNoise, below: f64| {
            if promised {
                NoiseSource::<Cpu>::promise_below(tree, below);
            }
        };
        let name = if promised {
            "cpu_brownian_step_promised_f32_1x16x128x128"
        } else {
            "cpu_brownian_step_f32_1x16x128x128"
        };
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut tree = BrownianTreeNoise::new(42, sigma_min, sigmas[0]).expect("tree");
                    for w in sigmas[..=middle].windows(2) {
                        promise(&mut tree, w[1]);
                        tree.draw(&LATENT, DType::F32, w[0], w[1]).expect("draw");
                    }
                    promise(&mut tree, sigmas[middle + 1]);
                    tree
                },
                |mut tree| {
                    let step = tree.draw(
                        black_box(&LATENT),
                        DType::F32,
                        sigmas[middle],
                        sigmas[middle + 1],
                    );
                    (step, tree)
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, noise);
criterion_main!(benches);
