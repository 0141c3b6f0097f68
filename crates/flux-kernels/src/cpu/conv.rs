//! Convolution-family kernels of the CPU backend: conv2d as im2col + GEMM (the `gemm` crate),
//! group norm, nearest upsampling, channel-major attention, and crops.
//!
//! Every kernel is generic over f32/f64 and computes in the input's dtype; reductions
//! (group-norm statistics, softmax sums) accumulate in f64. Weights stored in another dtype are
//! widened once per call.

use super::{CpuStorage, PAR_THRESHOLD};
use crate::conv_ops::{Conv2dParams, ConvOps, GroupMoments, check_stats_len, group_layout};
use crate::shapes::{self, ChannelSlice, Conv2dDims, GroupNormDims};
use crate::{Cpu, DType, KernelError, Result, SamplerOps, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Target im2col buffer (elements) of one band of output rows: small enough to stay in a core's
/// L2 cache between im2col and the GEMM that reads it.
const COL_BAND: usize = 1 << 17;
/// Fewest output pixels per band, so that the GEMM of a band amortises packing the weights.
const MIN_BAND_WIDTH: usize = 128;
/// Largest attention score block (elements) built at once; longer sequences run in query bands.
const SCORE_BUDGET: usize = 1 << 22;

/// A float type the conv kernels compute in.
pub trait ConvElem: super::Elem + gemm_elem::Sealed {
    /// e^x.
    fn exp(self) -> Self;
    /// Wraps a vector as storage.
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// The dtype tag.
    const DTYPE: DType;
}

mod gemm_elem {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl ConvElem for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    const DTYPE: DType = DType::F32;
}

impl ConvElem for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    const DTYPE: DType = DType::F64;
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, all given by pointer strides (row stride, column
/// stride) into their slices.
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided<T: ConvElem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: &[T],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[T],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(
        last(dst_rs, dst_cs, m, n) < dst.len(),
        "gemm: dst too short"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = T::ZERO;
                }
            }
        }
        return;
    }
    assert!(
        last(lhs_rs, lhs_cs, m, k) < lhs.len(),
        "gemm: lhs too short"
    );
    assert!(
        last(rhs_rs, rhs_cs, k, n) < rhs.len(),
        "gemm: rhs too short"
    );
    let par = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let one = T::from_f64(1.0);
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices (the
    // largest offsets are the last row/column combinations); `dst` is borrowed mutably, so it
    // aliases neither input; T is f32 or f64 (sealed), which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            one,
            one,
            false,
            false,
            false,
            par,
        );
    }
}

fn unsupported(op: &'static str, dtype: DType) -> KernelError {
    KernelError::Unsupported {
        backend: "cpu".into(),
        op,
        dtype,
    }
}

fn input<'a, T: ConvElem>(op: &'static str, t: &'a Tensor<Cpu>) -> Result<&'a [T]> {
    T::slice(t.storage()).ok_or(KernelError::DTypeMismatch {
        op,
        expected: T::DTYPE,
        found: t.dtype(),
    })
}

/// A parameter tensor's values as `T`: borrowed when already `T`, else widened/narrowed once.
fn param<T: ConvElem>(t: &Tensor<Cpu>) -> Result<Cow<'_, [T]>> {
    if let Some(s) = T::slice(t.storage()) {
        return Ok(Cow::Borrowed(s));
    }
    let v = Cpu.download_f64(t)?;
    Ok(Cow::Owned(v.into_iter().map(T::from_f64).collect()))
}

fn tensor<T: ConvElem>(v: Vec<T>, shape: Vec<usize>) -> Tensor<Cpu> {
    Tensor::from_parts(T::storage(v), shape, T::DTYPE)
}

/// Dispatches a generic kernel on the input's compute dtype.
macro_rules! dispatch {
    ($op:literal, $x:expr, $f:ident ( $($arg:expr),* )) => {
        match $x.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            d => Err(unsupported($op, d)),
        }
    };
}

struct ConvGeom {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ow: usize,
    stride: usize,
    top: usize,
    left: usize,
}

