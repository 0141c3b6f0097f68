//! The device handle: context, stream, compiled kernels, cuBLAS, and the launch helpers the op
//! implementations share.
//!
//! This is the only module (with `blas`) that calls unsafe cudarc functions; each call states
//! why its arguments are valid.
#![allow(unsafe_code)]

use crate::kernels;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use flux_kernels::{DType, KernelError, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a CUDA backend could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver library is not installed.
    #[error(
        "no CUDA driver: libcuda.so (the NVIDIA driver library) was not found on the loader path"
    )]
    NoDriver,
    /// The driver works but reports no device.
    #[error("no CUDA device: the driver reports {0} devices")]
    NoDevice(i32),
    /// The requested device does not exist.
    #[error("CUDA device {ordinal} requested, the driver reports {count} devices")]
    DeviceOutOfRange { ordinal: usize, count: i32 },
    /// A run-time library other than the driver is missing.
    #[error("{library} not found: {hint}")]
    MissingLibrary {
        library: &'static str,
        hint: &'static str,
    },
    /// A driver call failed.
    #[error("CUDA driver error while {during}: {message}")]
    Driver {
        during: &'static str,
        message: String,
    },
    /// A kernel file did not compile.
    #[error("NVRTC could not compile {file}:\n{log}")]
    Compile { file: &'static str, log: String },
    /// cuBLAS could not be initialised.
    #[error("cuBLAS initialisation failed: {0}")]
    Blas(String),
    /// A library call panicked (caught; reported instead of unwinding into the caller).
    #[error("the CUDA libraries failed while {0} (caught a panic)")]
    Panic(&'static str),
}

/// Device memory of a tensor: raw bytes of the tensor's dtype, plus the factor that multiplies
/// a stored weight when it is widened (fp8 checkpoints carry one; 1 otherwise).
pub struct CudaStorage {
    pub(crate) buf: CudaSlice<u8>,
    pub(crate) scale: f32,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStorage")
            .field("bytes", &self.buf.len())
            .field("scale", &self.scale)
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Every kernel entry point with its parameter types (checked at each launch).
    funcs: HashMap<String, (CudaFunction, kernels::Entry)>,
    pub(crate) blas: Mutex<CudaBlas>,
    /// cuBLASLt for GEMMs with a bias epilogue (`None` when the library is missing).
    pub(crate) lt: Mutex<Option<crate::blas::Lt>>,
    name: String,
    sm_count: u32,
    /// Compute capability (major, minor).
    pub(crate) capability: (i32, i32),
    /// GEMM shapes cuBLASLt refused in fp8 (they take the bf16 path from then on).
    pub(crate) fp8_refused: Mutex<std::collections::HashSet<(usize, usize, usize)>>,
}

/// A CUDA device with its stream, kernels and cuBLAS handle. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Cuda {
    pub(crate) inner: Arc<Inner>,
    /// Attention on the tensor cores with bf16 operands (see [`Cuda::with_bf16_attention`]).
    pub(crate) bf16_attention: bool,
    /// fp8 weights multiplied in fp8 on the tensor cores (see [`Cuda::with_fp8_gemm`]).
    pub(crate) fp8_gemm: bool,
    /// Packed weights multiplied in bf16 on the tensor cores (see [`Cuda::with_bf16_gemm`]).
    pub(crate) bf16_gemm: bool,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.inner.name)
            .field("bf16_attention", &self.bf16_attention)
            .field("fp8_gemm", &self.fp8_gemm)
            .field("bf16_gemm", &self.bf16_gemm)
            .finish_non_exhaustive()
    }
}

fn driver_err(during: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        during,
        message: e.to_string(),
    }
}

/// Runs `f`, turning a panic inside the CUDA libraries into [`CudaError::Panic`].
fn guarded<T>(
    during: &'static str,
    f: impl FnOnce() -> std::result::Result<T, CudaError>,
) -> std::result::Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(Err(CudaError::Panic(during)))
}

/// Whether the CUDA driver library (`libcuda`) can be loaded.
pub fn driver_available() -> bool {
    library_present(cudarc::driver::sys::is_culib_present)
}

fn library_present(check: unsafe fn() -> bool) -> bool {
    // SAFETY: the check only tries to open a shared library; a panic is contained.
    std::panic::catch_unwind(|| unsafe { check() }).unwrap_or(false)
}

impl Cuda {
    /// The first CUDA device, with every kernel compiled for its architecture.
    ///
    /// Fails cleanly (no panic) when the driver, a device, NVRTC or cuBLAS is missing.
    pub fn new() -> std::result::Result<Cuda, CudaError> {
        Self::with_device(0)
    }

