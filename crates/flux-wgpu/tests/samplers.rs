//! Every sampler run on the wgpu backend against the same run on the CPU (f32 on both sides),
//! so each op a sampler uses, fused ones included, is checked inside a real sampler loop.

mod common;

use flux_kernels::Cpu;
use flux_samplers::Sampler;
use flux_samplers::toy::backend_check_run;

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn every_sampler_matches_the_cpu() {
    let Some(be) = common::backend() else {
        return;
    };
    let mut checked = 0;
    let mut failures = Vec::new();
    for &s in Sampler::ALL.iter().filter(|s| s.is_implemented()) {
        let want = backend_check_run(&Cpu, s)
            .unwrap_or_else(|e| panic!("{} failed on the CPU: {e}", s.name()));
        let got = match backend_check_run(&be, s) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{}: {e}", s.name()));
                continue;
            }
        };
        assert_eq!(got.len(), want.len(), "{}", s.name());
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / scale)
            .fold(0.0f64, f64::max);
        checked += 1;
        // f32 on both sides with the same update order; the shader compiler may contract
        // multiplies and adds into FMAs where the CPU does not.
        if worst > 1e-4 || got.iter().any(|v| !v.is_finite()) {
            failures.push(format!("{}: worst relative error {worst:.3e}", s.name()));
        }
    }
    assert!(checked > 0, "no sampler was run");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
