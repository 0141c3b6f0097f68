//! The CUDA backend of flux-kernels: [`Cuda`] implements [`flux_kernels::Backend`] with
//! cudarc (driver API, NVRTC, cuBLAS).
//!
//! The kernels live as CUDA C sources in `shaders/cuda/` (one file per op family), are embedded
//! with `include_str!` and compiled by NVRTC at start-up for the device's architecture, so the
//! crate builds on machines without a CUDA toolkit and loads the driver, NVRTC and cuBLAS only
//! at run time. [`Cuda::new`] checks that each library is present before touching it and
//! returns a [`CudaError`] naming what is missing, never a panic.
//!
//! Every op is queued on one stream and nothing inside an op waits for the device: a model
//! forward or a whole sampler loop runs without a host round trip until the caller downloads a
//! tensor (or asks for a reduction, whose scalar has to reach the host).
//!
//! Precision follows the CPU backend: f32 and f64 activations, weights kept in their stored
//! dtype (f32, f64, bf16, f16, fp8 e4m3fn) and widened inside kernels. Linear layers with bf16
//! or fp8 weights run on the tensor cores (activations rounded to bf16, f32 accumulation).

mod blas;
mod conv;
mod device;
pub mod kernels;
mod model;
mod sampler;

pub use device::{Cuda, CudaError, CudaStorage, driver_available};
pub use kernels::{KERNEL_FILES, compile_kernels, nvrtc_available};
