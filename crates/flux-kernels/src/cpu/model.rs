//! The CPU implementation of [`ModelOps`]: GEMM-backed linear layers (weights widened panel by
//! panel), row-wise norms, tiled attention with an online softmax, and layout ops.
//!
//! Every op is generic over the compute element (`f32`, `f64`); secondary operands (biases, norm
//! scales) in another dtype are widened on the fly.

use super::gemm::{GemmElem, Mat, Parallelism, gemm, pool_parallelism};
use super::{CpuStorage, Elem, PAR_THRESHOLD, WeightData, unsupported};
use crate::model_ops::{Activation, BinaryOp, ByteView, ModelOps};
use crate::shapes::{self, AttentionDims, DimSplit, MatmulDims, RowDims};
use crate::{Cpu, DType, KernelError, Result, Tensor, simd_dispatch};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::LazyLock;
use std::thread::LocalKey;

/// A compute element of the CPU model ops.
pub trait Real: Elem + GemmElem + bytemuck::Pod + std::ops::Neg<Output = Self> {
    /// The dtype of tensors holding this element.
    const DTYPE: DType;
    /// One.
    const ONE: Self;
    /// Converts from f32.
    fn from_f32(x: f32) -> Self;
    /// `e^x`.
    fn exp(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// The larger of two values (NaN-propagating is not needed here).
    fn max(self, o: Self) -> Self;
    /// Wraps a vector as storage.
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// This thread's pool of scratch vectors (see `take_scratch`).
    fn scratch_pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
    /// `o = a(x)` elementwise.
    fn activation_into(a: Activation, x: &[Self], o: &mut [Self]) {
        activation_scalar(a, x, o);
    }
    /// `x[j] = e^(x[j] - mx)` for a row of attention scores (all at most `mx`), returning the
    /// sum of the new values.
    fn exp_shifted_sum(x: &mut [Self], mx: Self) -> Self {
        let mut sum = <Self as Elem>::ZERO;
        for v in x.iter_mut() {
            *v = (*v - mx).exp();
            sum = sum + *v;
        }
        sum
    }
}

impl Real for f32 {
    const DTYPE: DType = DType::F32;
    const ONE: Self = 1.0;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn scratch_pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        thread_local!(static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) });
        &POOL
    }
    fn activation_into(a: Activation, x: &[Self], o: &mut [Self]) {
        match a {
            Activation::GeluTanh => gelu_tanh_f32(x, o),
            _ => activation_scalar(a, x, o),
        }
    }
    fn exp_shifted_sum(x: &mut [Self], mx: Self) -> Self {
        exp_shifted_sum_f32(x, mx)
    }
}

impl Real for f64 {
    const DTYPE: DType = DType::F64;
    const ONE: Self = 1.0;
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn scratch_pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
        thread_local!(static POOL: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) });
        &POOL
    }
}

/// Values of the 256 fp8 e4m3fn codes (no infinities; `0x7f`/`0xff` are NaN).
static F8E4M3_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| {
    let mut t = [0f32; 256];
    for (code, v) in t.iter_mut().enumerate() {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xf) as i32;
        let m = (code & 0x7) as f32;
        *v = if e == 0xf && m == 7.0 {
            f32::NAN
        } else if e == 0 {
            sign * m / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        };
    }
    t
});

/// Decodes one fp8 e4m3fn byte.
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    F8E4M3_TABLE[b as usize]
}

/// Encodes `x` as the nearest fp8 e4m3fn value (ties to the even code), saturating at +-448
/// (the format has no infinities); NaN gives the NaN code `0x7f` with `x`'s sign. The same
/// rounding as the CUDA backend's activation quantisation (`fp8.cu`).
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let mag = bits & 0x7fff_ffff;
    if mag > 0x7f80_0000 {
        return sign | 0x7f;
    }
    if mag >= 0x43e0_0000 {
        return sign | 0x7e;
    }
    if mag < 0x3c80_0000 {
        // Multiples of 2^-9 below the smallest normal (whose code, 8, continues the count).
        return sign | (f32::from_bits(mag) * 512.0).round_ties_even() as u8;
    }
    let r = (mag + 0x7_ffff + ((mag >> 20) & 1)) >> 20;
    sign | ((((r >> 3) - 120) << 3) | (r & 7)) as u8
}

/// Where a weight's elements live.
enum WSrc<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    Raw {
        bytes: &'a [u8],
        dtype: DType,
        scale: f32,
    },
}

fn wsrc(t: &Tensor<Cpu>) -> WSrc<'_> {
    match t.storage() {
        CpuStorage::F32(v) => WSrc::F32(v),
        CpuStorage::F64(v) => WSrc::F64(v),
        CpuStorage::Weight(w) => WSrc::Raw {
            bytes: w.bytes.bytes(),
            dtype: w.dtype,
            scale: w.scale,
        },
    }
}

impl<'a> WSrc<'a> {
    /// The elements as a `T` slice when no conversion is needed.
    fn direct<T: Real>(&self) -> Option<&'a [T]> {
        match *self {
            WSrc::F32(v) => cast_slice_same::<f32, T>(v),
            WSrc::F64(v) => cast_slice_same::<f64, T>(v),
            WSrc::Raw {
                bytes,
                dtype: DType::F32,
                scale: 1.0,
            } => cast_slice_same::<f32, T>(bytemuck::try_cast_slice(bytes).ok()?),
            WSrc::Raw { .. } => None,
        }
    }

    /// Widens elements `start..start + out.len()` into `out`.
    fn widen_into<T: Real>(&self, start: usize, out: &mut [T]) {
        let n = out.len();
        match self {
            WSrc::F32(v) => {
                for (o, &x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = T::from_f32(x);
                }
            }
            WSrc::F64(v) => {
                for (o, &x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = T::from_f64(x);
                }
            }
            WSrc::Raw {
                bytes,
                dtype,
                scale,
            } => {
                let es = dtype.size_in_bytes();
                let b = &bytes[start * es..(start + n) * es];
                let s = *scale;
                match dtype {
                    DType::F32 => {
                        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                            *o = T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * s);
                        }
                    }
                    DType::F64 => {
                        for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            *o = T::from_f64(f64::from_le_bytes(a) * f64::from(s));
                        }
                    }
                    DType::BF16 => {
                        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                            let bits = u32::from(u16::from_le_bytes([c[0], c[1]])) << 16;
                            *o = T::from_f32(f32::from_bits(bits) * s);
                        }
                    }
                    DType::F16 => {
                        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                            *o = T::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32() * s);
                        }
                    }
                    DType::F8E4M3 => {
                        let t = &*F8E4M3_TABLE;
                        for (o, &c) in out.iter_mut().zip(b) {
                            *o = T::from_f32(t[c as usize] * s);
                        }
                    }
                }
            }
        }
    }
}

