//! `flux img2img --backend wgpu` on the demo model against the CPU run, and the same request
//! served by `flux serve --backend wgpu` against `flux serve --backend cpu`. Both compute in f32
//! but sum in different orders, so the images are not bit-identical; they must agree to within
//! [`MAX_ABS`] 8-bit levels on every channel and [`MIN_PSNR`] dB.
//!
//! Built only with the `wgpu` feature. Ignored unless built with `FLUX_REQUIRE_ADAPTER=1` (CI
//! sets it and installs Mesa's software Vulkan device), so a machine without an adapter never
//! counts it as passed; with it, a missing adapter fails the test.
#![cfg(feature = "wgpu")]

mod common;

use common::{
    compare_images as compare, decode, demo_image, demo_job_body, flux, ok, served_image,
    start_serve,
};

/// Largest difference of one channel allowed, in 8-bit levels.
const MAX_ABS: u8 = 2;
/// Smallest PSNR allowed over all channels, in dB.
const MIN_PSNR: f64 = 45.0;

/// A wgpu run that failed: allowed (reported as skipped) only when no adapter is required and
/// the error says the backend is missing; otherwise the test fails with `what` and the error.
fn skip_without_adapter(what: &str, stderr: &[u8]) {
    let err = String::from_utf8_lossy(stderr);
    let required =
        std::env::var("FLUX_REQUIRE_ADAPTER").is_ok_and(|v| v == "1") || cfg!(flux_adapter_tests);
    assert!(
        !required && err.contains("not available on this machine"),
        "{what}: {err}"
    );
    eprintln!("skipped: no adapter ({err})");
}

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn wgpu_img2img_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let run = |backend: &str| {
        let out = dir.path().join(format!("{backend}.png"));
        let mut args: Vec<String> = vec!["img2img".into(), "--image".into()];
        args.push(demo_image().display().to_string());
        for a in [
            "--prompt",
            "a red cab",
            "--steps",
            "3",
            "--seed",
            "5",
            "--backend",
            backend,
        ] {
            args.push(a.into());
        }
        args.push("--out".into());
        args.push(out.display().to_string());
        (flux(&args), out)
    };
    let (o, cpu) = run("cpu");
    ok(&o);
    let (o, gpu) = run("wgpu");
    if !o.status.success() {
        skip_without_adapter("flux img2img --backend wgpu failed", &o.stderr);
        return;
    }
    let (a, b) = (decode(&cpu), decode(&gpu));
    assert_eq!(a.dimensions(), b.dimensions());
    let (max, psnr) = compare(&a, &b);
    eprintln!("wgpu vs cpu: max_abs_diff={max} psnr_db={psnr:.2}");
    assert!(max <= MAX_ABS, "max abs diff {max} > {MAX_ABS} levels");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB < {MIN_PSNR} dB");
    assert_ne!(a, decode(&demo_image()), "the run must change the image");
}

/// Starts `flux serve` with its workers on `backend`; returns the process and its address, or
/// `None` when the backend is missing on a machine that does not require an adapter.
fn serve_on(backend: &str, data_dir: &std::path::Path) -> Option<(std::process::Child, String)> {
    match start_serve(backend, data_dir) {
        Ok(started) => Some(started),
        Err(stderr) => {
            skip_without_adapter(
                &format!("flux serve --backend {backend} did not start"),
                stderr.as_bytes(),
            );
            None
        }
    }
}

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn serve_runs_its_workers_on_wgpu() {
    let body = demo_job_body();
    let mut images = Vec::new();
    for backend in ["cpu", "wgpu"] {
        let dir = tempfile::tempdir().unwrap();
        let Some((child, addr)) = serve_on(backend, dir.path()) else {
            return;
        };
        images.push(served_image(backend, child, &addr, &body));
    }
    // The same request as `wgpu_img2img_matches_the_cpu`, so the same bounds.
    let (a, b) = (&images[0], &images[1]);
    assert_eq!(a.dimensions(), b.dimensions());
    let (max, psnr) = compare(a, b);
    eprintln!("served wgpu vs cpu: max_abs_diff={max} psnr_db={psnr:.2}");
    assert!(max <= MAX_ABS, "served wgpu image differs by {max} levels");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB < {MIN_PSNR} dB");
    assert_ne!(*a, decode(&demo_image()), "the job must change the image");
}
