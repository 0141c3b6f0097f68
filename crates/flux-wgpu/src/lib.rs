//! flux-kernels [`Backend`] on wgpu compute shaders: Vulkan, Metal and DX12 GPUs (and Mesa's
//! software Vulkan device, lavapipe, in CI).
//!
//! - Compute is f32; [`DType::F64`] is not supported (`supports_dtype` says so and every op
//!   asked for it returns [`KernelError::Unsupported`]).
//! - Weights stay packed on the device in their stored dtype (f32, f16, bf16 two per `u32`,
//!   fp8 e4m3fn four per `u32`) and are widened inside the kernels that read them.
//! - Weights larger than the device's storage binding limit (128 MiB on many devices; real Flux
//!   checkpoints have bigger tensors) are split by rows of their first dimension into several
//!   buffers, each under the limit; `linear`, `gather_rows`, `cast` and downloads run once per
//!   chunk, writing their part of the output. Activations must fit one binding.
//! - Ops record their dispatches into one shared command encoder; it is submitted when the host
//!   needs data (a download or a reduction result) or after a few hundred dispatches, so a whole
//!   model forward is a handful of submits. Intermediate buffers come from a size-class pool.
//!
//! The kernels live in `shaders/wgsl/`, one file per family, included at build time.

mod context;
mod conv;
mod model;
mod sampler;
mod shaders;

use context::{Context, DevBuf};
use flux_kernels::shapes::{invalid, shape_err};
use flux_kernels::{Backend, DType, KernelError, Result, Tensor};
use std::sync::Arc;

/// Why a wgpu backend could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WgpuError {
    /// No adapter (GPU or software Vulkan device) was found.
    #[error(
        "no wgpu adapter found ({0}); install a Vulkan driver (on Debian: mesa-vulkan-drivers libvulkan1) or select one with WGPU_BACKEND"
    )]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("requesting a device from adapter '{adapter}' failed: {message}")]
    Device { adapter: String, message: String },
}

/// Options of [`Wgpu::with_options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WgpuOptions {
    /// Largest buffer a stored weight is kept in before it is split by rows (bytes); defaults
    /// to the device's storage binding limit and is capped by it.
    pub weight_chunk_bytes: Option<u64>,
    /// Caps the storage binding limit the backend works within (bytes), as a device with a
    /// smaller limit would have it; defaults to the adapter's limit and cannot exceed it.
    pub max_binding_bytes: Option<u64>,
    /// Reads f16 weights as packed words widened in the shader even where the adapter has
    /// `shader-f16` (by default such adapters get the feature and native `f16` loads).
    pub packed_f16: bool,
}

/// The wgpu backend. Cheap to clone (shares the device, pipelines and buffer pool).
#[derive(Clone)]
pub struct Wgpu {
    ctx: Arc<Context>,
}

impl std::fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wgpu")
            .field("adapter", &self.ctx.info.name)
            .field("backend", &self.ctx.info.backend)
            .finish_non_exhaustive()
    }
}

impl Wgpu {
    /// The default adapter (high performance preference; `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
    /// and the other wgpu environment variables are honoured).
    pub fn new() -> std::result::Result<Wgpu, WgpuError> {
        Self::with_options(WgpuOptions::default())
    }

    /// The default adapter with explicit options.
    pub fn with_options(options: WgpuOptions) -> std::result::Result<Wgpu, WgpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| WgpuError::NoAdapter(e.to_string()))?;
        let limits = adapter.limits();
        let shader_f16 =
            !options.packed_f16 && adapter.features().contains(wgpu::Features::SHADER_F16);
        let required_features = if shader_f16 {
            wgpu::Features::SHADER_F16
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("flux-kernels"),
            required_features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| WgpuError::Device {
            adapter: adapter.get_info().name,
            message: e.to_string(),
        })?;
        let mut limits = limits;
        if let Some(cap) = options.max_binding_bytes {
            // Bindings stay multiples of 4 bytes (whole f32 elements).
            let cap = (cap / 4 * 4).max(4);
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap);
        }
        Ok(Wgpu {
            ctx: Context::new(
                &adapter,
                device,
                queue,
                limits,
                options.weight_chunk_bytes,
                shader_f16,
            ),
        })
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// The device limits in use.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// Whether f16 weights are read natively (`shader-f16`) rather than as packed words.
    pub fn uses_shader_f16(&self) -> bool {
        self.ctx.shader_f16
    }

    /// Whether the adapter offers `shader-f16` (used unless [`WgpuOptions::packed_f16`]).
    pub fn adapter_has_shader_f16(&self) -> bool {
        self.ctx.adapter_f16
    }

    /// Submits every recorded op and waits until the device has finished them (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.flush()?;
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| KernelError::Device(e.to_string()))?;
        self.ctx.check_error()
    }
}

/// One device buffer of a tensor: elements `first .. first + len` of the whole.
pub(crate) struct Chunk {
    buf: DevBuf,
    first: usize,
    len: usize,
}