/// `&[A]` as `&[B]` when `A` and `B` are the same type.
fn cast_slice_same<A: bytemuck::Pod, B: bytemuck::Pod>(s: &[A]) -> Option<&[B]> {
    if std::any::TypeId::of::<A>() == std::any::TypeId::of::<B>() {
        bytemuck::try_cast_slice(s).ok()
    } else {
        None
    }
}

fn not_compute(op: &'static str, d: DType) -> KernelError {
    KernelError::InvalidArgument {
        op,
        message: format!("activations must be f32 or f64, found {d}"),
    }
}

/// The activation's elements as `T`.
fn act<'a, T: Real>(op: &'static str, t: &'a Tensor<Cpu>) -> Result<&'a [T]> {
    T::slice(t.storage()).ok_or_else(|| KernelError::DTypeMismatch {
        op,
        expected: T::DTYPE,
        found: t.dtype(),
    })
}

/// A secondary operand as `T`, widened when stored in another dtype.
fn operand<T: Real>(t: &Tensor<Cpu>) -> Cow<'_, [T]> {
    let src = wsrc(t);
    if let Some(s) = src.direct::<T>() {
        return Cow::Borrowed(s);
    }
    let mut v = vec![<T as Elem>::ZERO; t.numel()];
    src.widen_into(0, &mut v);
    Cow::Owned(v)
}

fn out<T: Real>(v: Vec<T>, shape: Vec<usize>) -> Tensor<Cpu> {
    Tensor::from_parts(T::wrap(v), shape, T::DTYPE)
}

macro_rules! by_dtype {
    ($op:expr, $t:expr, $f:ident ( $($arg:expr),* )) => {
        match $t.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            d => Err(not_compute($op, d)),
        }
    };
}

/// Applies `f` to each row of `row_len` elements (`out` and `x` rows pair up), in parallel for
/// large inputs.
fn map_rows<T: Real>(x: &[T], row_len: usize, f: impl Fn(usize, &[T], &mut [T]) + Sync) -> Vec<T> {
    let mut o = vec![<T as Elem>::ZERO; x.len()];
    if row_len == 0 {
        return o;
    }
    if x.len() >= PAR_THRESHOLD {
        o.par_chunks_mut(row_len)
            .zip(x.par_chunks(row_len))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, x, o));
    } else {
        o.chunks_mut(row_len)
            .zip(x.chunks(row_len))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, x, o));
    }
    o
}

/// Rows of the weight in one panel, the unit of parallel work (and of widening, for weights
/// stored in another dtype): about 4 MiB of f32, a multiple of 16, and a panel count that is a
/// multiple of the thread count so no thread idles at the end.
fn panel_rows(k: usize, n: usize, threads: usize) -> usize {
    let by_cache = ((1usize << 20) / k.max(1)).clamp(32, 512);
    let t = threads.max(1);
    let panels = n.div_ceil(by_cache).div_ceil(t) * t;
    n.div_ceil(panels).div_ceil(16).max(1) * 16
}

/// `dst[c * rows + r] = src[r * cols + c] (+ add[r])`: the transpose of a row-major
/// `rows x cols` matrix, with an optional value per source row added, in 16 x 16 tiles, in
/// parallel over blocks of destination rows.
fn transpose_add<T: Real>(src: &[T], rows: usize, cols: usize, add: Option<&[T]>, dst: &mut [T]) {
    const B: usize = 16;
    if rows == 0 || cols == 0 {
        return;
    }
    let block = |c0: usize, d: &mut [T]| {
        let cn = d.len() / rows;
        for r0 in (0..rows).step_by(B) {
            let rn = B.min(rows - r0);
            if rn == B && cn == B {
                let mut tile = [[<T as Elem>::ZERO; B]; B];
                for (i, t) in tile.iter_mut().enumerate() {
                    let s0 = (r0 + i) * cols + c0;
                    t.copy_from_slice(&src[s0..s0 + B]);
                }
                for j in 0..B {
                    let drow = &mut d[j * rows + r0..j * rows + r0 + B];
                    match add {
                        Some(a) => {
                            for ((o, t), &a) in drow.iter_mut().zip(&tile).zip(&a[r0..r0 + B]) {
                                *o = t[j] + a;
                            }
                        }
                        None => {
                            for (o, t) in drow.iter_mut().zip(&tile) {
                                *o = t[j];
                            }
                        }
                    }
                }
            } else {
                for j in 0..cn {
                    for i in 0..rn {
                        let v = src[(r0 + i) * cols + c0 + j];
                        d[j * rows + r0 + i] = match add {
                            Some(a) => v + a[r0 + i],
                            None => v,
                        };
                    }
                }
            }
        }
    };
    if src.len() >= PAR_THRESHOLD {
        dst.par_chunks_mut(B * rows)
            .enumerate()
            .for_each(|(i, d)| block(i * B, d));
    } else {
        dst.chunks_mut(B * rows)
            .enumerate()
            .for_each(|(i, d)| block(i * B, d));
    }
}

/// Scratch vectors of a thread larger than this are freed after use rather than kept.
const SCRATCH_KEEP_BYTES: usize = 64 << 20;
/// Scratch vectors kept per thread and element type.
const SCRATCH_KEEP: usize = 4;

/// A vector of `len` elements from this thread's pool (contents unspecified: callers overwrite
/// every element). Reusing the linear layers' temporaries saves the page faults of mapping
/// fresh memory for each of them.
fn take_scratch<T: Real>(len: usize) -> Vec<T> {
    // The smallest vector that holds `len`, else the largest (grown below): handing a small
    // request the big vector of a linear layer would leave the next big request to grow a
    // small one into freshly mapped pages.
    let mut v = T::scratch_pool()
        .with(|p| {
            let mut p = p.borrow_mut();
            let fits = p
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity());
            let pick = fits
                .or_else(|| p.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
                .map(|(i, _)| i);
            pick.map(|i| p.swap_remove(i))
        })
        .unwrap_or_default();
    if v.len() < len {
        v.resize(len, <T as Elem>::ZERO);
    }
    v.truncate(len);
    v
}

/// Returns a vector taken with [`take_scratch`] to this thread's pool.
fn give_scratch<T: Real>(v: Vec<T>) {
    if v.capacity() * std::mem::size_of::<T>() <= SCRATCH_KEEP_BYTES {
        T::scratch_pool().with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < SCRATCH_KEEP {
                p.push(v);
            } else if let Some(small) = p.iter_mut().min_by_key(|s| s.capacity())
                && small.capacity() < v.capacity()
            {
                // A full pool keeps the larger vectors.
                *small = v;
            }
        });
    }
}

/// Token counts below this run the linear layer as panels of weight rows in parallel (the gemm
/// crate's own threading splits the token dimension, too short to share then).
const PANEL_BELOW_M: usize = 64;

