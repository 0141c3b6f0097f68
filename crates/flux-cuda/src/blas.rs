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
        // cuBLAS works on the calling thread's current context.
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| KernelError::Device(format!("gemm: {e}")))?;
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

/// A cuBLASLt handle and its workspace, for GEMMs with a fused bias epilogue.
pub(crate) struct Lt {
    handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    workspace: cudarc::driver::CudaSlice<u8>,
}

// SAFETY: the handle is only used under the backend's mutex, on the backend's one stream.
unsafe impl Send for Lt {}
// SAFETY: as above; every use goes through `&Mutex<Lt>`.
unsafe impl Sync for Lt {}

/// cuBLASLt workspace (the size cuBLASLt recommends for Hopper).
const LT_WORKSPACE: usize = 32 << 20;

impl Lt {
    /// A handle when cuBLASLt can be loaded (`None` otherwise: GEMMs then add the bias apart).
    pub(crate) fn new(stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Option<Lt> {
        let present = std::panic::catch_unwind(|| {
            // SAFETY: only opens the shared library to see whether it exists.
            unsafe { cudarc::cublaslt::sys::is_culib_present() }
        })
        .unwrap_or(false);
        if !present {
            return None;
        }
        let handle = cudarc::cublaslt::result::create_handle().ok()?;
        // SAFETY: cuBLASLt only writes scratch data to the workspace, ordered on the stream.
        let workspace = unsafe { stream.alloc::<u8>(LT_WORKSPACE) }.ok()?;
        Some(Lt { handle, workspace })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `create_handle` and is dropped once.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.handle) };
    }
}

/// Host-side cuBLASLt descriptors, destroyed when dropped (they are not needed once the GEMM
/// is queued).
struct LtDescs {
    desc: Option<cudarc::cublaslt::sys::cublasLtMatmulDesc_t>,
    layouts: Vec<cudarc::cublaslt::sys::cublasLtMatrixLayout_t>,
    pref: Option<cudarc::cublaslt::sys::cublasLtMatmulPreference_t>,
}

impl Drop for LtDescs {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as r;
        // SAFETY: each descriptor was created by cuBLASLt and is destroyed exactly once.
        unsafe {
            if let Some(d) = self.desc {
                let _ = r::destroy_matmul_desc(d);
            }
            for &l in &self.layouts {
                let _ = r::destroy_matrix_layout(l);
            }
            if let Some(p) = self.pref {
                let _ = r::destroy_matmul_pref(p);
            }
        }
    }
}

/// One row-major `out [m, n] (f32) = alpha * x [m, k] w [n, k]^T + beta * out` on cuBLASLt
/// (column-major `out^T = W^T' X'`: `W` transposed, the "TN" layout fp8 requires), with an
/// optional epilogue and a device-side dequantisation scale for `x`.
struct LtGemm {
    dims: (usize, usize, usize),
    /// Element type of `x` and `w` (bf16 or e4m3).
    input: cudarc::cublaslt::sys::cudaDataType,
    x: u64,
    w: u64,
    out: u64,
    alpha: f32,
    beta: f32,
    /// Bias epilogue (f32 bias `[n]`), with GELU after it when set.
    bias: Option<(u64, bool)>,
    /// Device address of one f32 multiplying `x` (fp8 activations).
    x_scale: Option<u64>,
}

