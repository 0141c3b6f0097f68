//! Sets `cfg(flux_require_nvrtc)` when NVRTC must be present for the tests (in CI, or when
//! `FLUX_REQUIRE_NVRTC=1`): the kernel compile test then runs and fails without NVRTC instead of
//! being reported as ignored.
//!
//! Sets `cfg(flux_require_cxx)` when the kernels' CPU-model test must run: in CI, with
//! `FLUX_REQUIRE_CXX=1`, or when a C++ compiler (`$CXX`, else `c++`) answers `--version`.

use std::process::{Command, Stdio};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flux_require_nvrtc)");
    println!("cargo::rustc-check-cfg=cfg(flux_require_cxx)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=FLUX_REQUIRE_NVRTC");
    println!("cargo::rerun-if-env-changed=FLUX_REQUIRE_CXX");
    println!("cargo::rerun-if-env-changed=CXX");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let required = std::env::var("FLUX_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if ci || required {
        println!("cargo::rustc-cfg=flux_require_nvrtc");
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let have_cxx = Command::new(cxx)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ci || have_cxx || std::env::var("FLUX_REQUIRE_CXX").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=flux_require_cxx");
    }
}