fn linear_t<T: Real>(
    x: &Tensor<Cpu>,
    w: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("linear", x)?;
    let shapes::LinearDims {
        m,
        k,
        n,
        out_shape: shape,
    } = shapes::linear(x.shape(), w.shape(), bias.map(Tensor::shape))?;
    let b = bias.map(operand::<T>);
    let mut o = vec![<T as Elem>::ZERO; m * n];
    if m == 0 || n == 0 {
        return Ok(out(o, shape));
    }
    // The product is computed transposed, `ot [n, m] = W x^T`, from `x^T [k, m]`: in that
    // orientation the gemm crate reads the weight rows and x^T along unit strides when it packs
    // them. The row-major product `x W^T` makes it gather the weight with a stride of `k`, one
    // element at a time, which costs a third of the multiply at the block sizes of Flux.
    let mut xt_buf = take_scratch::<T>(m * k);
    transpose_add(xs, m, k, None, &mut xt_buf);
    let xt = Mat {
        data: &xt_buf,
        rs: m,
        cs: 1,
    };
    let mut ot = take_scratch::<T>(n * m);
    let src = wsrc(w);
    let direct = src.direct::<T>();
    match direct {
        Some(wd) if m >= PANEL_BELOW_M => gemm(
            n,
            m,
            k,
            &mut ot,
            m,
            false,
            Mat {
                data: wd,
                rs: k,
                cs: 1,
            },
            xt,
            T::ONE,
            pool_parallelism(),
        ),
        _ => {
            // A panel of weight rows per task, widened into a per-task buffer when stored in
            // another dtype (a bf16 weight never exists as a full-precision copy).
            let nb = panel_rows(k, n, rayon::current_num_threads());
            ot.par_chunks_mut(nb * m).enumerate().for_each(|(p, blk)| {
                let (n0, nn) = (p * nb, blk.len() / m);
                let mut buf = Vec::new();
                let panel: &[T] = if let Some(wd) = direct {
                    &wd[n0 * k..(n0 + nn) * k]
                } else {
                    buf = take_scratch::<T>(nn * k);
                    src.widen_into(n0 * k, &mut buf);
                    &buf
                };
                gemm(
                    nn,
                    m,
                    k,
                    blk,
                    m,
                    false,
                    Mat {
                        data: panel,
                        rs: k,
                        cs: 1,
                    },
                    xt,
                    T::ONE,
                    Parallelism::None,
                );
                give_scratch(buf);
            });
        }
    }
    transpose_add(&ot, n, m, b.as_deref(), &mut o);
    give_scratch(ot);
    give_scratch(xt_buf);
    Ok(out(o, shape))
}

fn matmul_t<T: Real>(a: &Tensor<Cpu>, b: &Tensor<Cpu>, transpose_b: bool) -> Result<Tensor<Cpu>> {
    let av = act::<T>("matmul", a)?;
    let MatmulDims {
        batch,
        m,
        k,
        n,
        shared_b: shared,
        out_shape,
    } = shapes::matmul(a.shape(), b.shape(), transpose_b)?;
    let bv = operand::<T>(b);
    let mut o = vec![<T as Elem>::ZERO; batch * m * n];
    for i in 0..batch {
        let boff = if shared { 0 } else { i * k * n };
        let rhs = if transpose_b {
            Mat {
                data: &bv[boff..boff + k * n],
                rs: 1,
                cs: k,
            }
        } else {
            Mat {
                data: &bv[boff..boff + k * n],
                rs: n,
                cs: 1,
            }
        };
        gemm(
            m,
            n,
            k,
            &mut o[i * m * n..(i + 1) * m * n],
            n,
            false,
            Mat {
                data: &av[i * m * k..(i + 1) * m * k],
                rs: k,
                cs: 1,
            },
            rhs,
            T::ONE,
            pool_parallelism(),
        );
    }
    Ok(out(o, out_shape))
}

fn layer_norm_t<T: Real>(
    x: &Tensor<Cpu>,
    w: Option<&Tensor<Cpu>>,
    b: Option<&Tensor<Cpu>>,
    eps: f64,
) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("layer_norm", x)?;
    let RowDims { len: c, .. } =
        shapes::layer_norm(x.shape(), w.map(Tensor::shape), b.map(Tensor::shape))?;
    let w = w.map(operand::<T>);
    let b = b.map(operand::<T>);
    let o = map_rows(xs, c, |_, x, o| {
        let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / c as f64;
        let r = T::from_f64(1.0 / (var + eps).sqrt());
        let mean = T::from_f64(mean);
        for (j, (o, &v)) in o.iter_mut().zip(x).enumerate() {
            let mut y = (v - mean) * r;
            if let Some(w) = &w {
                y = y * w[j];
            }
            if let Some(b) = &b {
                y = y + b[j];
            }
            *o = y;
        }
    });
    Ok(out(o, x.shape().to_vec()))
}

fn rms_norm_t<T: Real>(
    x: &Tensor<Cpu>,
    scale: Option<&Tensor<Cpu>>,
    eps: f64,
) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("rms_norm", x)?;
    let RowDims { len: c, .. } = shapes::rms_norm(x.shape(), scale.map(Tensor::shape))?;
    let s = scale.map(operand::<T>);
    let o = map_rows(xs, c, |_, x, o| {
        let ms = x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / c as f64;
        let r = T::from_f64(1.0 / (ms + eps).sqrt());
        for (j, (o, &v)) in o.iter_mut().zip(x).enumerate() {
            *o = match &s {
                Some(s) => v * r * s[j],
                None => v * r,
            };
        }
    });
    Ok(out(o, x.shape().to_vec()))
}

fn modulate_t<T: Real>(
    x: &Tensor<Cpu>,
    shift: &Tensor<Cpu>,
    scale: &Tensor<Cpu>,
) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("modulate", x)?;
    let shapes::ModulateDims {
        l,
        c,
        shift_shared: sh_shared,
        scale_shared: sc_shared,
        ..
    } = shapes::modulate(x.shape(), shift.shape(), scale.shape())?;
    let (sh, sc) = (operand::<T>(shift), operand::<T>(scale));
    let o = map_rows(xs, c, |row, x, o| {
        let bi = row / l.max(1);
        let sh = if sh_shared {
            &sh[..]
        } else {
            &sh[bi * c..(bi + 1) * c]
        };
        let sc = if sc_shared {
            &sc[..]
        } else {
            &sc[bi * c..(bi + 1) * c]
        };
        for j in 0..c {
            o[j] = (T::ONE + sc[j]) * x[j] + sh[j];
        }
    });
    Ok(out(o, x.shape().to_vec()))
}

fn gated_add_t<T: Real>(
    x: &Tensor<Cpu>,
    y: &Tensor<Cpu>,
    gate: &Tensor<Cpu>,
) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("gated_add", x)?;
    let shapes::PerBatch { l, c, shared, .. } =
        shapes::gated_add(x.shape(), y.shape(), gate.shape())?;
    let ys = act::<T>("gated_add", y)?;
    let g = operand::<T>(gate);
    let o = map_rows(xs, c, |row, x, o| {
        let bi = row / l.max(1);
        let g = if shared {
            &g[..]
        } else {
            &g[bi * c..(bi + 1) * c]
        };
        let y = &ys[row * c..(row + 1) * c];
        for j in 0..c {
            o[j] = x[j] + g[j] * y[j];
        }
    });
    Ok(out(o, x.shape().to_vec()))
}

