//! `--backend cpu|wgpu|cuda`: picks the compute device and runs a generic job on it.
//!
//! Commands write their work once as a [`Job`] (a method generic over the backend); [`run_on`]
//! creates the device the user asked for and calls it. Backends are optional cargo features of
//! this crate (`wgpu`, `cuda`), so a CPU-only build never compiles their dependencies; asking for
//! one that is not compiled in, or not available on this machine, is an error naming it.

use anyhow::Result;
use clap::ValueEnum;
use flux_kernels::{Backend, Cpu};

/// The compute backends the command line knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU (f32 and f64; the reference for the others).
    #[default]
    Cpu,
    /// wgpu compute shaders (Vulkan, Metal, DX12); needs the `wgpu` feature.
    Wgpu,
    /// NVIDIA GPUs through CUDA; needs the `cuda` feature.
    Cuda,
}

impl BackendKind {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Work written once for every backend.
pub trait Job {
    /// What the job returns.
    type Output;
    /// Whether the job checks numerics against reference outputs (`flux parity`): a backend
    /// with a faster, less exact mode then defaults to its exact one.
    #[cfg_attr(
        not(feature = "cuda"),
        allow(dead_code, reason = "read by the cuda backend")
    )]
    const EXACT: bool = false;
    /// Runs the job on `be`.
    fn run<B: Backend>(self, be: &B) -> Result<Self::Output>;
}

/// Creates the backend `kind` names and runs `job` on it.
pub fn run_on<J: Job>(kind: BackendKind, job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Cpu => job.run(&Cpu),
        BackendKind::Wgpu => run_wgpu(job),
        BackendKind::Cuda => run_cuda(job),
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu<J: Job>(job: J) -> Result<J::Output> {
    let be = flux_wgpu::Wgpu::new()
        .map_err(|e| anyhow::anyhow!("backend 'wgpu' is not available on this machine: {e}"))?;
    job.run(&be)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<J: Job>(job: J) -> Result<J::Output> {
    drop(job);
    Err(not_compiled(BackendKind::Wgpu))
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(job: J) -> Result<J::Output> {
    let bf16 = cuda_attention(std::env::var(CUDA_ATTENTION_ENV).ok().as_deref())?;
    let linear = cuda_linear(std::env::var(CUDA_LINEAR_ENV).ok().as_deref(), J::EXACT)?;
    let be = flux_cuda::Cuda::new()
        .map_err(|e| anyhow::anyhow!("backend 'cuda' is not available on this machine: {e}"))?
        .with_bf16_attention(bf16)
        .with_bf16_gemm(linear != CudaLinear::F32)
        .with_fp8_gemm(linear == CudaLinear::Fp8);
    eprintln!(
        "cuda: linear layers in {} ({CUDA_LINEAR_ENV}), attention in {} ({CUDA_ATTENTION_ENV})",
        linear.as_str(),
        if bf16 { "bf16" } else { "f32" }
    );
    job.run(&be)
}

/// Environment variable choosing the CUDA attention kernel: `f32` (exact, the default) or
/// `bf16` (tensor cores, bf16 operands, f32 accumulation).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const CUDA_ATTENTION_ENV: &str = "FLUX_CUDA_ATTENTION";

/// Whether the value of [`CUDA_ATTENTION_ENV`] asks for the bf16 tensor-core attention.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn cuda_attention(value: Option<&str>) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("" | "f32") => Ok(false),
        Some("bf16") => Ok(true),
        Some(other) => Err(anyhow::anyhow!(
            "{CUDA_ATTENTION_ENV}: expected 'f32' (exact attention) or 'bf16' (tensor cores), got '{other}'"
        )),
    }
}

/// Environment variable choosing how the CUDA backend multiplies bf16 and fp8 weights: `bf16`
/// (tensor cores, activations rounded to bf16; fp8 weights widened to bf16; the default), `fp8`
/// (fp8 weights with activations quantised to e4m3, fp8 tensor cores) or `f32` (weights
/// widened to f32, exact; the default of `flux parity`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const CUDA_LINEAR_ENV: &str = "FLUX_CUDA_LINEAR";

/// How the CUDA backend multiplies packed weights (see [`CUDA_LINEAR_ENV`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLinear {
    /// Weights widened to f32, an f32 GEMM (exact).
    F32,
    /// bf16 tensor cores, activations rounded to bf16.
    Bf16,
    /// fp8 tensor cores for fp8 weights, activations quantised to e4m3.
    Fp8,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl CudaLinear {
    fn as_str(self) -> &'static str {
        match self {
            CudaLinear::F32 => "f32",
            CudaLinear::Bf16 => "bf16",
            CudaLinear::Fp8 => "fp8",
        }
    }
}

