//! Sets `cfg(flux_require_nvrtc)` when NVRTC must be present for the tests (in CI, or when
//! `FLUX_REQUIRE_NVRTC=1`): the kernel compile test then runs and fails without NVRTC instead of
//! being reported as ignored.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flux_require_nvrtc)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=FLUX_REQUIRE_NVRTC");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let required = std::env::var("FLUX_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if ci || required {
        println!("cargo::rustc-cfg=flux_require_nvrtc");
    }
}
