//! Declares the `flux_adapter_tests` cfg: set when `FLUX_REQUIRE_ADAPTER=1` at build time, it
//! turns the wgpu command-line test from ignored into required (a missing adapter fails it).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flux_adapter_tests)");
    println!("cargo::rerun-if-env-changed=FLUX_REQUIRE_ADAPTER");
    if std::env::var("FLUX_REQUIRE_ADAPTER").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=flux_adapter_tests");
    }
}
