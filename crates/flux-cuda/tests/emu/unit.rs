//! Building the C++ side of the CPU model of CUDA (`tests/emu`): the kernels of
//! `shaders/cuda` as one C++ translation unit, and the model's stand-ins for the CUDA
//! libraries. Shared by the `emulated` test and the `cuda_model` example.

#![allow(dead_code, reason = "each includer uses part of it")]

use flux_cuda::KERNEL_FILES;
use flux_cuda::kernels::COMMON;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Points `extern __shared__ [__align__(N)] TYPE NAME[];` at the model's dynamic shared memory.
pub fn rewrite_dynamic_shared(src: &str) -> String {
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

/// The C++ compiler: `$CXX`, else `c++`.
pub fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// The folder of the model's C++ sources.
pub fn emu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emu")
}

/// Writes `kernels.inc` (common.cuh and every kernel file, shared memory rewritten) into `dir`.
pub fn write_kernels_unit(dir: &Path) -> std::io::Result<()> {
    let mut unit = format!("{COMMON}\n");
    for (file, src) in KERNEL_FILES {
        writeln!(unit, "#line 1 \"{file}\"\n{}", rewrite_dynamic_shared(src))
            .expect("writing to a String");
    }
    std::fs::write(dir.join("kernels.inc"), unit)
}

/// Runs the compiler with `args`; `Err` with its diagnostics when it fails.
pub fn run_compiler(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, String> {
    let cxx = compiler();
    let out = Command::new(&cxx)
        .args(args)
        .output()
        .map_err(|e| format!("running the C++ compiler {cxx}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{cxx} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The names of the `__global__` functions in preprocessed source where `__global__` became
/// the marker `FLUX_EMU_KERNEL`.
pub fn kernel_names(preprocessed: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = preprocessed;
    while let Some(at) = rest.find("FLUX_EMU_KERNEL") {
        rest = &rest[at + "FLUX_EMU_KERNEL".len()..];
        let Some(open) = rest.find('(') else { break };
        let decl = &rest[..open];
        if let Some(name) = decl.split_whitespace().last() {
            names.push(name.to_string());
        }
        rest = &rest[open..];
    }
    names
}

/// Builds the model's `libcuda.so` into `dir` (with `libcublas.so` and `libcublasLt.so` as
/// links to it): the driver and BLAS stand-ins of `tests/emu` over every kernel.
pub fn build_model_libraries(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    write_kernels_unit(dir).map_err(|e| format!("writing kernels.inc: {e}"))?;
    let emu = emu_dir();
    let inc = |p: &Path| p.as_os_str().to_owned();
    let (emu_inc, dir_inc) = (inc(&emu), inc(dir));
    let driver = emu.join("driver.cpp");
    // The kernel list: preprocess the kernels with `__global__` as a marker.
    let listing = dir.join("listing.cpp");
    std::fs::write(
        &listing,
        "#define FLUX_CUDA_EMULATOR 1\n#include \"emu.h\"\n#include \"kernels.inc\"\n",
    )
    .map_err(|e| format!("writing {}: {e}", listing.display()))?;
    let pre = run_compiler(&[
        "-std=c++20".as_ref(),
        "-E".as_ref(),
        "-P".as_ref(),
        "-DFLUX_EMU_LIST_KERNELS".as_ref(),
        "-I".as_ref(),
        &emu_inc,
        "-I".as_ref(),
        &dir_inc,
        listing.as_os_str(),
    ])?;
    let names = kernel_names(&String::from_utf8_lossy(&pre));
    if names.is_empty() {
        return Err("no __global__ function found in the kernels".into());
    }
    let mut table = String::new();
    for n in &names {
        writeln!(table, "FLUX_KERNEL({n})").expect("writing to a String");
    }
    std::fs::write(dir.join("kernel_table.inc"), table)
        .map_err(|e| format!("writing kernel_table.inc: {e}"))?;
    let lib = dir.join("libcuda.so");
    run_compiler(&[
        "-std=c++20".as_ref(),
        "-O1".as_ref(),
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-pthread".as_ref(),
        "-ffp-contract=off".as_ref(),
        "-I".as_ref(),
        &emu_inc,
        "-I".as_ref(),
        &dir_inc,
        "-o".as_ref(),
        lib.as_os_str(),
        driver.as_os_str(),
        emu.join("blas.cpp").as_os_str(),
    ])?;
    for alias in ["libcublas.so", "libcublasLt.so"] {
        let link = dir.join(alias);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libcuda.so", &link)
            .map_err(|e| format!("linking {}: {e}", link.display()))?;
    }
    Ok(())
}