/// `erf` to about 1e-13: Taylor series near zero, continued fraction for the tail.
fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (mut term, mut sum, x2) = (a, a, a * a);
        for n in 1..200 {
            term *= -x2 / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut f = a;
        for n in (1..60).rev() {
            f = a + (n as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    r.copysign(x)
}

fn act_fn<T: Real>(a: Activation) -> impl Fn(T) -> T + Sync {
    let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
    let k = T::from_f64(0.044715);
    let half = T::from_f64(0.5);
    let q = T::from_f64(1.702);
    move |x: T| match a {
        Activation::Silu => x / (T::ONE + (-x).exp()),
        Activation::GeluTanh => half * x * (T::ONE + (c * (x + k * x * x * x)).tanh()),
        Activation::GeluErf => {
            half * x * (T::ONE + T::from_f64(erf64(x.to_f64() / std::f64::consts::SQRT_2)))
        }
        Activation::QuickGelu => x / (T::ONE + (-(q * x)).exp()),
        Activation::Relu => {
            if x > <T as Elem>::ZERO {
                x
            } else {
                <T as Elem>::ZERO
            }
        }
    }
}

fn activation_scalar<T: Real>(a: Activation, x: &[T], o: &mut [T]) {
    let f = act_fn::<T>(a);
    for (o, &v) in o.iter_mut().zip(x) {
        *o = f(v);
    }
}

/// `e^t` in f32 from straight-line arithmetic the compiler vectorises (no libm call): `t = n ln2
/// + r` with `ln2` split in two (Cody and Waite), the Cephes degree-6 polynomial for `e^r` on
/// `|r| <= ln2/2`, and `2^n` built in the exponent bits. Within 2 ulp of `e^t`; `t` is clamped to
/// [-87, 88], where `2^n` stays a normal number.
#[inline(always)]
fn exp_f32(t: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = t.clamp(-87.0, 88.0);
    let y = t * std::f32::consts::LOG2_E + SHIFTER;
    let n = y - SHIFTER;
    let r = t - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    let ni = (y.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    er * f32::from_bits(((ni + 127) << 23) as u32)
}

/// GELU (tanh approximation) in f32 as `x * sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`,
/// which equals `0.5 x (1 + tanh(u))` and needs one vectorisable exponential.
fn gelu_tanh_f32(x: &[f32], o: &mut [f32]) {
    simd_dispatch!(gelu_tanh_f32_body, gelu_avx512, gelu_avx2, (x: &[f32], o: &mut [f32]) -> ());
}

#[inline(always)]
fn gelu_tanh_f32_body(x: &[f32], o: &mut [f32]) {
    const C: f32 = 0.797_884_6;
    const K: f32 = 0.044_715;
    for (o, &v) in o.iter_mut().zip(x) {
        let u = C * (v + K * v * v * v);
        *o = v / (1.0 + exp_f32(-2.0 * u));
    }
}

/// [`Real::exp_shifted_sum`] in f32: the vectorisable [`exp_f32`] with 16 running sums.
/// Differences below -87 give 0 rather than `exp_f32`'s floor of e^-87 (below 2^-125, far under
/// an ulp of the sum, whose largest term is 1), so masked scores (`-inf`) drop out exactly.
fn exp_shifted_sum_f32(x: &mut [f32], mx: f32) -> f32 {
    simd_dispatch!(exp_shifted_sum_f32_body, exp_sum_avx512, exp_sum_avx2, (x: &mut [f32], mx: f32) -> f32)
}

#[inline(always)]
fn exp_shifted_sum_f32_body(x: &mut [f32], mx: f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let t = *v - mx;
            let e = if t < -87.0 { 0.0 } else { exp_f32(t) };
            *v = e;
            *a += e;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
        let t = *v - mx;
        let e = if t < -87.0 { 0.0 } else { exp_f32(t) };
        *v = e;
        *a += e;
    }
    let mut n = LANES / 2;
    while n > 0 {
        for i in 0..n {
            acc[i] += acc[i + n];
        }
        n /= 2;
    }
    acc[0]
}

fn activation_t<T: Real>(x: &Tensor<Cpu>, a: Activation) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("activation", x)?;
    let o = map_rows(xs, 4096.min(xs.len().max(1)), |_, x, o| {
        T::activation_into(a, x, o);
    });
    Ok(out(o, x.shape().to_vec()))
}

fn binary_t<T: Real>(a: &Tensor<Cpu>, b: &Tensor<Cpu>, op: BinaryOp) -> Result<Tensor<Cpu>> {
    let av = act::<T>("binary", a)?;
    let n = shapes::binary(a.shape(), b.shape())?;
    let bv = operand::<T>(b);
    if n == 0 {
        return Ok(out(av.to_vec(), a.shape().to_vec()));
    }
    let o = map_rows(av, n, |_, x, o| {
        for j in 0..n {
            o[j] = match op {
                BinaryOp::Add => x[j] + bv[j],
                BinaryOp::Sub => x[j] - bv[j],
                BinaryOp::Mul => x[j] * bv[j],
            };
        }
    });
    Ok(out(o, a.shape().to_vec()))
}

fn affine_t<T: Real>(x: &Tensor<Cpu>, mul: f64, add: f64) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("affine", x)?;
    let (m, a) = (T::from_f64(mul), T::from_f64(add));
    Ok(out(
        xs.iter().map(|&v| v * m + a).collect(),
        x.shape().to_vec(),
    ))
}

/// Lanes of PyTorch's 512-bit vectorised CPU kernels for an element of `size` bytes.
const fn torch_lanes(size: usize) -> usize {
    64 / size
}

/// Sum in the order of PyTorch's vectorised `reduce_all` on AVX-512: lane-wise accumulation
/// over full vectors (the tail vector adds into its first lanes only), then a butterfly over the
/// lanes (partners 8, 4, 2, 1 apart for 16 lanes). Following its order brings a float32 softmax
/// closer to the reference's rounding (the exponentials may still differ by an ulp).
fn torch_sum<T: Real>(x: &[T]) -> T {
    const MAX_LANES: usize = 16;
    let lanes = torch_lanes(std::mem::size_of::<T>()).min(MAX_LANES);
    let mut acc = [<T as Elem>::ZERO; MAX_LANES];
    if x.len() < lanes {
        // A single partial vector: unused lanes hold zero.
        acc[..x.len()].copy_from_slice(x);
    } else {
        let mut chunks = x.chunks_exact(lanes);
        if let Some(first) = chunks.next() {
            acc[..lanes].copy_from_slice(first);
        }
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = *a + v;
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a = *a + v;
        }
    }
    let mut step = lanes / 2;
    while step > 0 {
        let prev = acc;
        for (i, a) in acc[..lanes].iter_mut().enumerate() {
            *a = prev[i] + prev[i ^ step];
        }
        step /= 2;
    }
    acc[0]
}