/// The mode the value of [`CUDA_LINEAR_ENV`] asks for; unset, `f32` for an `exact` job and
/// `bf16` otherwise.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn cuda_linear(value: Option<&str>, exact: bool) -> Result<CudaLinear> {
    match value.map(str::trim) {
        None | Some("") if exact => Ok(CudaLinear::F32),
        None | Some("" | "bf16") => Ok(CudaLinear::Bf16),
        Some("f32") => Ok(CudaLinear::F32),
        Some("fp8") => Ok(CudaLinear::Fp8),
        Some(other) => Err(anyhow::anyhow!(
            "{CUDA_LINEAR_ENV}: expected 'bf16' (tensor cores), 'fp8' (fp8 tensor cores) or 'f32' (exact), got '{other}'"
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(job: J) -> Result<J::Output> {
    drop(job);
    Err(not_compiled(BackendKind::Cuda))
}

#[cfg(not(all(feature = "wgpu", feature = "cuda")))]
fn not_compiled(kind: BackendKind) -> anyhow::Error {
    anyhow::anyhow!(
        "backend '{kind}' is not compiled into this binary\nhint: rebuild with `cargo build -p flux-cli --features {kind}`, or use --backend cpu"
    )
}

#[cfg(test)]
mod tests {
    use super::{BackendKind, Job, run_on};
    use flux_kernels::Backend;

    struct Name;
    impl Job for Name {
        type Output = String;
        fn run<B: Backend>(self, be: &B) -> anyhow::Result<String> {
            Ok(be.name())
        }
    }

    #[test]
    fn the_cuda_attention_setting_is_parsed_or_refused_by_name() {
        use super::cuda_attention;
        assert!(!cuda_attention(None).unwrap());
        assert!(!cuda_attention(Some("f32")).unwrap());
        assert!(cuda_attention(Some("bf16")).unwrap());
        let e = cuda_attention(Some("fp16")).unwrap_err().to_string();
        assert!(
            e.contains("FLUX_CUDA_ATTENTION") && e.contains("'fp16'"),
            "{e}"
        );
    }

    #[test]
    fn the_cuda_linear_setting_is_parsed_or_refused_by_name() {
        use super::{CudaLinear, cuda_linear};
        assert_eq!(cuda_linear(None, false).unwrap(), CudaLinear::Bf16);
        assert_eq!(cuda_linear(None, true).unwrap(), CudaLinear::F32);
        assert_eq!(cuda_linear(Some(" bf16 "), true).unwrap(), CudaLinear::Bf16);
        assert_eq!(cuda_linear(Some("fp8"), false).unwrap(), CudaLinear::Fp8);
        assert_eq!(cuda_linear(Some("f32"), false).unwrap(), CudaLinear::F32);
        let e = cuda_linear(Some("int8"), false).unwrap_err().to_string();
        assert!(
            e.contains("FLUX_CUDA_LINEAR") && e.contains("'int8'"),
            "{e}"
        );
    }

    #[test]
    fn cpu_runs_the_job_on_the_cpu() {
        assert_eq!(run_on(BackendKind::Cpu, Name).unwrap(), "cpu");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn a_backend_not_compiled_in_is_an_error_naming_it() {
        let e = run_on(BackendKind::Wgpu, Name).unwrap_err().to_string();
        assert!(e.contains("'wgpu'") && e.contains("not compiled"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_not_compiled_in_is_an_error_naming_it() {
        let e = run_on(BackendKind::Cuda, Name).unwrap_err().to_string();
        assert!(e.contains("'cuda'") && e.contains("not compiled"), "{e}");
    }
}
