//! Row-major GEMMs on cuBLAS (`cublasGemmStridedBatchedEx`).
//!
//! cuBLAS is column-major: a row-major `C = op(A) op(B)` is computed as the column-major
//! `C^T = op(B)^T op(A)^T`, i.e. with the operands swapped.
#![allow(unsafe_code)]

use crate::device::Cuda;
use cudarc::cublas::sys::cudaDataType;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use flux_kernels::{KernelError, Result};
use std::ffi::c_void;

/// Element types of one GEMM: inputs, output and accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmKind {
    /// f32 in and out, f32 accumulation (no TF32: results match the CPU's f32 GEMM closely).
    F32,
    /// f64 in and out.
    F64,
    /// bf16 inputs, f32 output and accumulation (tensor cores).
    Bf16F32,
}

/// One (batched) row-major GEMM `C = alpha * op(A) op(B) + beta * C` on device addresses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `A` is stored `[k, m]` (transposed) instead of `[m, k]`.
    pub trans_a: bool,
    /// `B` is stored `[n, k]` (transposed) instead of `[k, n]`.
    pub trans_b: bool,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f64,
    pub beta: f64,
}

fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::InvalidArgument {
        op,
        message: format!("dimension {v} exceeds the 32-bit range of cuBLAS"),
    })
}

impl Cuda {
    /// Queues `g` on the stream. Addresses must point at buffers large enough for the shapes,
    /// leading dimensions and strides given (the callers derive all of them from tensor shapes).
    pub(crate) fn gemm(&self, kind: GemmKind, g: &Gemm) -> Result<()> {
        const OP: &str = "gemm";
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let (ab_type, c_type, compute) = match kind {
            GemmKind::F32 => (
                cudaDataType::CUDA_R_32F,
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            GemmKind::F64 => (
                cudaDataType::CUDA_R_64F,
                cudaDataType::CUDA_R_64F,
                cublasComputeType_t::CUBLAS_COMPUTE_64F,
            ),
            GemmKind::Bf16F32 => (
                cudaDataType::CUDA_R_16BF,
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let trans = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha32, beta32) = (g.alpha as f32, g.beta as f32);
        let (alpha_p, beta_p): (*const c_void, *const c_void) = if kind == GemmKind::F64 {
            (
                std::ptr::from_ref(&g.alpha).cast(),
                std::ptr::from_ref(&g.beta).cast(),
            )
        } else {
            (
                std::ptr::from_ref(&alpha32).cast(),
                std::ptr::from_ref(&beta32).cast(),
            )
        };
        let blas = self
            .inner
            .blas
            .lock()
            .map_err(|_| KernelError::Device("cuBLAS handle poisoned".into()))?;
        // SAFETY: the handle is bound to this backend's stream; the device addresses and the
        // sizes, leading dimensions and strides come from checked tensor shapes (see the callers),
        // so every access stays inside its buffer; alpha/beta outlive the call, which only queues
        // work on the stream.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                trans(g.trans_b),
                trans(g.trans_a),
                int(OP, g.n)?,
                int(OP, g.m)?,
                int(OP, g.k)?,
                alpha_p,
                g.b as *const c_void,
                ab_type,
                int(OP, g.ldb)?,
                g.stride_b as i64,
                g.a as *const c_void,
                ab_type,
                int(OP, g.lda)?,
                g.stride_a as i64,
                beta_p,
                g.c as *mut c_void,
                c_type,
                int(OP, g.ldc)?,
                g.stride_c as i64,
                int(OP, g.batch)?,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Device(format!("cuBLAS GEMM: {e}")))
    }
}