/// Softmax of one row as PyTorch's CPU kernel computes it: `e = exp(x - max)`, then
/// `e * (1 / sum(e))` with the sum in `torch_sum`'s order.
fn softmax_row<T: Real>(x: &[T], o: &mut [T]) {
    let mx = x
        .iter()
        .fold(T::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v));
    for (o, &v) in o.iter_mut().zip(x) {
        *o = (v - mx).exp();
    }
    let inv = T::ONE / torch_sum(o);
    for o in o.iter_mut() {
        *o = *o * inv;
    }
}

fn softmax_t<T: Real>(x: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("softmax", x)?;
    let c = shapes::last_dim("softmax", x.shape())?;
    let o = map_rows(xs, c, |_, x, o| softmax_row(x, o));
    Ok(out(o, x.shape().to_vec()))
}

fn rope_t<T: Real>(x: &Tensor<Cpu>, cs: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("rope", x)?;
    let s = x.shape();
    let shapes::RopeDims {
        l,
        h,
        d,
        shared_table,
        ..
    } = shapes::rope(s, cs.shape())?;
    let t = operand::<T>(cs);
    let o = map_rows(xs, h * d, |row, x, o| {
        let (bi, li) = (row / l.max(1), row % l.max(1));
        let tb = if shared_table { 0 } else { bi };
        let tab = &t[(tb * l + li) * d..(tb * l + li + 1) * d];
        for hh in 0..h {
            let (x, o) = (&x[hh * d..(hh + 1) * d], &mut o[hh * d..(hh + 1) * d]);
            for j in 0..d / 2 {
                let (c, s) = (tab[2 * j], tab[2 * j + 1]);
                let (x0, x1) = (x[2 * j], x[2 * j + 1]);
                o[2 * j] = c * x0 - s * x1;
                o[2 * j + 1] = s * x0 + c * x1;
            }
        }
    });
    Ok(out(o, s.to_vec()))
}

/// Query rows per attention block and key columns per score tile. A block's scores
/// (`ATT_BQ x ATT_BK`), its accumulator and the packed keys and values of its head stay in L2;
/// sequences up to `ATT_BK` keys take one tile, without the rescaling of the online softmax.
const ATT_BQ: usize = 64;
const ATT_BK: usize = 512;

/// `dst[c * dst_rs + r] = src[r * src_rs + c]` for `r < rows`, `c < cols`: the transpose of a
/// strided `rows x cols` block, in 8 x 8 tiles.
fn transpose_block<T: Copy>(
    src: &[T],
    src_rs: usize,
    rows: usize,
    cols: usize,
    dst: &mut [T],
    dst_rs: usize,
) {
    const B: usize = 8;
    for r0 in (0..rows).step_by(B) {
        let rn = B.min(rows - r0);
        for c0 in (0..cols).step_by(B) {
            let cn = B.min(cols - c0);
            for c in c0..c0 + cn {
                let d = &mut dst[c * dst_rs + r0..c * dst_rs + r0 + rn];
                for (i, o) in d.iter_mut().enumerate() {
                    *o = src[(r0 + i) * src_rs + c];
                }
            }
        }
    }
}

/// One attention task: query rows `q0..q0 + out.len() / d` of head `hi` of batch item `bi`,
/// written to `out` (`[rows, d]`), with the keys and values of the head packed once into
/// contiguous scratch (K^T per key tile, so both products read their right-hand operand along
/// unit strides).
#[allow(clippy::too_many_arguments)]
fn attention_task<T: Real>(
    (qs, ks, vs): (&[T], &[T], &[T]),
    bias: Option<(&[T], usize)>,
    (lq, lk, h, d): (usize, usize, usize, usize),
    (bi, hi, q0): (usize, usize, usize),
    alpha: T,
    out: &mut [T],
) {
    let hd = h * d;
    let rows = out.len() / d;
    let kvoff = bi * lk * hd + hi * d;
    let mut kt = take_scratch::<T>(lk * d);
    let mut vp = take_scratch::<T>(lk * d);
    for j0 in (0..lk).step_by(ATT_BK) {
        let bk = ATT_BK.min(lk - j0);
        transpose_block(
            &ks[kvoff + j0 * hd..],
            hd,
            bk,
            d,
            &mut kt[j0 * d..(j0 + bk) * d],
            bk,
        );
    }
    for (j, row) in vp.chunks_exact_mut(d).enumerate() {
        row.copy_from_slice(&vs[kvoff + j * hd..kvoff + j * hd + d]);
    }
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let mut sc = take_scratch::<T>(ATT_BQ * ATT_BK.min(lk));
    let mut mrow = [neg_inf; ATT_BQ];
    let mut lrow = [<T as Elem>::ZERO; ATT_BQ];
    for i0 in (0..rows).step_by(ATT_BQ) {
        let bq = ATT_BQ.min(rows - i0);
        let acc = &mut out[i0 * d..(i0 + bq) * d];
        let qoff = (bi * lq + q0 + i0) * hd + hi * d;
        mrow.fill(neg_inf);
        lrow.fill(<T as Elem>::ZERO);
        for j0 in (0..lk).step_by(ATT_BK) {
            let bk = ATT_BK.min(lk - j0);
            let sc = &mut sc[..bq * bk];
            gemm(
                bq,
                bk,
                d,
                sc,
                bk,
                false,
                Mat {
                    data: &qs[qoff..],
                    rs: hd,
                    cs: 1,
                },
                Mat {
                    data: &kt[j0 * d..(j0 + bk) * d],
                    rs: bk,
                    cs: 1,
                },
                alpha,
                Parallelism::None,
            );
            if let Some((bt, base)) = bias {
                for (i, srow) in sc.chunks_exact_mut(bk).enumerate() {
                    let off = (base + q0 + i0 + i) * lk + j0;
                    for (s, &bv) in srow.iter_mut().zip(&bt[off..off + bk]) {
                        *s = *s + bv;
                    }
                }
            }
            let first = j0 == 0;
            for (i, srow) in sc.chunks_exact_mut(bk).enumerate() {
                let mx = mrow[i].max(row_max(srow));
                if mx == neg_inf {
                    srow.fill(<T as Elem>::ZERO);
                    continue;
                }
                let sum = T::exp_shifted_sum(srow, mx);
                if first {
                    lrow[i] = sum;
                } else {
                    let corr = (mrow[i] - mx).exp();
                    lrow[i] = lrow[i] * corr + sum;
                    if corr != T::ONE {
                        for a in &mut acc[i * d..(i + 1) * d] {
                            *a = *a * corr;
                        }
                    }
                }
                mrow[i] = mx;
            }
            // The first tile overwrites the accumulator (scratch contents are unspecified).
            gemm(
                bq,
                d,
                bk,
                acc,
                d,
                !first,
                Mat {
                    data: sc,
                    rs: bk,
                    cs: 1,
                },
                Mat {
                    data: &vp[j0 * d..(j0 + bk) * d],
                    rs: d,
                    cs: 1,
                },
                T::ONE,
                Parallelism::None,
            );
        }
        for (i, row) in acc.chunks_exact_mut(d).enumerate() {
            let inv = T::ONE / lrow[i];
            for a in row {
                *a = *a * inv;
            }
        }
    }
    give_scratch(sc);
    give_scratch(vp);
    give_scratch(kt);
}