/// Device memory of a wgpu tensor: activations are one f32 buffer; stored weights keep their
/// dtype and scale and may be split into several chunks of whole rows.
pub struct WgpuStorage {
    chunks: Vec<Chunk>,
    /// Element type of the stored bits.
    dtype: DType,
    /// Factor applied when the elements are widened (fp8 checkpoints store one per tensor).
    scale: f32,
}

impl std::fmt::Debug for WgpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuStorage")
            .field("dtype", &self.dtype)
            .field("chunks", &self.chunks.len())
            .field("scale", &self.scale)
            .finish()
    }
}

impl WgpuStorage {
    /// Whether this is a plain f32 activation buffer (one chunk, no scale).
    fn is_plain(&self) -> bool {
        self.dtype == DType::F32 && self.scale == 1.0 && self.chunks.len() == 1
    }

    /// The only buffer, for ops that take one.
    fn single(&self) -> Option<&wgpu::Buffer> {
        match self.chunks.as_slice() {
            [c] => Some(c.buf.buffer()),
            _ => None,
        }
    }
}

/// The shader code of a stored dtype (see `weights.wgsl`).
fn wdtype_code(d: DType) -> f64 {
    match d {
        DType::F16 => 1.0,
        DType::BF16 => 2.0,
        DType::F8E4M3 => 3.0,
        DType::F32 | DType::F64 => 0.0,
    }
}

fn unsupported(op: &'static str, dtype: DType) -> KernelError {
    KernelError::Unsupported {
        backend: "wgpu".into(),
        op,
        dtype,
    }
}

/// `n` as a `u32` kernel parameter, or a clear error for tensors too large to index.
fn u32_of(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| invalid(op, format!("size {n} exceeds the 32-bit index range")))
}

/// An f32 operand ready to bind: the tensor's own buffer, or a widened copy kept alive here.
pub(crate) struct Operand {
    buf: wgpu::Buffer,
    _tmp: Option<DevBuf>,
}

impl Operand {
    fn buffer(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

impl Wgpu {
    /// A new f32 tensor with undefined contents (every op writes all of its output).
    fn empty(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        let buf = self.ctx.alloc(n as u64 * 4)?;
        Ok(Tensor::from_parts(
            WgpuStorage {
                chunks: vec![Chunk {
                    buf,
                    first: 0,
                    len: n,
                }],
                dtype: DType::F32,
                scale: 1.0,
            },
            shape.to_vec(),
            DType::F32,
        ))
    }

    /// The output buffer of a tensor made by [`Wgpu::empty`].
    fn out_buf(t: &Tensor<Self>) -> &wgpu::Buffer {
        // `empty` always makes exactly one chunk.
        t.storage().chunks[0].buf.buffer()
    }

    /// The primary activation of an op: must be f32 (a scaled or split f32 weight is widened).
    fn act(&self, op: &'static str, t: &Tensor<Self>) -> Result<Operand> {
        if t.dtype() != DType::F32 {
            return Err(KernelError::DTypeMismatch {
                op,
                expected: DType::F32,
                found: t.dtype(),
            });
        }
        self.operand(op, t)
    }

    /// Any tensor as f32 values: plain activations as they are, weights widened into a
    /// temporary buffer.
    fn operand(&self, op: &'static str, t: &Tensor<Self>) -> Result<Operand> {
        let s = t.storage();
        if s.is_plain()
            && let Some(b) = s.single()
        {
            return Ok(Operand {
                buf: b.clone(),
                _tmp: None,
            });
        }
        if s.dtype == DType::F64 {
            return Err(unsupported(op, DType::F64));
        }
        let tmp = self.ctx.alloc(t.numel() as u64 * 4)?;
        self.widen_into(tmp.buffer(), s)?;
        Ok(Operand {
            buf: tmp.buffer().clone(),
            _tmp: Some(tmp),
        })
    }

    /// Writes the widened f32 values of every chunk of `s` into `dst`.
    fn widen_into(&self, dst: &wgpu::Buffer, s: &WgpuStorage) -> Result<()> {
        for c in &s.chunks {
            let n = u32_of("cast", c.len)?;
            let off = u32_of("cast", c.first)?;
            self.ctx.dispatch(
                "cast",
                &shaders::CASTS,
                "widen",
                &[("WDTYPE", wdtype_code(s.dtype))],
                &[context::bind(0, dst), context::bind(1, c.buf.buffer())],
                (2, &[n, off, s.scale.to_bits(), 0]),
                context::grid(c.len as u64, 256),
            )?;
        }
        Ok(())
    }

    /// An optional secondary operand of length `len`, or the dummy buffer.
    fn opt_operand(
        &self,
        op: &'static str,
        t: Option<&Tensor<Self>>,
        len: usize,
    ) -> Result<Option<Operand>> {
        match t {
            None => Ok(None),
            Some(t) if t.numel() != len => Err(shape_err(op, vec![len], t.shape())),
            Some(t) => self.operand(op, t).map(Some),
        }
    }

    fn dummy_or<'a>(&'a self, o: Option<&'a Operand>) -> &'a wgpu::Buffer {
        o.map_or(self.ctx.dummy(), Operand::buffer)
    }
}

impl Backend for Wgpu {}
