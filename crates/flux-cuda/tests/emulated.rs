//! The kernels of `shaders/cuda` run on a CPU model of CUDA's execution (`tests/emu`): one OS
//! thread per CUDA thread, real barriers for `__syncthreads` and warp shuffles, the blocks of a
//! grid in turn, and the tensor-core attention's `ldmatrix`, `mma.sync` and `cp.async` modelled
//! from the PTX ISA. `tests/emu/check.cpp` launches each kernel family at awkward sizes with the
//! launch shapes the backend uses and compares with loops written from the kernels' contracts,
//! so the index arithmetic, shared-memory staging and reductions are checked on machines
//! without a GPU. (Speed and the GPU's own rounding are not: that is `scripts/gpu-check.sh`.)
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`); where none is found and neither `CI` nor
//! `FLUX_REQUIRE_CXX=1` is set, the test is ignored rather than passed.

#[path = "emu/unit.rs"]
mod unit;

use std::process::Command;
use unit::{
    build_model_libraries, emu_dir, rewrite_dynamic_shared, run_compiler, write_kernels_unit,
};

#[test]
fn dynamic_shared_declarations_are_rewritten() {
    let src = "  extern __shared__ __align__(16) unsigned char smem_raw[];\n    \
               extern __shared__ float tile[];\nint x;";
    assert_eq!(
        rewrite_dynamic_shared(src),
        "  unsigned char* smem_raw = reinterpret_cast<unsigned char*>(emu::dyn_smem);\n    \
         float* tile = reinterpret_cast<float*>(emu::dyn_smem);\nint x;"
    );
}

#[test]
fn kernel_names_are_read_from_the_marked_source() {
    let pre = "extern \"C\" FLUX_EMU_KERNEL void lincomb_f32(float* out, u64 n) { }\n\
               static void helper(int x);\n\
               extern \"C\" FLUX_EMU_KERNEL void  attention_tc_d64 (const float* q);";
    assert_eq!(
        unit::kernel_names(pre),
        ["lincomb_f32".to_string(), "attention_tc_d64".to_string()]
    );
}

#[test]
#[cfg_attr(
    not(flux_require_cxx),
    ignore = "needs a C++20 compiler ($CXX or c++); set FLUX_REQUIRE_CXX=1 to require it"
)]
fn kernels_match_their_contracts_on_the_cpu_model() {
    let dir = std::env::temp_dir().join(format!("flux-cuda-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    write_kernels_unit(&dir).expect("writing kernels.inc");
    let emu = emu_dir();
    let exe = dir.join("check");
    if let Err(e) = run_compiler(&[
        "-std=c++20".as_ref(),
        "-O1".as_ref(),
        "-pthread".as_ref(),
        "-ffp-contract=off".as_ref(),
        "-I".as_ref(),
        emu.as_os_str(),
        "-I".as_ref(),
        dir.as_os_str(),
        "-o".as_ref(),
        exe.as_os_str(),
        emu.join("check.cpp").as_os_str(),
    ]) {
        panic!("building the kernel model: {e}");
    }
    run_check(&dir, &exe, "kernels failed on the CPU model");
}

/// The CPU model of the CUDA libraries (`tests/emu/driver.cpp`, `blas.cpp`; what `.ci/run` runs
/// the backend's GPU tests on) enforces the rules it claims and computes the documented GEMMs:
/// `tests/emu/driver_check.cpp` against the built `libcuda.so`.
#[test]
#[cfg_attr(
    not(flux_require_cxx),
    ignore = "needs a C++20 compiler ($CXX or c++); set FLUX_REQUIRE_CXX=1 to require it"
)]
fn the_cuda_library_model_enforces_its_rules() {
    let dir = std::env::temp_dir().join(format!("flux-cuda-model-{}", std::process::id()));
    if let Err(e) = build_model_libraries(&dir) {
        panic!("building the model of the CUDA libraries: {e}");
    }
    let exe = dir.join("driver_check");
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    if let Err(e) = run_compiler(&[
        "-std=c++20".as_ref(),
        "-O1".as_ref(),
        "-pthread".as_ref(),
        "-o".as_ref(),
        exe.as_os_str(),
        emu_dir().join("driver_check.cpp").as_os_str(),
        "-L".as_ref(),
        dir.as_os_str(),
        "-lcuda".as_ref(),
        rpath.as_ref(),
    ]) {
        panic!("building the model check: {e}");
    }
    run_check(&dir, &exe, "the CUDA library model failed its checks");
}

/// Runs the check program `exe` (which prints a report ending in "N ..., M failed"), removes
/// `dir`, and fails with `what` unless it exited cleanly with nothing failed.
fn run_check(dir: &std::path::Path, exe: &std::path::Path, what: &str) {
    let run = Command::new(exe)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    let _ = std::fs::remove_dir_all(dir);
    assert!(
        run.status.success() && report.contains(", 0 failed"),
        "{what}:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