/// Fills `col` `[C*kh*kw, rows*OW]` for output rows `oh0 .. oh0 + rows`.
fn im2col<T: ConvElem>(x: &[T], g: &ConvGeom, oh0: usize, rows: usize, col: &mut [T]) {
    let width = rows * g.ow;
    for (r, dst) in col.chunks_mut(width).enumerate() {
        let c = r / (g.kh * g.kw);
        let i = (r / g.kw) % g.kh;
        let j = r % g.kw;
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (ro, out_row) in dst.chunks_exact_mut(g.ow).enumerate() {
            let y = ((oh0 + ro) * g.stride + i) as isize - g.top as isize;
            if y < 0 || y >= g.h as isize {
                out_row.fill(T::ZERO);
                continue;
            }
            let src = &plane[y as usize * g.w..(y as usize + 1) * g.w];
            if g.stride == 1 {
                // Output column o reads input column o + j - left: one contiguous copy between
                // the zero-padded edges.
                let lo = g.left.saturating_sub(j).min(g.ow);
                let hi = (g.w + g.left).saturating_sub(j).clamp(lo, g.ow);
                out_row[..lo].fill(T::ZERO);
                let s0 = lo + j - g.left;
                out_row[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                out_row[hi..].fill(T::ZERO);
            } else {
                for (o, d) in out_row.iter_mut().enumerate() {
                    let xx = (o * g.stride + j) as isize - g.left as isize;
                    *d = if xx >= 0 && xx < g.w as isize {
                        src[xx as usize]
                    } else {
                        T::ZERO
                    };
                }
            }
        }
    }
}

/// The output buffer of a convolution, shared by the threads that each write a disjoint set of
/// its elements.
struct SharedOut<T>(*mut T, usize);

// SAFETY: the pointer is only dereferenced through `SharedOut::band`, whose callers write disjoint
// elements; T is f32 or f64.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T: ConvElem> SharedOut<T> {
    /// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]` into the output at element `offset`, rows
    /// `dst_rs` apart; lhs is row-major and contiguous, rhs row-major with rows `rhs_rs` apart.
    ///
    /// # Safety
    /// No other thread may access the `m x n` window at `offset` during the call.
    #[allow(unsafe_code, clippy::too_many_arguments)]
    unsafe fn gemm_into(
        &self,
        offset: usize,
        dst_rs: usize,
        m: usize,
        n: usize,
        k: usize,
        lhs: &[T],
        rhs: &[T],
        rhs_rs: usize,
        accumulate: bool,
    ) {
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        assert!(
            offset + (m - 1) * dst_rs + n <= self.1,
            "conv: output window out of range"
        );
        assert!(
            lhs.len() >= m * k && rhs.len() >= (k - 1) * rhs_rs + n,
            "conv: operands too short"
        );
        let one = T::from_f64(1.0);
        // SAFETY: the asserts keep the window inside the buffer and the reads inside the
        // operand slices; the caller guarantees that nothing else accesses the window.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                self.0.add(offset),
                1,
                dst_rs as isize,
                accumulate,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                one,
                one,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

fn conv2d_impl<T: ConvElem>(
    x: &Tensor<Cpu>,
    weight: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
    p: Conv2dParams,
) -> Result<Tensor<Cpu>> {
    const OP: &str = "conv2d";
    let Conv2dDims {
        n,
        c,
        h,
        w,
        o,
        kh,
        kw,
        oh,
        ow,
    } = shapes::conv2d(x.shape(), weight.shape(), bias.map(Tensor::shape), p)?;
    let xs = input::<T>(OP, x)?;
    let ws = param::<T>(weight)?;
    let bs = bias.map(param::<T>).transpose()?;
    let k = c * kh * kw;
    let plane = oh * ow;
    let mut out = vec![T::ZERO; n * o * plane];
    // The bias is the GEMM's initial value: the products accumulate onto it.
    if let Some(b) = &bs {
        for img in out.chunks_exact_mut(o * plane) {
            for (ch, dst) in img.chunks_exact_mut(plane).enumerate() {
                dst.fill(b[ch]);
            }
        }
    }
    let acc = bs.is_some();
    if out.is_empty() || k == 0 {
        return Ok(tensor(out, vec![n, o, oh, ow]));
    }
    let pointwise = kh == 1 && kw == 1 && p.stride == 1 && p.padding == [0; 4];
    let g = ConvGeom {
        h,
        w,
        kh,
        kw,
        ow,
        stride: p.stride,
        top: p.padding[0],
        left: p.padding[2],
    };
    // Bands of output rows: each band's im2col buffer stays in cache while its GEMM runs, and the
    // bands are spread over the threads (each GEMM single-threaded), so no buffer is ever larger
    // than a band whatever the image size.
    let row_cost = if pointwise { c * ow } else { k * ow };
    let mut band = (COL_BAND / row_cost.max(1))
        .max(MIN_BAND_WIDTH.div_ceil(ow))
        .clamp(1, oh);
    let threads = rayon::current_num_threads();
    if n * oh.div_ceil(band) < 2 * threads && o * plane * k >= 1 << 20 {
        band = oh.div_ceil((2 * threads).div_ceil(n)).max(1);
    }
    let jobs: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| {
            (0..oh)
                .step_by(band)
                .map(move |oh0| (b, oh0, band.min(oh - oh0)))
        })
        .collect();
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let run = |col: &mut Vec<T>, &(b, oh0, rows): &(usize, usize, usize)| {
        let xb = &xs[b * c * h * w..(b + 1) * c * h * w];
        let offset = b * o * plane + oh0 * ow;
        let width = rows * ow;
        // A 1x1 convolution reads the input in place: the band is a strided window of x.
        let (rhs, rhs_rs) = if pointwise {
            (&xb[oh0 * ow..], plane)
        } else {
            im2col(xb, &g, oh0, rows, &mut col[..k * width]);
            (&col[..k * width], width)
        };
        // SAFETY: band (b, oh0) writes columns oh0*ow .. (oh0+rows)*ow of image b's rows, which
        // no other band touches.
        #[allow(unsafe_code)]
        unsafe {
            shared.gemm_into(offset, plane, o, width, k, &ws, rhs, rhs_rs, acc);
        }
    };
    let col_len = if pointwise { 0 } else { k * band * ow };
    if jobs.len() == 1 || o * plane * k < 1 << 18 {
        let mut col = vec![T::ZERO; col_len];
        for j in &jobs {
            run(&mut col, j);
        }
    } else {
        jobs.par_iter()
            .for_each_init(|| vec![T::ZERO; col_len], |col, j| run(col, j));
    }
    Ok(tensor(out, vec![n, o, oh, ow]))
}

/// Mean and sum of squared deviations of one group (two passes in f64).
fn moments_of<T: ConvElem>(src: &[T]) -> (f64, f64) {
    let len = src.len().max(1) as f64;
    let mean = src.iter().map(|v| v.to_f64()).sum::<f64>() / len;
    let m2 = src
        .iter()
        .map(|v| {
            let d = v.to_f64() - mean;
            d * d
        })
        .sum::<f64>();
    (mean, m2)
}

/// Normalises one group `src` (channels `c0 ..`, `spatial` values each) into `dst` with the given
/// mean and reciprocal standard deviation, then the affine and swish.
#[allow(clippy::too_many_arguments)]
fn normalise_group<T: ConvElem>(
    dst: &mut [T],
    src: &[T],
    spatial: usize,
    c0: usize,
    mean: f64,
    rstd: f64,
    ws: Option<&[T]>,
    bs: Option<&[T]>,
    swish: bool,
) {
    let one = T::from_f64(1.0);
    for (ci, (d, s)) in dst
        .chunks_exact_mut(spatial)
        .zip(src.chunks_exact(spatial))
        .enumerate()
    {
        let ch = c0 + ci;
        let wv = ws.map_or(1.0, |w| w[ch].to_f64());
        let bv = bs.map_or(0.0, |b| b[ch].to_f64());
        // y = x * a + b with the normalisation folded into one multiply-add.
        let a = T::from_f64(rstd * wv);
        let b = T::from_f64(bv - mean * rstd * wv);
        if swish {
            for (dv, &sv) in d.iter_mut().zip(s) {
                let y = sv * a + b;
                *dv = y / (one + (T::ZERO - y).exp());
            }
        } else {
            for (dv, &sv) in d.iter_mut().zip(s) {
                *dv = sv * a + b;
            }
        }
    }
}

/// Group norm of `x` with statistics from `stats(group index) -> (mean, rstd)`, where the group
/// index runs image-major over `N * groups`.
#[allow(clippy::too_many_arguments)]
fn group_norm_with<T: ConvElem>(
    op: &'static str,
    x: &Tensor<Cpu>,
    groups: usize,
    weight: Option<&Tensor<Cpu>>,
    bias: Option<&Tensor<Cpu>>,
    swish: bool,
    given: Option<(&[f64], &[f64])>,
    eps: f64,
) -> Result<Tensor<Cpu>> {
    let GroupNormDims {
        n, spatial, cpg, ..
    } = shapes::group_norm(
        op,
        x.shape(),
        groups,
        weight.map(Tensor::shape),
        bias.map(Tensor::shape),
    )?;
    if let Some((mean, rstd)) = given {
        check_stats_len(op, n * groups, mean, rstd)?;
    }
    let xs = input::<T>(op, x)?;
    let ws = weight.map(param::<T>).transpose()?;
    let bs = bias.map(param::<T>).transpose()?;
    let glen = cpg * spatial;
    let mut out = vec![T::ZERO; xs.len()];
    if glen == 0 {
        return Ok(tensor(out, x.shape().to_vec()));
    }
    out.par_chunks_mut(glen)
        .zip(xs.par_chunks(glen))
        .enumerate()
        .for_each(|(gi, (dst, src))| {
            let (mean, rstd) = if let Some((m, r)) = given {
                (m[gi], r[gi])
            } else {
                let (mean, m2) = moments_of(src);
                (mean, 1.0 / (m2 / glen as f64 + eps).sqrt())
            };
            let c0 = (gi % groups) * cpg;
            normalise_group(
                dst,
                src,
                spatial,
                c0,
                mean,
                rstd,
                ws.as_deref(),
                bs.as_deref(),
                swish,
            );
        });
    Ok(tensor(out, x.shape().to_vec()))
}

fn group_norm_impl<T: ConvElem>(
    x: &Tensor<Cpu>,
    groups: usize,
    eps: f64,
    weight: Option<&Tensor<Cpu>>,
    bias: Option<&Tensor<Cpu>>,
    swish: bool,
) -> Result<Tensor<Cpu>> {
    group_norm_with::<T>("group_norm", x, groups, weight, bias, swish, None, eps)
}

fn group_norm_stats_impl<T: ConvElem>(
    x: &Tensor<Cpu>,
    groups: usize,
    stats: (&[f64], &[f64]),
    weight: Option<&Tensor<Cpu>>,
    bias: Option<&Tensor<Cpu>>,
    swish: bool,
) -> Result<Tensor<Cpu>> {
    group_norm_with::<T>(
        "group_norm_with_stats",
        x,
        groups,
        weight,
        bias,
        swish,
        Some(stats),
        0.0,
    )
}

fn group_moments_impl<T: ConvElem>(x: &Tensor<Cpu>, groups: usize) -> Result<GroupMoments> {
    const OP: &str = "group_moments";
    let (n, c, spatial) = group_layout(OP, x.shape(), groups)?;
    let xs = input::<T>(OP, x)?;
    let glen = c / groups * spatial;
    let mut m = GroupMoments::empty(n, groups);
    m.count = glen as f64;
    if glen == 0 {
        return Ok(m);
    }
    let per: Vec<(f64, f64)> = xs.par_chunks(glen).map(moments_of).collect();
    for (k, (mean, m2)) in per.into_iter().enumerate() {
        m.mean[k] = mean;
        m.m2[k] = m2;
    }
    Ok(m)
}

fn upsample_impl<T: ConvElem>(x: &Tensor<Cpu>) -> Result<Tensor<Cpu>> {
    const OP: &str = "upsample_nearest2x";
    let [n, c, h, w] = shapes::nchw(OP, x.shape())?;
    let xs = input::<T>(OP, x)?;
    let mut out = vec![T::ZERO; n * c * 4 * h * w];
    let plane_out = 4 * h * w;
    if plane_out > 0 {
        out.par_chunks_mut(plane_out)
            .zip(xs.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for y in 0..h {
                    let s = &src[y * w..(y + 1) * w];
                    let (r0, r1) = dst[2 * y * 2 * w..(2 * y + 2) * 2 * w].split_at_mut(2 * w);
                    for (xx, &v) in s.iter().enumerate() {
                        r0[2 * xx] = v;
                        r0[2 * xx + 1] = v;
                    }
                    r1.copy_from_slice(r0);
                }
            });
    }
    Ok(tensor(out, vec![n, c, 2 * h, 2 * w]))
}

