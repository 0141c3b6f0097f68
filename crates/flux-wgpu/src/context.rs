//! The device, its queue and everything shared by the ops: compiled pipelines, the buffer pool
//! and the command encoder that collects the dispatches of consecutive ops.

use crate::shaders::Shader;
use flux_kernels::{KernelError, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use wgpu::util::DeviceExt;

/// Dispatches recorded before the pending encoder is submitted on its own (bounds the memory
/// held by bind groups and parameter buffers of a long chain of ops).
const MAX_PENDING_DISPATCHES: usize = 512;
/// Buffers kept per size class in the pool.
const MAX_POOLED_PER_CLASS: usize = 16;

/// Workgroups per dimension a dispatch may use (the WebGPU minimum; devices may allow more).
pub(crate) const MAX_GROUPS: u32 = 65_535;

/// A compiled pipeline is identified by its shader (and whether it is the native-f16 variant),
/// entry point and override constants.
type PipelineKey = (&'static str, bool, &'static str, Vec<(&'static str, u64)>);

pub(crate) struct Context {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    /// Largest chunk of a stored weight (bytes); bigger weights are split by rows.
    pub(crate) weight_chunk_bytes: u64,
    /// Whether the device has `shader-f16` enabled: f16 weights are then read as `array<f16>`.
    pub(crate) shader_f16: bool,
    /// Whether the adapter offers `shader-f16` at all.
    pub(crate) adapter_f16: bool,
    modules: Mutex<HashMap<(&'static str, bool), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    pool: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    pending: Mutex<Pending>,
    error: Arc<Mutex<Option<String>>>,
    /// Bound where a kernel declares an operand the current call does not use.
    dummy: wgpu::Buffer,
    me: Weak<Context>,
}

#[derive(Default)]
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn dev_err(e: impl std::fmt::Display) -> KernelError {
    KernelError::Device(e.to_string())
}

/// The pool's size class of a request: 256-byte steps up to 4 KiB, then steps of 1/8 of the
/// power of two below (at most 12.5 % slack).
fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16).next_multiple_of(4);
    if b <= 4096 {
        return b.next_multiple_of(256);
    }
    let shift = b.ilog2() - 3;
    b.next_multiple_of(1u64 << shift)
}

/// A device buffer that goes back to the pool when dropped.
pub(crate) struct DevBuf {
    buf: wgpu::Buffer,
    class: Option<u64>,
    ctx: Weak<Context>,
}

impl DevBuf {
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let (Some(class), Some(ctx)) = (self.class, self.ctx.upgrade()) {
            let mut pool = lock(&ctx.pool);
            let list = pool.entry(class).or_default();
            if list.len() < MAX_POOLED_PER_CLASS {
                list.push(self.buf.clone());
            }
        }
    }
}

/// A buffer bound to a kernel's binding slot.
pub(crate) struct Binding<'a> {
    pub(crate) slot: u32,
    pub(crate) buffer: &'a wgpu::Buffer,
}

/// Shorthand for a binding.
pub(crate) fn bind(slot: u32, buffer: &wgpu::Buffer) -> Binding<'_> {
    Binding { slot, buffer }
}