/// The largest element of a row (`-inf` for an empty one), over 16 running maxima so the loop
/// vectorises.
fn row_max<T: Real>(x: &[T]) -> T {
    const LANES: usize = 16;
    let mut m = [T::from_f64(f64::NEG_INFINITY); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in m.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    m.iter().fold(m[0], |a, &b| a.max(b))
}

fn attention_t<T: Real>(
    q: &Tensor<Cpu>,
    k: &Tensor<Cpu>,
    v: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    scale: Option<f64>,
) -> Result<Tensor<Cpu>> {
    let (qs, ks, vs) = (
        act::<T>("attention", q)?,
        act::<T>("attention", k)?,
        act::<T>("attention", v)?,
    );
    let s = q.shape();
    let AttentionDims {
        b,
        lq,
        lk,
        h,
        d,
        bias: bias_dims,
    } = shapes::attention(s, k.shape(), v.shape(), bias.map(Tensor::shape))?;
    let bias_info = bias
        .zip(bias_dims)
        .map(|(t, (bb, bh))| (operand::<T>(t), bb, bh));
    let alpha = T::from_f64(scale.unwrap_or(1.0 / (d as f64).sqrt()));
    let hd = h * d;
    let mut o = vec![<T as Elem>::ZERO; b * lq * hd];
    if o.is_empty() {
        return Ok(out(o, s.to_vec()));
    }
    if lk == 0 {
        // Softmax over no keys: 0 / 0, as the tiled loop would give.
        o.fill(T::from_f64(f64::NAN));
        return Ok(out(o, s.to_vec()));
    }
    // One task per head, or per chunk of query rows of a head when there are too few heads to
    // keep every thread busy; each writes its rows to `[B, H, Lq, D]`, permuted at the end.
    let heads = b * h;
    let want_tasks = 4 * rayon::current_num_threads().max(1);
    let rows = if heads >= want_tasks {
        lq
    } else {
        lq.div_ceil(want_tasks.div_ceil(heads)).max(1)
    };
    let mut ob = take_scratch::<T>(heads * lq * d);
    ob.par_chunks_mut(lq * d).enumerate().for_each(|(bh, hb)| {
        let (bi, hi) = (bh / h, bh % h);
        let bias = bias_info.as_ref().map(|(bt, nb, nh)| {
            let base = ((if *nb == 1 { 0 } else { bi }) * nh + if *nh == 1 { 0 } else { hi }) * lq;
            (&bt[..], base)
        });
        hb.par_chunks_mut(rows * d)
            .enumerate()
            .for_each(|(c, blk)| {
                attention_task(
                    (qs, ks, vs),
                    bias,
                    (lq, lk, h, d),
                    (bi, hi, c * rows),
                    alpha,
                    blk,
                );
            });
    });
    let permute = |r: usize, row: &mut [T]| {
        let (bi, i) = (r / lq, r % lq);
        for (hi, o) in row.chunks_exact_mut(d).enumerate() {
            let src = ((bi * h + hi) * lq + i) * d;
            o.copy_from_slice(&ob[src..src + d]);
        }
    };
    if o.len() >= PAR_THRESHOLD {
        o.par_chunks_mut(hd)
            .enumerate()
            .for_each(|(r, row)| permute(r, row));
    } else {
        o.chunks_mut(hd)
            .enumerate()
            .for_each(|(r, row)| permute(r, row));
    }
    give_scratch(ob);
    Ok(out(o, s.to_vec()))
}

fn concat_t<T: Real>(xs: &[&Tensor<Cpu>], dim: usize) -> Result<Tensor<Cpu>> {
    let DimSplit {
        outer,
        inner,
        out_shape,
        ..
    } = shapes::concat(xs.iter().map(|t| t.shape()), dim)?;
    let parts = xs
        .iter()
        .map(|t| Ok((act::<T>("concat", t)?, t.shape()[dim] * inner)))
        .collect::<Result<Vec<_>>>()?;
    let mut o = Vec::with_capacity(outer * out_shape[dim] * inner);
    for i in 0..outer {
        for (data, blk) in &parts {
            o.extend_from_slice(&data[i * blk..(i + 1) * blk]);
        }
    }
    Ok(out(o, out_shape))
}

fn narrow_t<T: Real>(x: &Tensor<Cpu>, dim: usize, start: usize, len: usize) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("narrow", x)?;
    let DimSplit {
        outer,
        size,
        inner,
        out_shape,
    } = shapes::narrow(x.shape(), dim, start, len)?;
    let mut o = Vec::with_capacity(outer * len * inner);
    for i in 0..outer {
        let base = (i * size + start) * inner;
        o.extend_from_slice(&xs[base..base + len * inner]);
    }
    Ok(out(o, out_shape))
}

fn permute_t<T: Real>(x: &Tensor<Cpu>, perm: &[usize]) -> Result<Tensor<Cpu>> {
    let xs = act::<T>("permute", x)?;
    let shapes::Permuted {
        out_shape: shape,
        src_strides: pst,
    } = shapes::permute(x.shape(), perm)?;
    let r = shape.len();
    let n = xs.len();
    let mut o = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    let mut off = 0usize;
    for _ in 0..n {
        o.push(xs[off]);
        for a in (0..r).rev() {
            idx[a] += 1;
            off += pst[a];
            if idx[a] < shape[a] {
                break;
            }
            off -= pst[a] * shape[a];
            idx[a] = 0;
        }
    }
    Ok(out(o, shape))
}

fn gather_t<T: Real>(table: &Tensor<Cpu>, ids: &[usize]) -> Result<Tensor<Cpu>> {
    let (_, c) = shapes::gather_rows(table.shape(), ids)?;
    let src = wsrc(table);
    let mut o = vec![<T as Elem>::ZERO; ids.len() * c];
    for (row, &id) in o.chunks_mut(c.max(1)).zip(ids) {
        src.widen_into(id * c, row);
    }
    Ok(out(o, vec![ids.len(), c]))
}

fn cast_t<T: Real>(x: &Tensor<Cpu>) -> Tensor<Cpu> {
    let v = operand::<T>(x).into_owned();
    out(v, x.shape().to_vec())
}