fn softmax_rows<T: ConvElem>(s: &mut [T], len: usize) {
    let f = |row: &mut [T]| {
        let mut m = row[0];
        for &v in row.iter() {
            if v > m {
                m = v;
            }
        }
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += v.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        for v in row.iter_mut() {
            *v = *v * inv;
        }
    };
    if s.len() >= PAR_THRESHOLD {
        s.par_chunks_mut(len).for_each(f);
    } else {
        s.chunks_mut(len).for_each(f);
    }
}

fn attention_impl<T: ConvElem>(
    q: &Tensor<Cpu>,
    k: &Tensor<Cpu>,
    v: &Tensor<Cpu>,
    scale: f64,
) -> Result<Tensor<Cpu>> {
    const OP: &str = "attention_nchw";
    let [n, c, h, w] = shapes::attention_nchw(q.shape(), k.shape(), v.shape())?;
    let (qs, ks, vs) = (input::<T>(OP, q)?, input::<T>(OP, k)?, input::<T>(OP, v)?);
    let l = h * w;
    let mut out = vec![T::ZERO; n * c * l];
    if l == 0 || c == 0 {
        return Ok(tensor(out, q.shape().to_vec()));
    }
    // Scale q once rather than every score.
    let sc = T::from_f64(scale);
    let band = (SCORE_BUDGET / l).clamp(1, l);
    let mut scores = vec![T::ZERO; band * l];
    let mut qband = vec![T::ZERO; c * band];
    for b in 0..n {
        let base = b * c * l;
        let (qb, kb, vb) = (
            &qs[base..base + c * l],
            &ks[base..base + c * l],
            &vs[base..base + c * l],
        );
        let ob = &mut out[base..base + c * l];
        let mut i0 = 0;
        while i0 < l {
            let rows = band.min(l - i0);
            // qband [C, rows]: the scaled query columns of this band.
            for ch in 0..c {
                for (d, &s) in qband[ch * rows..(ch + 1) * rows]
                    .iter_mut()
                    .zip(&qb[ch * l + i0..ch * l + i0 + rows])
                {
                    *d = s * sc;
                }
            }
            let sb = &mut scores[..rows * l];
            // S[i, j] = sum_c q[c, i] k[c, j]
            gemm_strided(rows, l, c, sb, l, 1, false, &qband, 1, rows, kb, l, 1);
            softmax_rows(sb, l);
            // out[c, i] = sum_j v[c, j] P[i, j]
            gemm_strided(c, rows, l, &mut ob[i0..], l, 1, false, vb, l, 1, sb, 1, l);
            i0 += rows;
        }
    }
    Ok(tensor(out, q.shape().to_vec()))
}

