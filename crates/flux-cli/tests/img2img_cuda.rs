//! `flux img2img --backend cuda` on the demo model against the CPU run, and the same request
//! served by `flux serve --backend cuda` (its workers run on their own threads) against
//! `flux serve --backend cpu`. The demo model's
//! weights are f32, so both compute in f32 (cuBLAS without TF32, the exact attention kernel)
//! but sum in different orders: the images are not bit-identical in general and must agree to
//! within [`MAX_ABS`] 8-bit levels on every channel and [`MIN_PSNR`] dB (the wgpu bounds).
//!
//! Built only with the `cuda` feature; needs a CUDA device (or the CPU model of the CUDA
//! libraries that `.ci/run` builds), so it is ignored elsewhere and run with `--run-ignored`
//! by `scripts/gpu-check.sh` and `.ci/run`.
#![cfg(feature = "cuda")]

mod common;

use common::{compare_images, decode, demo_image, demo_job_body, ok, served_image, start_serve};

/// Largest difference of one channel allowed, in 8-bit levels.
const MAX_ABS: u8 = 2;
/// Smallest PSNR allowed over all channels, in dB.
const MIN_PSNR: f64 = 45.0;

fn img2img(backend: &str, out: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_flux"))
        .arg("img2img")
        .arg("--image")
        .arg(demo_image())
        .args(["--prompt", "a red cab", "--steps", "3", "--seed", "5"])
        .args(["--backend", backend])
        .arg("--out")
        .arg(out)
        .env_remove("FLUX_MODEL_DIR")
        .env_remove("FLUX_CUDA_ATTENTION")
        .env_remove("FLUX_CUDA_LINEAR")
        .output()
        .expect("flux runs")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_img2img_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (cpu, cuda) = (dir.path().join("cpu.png"), dir.path().join("cuda.png"));
    ok(&img2img("cpu", &cpu));
    ok(&img2img("cuda", &cuda));
    let (a, b) = (decode(&cpu), decode(&cuda));
    assert_ne!(a, decode(&demo_image()), "the run must change the image");
    assert_eq!(a.dimensions(), b.dimensions());
    let (max, psnr) = compare_images(&a, &b);
    eprintln!("cuda vs cpu: max_abs_diff={max} psnr_db={psnr:.2}");
    assert!(max <= MAX_ABS, "max abs diff {max} > {MAX_ABS} levels");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB < {MIN_PSNR} dB");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn serve_runs_its_workers_on_cuda() {
    let body = demo_job_body();
    let mut images = Vec::new();
    for backend in ["cpu", "cuda"] {
        let dir = tempfile::tempdir().unwrap();
        let (child, addr) = start_serve(backend, dir.path())
            .unwrap_or_else(|e| panic!("flux serve --backend {backend} did not start: {e}"));
        images.push(served_image(backend, child, &addr, &body));
    }
    let (a, b) = (&images[0], &images[1]);
    assert_eq!(a.dimensions(), b.dimensions());
    let (max, psnr) = compare_images(a, b);
    eprintln!("served cuda vs cpu: max_abs_diff={max} psnr_db={psnr:.2}");
    assert!(max <= MAX_ABS, "served cuda image differs by {max} levels");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB < {MIN_PSNR} dB");
    assert_ne!(*a, decode(&demo_image()), "the job must change the image");
}
