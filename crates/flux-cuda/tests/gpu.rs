//! Tests that launch kernels. They need a CUDA GPU and are ignored elsewhere (reported as
//! ignored, never as passed); `scripts/gpu-check.sh` runs them with `--run-ignored all`. On a
//! machine where they are run but no device opens, they fail with the reason.

use flux_cuda::Cuda;
use flux_kernels::conformance::Tolerances;
use flux_kernels::{Cpu, DType, HostData, SamplerOps, Tensor};
use flux_samplers::noise::reference_noise;
use flux_samplers::toy::MixtureDenoiser;
use flux_samplers::{SampleContext, Sampler, SamplerOptions, sample};
use flux_schedulers::ModelSampling;

fn cuda() -> Cuda {
    Cuda::new().unwrap_or_else(|e| panic!("the CUDA backend could not be created: {e}"))
}

/// f32 compute matches the CPU to 1e-5 relative. Linear layers with bf16 / fp8 weights run on
/// the tensor cores with the activations rounded to bf16 (relative error up to 2^-9 per input,
/// about 1e-3 of the output's RMS), hence the looser bound for ops that read packed weights.
const TOL: Tolerances = Tolerances {
    rel: 1e-5,
    weight_rel: 1e-2,
};

/// One ignored test per op family of the backend conformance suite.
macro_rules! conformance {
    ($($op:ident),* $(,)?) => {
        $(
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn $op() {
                let be = cuda();
                let failures = flux_kernels::conformance::$op(&be, TOL);
                assert!(
                    failures.is_empty(),
                    "{} conformance failures on {}:\n{}",
                    failures.len(),
                    be.name(),
                    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
                );
            }
        )*
    };
}

conformance!(
    memory,
    dtype_support,
    lincomb,
    reductions,
    weights,
    linear,
    matmul,
    norms,
    modulation,
    activations,
    elementwise,
    softmax,
    rope,
    attention,
    layout,
    conv2d,
    group_norm,
    image_ops,
    bad_input,
);

/// Runs `sampler` on the analytic toy model from the same start and noise on both backends.
fn run_sampler<B: flux_kernels::Backend>(be: &B, sampler: Sampler) -> Vec<f64> {
    let model = ModelSampling::flux(1.15);
    let sigmas: Vec<f64> = (0..=8).map(|i| 1.0 - f64::from(i) / 8.0).collect();
    let shape = [1usize, 4, 9, 7];
    let n: usize = shape.iter().product();
    let start: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let x: Tensor<B> = be
        .upload(HostData::F32(&start), &shape, DType::F32)
        .expect("upload");
    let mut denoiser = MixtureDenoiser::reference(1.0, true);
    let mut noise = reference_noise::<B>(sampler, 42, &sigmas).expect("noise source");
    let mut ctx = SampleContext {
        backend: be,
        model: &model,
        denoiser: &mut denoiser,
        noise: noise.as_mut(),
        callback: None,
    };
    let out = sample(sampler, &mut ctx, x, &sigmas, &SamplerOptions::default())
        .unwrap_or_else(|e| panic!("{} failed: {e}", sampler.name()));
    be.download_f64(&out).expect("download")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_sampler_matches_the_cpu_on_the_device() {
    let gpu = cuda();
    let mut checked = 0;
    let mut failures = Vec::new();
    for &s in Sampler::ALL.iter().filter(|s| s.is_implemented()) {
        let want = run_sampler(&Cpu, s);
        let got = run_sampler(&gpu, s);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0f64, f64::max);
        checked += 1;
        // f32 on both sides; the update order is the same, only FMA contraction differs.
        if worst > 1e-4 || got.iter().any(|v| !v.is_finite()) {
            failures.push(format!("{}: worst relative error {worst:.3e}", s.name()));
        }
    }
    assert!(checked > 0, "no sampler was run");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_linear_at_a_flux_shape_matches_the_cpu() {
    use flux_kernels::{ByteView, ModelOps};
    let gpu = cuda();
    let (m, k, n) = (77usize, 3072usize, 1024usize);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31 % 997) as f32 / 498.5) - 1.0)
        .collect();
    let w: Vec<u8> = (0..n * k)
        .flat_map(|i| half::bf16::from_f32(((i * 17 % 991) as f32 / 4955.0) - 0.1).to_le_bytes())
        .collect();
    let bias: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let view = ByteView::from_vec(w);
    let run = |be: &dyn Fn() -> Vec<f64>| be();
    let want = run(&|| {
        let xt = Cpu.upload(HostData::F32(&x), &[m, k], DType::F32).unwrap();
        let wt = Cpu
            .upload_weight(view.clone(), &[n, k], DType::BF16, None)
            .unwrap();
        let bt = Cpu.upload(HostData::F32(&bias), &[n], DType::F32).unwrap();
        Cpu.download_f64(&Cpu.linear(&xt, &wt, Some(&bt)).unwrap())
            .unwrap()
    });
    let got = run(&|| {
        let xt = gpu.upload(HostData::F32(&x), &[m, k], DType::F32).unwrap();
        let wt = gpu
            .upload_weight(view.clone(), &[n, k], DType::BF16, None)
            .unwrap();
        let bt = gpu.upload(HostData::F32(&bias), &[n], DType::F32).unwrap();
        gpu.download_f64(&gpu.linear(&xt, &wt, Some(&bt)).unwrap())
            .unwrap()
    });
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(rms))
        .fold(0.0f64, f64::max);
    assert!(worst < 1e-2, "worst relative error {worst:.3e}");
}