impl ModelOps for Cpu {
    fn upload_weight(
        &self,
        bytes: ByteView,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Result<Tensor<Self>> {
        shapes::weight_len(shape, dtype, bytes.len())?;
        let scale = scale.unwrap_or(1.0);
        let storage = CpuStorage::Weight(WeightData {
            bytes,
            dtype,
            scale,
        });
        Ok(Tensor::from_parts(storage, shape.to_vec(), dtype))
    }

    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>> {
        match dtype {
            DType::F32 => Ok(cast_t::<f32>(x)),
            DType::F64 => Ok(cast_t::<f64>(x)),
            d => Err(unsupported("cast", d)),
        }
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        by_dtype!("linear", x, linear_t(x, w, bias))
    }

    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        transpose_b: bool,
    ) -> Result<Tensor<Self>> {
        by_dtype!("matmul", a, matmul_t(a, b, transpose_b))
    }

    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        by_dtype!("layer_norm", x, layer_norm_t(x, weight, bias, eps))
    }

    fn rms_norm(
        &self,
        x: &Tensor<Self>,
        scale: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        by_dtype!("rms_norm", x, rms_norm_t(x, scale, eps))
    }

    fn modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        by_dtype!("modulate", x, modulate_t(x, shift, scale))
    }

    fn gated_add(
        &self,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        by_dtype!("gated_add", x, gated_add_t(x, y, gate))
    }

    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        by_dtype!("activation", x, activation_t(x, act))
    }

    fn binary(&self, a: &Tensor<Self>, b: &Tensor<Self>, op: BinaryOp) -> Result<Tensor<Self>> {
        by_dtype!("binary", a, binary_t(a, b, op))
    }

    fn affine(&self, x: &Tensor<Self>, mul: f64, add: f64) -> Result<Tensor<Self>> {
        by_dtype!("affine", x, affine_t(x, mul, add))
    }

    fn softmax(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        by_dtype!("softmax", x, softmax_t(x))
    }

    fn rope(&self, x: &Tensor<Self>, cos_sin: &Tensor<Self>) -> Result<Tensor<Self>> {
        by_dtype!("rope", x, rope_t(x, cos_sin))
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        scale: Option<f64>,
    ) -> Result<Tensor<Self>> {
        by_dtype!("attention", q, attention_t(q, k, v, bias, scale))
    }

    fn concat(&self, xs: &[&Tensor<Self>], dim: usize) -> Result<Tensor<Self>> {
        let d = xs.first().map_or(DType::F32, |t| t.dtype());
        match d {
            DType::F32 => concat_t::<f32>(xs, dim),
            DType::F64 => concat_t::<f64>(xs, dim),
            d => Err(not_compute("concat", d)),
        }
    }

    fn narrow(
        &self,
        x: &Tensor<Self>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor<Self>> {
        by_dtype!("narrow", x, narrow_t(x, dim, start, len))
    }

    fn permute(&self, x: &Tensor<Self>, perm: &[usize]) -> Result<Tensor<Self>> {
        by_dtype!("permute", x, permute_t(x, perm))
    }

    fn gather_rows(
        &self,
        table: &Tensor<Self>,
        ids: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        match dtype {
            DType::F32 => gather_t::<f32>(table, ids),
            DType::F64 => gather_t::<f64>(table, ids),
            d => Err(not_compute("gather_rows", d)),
        }
    }
}

/// Widens any CPU tensor (activation or weight) to f64 values.
pub(crate) fn widen_f64(t: &Tensor<Cpu>) -> Vec<f64> {
    operand::<f64>(t).into_owned()
}

