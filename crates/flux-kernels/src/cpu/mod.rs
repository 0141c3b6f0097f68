//! The CPU backend: the reference implementation of every op, in f32 and f64.
//!
//! Large tensors are split into chunks processed on the rayon pool (both cores of a small
//! machine); the inner loops are written over fixed term counts so the compiler vectorises them.

mod conv;
mod elementwise;
pub mod gemm;
mod model;

use crate::backend::{check_pair, check_terms, derivative_step_operands};
use crate::shapes;
use crate::{Backend, DType, HostData, KernelError, MAX_LINCOMB_TERMS, Result, SamplerOps, Tensor};
use rayon::prelude::*;

pub use elementwise::Elem;
pub use model::{Real, f8e4m3_to_f32, f32_to_f8e4m3};

/// Tensors at least this large are processed in parallel chunks.
pub(crate) const PAR_THRESHOLD: usize = 1 << 16;
/// Chunk length for parallel elementwise work (a multiple of every SIMD width).
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// Memory of a CPU tensor.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// f64 elements.
    F64(Vec<f64>),
    /// f32 elements.
    F32(Vec<f32>),
    /// A weight kept in its stored dtype (possibly a range of a memory-mapped file); widened
    /// inside the kernels that read it.
    Weight(WeightData),
}

/// A weight in its stored dtype: little-endian elements in a shared byte range.
#[derive(Clone, Debug)]
pub struct WeightData {
    /// The element bytes.
    pub bytes: crate::model_ops::ByteView,
    /// Their dtype.
    pub dtype: DType,
    /// Factor applied to every element when widened (fp8 checkpoints store one per weight).
    pub scale: f32,
}

impl CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::Weight(w) => w.dtype,
        }
    }
}

/// The CPU backend. Cheap to clone; uses the global rayon pool for large tensors.
///
/// An op called from a thread outside the pool hands its parallel work to the pool and waits
/// for it, a few microseconds per op; a loop of many short ops (a sampler on a small latent)
/// runs faster from a pool thread, e.g. inside `rayon::scope(|_| ...)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// A CPU backend.
    pub fn new() -> Self {
        Cpu
    }

    /// Borrow an f64 tensor's elements.
    pub fn as_f64<'a>(&self, t: &'a Tensor<Self>) -> Result<&'a [f64]> {
        match t.storage() {
            CpuStorage::F64(v) => Ok(v),
            s => Err(KernelError::DTypeMismatch {
                op: "as_f64",
                expected: DType::F64,
                found: s.dtype(),
            }),
        }
    }

    /// Borrow an f32 tensor's elements.
    pub fn as_f32<'a>(&self, t: &'a Tensor<Self>) -> Result<&'a [f32]> {
        match t.storage() {
            CpuStorage::F32(v) => Ok(v),
            s => Err(KernelError::DTypeMismatch {
                op: "as_f32",
                expected: DType::F32,
                found: s.dtype(),
            }),
        }
    }

    /// Wraps host f64 values as a tensor without copying.
    pub fn from_vec_f64(&self, data: Vec<f64>, shape: &[usize]) -> Result<Tensor<Self>> {
        shapes::host_len("from_vec_f64", shape, data.len())?;
        Ok(Tensor::from_parts(
            CpuStorage::F64(data),
            shape.to_vec(),
            DType::F64,
        ))
    }

    /// Wraps host f32 values as a tensor without copying.
    pub fn from_vec_f32(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor<Self>> {
        shapes::host_len("from_vec_f32", shape, data.len())?;
        Ok(Tensor::from_parts(
            CpuStorage::F32(data),
            shape.to_vec(),
            DType::F32,
        ))
    }

    /// Copies a tensor into an ndarray (f64) of the same shape.
    pub fn to_ndarray(&self, t: &Tensor<Self>) -> Result<ndarray::ArrayD<f64>> {
        let v = self.download_f64(t)?;
        ndarray::ArrayD::from_shape_vec(t.shape().to_vec(), v).map_err(|e| {
            KernelError::InvalidArgument {
                op: "to_ndarray",
                message: e.to_string(),
            }
        })
    }

    /// Creates a tensor of `dtype` from an ndarray of f64 values (any memory layout).
    pub fn from_ndarray(&self, a: &ndarray::ArrayD<f64>, dtype: DType) -> Result<Tensor<Self>> {
        let v: Vec<f64> = a.iter().copied().collect();
        self.upload(HostData::F64(&v), a.shape(), dtype)
    }
}

fn unsupported(op: &'static str, dtype: DType) -> KernelError {
    KernelError::Unsupported {
        backend: "cpu".into(),
        op,
        dtype,
    }
}

fn convert_host<T: Elem>(data: HostData<'_>) -> Vec<T> {
    match data {
        HostData::F64(v) => elementwise::map_new(v, T::from_f64),
        HostData::F32(v) => elementwise::map_new(v, |x| T::from_f64(f64::from(x))),
    }
}