impl Cuda {
    /// `out [m, n] (f32) = alpha * x [m, k] (bf16) w [n, k]^T (bf16) + bias [n] (f32)` on
    /// cuBLASLt with the bias added in the GEMM's epilogue, followed there by GELU (the tanh
    /// form cuBLASLt implements) when `gelu`. `Err` when cuBLASLt is missing or refuses the
    /// problem; the caller then adds the bias (and applies the activation) itself.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_bf16_bias_lt(
        &self,
        dims: (usize, usize, usize),
        x: u64,
        w: u64,
        bias: u64,
        out: u64,
        alpha: f32,
        gelu: bool,
    ) -> std::result::Result<(), String> {
        self.lt_gemm(&LtGemm {
            dims,
            input: cudarc::cublaslt::sys::cudaDataType::CUDA_R_16BF,
            x,
            w,
            out,
            alpha,
            beta: 0.0,
            bias: Some((bias, gelu)),
            x_scale: None,
        })
    }

    /// `out [m, n] (f32) = alpha * x_scale * xq [m, k] (e4m3) w [n, k]^T (e4m3) + beta * out`
    /// on the fp8 tensor cores, `x_scale` read from the device. `Err` when cuBLASLt is missing
    /// or refuses the problem (shape, alignment, device); nothing is written then.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_fp8_lt(
        &self,
        dims: (usize, usize, usize),
        xq: u64,
        w: u64,
        x_scale: u64,
        out: u64,
        alpha: f32,
        beta: f32,
    ) -> std::result::Result<(), String> {
        self.lt_gemm(&LtGemm {
            dims,
            input: cudarc::cublaslt::sys::cudaDataType::CUDA_R_8F_E4M3,
            x: xq,
            w,
            out,
            alpha,
            beta,
            bias: None,
            x_scale: Some(x_scale),
        })
    }

    fn lt_gemm(&self, g: &LtGemm) -> std::result::Result<(), String> {
        use cudarc::cublaslt::result as r;
        use cudarc::cublaslt::sys as s;
        let (m, n, k) = g.dims;
        self.inner.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let mut lt = self
            .inner
            .lt
            .lock()
            .map_err(|_| "cuBLASLt handle poisoned")?;
        let Some(lt) = lt.as_mut() else {
            return Err("cuBLASLt not available".into());
        };
        let e = |e: cudarc::cublaslt::result::CublasError| e.to_string();
        let mut d = LtDescs {
            desc: None,
            layouts: Vec::new(),
            pref: None,
        };
        let desc = r::create_matmul_desc(
            s::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            s::cudaDataType::CUDA_R_32F,
        )
        .map_err(e)?;
        d.desc = Some(desc);
        let trans_a = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // Column-major: D' [n, m] = W'^T [n, k] x X' [k, m], a bias broadcast over columns.
        let a_layout = r::create_matrix_layout(g.input, k as u64, n as u64, k as i64).map_err(e)?;
        d.layouts.push(a_layout);
        let b_layout = r::create_matrix_layout(g.input, k as u64, m as u64, k as i64).map_err(e)?;
        d.layouts.push(b_layout);
        let c_layout =
            r::create_matrix_layout(s::cudaDataType::CUDA_R_32F, n as u64, m as u64, n as i64)
                .map_err(e)?;
        d.layouts.push(c_layout);
        let pref = r::create_matmul_pref().map_err(e)?;
        d.pref = Some(pref);
        let ws = LT_WORKSPACE;
        let stream = self.inner.stream.cu_stream();
        let wsp = self.ptr(&lt.workspace);
        // SAFETY: attribute buffers are plain values of the documented types and sizes; the
        // device addresses come from tensors sized for these shapes (checked by the caller);
        // the GEMM is queued on the backend's stream and the descriptors outlive the call.
        unsafe {
            r::set_matmul_desc_attribute(
                desc,
                s::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                std::ptr::from_ref(&trans_a).cast(),
                std::mem::size_of_val(&trans_a),
            )
            .map_err(e)?;
            if let Some((bias, gelu)) = g.bias {
                let epilogue = if gelu {
                    s::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS
                } else {
                    s::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
                };
                let bias_ptr = bias as *const c_void;
                r::set_matmul_desc_attribute(
                    desc,
                    s::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    std::ptr::from_ref(&epilogue).cast(),
                    std::mem::size_of_val(&epilogue),
                )
                .map_err(e)?;
                r::set_matmul_desc_attribute(
                    desc,
                    s::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    std::ptr::from_ref(&bias_ptr).cast(),
                    std::mem::size_of_val(&bias_ptr),
                )
                .map_err(e)?;
            }
            if let Some(scale) = g.x_scale {
                // X is cuBLASLt's B operand (see the layouts above).
                let scale_ptr = scale as *const c_void;
                r::set_matmul_desc_attribute(
                    desc,
                    s::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                    std::ptr::from_ref(&scale_ptr).cast(),
                    std::mem::size_of_val(&scale_ptr),
                )
                .map_err(e)?;
            }
            r::set_matmul_pref_attribute(
                pref,
                s::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                std::ptr::from_ref(&ws).cast(),
                std::mem::size_of_val(&ws),
            )
            .map_err(e)?;
            let heuristic = r::get_matmul_algo_heuristic(
                lt.handle, desc, a_layout, b_layout, c_layout, c_layout, pref,
            )
            .map_err(e)?;
            r::matmul(
                lt.handle,
                desc,
                std::ptr::from_ref(&g.alpha).cast(),
                std::ptr::from_ref(&g.beta).cast(),
                g.w as *const c_void,
                a_layout,
                g.x as *const c_void,
                b_layout,
                g.out as *const c_void,
                c_layout,
                g.out as *mut c_void,
                c_layout,
                &raw const heuristic.algo,
                wsp as *mut c_void,
                ws,
                stream.cast(),
            )
            .map_err(e)
        }
    }
}