/// Widens any CPU tensor (activation or weight) to f32 values.
pub(crate) fn widen_f32(t: &Tensor<Cpu>) -> Vec<f32> {
    operand::<f32>(t).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostData, SamplerOps};

    /// The encoder against a search over the decoded codes: nearest value, ties to the even
    /// code, saturation, NaN, both signs; every code and every midpoint between neighbours.
    #[test]
    fn f8e4m3_encoding_is_nearest_even_and_saturating() {
        let search = |x: f32| -> u8 {
            let sign = if x.is_sign_negative() { 0x80 } else { 0 };
            if x.is_nan() {
                return sign | 0x7f;
            }
            let a = f64::from(x).abs();
            let mut best = 0u8;
            for c in 1..=0x7eu8 {
                let dc = (f64::from(f8e4m3_to_f32(c)) - a).abs();
                let db = (f64::from(f8e4m3_to_f32(best)) - a).abs();
                if dc < db || (dc == db && c % 2 == 0) {
                    best = c;
                }
            }
            sign | best
        };
        let mut xs = vec![
            448.0,
            460.0,
            464.0,
            1e30,
            f32::INFINITY,
            f32::NAN,
            1e-30,
            0.0,
        ];
        for c in 0..0x7eu8 {
            let (lo, hi) = (f64::from(f8e4m3_to_f32(c)), f64::from(f8e4m3_to_f32(c + 1)));
            let mid = 0.5 * (lo + hi);
            xs.extend([lo, mid, mid * (1.0 + 1e-6), mid * (1.0 - 1e-6)].map(|v| v as f32));
        }
        for i in 0..2000u32 {
            xs.push((i as f32 * 0.618_034).fract() * 2f32.powi((i % 24) as i32 - 12));
        }
        for x in xs.iter().flat_map(|&x| [x, -x]) {
            assert_eq!(f32_to_f8e4m3(x), search(x), "{x:e}");
        }
        for c in (0..=255u8).filter(|c| c & 0x7f != 0x7f) {
            assert_eq!(f32_to_f8e4m3(f8e4m3_to_f32(c)), c, "code {c:#x}");
        }
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let t = -87.0 + 175.0 * f64::from(i) / 200_000.0;
            let t32 = t as f32;
            let want = f64::from(t32).exp();
            let got = f64::from(exp_f32(t32));
            worst = worst.max(((got - want) / want).abs());
        }
        // 2 ulp of f32 is 2^-22 relative.
        assert!(
            worst < 2.0 * 2f64.powi(-23),
            "worst relative error {worst:e}"
        );
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1e-37);
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
    }

    #[test]
    fn gelu_tanh_f32_matches_the_tanh_formula() {
        let xs: Vec<f32> = (0..=40_000).map(|i| -20.0 + i as f32 / 1000.0).collect();
        let mut o = vec![0f32; xs.len()];
        gelu_tanh_f32(&xs, &mut o);
        for (&x, &g) in xs.iter().zip(&o) {
            let x64 = f64::from(x);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            // 0.5 x (1 + tanh u) in a form without the cancellation of 1 + tanh u for x << 0.
            let want = x64 / (1.0 + (-2.0 * u).exp());
            assert!((0.5 * x64 * (1.0 + u.tanh()) - want).abs() <= 1e-15 * (1.0 + x64.abs()));
            // Evaluating `2u` in f32 (a few roundings) moves e^-2u by up to about 16 |u| 2^-24
            // relative, which dominates for x << 0. The exponential saturates at e^88:
            // far-negative inputs give about x e^-88 (below 1e-36) where the exact value
            // underflows.
            let rel = 1e-6 + 16.0 * u.abs() * 2f64.powi(-24);
            let err = (f64::from(g) - want).abs();
            assert!(
                err <= rel * want.abs() + 1e-36,
                "gelu({x}) = {g}, expected {want}"
            );
        }
    }

    #[test]
    fn exp_shifted_sum_f32_matches_exp_and_every_simd_variant() {
        // Scores at and below the maximum, a masked one, lengths around the 16 lanes.
        for n in [0usize, 1, 15, 16, 17, 100, 333] {
            let mx = 3.25f32;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 29 == 7 {
                        f32::NEG_INFINITY
                    } else {
                        mx - (i as f32 * 0.731).rem_euclid(95.0)
                    }
                })
                .collect();
            let mut got = x.clone();
            let sum = exp_shifted_sum_f32(&mut got, mx);
            let mut want_sum = 0f64;
            for (&xi, &g) in x.iter().zip(&got) {
                let t = f64::from(xi) - f64::from(mx);
                let want = if t < -87.0 { 0.0 } else { t.exp() };
                want_sum += want;
                assert!(
                    (f64::from(g) - want).abs() <= 2.0 * 2f64.powi(-23) * want,
                    "e^{t} = {g}, expected {want}"
                );
            }
            assert!((f64::from(sum) - want_sum).abs() <= 1e-6 * want_sum.max(1e-30));
            // The plain body (baseline vectors) gives the same bits as the variant dispatched.
            let mut base = x.clone();
            let base_sum = exp_shifted_sum_f32_body(&mut base, mx);
            assert_eq!(base_sum.to_bits(), sum.to_bits());
            assert!(
                base.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    /// Attention by the definition in f64 (`q [B, Lq, H, D]`, `bias [1, H, Lq, Lk]`).
    #[allow(clippy::too_many_arguments)]
    fn naive_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        bias: &[f64],
        (b, lq, lk, h, d): (usize, usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let mut o = vec![0.0; b * lq * h * d];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| {
                                    q[((bi * lq + i) * h + hi) * d + e]
                                        * k[((bi * lk + j) * h + hi) * d + e]
                                })
                                .sum();
                            scale * dot + bias[(hi * lq + i) * lk + j]
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for e in 0..d {
                        o[((bi * lq + i) * h + hi) * d + e] = (0..lk)
                            .map(|j| p[j] * v[((bi * lk + j) * h + hi) * d + e])
                            .sum::<f64>()
                            / z;
                    }
                }
            }
        }
        o
    }

    #[test]
    fn attention_matches_the_definition_across_tiles_and_tasks() {
        let val = |i: usize, s: f64| ((i as f64 * 0.618_034 + s).fract() - 0.5) * 3.0;
        // Several key tiles with a partial last one and query blocks with a partial last one,
        // with few heads (query rows split over tasks) and with many (one task per head).
        for &(b, lq, lk, h, d) in &[
            (1, 2 * ATT_BQ + 5, 2 * ATT_BK + 37, 2, 8),
            (2, 70, ATT_BK + 88, 5, 16),
        ] {
            let shape = (b, lq, lk, h, d);
            let q: Vec<f64> = (0..b * lq * h * d).map(|i| val(i, 0.1)).collect();
            let k: Vec<f64> = (0..b * lk * h * d).map(|i| val(i, 0.2)).collect();
            let v: Vec<f64> = (0..b * lk * h * d).map(|i| val(i, 0.3)).collect();
            // Row i of head 0 masks its whole first key tile when i is odd, and every row masks
            // the keys after it plus ATT_BK; head 1 and up see all keys with a position bias.
            let bias: Vec<f64> = (0..h * lq * lk)
                .map(|idx| {
                    let (hi, i, j) = (idx / (lq * lk), (idx / lk) % lq, idx % lk);
                    if hi == 0 && ((i % 2 == 1 && j < ATT_BK) || j > i + ATT_BK) {
                        f64::NEG_INFINITY
                    } else {
                        val(idx, 0.4) * 0.5
                    }
                })
                .collect();
            let scale = 0.4;
            let want = naive_attention(&q, &k, &v, &bias, shape, scale);
            for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
                let t = |x: &[f64], s: &[usize]| Cpu.upload(HostData::F64(x), s, dt).unwrap();
                let got = Cpu
                    .attention(
                        &t(&q, &[b, lq, h, d]),
                        &t(&k, &[b, lk, h, d]),
                        &t(&v, &[b, lk, h, d]),
                        Some(&t(&bias, &[1, h, lq, lk])),
                        Some(scale),
                    )
                    .unwrap();
                assert_eq!(got.shape(), [b, lq, h, d]);
                let got = widen_f64(&got);
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol * (1.0 + e.abs()),
                        "{shape:?} {dt:?}: element {idx} is {g}, expected {e}"
                    );
                }
            }
        }
    }

    /// `x w^T + b` in f64 by the definition.
    fn naive_linear(x: &[f64], w: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = b[j] + (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum::<f64>();
            }
        }
        o
    }

    #[test]
    fn linear_matches_the_definition_on_every_path() {
        // Token counts below and above the panel threshold, widths that are not multiples of the
        // tile or panel sizes, f32 weights (direct) and bf16 weights (widened per panel).
        let val = |i: usize, s: f64| ((i as f64 * 0.618_034 + s).fract() - 0.5) * 2.0;
        for &(m, k, n) in &[(1, 7, 5), (3, 40, 1000), (70, 33, 517), (130, 64, 96)] {
            let x: Vec<f64> = (0..m * k).map(|i| val(i, 0.1)).collect();
            let w32: Vec<f32> = (0..n * k).map(|i| val(i, 0.3) as f32).collect();
            let bias: Vec<f64> = (0..n).map(|i| val(i, 0.7)).collect();
            let wbf: Vec<half::bf16> = w32.iter().map(|&v| half::bf16::from_f32(v)).collect();
            for bf16 in [false, true] {
                let (bytes, dt, wv): (Vec<u8>, DType, Vec<f64>) = if bf16 {
                    (
                        wbf.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        DType::BF16,
                        wbf.iter().map(|v| f64::from(v.to_f32())).collect(),
                    )
                } else {
                    (
                        w32.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        DType::F32,
                        w32.iter().map(|&v| f64::from(v)).collect(),
                    )
                };
                let stored = Cpu
                    .upload_weight(ByteView::from_vec(bytes), &[n, k], dt, None)
                    .unwrap();
                // The same values as an f64 tensor take the direct (unwidened) path.
                let direct = out(wv.clone(), vec![n, k]);
                let want = naive_linear(&x, &wv, &bias, m, k, n);
                let xt = out(x.clone(), vec![m, k]);
                let bt = out(bias.clone(), vec![n]);
                for w in [&stored, &direct] {
                    let got = Cpu.linear(&xt, w, Some(&bt)).unwrap();
                    assert_eq!(got.shape(), [m, n]);
                    let got = f64::slice(got.storage()).unwrap();
                    for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-12 * (1.0 + e.abs()),
                            "m={m} k={k} n={n} bf16={bf16} {:?}: element {idx} is {g}, expected {e}",
                            w.dtype()
                        );
                    }
                }
            }
        }
    }
}
