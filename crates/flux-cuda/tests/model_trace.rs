//! The host traffic of the CUDA backend, read from the trace of the CPU model of the CUDA
//! libraries (`examples/cuda_model.rs`, `FLUX_CUDA_MODEL_TRACE_DIR`): a sampler step must never
//! copy the latent to the host (only the scalars of reductions come back, and host-drawn noise
//! goes up), so the whole loop stays on the device; and a transformer forward is queued on the
//! stream without a synchronisation or a copy back to the host.
//!
//! Runs only on that model (the trace is its feature): ignored elsewhere, run by `.ci/run` with
//! `--run-ignored only` and the trace folder set; where it is run without them it fails
//! saying so. Not part of the GPU bundle.

use flux_cuda::Cuda;
use flux_kernels::{Backend, DType, HostData, SamplerOps, Tensor};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
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

/// One line of the trace: `dtoh BYTES`, `htod BYTES`, `sync 0` or `launch BLOCKS NAME`.
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

/// The backend, on the model (the trace is its feature).
fn model_backend() -> Cuda {
    let be = Cuda::new().unwrap_or_else(|e| panic!("no CUDA backend: {e}"));
    assert!(
        be.device_name().contains("CPU model of CUDA"),
        "this test reads the trace of the CPU model of the CUDA libraries, not a GPU ({})",
        be.device_name()
    );
    be
}

#[test]
#[ignore = "needs the CPU model of the CUDA libraries (examples/cuda_model.rs) and FLUX_CUDA_MODEL_TRACE_DIR"]
fn sampler_steps_do_not_copy_the_latent_to_the_host() {
    let be = model_backend();
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

#[test]
#[ignore = "needs the CPU model of the CUDA libraries (examples/cuda_model.rs) and FLUX_CUDA_MODEL_TRACE_DIR"]
fn a_transformer_forward_never_waits_for_the_device() {
    let be = model_backend();
    // flux-dev's structure at a small width (two double and two single blocks).
    let cfg = FluxConfig {
        vec_in_dim: 32,
        context_in_dim: 48,
        hidden_size: 128,
        mlp_hidden: 256,
        num_heads: 2,
        depth: 2,
        depth_single: 2,
        axes_dim: vec![8, 28, 28],
        ..FluxConfig::dev()
    };
    let w = random_weights(&cfg, DType::BF16, 3).expect("random weights");
    let model = FluxTransformer::load_with_config(&be, &w, cfg.clone(), DType::F32)
        .expect("loading the transformer");
    let (li, lt) = (36usize, 7usize);
    let up = |n: usize, shape: &[usize]| {
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
            .collect();
        be.upload(HostData::F32(&v), shape, DType::F32)
            .expect("upload")
    };
    let img = up(li * 64, &[1, li, 64]);
    let txt = up(lt * cfg.context_in_dim, &[1, lt, cfg.context_in_dim]);
    let y = up(cfg.vec_in_dim, &[1, cfg.vec_in_dim]);
    let img_ids = flux_model::denoiser::img_ids(1, 6, 6);
    let txt_ids = vec![0.0; lt * 3];
    let inp = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &[0.5],
        y: &y,
        guidance: Some(&[3.5]),
    };
    // The first forward may upload tables (RoPE, ids); the second is the steady state.
    model.forward(&be, &inp).expect("forward");
    let (_, at) = events_since(0);
    let out = model.forward(&be, &inp).expect("forward");
    let (events, end) = events_since(at);
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
    assert!(
        count("launch") > 20,
        "only {} launches in a forward",
        count("launch")
    );
    assert_eq!(count("sync"), 0, "a forward synchronised with the device");
    assert_eq!(count("dtoh"), 0, "a forward copied data back to the host");
    println!(
        "forward: {} launches, {} host-to-device copies, no sync, no device-to-host copy",
        count("launch"),
        count("htod")
    );
    // The detector sees a synchronising download when there is one.
    be.download_f64(&out).expect("download");
    let (events, _) = events_since(end);
    assert!(
        events.iter().any(|e| e.kind == "dtoh"),
        "the trace missed the download"
    );
}