fn write_host<T: Elem>(dst: &mut [T], data: HostData<'_>) {
    fn fill<S: Copy + Sync, T: Elem>(dst: &mut [T], src: &[S], f: impl Fn(S) -> T + Sync) {
        if dst.len() >= PAR_THRESHOLD {
            dst.par_iter_mut()
                .zip(src.par_iter())
                .for_each(|(d, &s)| *d = f(s));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(s));
        }
    }
    match data {
        HostData::F64(v) => fill(dst, v, T::from_f64),
        HostData::F32(v) => fill(dst, v, |s| T::from_f64(f64::from(s))),
    }
}

/// Collects the slices of `terms` as `T`, failing on a dtype the caller did not check.
fn slices<'a, T: Elem>(terms: &[(f64, &'a Tensor<Cpu>)]) -> Result<Vec<(T, &'a [T])>> {
    terms
        .iter()
        .map(|(c, t)| {
            T::slice(t.storage())
                .map(|s| (T::from_f64(*c), s))
                .ok_or_else(|| unsupported("lincomb", t.dtype()))
        })
        .collect()
}

impl SamplerOps for Cpu {
    type Storage = CpuStorage;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn supports_dtype(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        let storage = match dtype {
            DType::F64 => CpuStorage::F64(vec![0.0; n]),
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            d => return Err(unsupported("zeros", d)),
        };
        Ok(Tensor::from_parts(storage, shape.to_vec(), dtype))
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        shapes::host_len("upload", shape, data.len())?;
        let storage = match dtype {
            DType::F64 => CpuStorage::F64(convert_host(data)),
            DType::F32 => CpuStorage::F32(convert_host(data)),
            d => return Err(unsupported("upload", d)),
        };
        Ok(Tensor::from_parts(storage, shape.to_vec(), dtype))
    }

    fn upload_f32_vec(
        &self,
        data: Vec<f32>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        if dtype == DType::F32 {
            self.from_vec_f32(data, shape)
        } else {
            self.upload(HostData::F32(&data), shape, dtype)
        }
    }

    fn upload_f64_vec(
        &self,
        data: Vec<f64>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        if dtype == DType::F64 {
            self.from_vec_f64(data, shape)
        } else {
            self.upload(HostData::F64(&data), shape, dtype)
        }
    }

    fn write(&self, dst: &mut Tensor<Self>, data: HostData<'_>) -> Result<()> {
        shapes::host_len("write", dst.shape(), data.len())?;
        match dst.storage_mut() {
            CpuStorage::F64(v) => write_host(v, data),
            CpuStorage::F32(v) => write_host(v, data),
            CpuStorage::Weight(w) => return Err(unsupported("write", w.dtype)),
        }
        Ok(())
    }

    fn download_f64(&self, t: &Tensor<Self>) -> Result<Vec<f64>> {
        Ok(match t.storage() {
            CpuStorage::F64(v) => v.clone(),
            CpuStorage::F32(v) => elementwise::map_new(v, f64::from),
            CpuStorage::Weight(_) => model::widen_f64(t),
        })
    }

    fn download_f32(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(match t.storage() {
            CpuStorage::F64(v) => elementwise::map_new(v, |x| x as f32),
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::Weight(_) => model::widen_f32(t),
        })
    }

    fn copy(&self, t: &Tensor<Self>) -> Result<Tensor<Self>> {
        Ok(Tensor::from_parts(
            t.storage().clone(),
            t.shape().to_vec(),
            t.dtype(),
        ))
    }

    fn map_f64(&self, x: &Tensor<Self>, f: &(dyn Fn(&mut [f64]) + Sync)) -> Result<Tensor<Self>> {
        let storage = match x.storage() {
            CpuStorage::F64(v) => CpuStorage::F64(elementwise::map_f64_new(v, f)),
            CpuStorage::F32(v) => CpuStorage::F32(elementwise::map_f64_new(v, f)),
            CpuStorage::Weight(w) => return Err(unsupported("map_f64", w.dtype)),
        };
        Ok(Tensor::from_parts(storage, x.shape().to_vec(), x.dtype()))
    }

    fn lincomb_into(&self, out: &mut Tensor<Self>, terms: &[(f64, &Tensor<Self>)]) -> Result<()> {
        shapes::lincomb_terms(out, terms, false)?;
        match out.storage_mut() {
            CpuStorage::F64(o) => elementwise::lincomb(o, None, &slices::<f64>(terms)?),
            CpuStorage::F32(o) => elementwise::lincomb(o, None, &slices::<f32>(terms)?),
            CpuStorage::Weight(w) => return Err(unsupported("lincomb", w.dtype)),
        }
        Ok(())
    }

    fn lincomb_inplace(
        &self,
        x: &mut Tensor<Self>,
        a: f64,
        terms: &[(f64, &Tensor<Self>)],
    ) -> Result<()> {
        shapes::lincomb_terms(x, terms, true)?;
        match x.storage_mut() {
            CpuStorage::F64(o) => elementwise::lincomb(o, Some(a), &slices::<f64>(terms)?),
            CpuStorage::F32(o) => elementwise::lincomb(o, Some(a as f32), &slices::<f32>(terms)?),
            CpuStorage::Weight(w) => return Err(unsupported("lincomb_inplace", w.dtype)),
        }
        Ok(())
    }