impl Context {
    pub(crate) fn new(
        adapter: &wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
        limits: wgpu::Limits,
        weight_chunk_bytes: Option<u64>,
        shader_f16: bool,
    ) -> Arc<Self> {
        let error = Arc::new(Mutex::new(None::<String>));
        let slot = Arc::clone(&error);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut s = lock(&slot);
            if s.is_none() {
                // The display text is only the error kind; the description says what failed.
                *s = Some(match &e {
                    wgpu::Error::Validation { description, .. } => {
                        format!("validation error: {description}")
                    }
                    other => other.to_string(),
                });
            }
        }));
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flux dummy operand"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let binding_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let weight_chunk_bytes = weight_chunk_bytes
            .unwrap_or(binding_max)
            .min(binding_max)
            .max(4)
            / 4
            * 4;
        Arc::new_cyclic(|me| Context {
            device,
            queue,
            info: adapter.get_info(),
            limits,
            weight_chunk_bytes,
            shader_f16,
            adapter_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            pool: Mutex::default(),
            pending: Mutex::default(),
            error,
            dummy,
            me: me.clone(),
        })
    }

    pub(crate) fn dummy(&self) -> &wgpu::Buffer {
        &self.dummy
    }

    /// Fails with the first device error seen since the last check.
    pub(crate) fn check_error(&self) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(KernelError::Device(e)),
            None => Ok(()),
        }
    }

    /// A storage buffer of at least `bytes` bytes (contents undefined), from the pool if one fits.
    pub(crate) fn alloc(&self, bytes: u64) -> Result<DevBuf> {
        let class = size_class(bytes);
        if class > self.limits.max_buffer_size {
            return Err(KernelError::Device(format!(
                "a tensor of {bytes} bytes exceeds this device's largest buffer ({} bytes)",
                self.limits.max_buffer_size
            )));
        }
        let reused = lock(&self.pool).get_mut(&class).and_then(Vec::pop);
        let buf = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flux tensor"),
                size: class,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Ok(DevBuf {
            buf,
            class: Some(class),
            ctx: self.me.clone(),
        })
    }

    /// A buffer holding exactly `data` (padded to 4 bytes), outside the pool (weights).
    pub(crate) fn buffer_from_bytes(&self, data: &[u8]) -> Result<DevBuf> {
        let padded;
        let contents = if data.len().is_multiple_of(4) && !data.is_empty() {
            data
        } else {
            let mut v = data.to_vec();
            v.resize(data.len().next_multiple_of(4).max(4), 0);
            padded = v;
            &padded
        };
        if contents.len() as u64 > self.limits.max_buffer_size {
            return Err(KernelError::Device(format!(
                "{} bytes exceed this device's largest buffer ({} bytes)",
                contents.len(),
                self.limits.max_buffer_size
            )));
        }
        let buf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("flux weight"),
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        Ok(DevBuf {
            buf,
            class: None,
            ctx: self.me.clone(),
        })
    }

    /// Runs `f` on the pending encoder (created on demand).
    fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut p = lock(&self.pending);
        let enc = p.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("flux ops"),
                })
        });
        f(enc)
    }

    /// Records a copy of host bytes into `dst` at `offset` (ordered with the recorded ops).
    pub(crate) fn write(&self, dst: &wgpu::Buffer, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let staging = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("flux upload"),
                contents: data,
                usage: wgpu::BufferUsages::COPY_SRC,
            });
        self.with_encoder(|enc| {
            enc.copy_buffer_to_buffer(&staging, 0, dst, offset, Some(data.len() as u64));
        });
    }

    /// Records a copy of the first `bytes` bytes of `src` into `dst`.
    pub(crate) fn copy(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.with_encoder(|enc| enc.copy_buffer_to_buffer(src, 0, dst, 0, Some(bytes)));
    }

    /// Records zero-filling of the first `bytes` bytes of `dst`.
    pub(crate) fn clear(&self, dst: &wgpu::Buffer, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.with_encoder(|enc| enc.clear_buffer(dst, 0, Some(bytes)));
    }

    /// Submits everything recorded so far (without waiting).
    pub(crate) fn flush(&self) -> Result<()> {
        let enc = {
            let mut p = lock(&self.pending);
            p.dispatches = 0;
            p.encoder.take()
        };
        if let Some(enc) = enc {
            self.queue.submit([enc.finish()]);
        }
        self.check_error()
    }

    /// Reads back the first `bytes` bytes of `src`: submits the pending work and waits for it.
    pub(crate) fn read(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flux download"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.with_encoder(|enc| enc.copy_buffer_to_buffer(src, 0, &staging, 0, Some(size)));
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver waits below; a closed channel only means the caller gave up.
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(dev_err)?;
        rx.recv()
            .map_err(|_| KernelError::Device("buffer mapping was dropped".into()))?
            .map_err(dev_err)?;
        let out = {
            let view = staging.get_mapped_range(..).map_err(dev_err)?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.check_error()?;
        Ok(out)
    }

    fn module(&self, shader: &Shader, native_f16: bool) -> wgpu::ShaderModule {
        let mut modules = lock(&self.modules);
        modules
            .entry((shader.name, native_f16))
            .or_insert_with(|| {
                self.device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(shader.name),
                        source: wgpu::ShaderSource::Wgsl(shader.source(native_f16).into()),
                    })
            })
            .clone()
    }

    fn pipeline(
        &self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> wgpu::ComputePipeline {
        // f16 weights (WDTYPE 1) are read natively where the device allows it.
        let native_f16 = self.shader_f16
            && shader.reads_weights()
            && constants.contains(&("WDTYPE", crate::wdtype_code(flux_kernels::DType::F16)));
        let key: PipelineKey = (
            shader.name,
            native_f16,
            entry,
            constants.iter().map(|&(k, v)| (k, v.to_bits())).collect(),
        );
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return p.clone();
        }
        let module = self.module(shader, native_f16);
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        lock(&self.pipelines).insert(key, p.clone());
        p
    }

    /// Records one dispatch of `entry` in `shader` with its storage bindings and a uniform
    /// parameter block at `params.0` holding the words `params.1`.
    pub(crate) fn dispatch(
        &self,
        op: &'static str,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        bindings: &[Binding<'_>],
        params: (u32, &[u32]),
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        if groups
            .iter()
            .any(|&g| g > self.limits.max_compute_workgroups_per_dimension)
        {
            return Err(KernelError::InvalidArgument {
                op,
                message: format!(
                    "needs {groups:?} workgroups, more than this device allows per dimension ({})",
                    self.limits.max_compute_workgroups_per_dimension
                ),
            });
        }
        let max_bind = self.limits.max_storage_buffer_binding_size;
        for b in bindings {
            if b.buffer.size() > max_bind {
                return Err(KernelError::InvalidArgument {
                    op,
                    message: format!(
                        "an operand of {} bytes exceeds this device's storage binding limit of \
                          {max_bind} bytes (stored weights are split into chunks; models keep \
                         activations within `ModelOps::max_activation_bytes`)",
                        b.buffer.size()
                    ),
                });
            }
        }
        let pipeline = self.pipeline(shader, entry, constants);
        let mut words = params.1.to_vec();
        words.resize(words.len().next_multiple_of(4).max(4), 0);
        let ubuf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("flux params"),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = bindings
            .iter()
            .map(|b| wgpu::BindGroupEntry {
                binding: b.slot,
                resource: b.buffer.as_entire_binding(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: params.0,
            resource: ubuf.as_entire_binding(),
        });
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(op),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let flush_now = {
            let mut p = lock(&self.pending);
            let enc = p.encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("flux ops"),
                    })
            });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(op),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
            p.dispatches += 1;
            p.dispatches >= MAX_PENDING_DISPATCHES
        };
        if flush_now {
            self.flush()?;
        }
        Ok(())
    }
}

/// Workgroups for `n` threads in groups of `per_group`, folded into 2-D when the count
/// exceeds one dimension (kernels rebuild the flat index from `num_workgroups`).
pub(crate) fn grid(n: u64, per_group: u64) -> [u32; 3] {
    let groups = n.div_ceil(per_group);
    if groups == 0 {
        return [0, 1, 1];
    }
    let x = groups.min(u64::from(MAX_GROUPS));
    let y = groups.div_ceil(x);
    [x as u32, y.min(u64::from(u32::MAX)) as u32, 1]
}