fn narrow_impl<T: ConvElem>(x: &Tensor<Cpu>, start: usize, len: usize) -> Result<Tensor<Cpu>> {
    const OP: &str = "narrow_channels";
    let ChannelSlice {
        n,
        c,
        inner,
        out_shape,
    } = shapes::narrow_channels(x.shape(), start, len)?;
    let xs = input::<T>(OP, x)?;
    let mut out = Vec::with_capacity(n * len * inner);
    for b in 0..n {
        let off = (b * c + start) * inner;
        out.extend_from_slice(&xs[off..off + len * inner]);
    }
    Ok(tensor(out, out_shape))
}

fn crop_impl<T: ConvElem>(
    x: &Tensor<Cpu>,
    y0: usize,
    x0: usize,
    ch: usize,
    cw: usize,
) -> Result<Tensor<Cpu>> {
    const OP: &str = "crop2d";
    let [n, c, h, w] = shapes::crop2d(x.shape(), y0, x0, ch, cw)?;
    let xs = input::<T>(OP, x)?;
    let mut out = Vec::with_capacity(n * c * ch * cw);
    for p in 0..n * c {
        for y in y0..y0 + ch {
            let off = p * h * w + y * w + x0;
            out.extend_from_slice(&xs[off..off + cw]);
        }
    }
    Ok(tensor(out, vec![n, c, ch, cw]))
}

