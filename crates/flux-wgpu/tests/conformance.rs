//! The backend conformance suite of flux-kernels, run on the wgpu backend in f32.

mod common;

flux_kernels::conformance_tests!(
    [#[cfg_attr(not(flux_adapter_tests), ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)")]]
    common::backend(),
    flux_kernels::conformance::Tolerances::F32
);

/// The same suite with stored weights split into 1 KiB chunks, as weights above the device's
/// binding limit are: every op reading a weight must give the same results.
mod split_weights {
    use super::common;

    flux_kernels::conformance_tests!(
        [#[cfg_attr(not(flux_adapter_tests), ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)")]]
        common::backend_with(flux_wgpu::WgpuOptions {
            weight_chunk_bytes: Some(1024),
            ..flux_wgpu::WgpuOptions::default()
        }),
        flux_kernels::conformance::Tolerances::F32
    );
}

/// The ops that read stored weights, with f16 weights read as packed words widened in the
/// shader: the path of adapters without `shader-f16` (where the adapter has it, the suite above
/// reads them as native `f16`).
mod packed_f16 {
    use super::common;

    flux_kernels::conformance_tests!(@each
        [#[cfg_attr(not(flux_adapter_tests), ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)")]]
        (common::backend_with(flux_wgpu::WgpuOptions {
            packed_f16: true,
            ..flux_wgpu::WgpuOptions::default()
        }))
        (flux_kernels::conformance::Tolerances::F32);
        weights, linear, matmul, conv2d
    );
}
