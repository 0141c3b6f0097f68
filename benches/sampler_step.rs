//! One sampler step per family, and the fused lincomb kernel against a plain memory copy.
//!
//! The step benches use a memory-speed stand-in model (`denoised = 0.5 x`, one lincomb), so
//! they measure the sampler's own work. The lincomb benches report bytes moved per second:
//! `(terms + 1) * numel * 4` for f32; the copy bench moves the same number of bytes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flux_kernels::{Backend, Cpu, DType, SamplerOps, Tensor};
use flux_samplers::noise::{randn, reference_noise};
use flux_samplers::{Denoised, Denoiser, SampleContext, Sampler, SamplerOptions, sample};
use flux_schedulers::{ModelSampling, Scheduler, ksampler_sigmas};
use rayon::prelude::*;
use std::hint::black_box;

const SHAPES: [[usize; 4]; 2] = [[1, 16, 128, 128], [4, 16, 128, 128]];

/// A model at memory speed: one fused pass over the latent.
struct HalfModel;

impl<B: Backend> Denoiser<B> for HalfModel {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        _sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        let denoised = backend.lincomb(&[(0.5, x)])?;
        let uncond = if want_uncond {
            Some(backend.lincomb(&[(0.4, x)])?)
        } else {
            None
        };
        Ok(Denoised { denoised, uncond })
    }
}

fn latent(backend: Cpu, shape: &[usize], seed: u64) -> Tensor<Cpu> {
    let noise = randn(shape, seed, DType::F32).expect("valid shape");
    backend
        .upload(noise.as_host(), shape, DType::F32)
        .expect("upload")
}

fn sampler_steps(c: &mut Criterion) {
    let backend = Cpu::new();
    let model = ModelSampling::flux_dev();
    // One representative per family: first order, second order (two calls), multistep,
    // ancestral (flow branch), SDE (Brownian tree), exponential-integrator multistep, UniPC.
    let families = [
        Sampler::Euler,
        Sampler::Heun,
        Sampler::Dpmpp2m,
        Sampler::EulerAncestral,
        Sampler::Lms,
        Sampler::ResMultistep,
        Sampler::UniPc,
        Sampler::Dpmpp2mSde,
    ];
    let mut group = c.benchmark_group("cpu_sampler_step");
    group.sample_size(10);
    for shape in SHAPES {
        let x0 = latent(backend, &shape, 1);
        let id_shape = shape.map(|d| d.to_string()).join("x");
        for sampler in families {
            // Two steps of a 20-step schedule from its middle: multistep samplers reach their
            // steady-state update on the second.
            let full: Vec<f64> = ksampler_sigmas(
                Scheduler::Simple,
                &model,
                20,
                1.0,
                sampler.discards_penultimate_sigma(),
            )
            .expect("schedule")
            .into_iter()
            .map(f64::from)
            .collect();
            let sigmas = &full[8..11];
            group.bench_function(BenchmarkId::new(sampler.name(), &id_shape), |b| {
                b.iter(|| {
                    let mut noise =
                        reference_noise::<Cpu>(sampler, 0, sigmas).expect("noise source");
                    let mut den = HalfModel;
                    let mut ctx = SampleContext {
                        backend: &backend,
                        model: &model,
                        denoiser: &mut den,
                        noise: noise.as_mut(),
                        callback: None,
                    };
                    let x = backend.copy(&x0).expect("copy");
                    black_box(
                        sample(sampler, &mut ctx, x, sigmas, &SamplerOptions::default())
                            .expect("sample"),
                    )
                });
            });
        }
    }
    group.finish();
}

fn lincomb_vs_copy(c: &mut Criterion) {
    let backend = Cpu::new();
    let mut group = c.benchmark_group("cpu_lincomb");
    group.sample_size(20);
    for shape in SHAPES {
        let numel: usize = shape.iter().product();
        let id_shape = shape.map(|d| d.to_string()).join("x");
        let inputs: Vec<Tensor<Cpu>> = (0..4).map(|i| latent(backend, &shape, i)).collect();
        let mut out = backend.zeros(&shape, DType::F32).expect("zeros");
        for terms in [2usize, 3, 4] {
            let bytes = ((terms + 1) * numel * 4) as u64;
            group.throughput(Throughput::Bytes(bytes));
            let t: Vec<(f64, &Tensor<Cpu>)> = inputs[..terms]
                .iter()
                .enumerate()
                .map(|(i, x)| (0.5 + i as f64, x))
                .collect();
            group.bench_function(BenchmarkId::new(format!("terms{terms}"), &id_shape), |b| {
                b.iter(|| {
                    backend
                        .lincomb_into(&mut out, black_box(&t))
                        .expect("lincomb");
                });
            });
            // A plain parallel copy of the same number of bytes (half read, half written).
            let half = (bytes / 8) as usize;
            let src = vec![1.0f32; half];
            let mut dst = vec![0.0f32; half];
            group.bench_function(
                BenchmarkId::new(format!("copy_same_bytes_as_terms{terms}"), &id_shape),
                |b| {
                    b.iter(|| {
                        // Same chunking and thread pool as the CPU backend's lincomb.
                        dst.par_chunks_mut(1 << 14)
                            .zip(black_box(&src).par_chunks(1 << 14))
                            .for_each(|(d, s)| d.copy_from_slice(s));
                        black_box(&dst);
                    });
                },
            );
        }
        // A corrector feeding the next step's predictor (uni_pc): two new tensors over five
        // operands in one pass, against the two separate combinations.
        let five: Vec<Tensor<Cpu>> = (0..5).map(|i| latent(backend, &shape, 10 + i)).collect();
        let first: Vec<(f64, &Tensor<Cpu>)> = five
            .iter()
            .enumerate()
            .map(|(i, x)| (0.5 + i as f64, x))
            .collect();
        let second = [0.0, 0.3, -0.2, 0.0, 1.1];
        group.throughput(Throughput::Bytes((7 * numel * 4) as u64));
        group.bench_function(BenchmarkId::new("pair5", &id_shape), |b| {
            b.iter(|| {
                black_box(
                    backend
                        .lincomb_pair(black_box(&first), 0.9, &second)
                        .expect("lincomb_pair"),
                )
            });
        });
        group.bench_function(BenchmarkId::new("pair5_as_two_lincombs", &id_shape), |b| {
            b.iter(|| {
                let a = backend.lincomb(black_box(&first)).expect("lincomb");
                let mut terms = vec![(0.9, &a)];
                terms.extend(second.iter().copied().zip(&five).filter(|(c, _)| *c != 0.0));
                let s = backend.lincomb(&terms).expect("lincomb");
                black_box((a, s))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, sampler_steps, lincomb_vs_copy);
criterion_main!(benches);