    /// One pass: each element's `d` is written and used for its `x` while both are in
    /// registers.
    fn derivative_step(
        &self,
        x: &mut Tensor<Self>,
        (a, b): (f64, f64),
        den: &Tensor<Self>,
        c: f64,
        history: &[(f64, &Tensor<Self>)],
    ) -> Result<Tensor<Self>> {
        let operands = derivative_step_operands(x, b, den, history)?;
        let (shape, dtype) = (x.shape().to_vec(), x.dtype());
        let storage = match x.storage_mut() {
            CpuStorage::F64(o) => {
                let ops = slices::<f64>(&operands)?;
                CpuStorage::F64(elementwise::derivative_step(
                    o,
                    (a, b),
                    ops[0].1,
                    c,
                    &ops[1..],
                ))
            }
            CpuStorage::F32(o) => {
                let ops = slices::<f32>(&operands)?;
                CpuStorage::F32(elementwise::derivative_step(
                    o,
                    (a as f32, b as f32),
                    ops[0].1,
                    c as f32,
                    &ops[1..],
                ))
            }
            CpuStorage::Weight(w) => return Err(unsupported("derivative_step", w.dtype)),
        };
        Ok(Tensor::from_parts(storage, shape, dtype))
    }

    /// One pass: each element's first value is written and used for its second while in
    /// registers.
    fn lincomb_pair(
        &self,
        first: &[(f64, &Tensor<Self>)],
        link: f64,
        b: &[f64],
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let head = check_pair("lincomb_pair", first, b)?;
        let (shape, dtype, n) = (head.shape().to_vec(), head.dtype(), head.numel());
        let (a, s) = match head.storage() {
            CpuStorage::F64(_) => {
                let (a, s) = elementwise::lincomb_pair(n, &slices::<f64>(first)?, link, b);
                (CpuStorage::F64(a), CpuStorage::F64(s))
            }
            CpuStorage::F32(_) => {
                let b: Vec<f32> = b.iter().map(|&c| c as f32).collect();
                let (a, s) = elementwise::lincomb_pair(n, &slices::<f32>(first)?, link as f32, &b);
                (CpuStorage::F32(a), CpuStorage::F32(s))
            }
            CpuStorage::Weight(w) => return Err(unsupported("lincomb_pair", w.dtype)),
        };
        Ok((
            Tensor::from_parts(a, shape.clone(), dtype),
            Tensor::from_parts(s, shape, dtype),
        ))
    }

    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64> {
        Ok(match t.storage() {
            CpuStorage::F64(v) => elementwise::sum_squares(v),
            CpuStorage::F32(v) => elementwise::sum_squares(v),
            CpuStorage::Weight(_) => elementwise::sum_squares(&model::widen_f64(t)),
        })
    }

    fn max_abs(&self, t: &Tensor<Self>) -> Result<f64> {
        Ok(match t.storage() {
            CpuStorage::F64(v) => elementwise::max_abs(v),
            CpuStorage::F32(v) => elementwise::max_abs(v),
            CpuStorage::Weight(_) => elementwise::max_abs(&model::widen_f64(t)),
        })
    }

    fn scaled_error_rms(
        &self,
        e: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        atol: f64,
        rtol: f64,
    ) -> Result<f64> {
        shapes::scaled_error(e, a, b)?;
        let s = match (e.storage(), a.storage(), b.storage()) {
            (CpuStorage::F64(e), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                elementwise::scaled_error_sq(e, a, b, atol, rtol)
            }
            (CpuStorage::F32(e), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                elementwise::scaled_error_sq(e, a, b, atol as f32, rtol as f32)
            }
            _ => return Err(unsupported("scaled_error_rms", e.dtype())),
        };
        Ok((s / e.numel().max(1) as f64).sqrt())
    }
}

impl Backend for Cpu {
    /// The result is written straight into new memory (no zero-fill pass before the kernel).
    fn lincomb(&self, terms: &[(f64, &Tensor<Self>)]) -> Result<Tensor<Self>> {
        let first = terms.first().ok_or(KernelError::InvalidArgument {
            op: "lincomb",
            message: "needs at least one term".into(),
        })?;
        let (shape, dtype) = (first.1.shape().to_vec(), first.1.dtype());
        check_terms("lincomb", &shape, dtype, terms, MAX_LINCOMB_TERMS)?;
        let n = first.1.numel();
        let storage = match dtype {
            DType::F64 => CpuStorage::F64(elementwise::lincomb_new(n, &slices::<f64>(terms)?)),
            DType::F32 => CpuStorage::F32(elementwise::lincomb_new(n, &slices::<f32>(terms)?)),
            d => return Err(unsupported("lincomb", d)),
        };
        Ok(Tensor::from_parts(storage, shape, dtype))
    }
}
