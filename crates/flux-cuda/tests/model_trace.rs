//! The host traffic of the CUDA backend's sampler loops, read from the trace of the CPU model
//! of the CUDA libraries (`examples/cuda_model.rs`, `FLUX_CUDA_MODEL_TRACE_DIR`): a sampler
//! step must never copy the latent to the host (only the scalars of reductions come back,
//! and host-drawn noise goes up), so the whole loop stays on the device.
//!
//! Runs only on that model (the trace is its feature): ignored elsewhere, run by `.ci/run` with
//! `--run-ignored only` and the trace folder set; where it is run without them it fails
//! saying so. Not part of the GPU bundle.

use flux_cuda::Cuda;
use flux_kernels::{Backend, DType, HostData, SamplerOps, Tensor};
use flux_samplers::noise::reference_noise;
use flux_samplers::{Denoised, Denoiser, SampleContext, Sampler, SamplerOptions, sample};
use flux_schedulers::ModelSampling;
use std::path::PathBuf;

/// A denoiser that stays on the device: `denoised = 0.8 x` (one lincomb kernel).
struct OnDevice;

impl<B: Backend> Denoiser<B> for OnDevice {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        _sigma: f64,
        _want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        Ok(Denoised {
            denoised: backend.lincomb(&[(0.8, x)])?,
            uncond: None,
        })
    }
}

/// One line of the trace: `dtoh BYTES`, `htod BYTES` or `launch BLOCKS NAME`.
struct Event {
    kind: String,
    bytes: usize,
}

fn trace_file() -> PathBuf {
    let dir = std::env::var_os("FLUX_CUDA_MODEL_TRACE_DIR").unwrap_or_else(|| {
        panic!("FLUX_CUDA_MODEL_TRACE_DIR is not set: this test reads the trace of the CPU model of the CUDA libraries")
    });
    PathBuf::from(dir).join(format!("trace-{}.txt", std::process::id()))
}

/// The events logged since byte `from` of the trace, and its new length.
fn events_since(from: usize) -> (Vec<Event>, usize) {
    let text = std::fs::read_to_string(trace_file()).expect("reading the model's trace");
    let events = text[from..]
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some(Event {
                kind: parts.next()?.to_string(),
                bytes: parts.next()?.parse().ok()?,
            })
        })
        .collect();
    (events, text.len())
}

#[test]
#[ignore = "needs the CPU model of the CUDA libraries (examples/cuda_model.rs) and FLUX_CUDA_MODEL_TRACE_DIR"]
fn sampler_steps_do_not_copy_the_latent_to_the_host() {
    let be = Cuda::new().unwrap_or_else(|e| panic!("no CUDA backend: {e}"));
    assert!(
        be.device_name().contains("CPU model of CUDA"),
        "this test reads the trace of the CPU model of the CUDA libraries, not a GPU ({})",
        be.device_name()
    );
    let shape = [1usize, 16, 32, 32];
    let n: usize = shape.iter().product();
    let latent_bytes = n * 4;
    let model = ModelSampling::flux(1.15);
    let sigmas: Vec<f64> = (0..=6).map(|i| 1.0 - f64::from(i) / 6.0).collect();
    let start: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let (_, mut at) = events_since(0);
    for sampler in [
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::Dpmpp2m,
        Sampler::Dpmpp2mSde,
        Sampler::Heun,
        Sampler::DpmAdaptive,
    ] {
        let x = be
            .upload(HostData::F32(&start), &shape, DType::F32)
            .expect("upload");
        let mut noise = reference_noise::<Cuda>(sampler, 7, &sigmas).expect("noise source");
        let mut ctx = SampleContext {
            backend: &be,
            model: &model,
            denoiser: &mut OnDevice,
            noise: noise.as_mut(),
            callback: None,
        };
        let out = sample(sampler, &mut ctx, x, &sigmas, &SamplerOptions::default())
            .unwrap_or_else(|e| panic!("{} failed: {e}", sampler.name()));
        let (events, end) = events_since(at);
        let launches = events.iter().filter(|e| e.kind == "launch").count();
        assert!(
            launches > 0,
            "{}: no kernel launch in the trace",
            sampler.name()
        );
        let largest = events
            .iter()
            .filter(|e| e.kind == "dtoh")
            .map(|e| e.bytes)
            .max()
            .unwrap_or(0);
        assert!(
            largest < latent_bytes / 4,
            "{}: a device-to-host copy of {largest} bytes inside the loop (the latent is {latent_bytes})",
            sampler.name()
        );
        // The detector sees a latent-sized copy when there is one: the final download.
        be.download_f64(&out).expect("download");
        let (events, end2) = events_since(end);
        assert!(
            events
                .iter()
                .any(|e| e.kind == "dtoh" && e.bytes >= latent_bytes),
            "the trace missed the download of the result"
        );
        println!(
            "{}: {launches} launches, largest device-to-host copy {largest} bytes",
            sampler.name()
        );
        at = end2;
    }
}
