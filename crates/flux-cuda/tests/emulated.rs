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

use flux_cuda::KERNEL_FILES;
use flux_cuda::kernels::COMMON;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Points `extern __shared__ [__align__(N)] TYPE NAME[];` at the model's dynamic shared memory.
fn rewrite_dynamic_shared(src: &str) -> String {
    src.lines()
        .map(|line| {
            let Some(at) = line.find("extern __shared__ ") else {
                return line.to_string();
            };
            let decl = line[at + "extern __shared__ ".len()..].trim_end();
            let decl = match decl.strip_prefix("__align__(") {
                Some(rest) => rest.split_once(") ").map_or(rest, |(_, d)| d),
                None => decl,
            };
            let Some(decl) = decl.strip_suffix("[];") else {
                return line.to_string();
            };
            let Some((ty, name)) = decl.rsplit_once(' ') else {
                return line.to_string();
            };
            format!(
                "{}{ty}* {name} = reinterpret_cast<{ty}*>(emu::dyn_smem);",
                &line[..at]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

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
#[cfg_attr(
    not(flux_require_cxx),
    ignore = "needs a C++20 compiler ($CXX or c++); set FLUX_REQUIRE_CXX=1 to require it"
)]
fn kernels_match_their_contracts_on_the_cpu_model() {
    let dir = std::env::temp_dir().join(format!("flux-cuda-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    let mut unit = format!("{COMMON}\n");
    for (file, src) in KERNEL_FILES {
        writeln!(unit, "#line 1 \"{file}\"\n{}", rewrite_dynamic_shared(src))
            .expect("writing to a String");
    }
    std::fs::write(dir.join("kernels.inc"), unit).expect("writing kernels.inc");
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emu");
    let exe = dir.join("check");
    let cxx = compiler();
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off"])
        .arg("-I")
        .arg(&emu)
        .arg("-I")
        .arg(&dir)
        .arg("-o")
        .arg(&exe)
        .arg(emu.join("check.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler {cxx}: {e}"));
    assert!(
        built.status.success(),
        "{cxx} failed to build the kernel model:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the kernel model");
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success(),
        "kernels failed on the CPU model:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains(", 0 failed"), "{report}");
}
