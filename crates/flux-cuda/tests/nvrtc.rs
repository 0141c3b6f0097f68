//! Every kernel file compiles with NVRTC for the architectures the backend targets. NVRTC runs
//! without a GPU; in CI (or with `FLUX_REQUIRE_NVRTC=1`) a missing NVRTC fails the test, elsewhere
//! the test is ignored rather than passed.

use flux_cuda::kernels::{ParamType, include_paths_from_env};
use flux_cuda::{KERNEL_FILES, compile_kernels, nvrtc_available};

fn compile_for(arch: &'static str) {
    assert!(
        nvrtc_available(),
        "NVRTC (libnvrtc.so.12) is not on the loader path: install the pip wheel \
         nvidia-cuda-nvrtc-cu12 and add its nvidia/cuda_nvrtc/lib folder to LD_LIBRARY_PATH"
    );
    let compiled = match compile_kernels(arch, &include_paths_from_env()) {
        Ok(c) => c,
        Err(e) => panic!("{arch}: {e}"),
    };
    assert_eq!(compiled.len(), KERNEL_FILES.len());
    for file in &compiled {
        assert!(
            !file.entries.is_empty(),
            "{arch}: {} defines no kernel entry point",
            file.file
        );
    }
    // Every entry's parameter list was read, in types the launch helper can pass (the launch
    // checks its arguments against these lists).
    for entry in compiled.iter().flat_map(|f| &f.entries) {
        assert!(
            !entry.params.is_empty() && !entry.params.contains(&ParamType::Other),
            "{arch}: kernel {} has parameters {:?}",
            entry.name,
            entry.params
        );
    }
    let params = |name: &str| {
        compiled
            .iter()
            .flat_map(|f| &f.entries)
            .find(|e| e.name == name)
            .map(|e| e.params.clone())
    };
    // Two signatures written out from the sources: `lincomb` (the output and six term
    // pointers, six double coefficients, the int term count and flag, the double `a`, the u64
    // count) and `rms_norm` (three pointers, u64, double, int).
    use ParamType::{Bits64 as P, F64, Int32 as I};
    assert_eq!(
        params("lincomb_f32"),
        Some(vec![
            P, P, P, P, P, P, P, F64, F64, F64, F64, F64, F64, I, I, F64, P
        ]),
        "{arch}: lincomb_f32"
    );
    assert_eq!(
        params("rms_norm_f64"),
        Some(vec![P, P, P, P, F64, I]),
        "{arch}: rms_norm_f64"
    );
    // Spot-check that the families the backend launches are all there, in both precisions.
    let all: Vec<&str> = compiled
        .iter()
        .flat_map(|f| f.entries.iter().map(|e| e.name.as_str()))
        .collect();
    for base in [
        "lincomb",
        "affine",
        "binary",
        "sum_squares",
        "max_abs",
        "scaled_error_sq",
        "layer_norm",
        "rms_norm",
        "group_norm",
        "modulate",
        "gated_add",
        "rope",
        "softmax",
        "activation",
        "im2col",
        "bias_nchw",
        "upsample2x",
        "crop",
        "permute",
        "copy_rows",
        "broadcast_rows",
        "widen_f32",
        "widen_f64",
        "widen_bf16",
        "widen_f16",
        "dequant_f8e4m3",
        "attention",
    ] {
        for s in ["f32", "f64"] {
            let name = format!("{base}_{s}");
            assert!(
                all.contains(&name.as_str()),
                "{arch}: kernel {name} missing"
            );
        }
    }
    for name in [
        "narrow_f32_to_bf16",
        "narrow_f32_to_f16",
        "f8e4m3_to_bf16",
        "gather_rows_bytes",
        "attention_pack_k_bf16",
        "attention_pack_vt_bf16",
        "attention_tc_d16",
        "attention_tc_d32",
        "attention_tc_d64",
        "attention_tc_d128",
    ] {
        assert!(all.contains(&name), "{arch}: kernel {name} missing");
    }
}

/// Devices older than sm_80 get the same files; the tensor-core kernels compile there to a stub
/// (never launched), so opening such a device does not fail on them.
#[test]
#[cfg_attr(
    not(flux_require_nvrtc),
    ignore = "needs NVRTC: set FLUX_REQUIRE_NVRTC=1 (CI does) with libnvrtc on LD_LIBRARY_PATH"
)]
fn every_kernel_compiles_for_compute_75() {
    compile_for("compute_75");
}

#[test]
#[cfg_attr(
    not(flux_require_nvrtc),
    ignore = "needs NVRTC: set FLUX_REQUIRE_NVRTC=1 (CI does) with libnvrtc on LD_LIBRARY_PATH"
)]
fn every_kernel_compiles_for_compute_80() {
    compile_for("compute_80");
}

#[test]
#[cfg_attr(
    not(flux_require_nvrtc),
    ignore = "needs NVRTC: set FLUX_REQUIRE_NVRTC=1 (CI does) with libnvrtc on LD_LIBRARY_PATH"
)]
fn every_kernel_compiles_for_compute_90() {
    compile_for("compute_90");
}