    /// CUDA device `ordinal`.
    pub fn with_device(ordinal: usize) -> std::result::Result<Cuda, CudaError> {
        guarded("opening the device", || Self::open(ordinal))
    }

    fn open(ordinal: usize) -> std::result::Result<Cuda, CudaError> {
        if !library_present(cudarc::driver::sys::is_culib_present) {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(driver_err("counting devices"))?;
        if count <= 0 {
            return Err(CudaError::NoDevice(count));
        }
        if ordinal >= count as usize {
            return Err(CudaError::DeviceOutOfRange { ordinal, count });
        }
        if !kernels::nvrtc_available() {
            return Err(CudaError::MissingLibrary {
                library: "libnvrtc (NVRTC, the CUDA run-time compiler)",
                hint: "install the CUDA toolkit or the pip wheel nvidia-cuda-nvrtc-cu12 and put \
                       its nvidia/cuda_nvrtc/lib folder on LD_LIBRARY_PATH",
            });
        }
        if !library_present(cudarc::cublas::sys::is_culib_present) {
            return Err(CudaError::MissingLibrary {
                library: "libcublas (cuBLAS)",
                hint: "install the CUDA toolkit or the pip wheel nvidia-cublas-cu12 and put its \
                       nvidia/cublas/lib folder on LD_LIBRARY_PATH",
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating the context"))?;
        // One stream for everything: cudarc's per-buffer events are not needed.
        // SAFETY: no buffer exists yet, so none depends on event tracking.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let name = ctx.name().map_err(driver_err("reading the device name"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("reading the multiprocessor count"))?;
        let compiled = kernels::compile_kernels(
            kernels::arch_for(major, minor),
            &kernels::include_paths_from_env(),
        )?;
        let mut funcs = HashMap::new();
        for file in compiled {
            let module = ctx
                .load_module(file.ptx)
                .map_err(driver_err("loading a kernel module"))?;
            for entry in file.entries {
                let f = module
                    .load_function(&entry.name)
                    .map_err(driver_err("loading a kernel"))?;
                funcs.insert(entry.name.clone(), (f, entry));
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(e.to_string()))?;
        let stream_for_lt = stream.clone();
        Ok(Cuda {
            inner: Arc::new(Inner {
                ctx,
                stream,
                funcs,
                blas: Mutex::new(blas),
                lt: Mutex::new(crate::blas::Lt::new(&stream_for_lt)),
                name: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
                sm_count: sm_count.max(1) as u32,
                capability: (major, minor),
                fp8_refused: Mutex::new(std::collections::HashSet::new()),
            }),
            bf16_attention: false,
            fp8_gemm: false,
            bf16_gemm: true,
        })
    }

    /// This device with attention computed on the tensor cores (`on`) or exactly (the default).
    ///
    /// The tensor-core kernel rounds q, k, v and the softmax weights to bf16 for its two
    /// products (scores, softmax and the output accumulate in f32), as bf16 inference does; its
    /// results differ from the f32 kernel's by about 2^-9 of the output's scale. It serves f32
    /// attention with head dims 16, 32, 64 and 128 on sm_80 and newer; other calls (f64, other
    /// head dims, older devices) keep the f32 kernel. Clones share the device, not the setting.
    pub fn with_bf16_attention(mut self, on: bool) -> Cuda {
        self.bf16_attention = on;
        self
    }

    /// Whether [`Cuda::with_bf16_attention`] is on.
    pub fn bf16_attention(&self) -> bool {
        self.bf16_attention
    }

    /// This device with the linear layers of bf16 and fp8 weights multiplied on the
    /// tensor cores in bf16 (`on`, the default) or exactly (`off`: the weights widened to f32
    /// and an f32 GEMM, which is what the reference outputs of `flux parity` are computed with).
    ///
    /// In bf16 the activations are rounded to bf16 for the product (f32 accumulation and
    /// output), a relative error of about 2^-9 of the size of the terms summed: the production
    /// path, several times the f32 GEMM's rate. [`Cuda::with_fp8_gemm`] takes precedence for
    /// fp8 weights. Clones share the device, not the setting.
    pub fn with_bf16_gemm(mut self, on: bool) -> Cuda {
        self.bf16_gemm = on;
        self
    }

    /// Whether [`Cuda::with_bf16_gemm`] is on.
    pub fn bf16_gemm(&self) -> bool {
        self.bf16_gemm
    }

    /// This device with the linear layers of fp8 (e4m3) weights multiplied in fp8 (`on`) or in
    /// bf16 with the weights widened (the default).
    ///
    /// In fp8 the activations are quantised to e4m3 per tensor as well (scale 448 / amax,
    /// computed on the device), and cuBLASLt multiplies e4m3 by e4m3 with f32 accumulation and
    /// f32 output, on devices of compute capability 8.9 or newer: about twice the bf16 rate and
    /// no widened copy of the weights, at the cost of rounding the activations to 3 mantissa
    /// bits (a few percent of the output's scale). Shapes cuBLASLt refuses, other weight dtypes
    /// and older devices keep the bf16 path. Clones share the device, not the setting.
    pub fn with_fp8_gemm(mut self, on: bool) -> Cuda {
        self.fp8_gemm = on;
        self
    }

    /// Whether [`Cuda::with_fp8_gemm`] is on.
    pub fn fp8_gemm(&self) -> bool {
        self.fp8_gemm
    }

    /// Whether cuBLASLt refused the fp8 GEMM of `x [m, k] W [n, k]^T` on this device (those
    /// linear layers then ran in bf16); for benches and diagnostics.
    pub fn fp8_gemm_refused(&self, m: usize, n: usize, k: usize) -> bool {
        self.inner
            .fp8_refused
            .lock()
            .is_ok_and(|set| set.contains(&(m, n, k)))
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.inner.ctx.mem_get_info().map_err(dev("memory info"))
    }

    /// The human-readable device name.
    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    /// Waits until every queued op has finished (for timing; ops never need it).
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(dev("synchronize"))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// Allocates `bytes` bytes (at least one, so empty tensors have a valid pointer).
    pub(crate) fn alloc_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: every caller writes the buffer (kernel output, copy or memset) before it is
        // read; the stream orders those writes before any read.
        unsafe { self.inner.stream.alloc::<u8>(bytes.max(1)) }.map_err(dev("alloc"))
    }

    /// A tensor of `shape` and `dtype` whose memory is not yet written.
    pub(crate) fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Cuda>> {
        let n: usize = shape.iter().product();
        let buf = self.alloc_bytes(n * dtype.size_in_bytes())?;
        Ok(Tensor::from_parts(
            CudaStorage { buf, scale: 1.0 },
            shape.to_vec(),
            dtype,
        ))
    }

    /// The raw device address of a buffer (for cuBLAS and pointer offsets).
    pub(crate) fn ptr(&self, buf: &CudaSlice<u8>) -> u64 {
        let (p, _sync) = buf.device_ptr(&self.inner.stream);
        p
    }

    /// A grid-stride launch configuration for `n` elements.
    pub(crate) fn cfg_elems(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.inner.sm_count as usize * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The grid of a block reduction over `n` elements (`sum_squares`, `max_abs`, ...): the
    /// grid-stride configuration with at most 1024 blocks, each writing one f64 partial.
    pub(crate) fn cfg_reduce(&self, n: usize) -> LaunchConfig {
        let mut cfg = self.cfg_elems(n);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        cfg
    }

    /// One block of `threads` threads per row.
    pub(crate) fn cfg_rows(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launches kernel `name` on the stream.
    pub(crate) fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg<'_>]) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            return Ok(());
        }
        let (f, entry) = self
            .inner
            .funcs
            .get(name)
            .ok_or_else(|| KernelError::Device(format!("kernel {name} was not compiled")))?;
        kernels::check_launch_args(entry, args.iter().map(Arg::param_type))
            .map_err(KernelError::Device)?;
        let mut b = self.inner.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Buf(s) => b.arg(*s),
                Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: the arguments match the kernel's parameters in number and type (checked
        // above against the PTX), and the callers size every buffer for the element counts
        // they pass; the kernels bound-check against those counts.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(dev("kernel launch"))
    }
}

/// One kernel argument.
pub(crate) enum Arg<'a> {
    /// A device buffer (passed as its pointer).
    Buf(&'a CudaSlice<u8>),
    /// `unsigned long long`.
    U64(u64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

impl Arg<'_> {
    /// The PTX parameter type this argument fills.
    fn param_type(&self) -> kernels::ParamType {
        match self {
            Arg::Buf(_) | Arg::U64(_) => kernels::ParamType::Bits64,
            Arg::I32(_) => kernels::ParamType::Int32,
            Arg::F32(_) => kernels::ParamType::F32,
            Arg::F64(_) => kernels::ParamType::F64,
        }
    }
}

/// Maps a driver error to a kernel error naming the operation.
pub(crate) fn dev(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Device(format!("{op}: {e}"))
}

/// `_f32` / `_f64` kernel name suffix of a compute dtype.
pub(crate) fn suffix(op: &'static str, d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        d => Err(KernelError::InvalidArgument {
            op,
            message: format!("activations must be f32 or f64, found {d}"),
        }),
    }
}

/// `u64` argument from a count.
pub(crate) fn u(n: usize) -> Arg<'static> {
    Arg::U64(n as u64)
}

/// `int` flag argument.
pub(crate) fn flag(b: bool) -> Arg<'static> {
    Arg::I32(i32::from(b))
}
