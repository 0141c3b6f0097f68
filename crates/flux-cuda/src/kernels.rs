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
    /// The kernel entry points it defines, with their parameter lists.
    pub entries: Vec<Entry>,
}

/// One kernel entry point of a PTX module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The kernel's (unmangled, `extern "C"`) name.
    pub name: String,
    /// The type of each parameter, in order.
    pub params: Vec<ParamType>,
}

/// A kernel parameter's type as PTX declares it: what the launch must pass in its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// 64 bits: a pointer or an `unsigned long long` (`.u64`, `.s64`, `.b64`).
    Bits64,
    /// 32-bit integer (`.u32`, `.s32`, `.b32`): `int` or `unsigned int`.
    Int32,
    /// `float` (`.f32`).
    F32,
    /// `double` (`.f64`).
    F64,
    /// Anything else (a struct or a narrow integer), which no launch of this crate passes.
    Other,
}

impl ParamType {
    fn of_ptx(ty: &str) -> Self {
        match ty {
            ".u64" | ".s64" | ".b64" => ParamType::Bits64,
            ".u32" | ".s32" | ".b32" => ParamType::Int32,
            ".f32" => ParamType::F32,
            ".f64" => ParamType::F64,
            _ => ParamType::Other,
        }
    }
}

impl std::fmt::Display for ParamType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParamType::Bits64 => "a pointer or u64",
            ParamType::Int32 => "a 32-bit int",
            ParamType::F32 => "an f32",
            ParamType::F64 => "an f64",
            ParamType::Other => "a type no launch passes",
        })
    }
}

/// Checks a launch's argument types against the kernel's parameters: the driver copies each
/// argument by the size the kernel declares, so a wrong count or type would make the kernel read
/// garbage. The error names the kernel, the slot and both types.
pub fn check_launch_args(
    entry: &Entry,
    args: impl ExactSizeIterator<Item = ParamType>,
) -> Result<(), String> {
    if args.len() != entry.params.len() {
        return Err(format!(
            "kernel {} takes {} arguments, the launch passes {}",
            entry.name,
            entry.params.len(),
            args.len()
        ));
    }
    for (i, (&want, got)) in entry.params.iter().zip(args).enumerate() {
        if want != got || want == ParamType::Other {
            return Err(format!(
                "kernel {} argument {i}: the kernel takes {want}, the launch passes {got}",
                entry.name
            ));
        }
    }
    Ok(())
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

/// The `.entry` functions in PTX text with their parameter types (NVRTC writes one
/// `.param .TYPE NAME` per line between the entry's parentheses).
fn entries(ptx: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    let mut open = false;
    for line in ptx.lines() {
        let l = line.trim();
        let head = l
            .strip_prefix(".visible .entry ")
            .or_else(|| l.strip_prefix(".entry "));
        if let Some(rest) = head {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            open = !name.is_empty() && rest[name.len()..].trim_start().starts_with('(');
            if !name.is_empty() {
                out.push(Entry {
                    name,
                    params: Vec::new(),
                });
            }
            if open && rest.trim_end().ends_with(')') {
                open = false;
            }
            continue;
        }
        if !open {
            continue;
        }
        if l.starts_with(')') {
            open = false;
            continue;
        }
        if let (Some(entry), Some(param)) = (out.last_mut(), l.strip_prefix(".param ")) {
            // `.param .u64 name` or `.param .align 8 .b8 name[16]` (a struct: Other).
            let ty = param.split_whitespace().next().unwrap_or("");
            let is_array = param.contains('[');
            entry.params.push(if is_array {
                ParamType::Other
            } else {
                ParamType::of_ptx(ty)
            });
        }
    }
    out
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
    fn entries_and_parameter_types_are_read_from_ptx() {
        let ptx = ".version 8.7\n.target sm_80\n\n\
                   // .globl\tlincomb_f32\n\
                   .visible .entry lincomb_f32(\n\
                   \t.param .u64 lincomb_f32_param_0,\n\
                   \t.param .f64 lincomb_f32_param_1,\n\
                   \t.param .u32 lincomb_f32_param_2,\n\
                   \t.param .f32 lincomb_f32_param_3,\n\
                   \t.param .align 8 .b8 lincomb_f32_param_4[16]\n\
                   )\n{\n\tld.param.u64 %rd1, [lincomb_f32_param_0];\n}\n\
                   .entry empty_f64()\n{\n}\n\
                   .visible .entry helper_f64(\n\t.param .s64 x\n)\n";
        let got = entries(ptx);
        let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["lincomb_f32", "empty_f64", "helper_f64"]);
        assert_eq!(
            got[0].params,
            [
                ParamType::Bits64,
                ParamType::F64,
                ParamType::Int32,
                ParamType::F32,
                ParamType::Other
            ]
        );
        assert!(got[1].params.is_empty());
        assert_eq!(got[2].params, [ParamType::Bits64]);
    }

    #[test]
    fn launches_with_other_argument_types_are_refused() {
        let entry = Entry {
            name: "k".into(),
            params: vec![ParamType::Bits64, ParamType::Int32, ParamType::F64],
        };
        let ok = [ParamType::Bits64, ParamType::Int32, ParamType::F64];
        assert_eq!(check_launch_args(&entry, ok.iter().copied()), Ok(()));
        let short = check_launch_args(&entry, ok[..2].iter().copied()).unwrap_err();
        assert!(
            short.contains("takes 3 arguments") && short.contains("passes 2"),
            "{short}"
        );
        let swapped = [ParamType::Bits64, ParamType::F64, ParamType::Int32];
        let err = check_launch_args(&entry, swapped.iter().copied()).unwrap_err();
        assert!(
            err.contains("argument 1") && err.contains("32-bit int"),
            "{err}"
        );
        let other = Entry {
            name: "s".into(),
            params: vec![ParamType::Other],
        };
        assert!(check_launch_args(&other, [ParamType::Other].into_iter()).is_err());
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
