//! Every sampler run on the wgpu backend against the same run on the CPU (f32 on both sides),
//! so each op a sampler uses, fused ones included, is checked inside a real sampler loop.

mod common;

use flux_samplers::toy::every_sampler_against_cpu;

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn every_sampler_matches_the_cpu() {
    let Some(be) = common::backend() else {
        return;
    };
    // f32 on both sides with the same update order; the shader compiler may contract
    // multiplies and adds into FMAs where the CPU does not.
    let (checked, failures) = every_sampler_against_cpu(&be, 1e-4);
    assert!(checked > 0, "no sampler was run");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
