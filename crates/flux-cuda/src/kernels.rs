//! The CUDA C kernel sources and their run-time compilation with NVRTC.
//!
//! NVRTC needs no GPU, so the compile step is tested on machines without one.

use crate::CudaError;
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// Helpers prepended to every kernel file (types, conversions, warp and block reductions).
pub const COMMON: &str = include_str!("../../../shaders/cuda/common.cuh");

/// Every kernel file: `(name, source)`, one per op family.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    (
        "elementwise.cu",
        include_str!("../../../shaders/cuda/elementwise.cu"),
    ),
    ("reduce.cu", include_str!("../../../shaders/cuda/reduce.cu")),
    ("norms.cu", include_str!("../../../shaders/cuda/norms.cu")),
    (
        "modulation.cu",
        include_str!("../../../shaders/cuda/modulation.cu"),
    ),
    ("rope.cu", include_str!("../../../shaders/cuda/rope.cu")),
    (
        "softmax.cu",
        include_str!("../../../shaders/cuda/softmax.cu"),
    ),
    (
        "activations.cu",
        include_str!("../../../shaders/cuda/activations.cu"),
    ),
    ("conv.cu", include_str!("../../../shaders/cuda/conv.cu")),
    ("layout.cu", include_str!("../../../shaders/cuda/layout.cu")),
    ("casts.cu", include_str!("../../../shaders/cuda/casts.cu")),
    ("fp8.cu", include_str!("../../../shaders/cuda/fp8.cu")),
    (
        "attention.cu",
        include_str!("../../../shaders/cuda/attention.cu"),
    ),
    (
        "attention_tc.cu",
        include_str!("../../../shaders/cuda/attention_tc.cu"),
    ),
];

/// Environment variable with extra NVRTC include directories (separated like `PATH`), for
/// example the `include` folder of the `nvidia-cuda-runtime-cu12` wheel. The kernels include no
/// CUDA header today; the paths are passed so that they can.
pub const INCLUDE_ENV: &str = "FLUX_CUDA_INCLUDE";

/// One compiled kernel file.
#[derive(Debug)]
pub struct CompiledFile {
    /// The file name (`elementwise.cu`).
    pub file: &'static str,
    /// The PTX NVRTC produced.
    pub ptx: Ptx,
    /// The kernel entry points it defines.
    pub entries: Vec<String>,
}

/// Whether the NVRTC library can be loaded (looked up on the normal loader path).
pub fn nvrtc_available() -> bool {
    // A failed lookup of a dynamically loaded library panics inside cudarc; contain it.
    std::panic::catch_unwind(|| {
        // SAFETY: only tries to open the shared library and reports whether it was found.
        #[allow(unsafe_code)]
        unsafe {
            cudarc::nvrtc::sys::is_culib_present()
        }
    })
    .unwrap_or(false)
}

/// The include directories named by [`INCLUDE_ENV`].
pub fn include_paths_from_env() -> Vec<String> {
    std::env::var_os(INCLUDE_ENV)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The NVRTC virtual architecture for a compute capability (PTX for the newest architecture
/// the pinned CUDA version knows that is not newer than the device).
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (m, _) if m >= 10 => "compute_100",
        (9, _) => "compute_90",
        (8, n) if n >= 9 => "compute_89",
        (8, n) if n >= 6 => "compute_86",
        (8, _) => "compute_80",
        (7, n) if n >= 5 => "compute_75",
        _ => "compute_70",
    }
}

/// Names of the `.entry` functions in PTX text.
fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Compiles every file of [`KERNEL_FILES`] to PTX for `arch` (`compute_80`, `compute_90`, ...).
///
/// Fails with [`CudaError::MissingLibrary`] when NVRTC cannot be loaded and with
/// [`CudaError::Compile`] (holding NVRTC's log) when a file does not compile.
pub fn compile_kernels(
    arch: &'static str,
    include_paths: &[String],
) -> Result<Vec<CompiledFile>, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::MissingLibrary {
            library: "libnvrtc (NVRTC, the CUDA run-time compiler)",
            hint: "install the CUDA toolkit or the pip wheel nvidia-cuda-nvrtc-cu12 and put its \
                   nvidia/cuda_nvrtc/lib folder on LD_LIBRARY_PATH",
        });
    }
    // One NVRTC program per file, compiled in parallel (NVRTC is thread-safe across programs).
    std::thread::scope(|scope| {
        let handles: Vec<_> = KERNEL_FILES
            .iter()
            .map(|&(file, src)| scope.spawn(move || compile_file(file, src, arch, include_paths)))
            .collect();
        handles
            .into_iter()
            .zip(KERNEL_FILES)
            .map(|(h, &(file, _))| {
                h.join().unwrap_or_else(|_| {
                    Err(CudaError::Compile {
                        file,
                        log: "NVRTC panicked".into(),
                    })
                })
            })
            .collect()
    })
}

fn compile_file(
    file: &'static str,
    src: &str,
    arch: &'static str,
    include_paths: &[String],
) -> Result<CompiledFile, CudaError> {
    let source = format!("{COMMON}\n#line 1 \"{file}\"\n{src}");
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: include_paths.to_vec(),
        name: Some(file.to_string()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
            file,
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => other.to_string(),
            },
        })?;
    let entries = entries(&ptx.to_src());
    Ok(CompiledFile { file, ptx, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_read_from_ptx() {
        let ptx = ".version 8.7\n.visible .entry lincomb_f32(\n\t.param .u64 a\n)\n\
                   .entry helper_f64(\n";
        assert_eq!(entries(ptx), vec!["lincomb_f32", "helper_f64"]);
    }

    #[test]
    #[cfg_attr(
        not(flux_require_nvrtc),
        ignore = "needs NVRTC: set FLUX_REQUIRE_NVRTC=1 (CI does) with libnvrtc on LD_LIBRARY_PATH"
    )]
    fn a_kernel_that_does_not_compile_reports_the_nvrtc_log() {
        assert!(nvrtc_available(), "NVRTC is not on the loader path");
        let src = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_helper(); }";
        match compile_file("broken.cu", src, "compute_80", &[]) {
            Err(CudaError::Compile { file, log }) => {
                assert_eq!(file, "broken.cu");
                assert!(log.contains("undefined_helper"), "log: {log}");
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }

    #[test]
    fn arch_follows_the_compute_capability() {
        assert_eq!(arch_for(9, 0), "compute_90");
        assert_eq!(arch_for(8, 0), "compute_80");
        assert_eq!(arch_for(8, 9), "compute_89");
        assert_eq!(arch_for(12, 0), "compute_100");
    }
}
