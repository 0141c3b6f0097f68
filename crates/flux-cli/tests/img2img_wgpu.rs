//! `flux img2img --backend wgpu` on the demo model against the CPU run. Both compute in f32 but
//! sum in different orders, so the images are not bit-identical; they must agree to within
//! [`MAX_ABS`] 8-bit levels on every channel and [`MIN_PSNR`] dB.
//!
//! Built only with the `wgpu` feature. Ignored unless built with `FLUX_REQUIRE_ADAPTER=1` (CI
//! sets it and installs Mesa's software Vulkan device), so a machine without an adapter never
//! counts it as passed; with it, a missing adapter fails the test.
#![cfg(feature = "wgpu")]

mod common;

use common::{decode, demo_image, flux, ok};

/// Largest difference of one channel allowed, in 8-bit levels.
const MAX_ABS: u8 = 2;
/// Smallest PSNR allowed over all channels, in dB.
const MIN_PSNR: f64 = 45.0;

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
        let err = String::from_utf8_lossy(&o.stderr);
        let required = std::env::var("FLUX_REQUIRE_ADAPTER").is_ok_and(|v| v == "1")
            || cfg!(flux_adapter_tests);
        assert!(
            !required && err.contains("not available on this machine"),
            "flux img2img --backend wgpu failed: {err}"
        );
        eprintln!("skipped: no adapter ({err})");
        return;
    }
    let (a, b) = (decode(&cpu), decode(&gpu));
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut max, mut sq) = (0u8, 0.0f64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sq += f64::from(d) * f64::from(d);
    }
    let mse = sq / a.as_raw().len() as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    eprintln!("wgpu vs cpu: max_abs_diff={max} psnr_db={psnr:.2}");
    assert!(max <= MAX_ABS, "max abs diff {max} > {MAX_ABS} levels");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB < {MIN_PSNR} dB");
    assert_ne!(a, decode(&demo_image()), "the run must change the image");
}