impl ConvOps for Cpu {
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        params: Conv2dParams,
    ) -> Result<Tensor<Self>> {
        dispatch!("conv2d", x, conv2d_impl(x, weight, bias, params))
    }

    fn group_norm(
        &self,
        x: &Tensor<Self>,
        groups: usize,
        eps: f64,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        swish: bool,
    ) -> Result<Tensor<Self>> {
        dispatch!(
            "group_norm",
            x,
            group_norm_impl(x, groups, eps, weight, bias, swish)
        )
    }

    fn group_moments(&self, x: &Tensor<Self>, groups: usize) -> Result<GroupMoments> {
        dispatch!("group_moments", x, group_moments_impl(x, groups))
    }

    fn group_norm_with_stats(
        &self,
        x: &Tensor<Self>,
        groups: usize,
        mean: &[f64],
        rstd: &[f64],
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        swish: bool,
    ) -> Result<Tensor<Self>> {
        dispatch!(
            "group_norm_with_stats",
            x,
            group_norm_stats_impl(x, groups, (mean, rstd), weight, bias, swish)
        )
    }

    fn upsample_nearest2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        dispatch!("upsample_nearest2x", x, upsample_impl(x))
    }

    fn attention_nchw(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        scale: f64,
    ) -> Result<Tensor<Self>> {
        dispatch!("attention_nchw", q, attention_impl(q, k, v, scale))
    }

    fn narrow_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        dispatch!("narrow_channels", x, narrow_impl(x, start, len))
    }

    fn crop2d(
        &self,
        x: &Tensor<Self>,
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
    ) -> Result<Tensor<Self>> {
        dispatch!("crop2d", x, crop_impl(x, y0, x0, h, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostData;

    use crate::conv_ops::splitmix_values as values;

    fn up(v: &[f64], shape: &[usize], dtype: DType) -> Tensor<Cpu> {
        Cpu.upload(HostData::F64(v), shape, dtype).unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "[{i}] {x} vs {y}");
        }
    }

    /// Direct-summation convolution in f64, written from the definition.
    fn naive_conv(
        x: &[f64],
        [n, c, h, w]: [usize; 4],
        wt: &[f64],
        [o, kh, kw]: [usize; 3],
        bias: Option<&[f64]>,
        p: Conv2dParams,
    ) -> (Vec<f64>, [usize; 4]) {
        let [t, b, l, r] = p.padding;
        let oh = (h + t + b - kh) / p.stride + 1;
        let ow = (w + l + r - kw) / p.stride + 1;
        let mut out = vec![0.0; n * o * oh * ow];
        for bn in 0..n {
            for oc in 0..o {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = bias.map_or(0.0, |bv| bv[oc]);
                        for ic in 0..c {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let iy = (y * p.stride + i) as isize - t as isize;
                                    let ix = (xx * p.stride + j) as isize - l as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    acc += wt[((oc * c + ic) * kh + i) * kw + j]
                                        * x[((bn * c + ic) * h + iy as usize) * w + ix as usize];
                                }
                            }
                        }
                        out[((bn * o + oc) * oh + y) * ow + xx] = acc;
                    }
                }
            }
        }
        (out, [n, o, oh, ow])
    }

    #[test]
    fn conv2d_matches_direct_sum() {
        let cases = [
            ([2, 3, 7, 9], [5, 3, 3], Conv2dParams::same(1), true),
            ([1, 4, 6, 5], [3, 1, 1], Conv2dParams::same(0), true),
            ([1, 4, 6, 5], [3, 1, 1], Conv2dParams::same(0), false),
            // The autoencoder's downsample: pad right and bottom only, stride 2.
            (
                [1, 3, 7, 10],
                [4, 3, 3],
                Conv2dParams {
                    stride: 2,
                    padding: [0, 1, 0, 1],
                },
                true,
            ),
            (
                [1, 2, 5, 5],
                [2, 2, 2],
                Conv2dParams {
                    stride: 1,
                    padding: [1, 0, 2, 0],
                },
                false,
            ),
        ];
        for (k, (xs, [o, kh, kw], p, with_bias)) in cases.into_iter().enumerate() {
            let seed = k as u64 * 10;
            let x = values(xs.iter().product(), seed);
            let wt = values(o * xs[1] * kh * kw, seed + 1);
            let b = values(o, seed + 2);
            let (want, shape) =
                naive_conv(&x, xs, &wt, [o, kh, kw], with_bias.then_some(&b[..]), p);
            for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 2e-6)] {
                let xt = up(&x, &xs, dtype);
                let wt_t = up(&wt, &[o, xs[1], kh, kw], dtype);
                let bt = up(&b, &[o], dtype);
                let got = Cpu.conv2d(&xt, &wt_t, with_bias.then_some(&bt), p).unwrap();
                assert_eq!(got.shape(), shape, "case {k}");
                assert_close(&Cpu.download_f64(&got).unwrap(), &want, tol);
            }
        }
    }

    #[test]
    fn conv2d_runs_in_row_bands_when_large() {
        // K * OW large enough that COL_BAND forces several bands.
        let xs = [1, 64, 40, 300];
        let x = values(xs.iter().product(), 3);
        let wt = values(2 * 64 * 9, 4);
        let (want, _) = naive_conv(&x, xs, &wt, [2, 3, 3], None, Conv2dParams::same(1));
        const { assert!(64 * 9 * 300 * 40 > 4 * COL_BAND) };
        let got = Cpu
            .conv2d(
                &up(&x, &xs, DType::F64),
                &up(&wt, &[2, 64, 3, 3], DType::F64),
                None,
                Conv2dParams::same(1),
            )
            .unwrap();
        assert_close(&Cpu.download_f64(&got).unwrap(), &want, 1e-13);
    }

    #[test]
    fn conv2d_bands_over_threads_match_direct_sum() {
        // Large enough for the multi-threaded band path; two images, 1x1 and stride 2 too.
        let down = Conv2dParams {
            stride: 2,
            padding: [0, 1, 0, 1],
        };
        for (k, (xs, [o, kh, kw], p)) in [
            ([2, 32, 40, 50], [8, 1, 1], Conv2dParams::same(0)),
            ([2, 16, 37, 41], [12, 3, 3], down),
            ([1, 16, 33, 70], [24, 3, 3], Conv2dParams::same(1)),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 100 + 10 * k as u64;
            let x = values(xs.iter().product(), seed);
            let wt = values(o * xs[1] * kh * kw, seed + 1);
            let b = values(o, seed + 2);
            let (want, shape) = naive_conv(&x, xs, &wt, [o, kh, kw], Some(&b), p);
            assert!(o * shape[2] * shape[3] * xs[1] * kh * kw >= 1 << 18);
            let got = Cpu
                .conv2d(
                    &up(&x, &xs, DType::F64),
                    &up(&wt, &[o, xs[1], kh, kw], DType::F64),
                    Some(&up(&b, &[o], DType::F64)),
                    p,
                )
                .unwrap();
            assert_eq!(got.shape(), shape, "case {k}");
            assert_close(&Cpu.download_f64(&got).unwrap(), &want, 1e-13);
        }
    }

    #[test]
    fn conv2d_rejects_bad_shapes() {
        let x = up(&values(2 * 3 * 4 * 4, 1), &[2, 3, 4, 4], DType::F64);
        let w = up(&values(5 * 2 * 9, 2), &[5, 2, 3, 3], DType::F64);
        let err = Cpu.conv2d(&x, &w, None, Conv2dParams::same(1)).unwrap_err();
        assert!(err.to_string().contains("input channels"), "{err}");
        let w = up(&values(5 * 3 * 9, 2), &[5, 3, 3, 3], DType::F64);
        let b = up(&values(4, 3), &[4], DType::F64);
        let err = Cpu
            .conv2d(&x, &w, Some(&b), Conv2dParams::same(1))
            .unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
        let w = up(&values(5 * 3 * 49, 2), &[5, 3, 7, 7], DType::F64);
        assert!(Cpu.conv2d(&x, &w, None, Conv2dParams::same(0)).is_err());
    }

    #[test]
    fn group_norm_matches_definition() {
        let (n, c, h, w, g) = (2, 8, 3, 5, 4);
        let x: Vec<f64> = values(n * c * h * w, 7)
            .iter()
            .map(|v| 3.0 * v + 0.5)
            .collect();
        let wt = values(c, 8);
        let b = values(c, 9);
        let cpg = c / g;
        let len = cpg * h * w;
        let mut want = vec![0.0; x.len()];
        for bn in 0..n {
            for gi in 0..g {
                let s = (bn * c + gi * cpg) * h * w;
                let grp = &x[s..s + len];
                let mean = grp.iter().sum::<f64>() / len as f64;
                let var = grp.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
                for (i, v) in grp.iter().enumerate() {
                    let ch = gi * cpg + i / (h * w);
                    want[s + i] = (v - mean) / (var + 1e-6).sqrt() * wt[ch] + b[ch];
                }
            }
        }
        let swished: Vec<f64> = want.iter().map(|y| y / (1.0 + (-y).exp())).collect();
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 2e-6)] {
            let xt = up(&x, &[n, c, h, w], dtype);
            let (wt_t, bt) = (up(&wt, &[c], dtype), up(&b, &[c], dtype));
            let got = Cpu
                .group_norm(&xt, g, 1e-6, Some(&wt_t), Some(&bt), false)
                .unwrap();
            assert_close(&Cpu.download_f64(&got).unwrap(), &want, tol);
            let got = Cpu
                .group_norm(&xt, g, 1e-6, Some(&wt_t), Some(&bt), true)
                .unwrap();
            assert_close(&Cpu.download_f64(&got).unwrap(), &swished, tol);
        }
        let xt = up(&x, &[n, c, h, w], DType::F64);
        assert!(Cpu.group_norm(&xt, 3, 1e-6, None, None, false).is_err());
    }

    #[test]
    fn upsample_repeats_each_pixel() {
        let x = values(2 * 3 * 4, 5);
        let t = up(&x, &[1, 2, 3, 4], DType::F64);
        let got = Cpu
            .download_f64(&Cpu.upsample_nearest2x(&t).unwrap())
            .unwrap();
        for c in 0..2 {
            for y in 0..6 {
                for xx in 0..8 {
                    assert_eq!(got[(c * 6 + y) * 8 + xx], x[(c * 3 + y / 2) * 4 + xx / 2]);
                }
            }
        }
    }

    #[test]
    fn attention_matches_definition() {
        let (n, c, h, w) = (2, 6, 3, 4);
        let l = h * w;
        let q = values(n * c * l, 11);
        let k = values(n * c * l, 12);
        let v = values(n * c * l, 13);
        let scale = 1.0 / (c as f64).sqrt();
        let mut want = vec![0.0; n * c * l];
        for b in 0..n {
            let at = |t: &[f64], ch: usize, i: usize| t[(b * c + ch) * l + i];
            for i in 0..l {
                let s: Vec<f64> = (0..l)
                    .map(|j| (0..c).map(|ch| at(&q, ch, i) * at(&k, ch, j)).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for ch in 0..c {
                    want[(b * c + ch) * l + i] =
                        (0..l).map(|j| e[j] / z * at(&v, ch, j)).sum::<f64>();
                }
            }
        }
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 2e-6)] {
            let sh = [n, c, h, w];
            let got = Cpu
                .attention_nchw(
                    &up(&q, &sh, dtype),
                    &up(&k, &sh, dtype),
                    &up(&v, &sh, dtype),
                    scale,
                )
                .unwrap();
            assert_close(&Cpu.download_f64(&got).unwrap(), &want, tol);
        }
    }

    #[test]
    fn narrow_and_crop_pick_the_right_elements() {
        let x = values(2 * 4 * 3 * 5, 21);
        let t = up(&x, &[2, 4, 3, 5], DType::F64);
        let got = Cpu
            .download_f64(&Cpu.narrow_channels(&t, 1, 2).unwrap())
            .unwrap();
        let want: Vec<f64> = (0..2)
            .flat_map(|b| x[(b * 4 + 1) * 15..(b * 4 + 3) * 15].to_vec())
            .collect();
        assert_eq!(got, want);
        let got = Cpu
            .download_f64(&Cpu.crop2d(&t, 1, 2, 2, 3).unwrap())
            .unwrap();
        let mut want = Vec::new();
        for p in 0..8 {
            for y in 1..3 {
                for xx in 2..5 {
                    want.push(x[p * 15 + y * 5 + xx]);
                }
            }
        }
        assert_eq!(got, want);
        assert!(Cpu.narrow_channels(&t, 3, 2).is_err());
        assert!(Cpu.crop2d(&t, 2, 0, 2, 1).is_err());
    }
}
