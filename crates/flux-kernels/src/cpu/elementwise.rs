//! Elementwise kernels and reductions of the CPU backend.

use super::{CpuStorage, PAR_CHUNK, PAR_THRESHOLD};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A floating element type the CPU backend computes in.
pub trait Elem:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// Converts from f64 (rounding to nearest).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Absolute value.
    fn abs(self) -> Self;
    /// Borrow the storage if it holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            CpuStorage::F32(_) | CpuStorage::Weight(_) => None,
        }
    }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            CpuStorage::F64(_) | CpuStorage::Weight(_) => None,
        }
    }
}

/// Where a kernel stores one output element: an initialised slot, or fresh memory that is
/// written without being zero-filled first.
trait Put<T>: Send {
    fn put(&mut self, v: T);
}

impl<T: Elem> Put<T> for T {
    #[inline]
    fn put(&mut self, v: T) {
        *self = v;
    }
}

impl<T: Elem> Put<T> for MaybeUninit<T> {
    #[inline]
    fn put(&mut self, v: T) {
        self.write(v);
    }
}

/// One chunk of `out = sum c_k t_k`, with the term count fixed at compile time, compiled for
/// the widest vector unit the CPU has (the same separate multiplies and adds in every
/// variant: the values do not depend on which one runs).
fn chunk_set<T: Elem, O: Put<T>, const N: usize>(
    out: &mut [O],
    c: [T; N],
    t: [&[T]; N],
    start: usize,
) {
    crate::simd_dispatch!(chunk_set_body, chunk_set_avx512, chunk_set_avx2,
        [T: Elem, O: Put<T>, const N: usize],
        (out: &mut [O], c: [T; N], t: [&[T]; N], start: usize) -> ());
}

#[allow(clippy::inline_always)] // compiled once per instruction set by the dispatch above
#[inline(always)]
fn chunk_set_body<T: Elem, O: Put<T>, const N: usize>(
    out: &mut [O],
    c: [T; N],
    t: [&[T]; N],
    start: usize,
) {
    let t: [&[T]; N] = std::array::from_fn(|k| &t[k][start..start + out.len()]);
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = c[0] * t[0][i];
        for k in 1..N {
            acc = acc + c[k] * t[k][i];
        }
        o.put(acc);
    }
}

/// One chunk of `out = a*out + sum c_k t_k`, dispatched like [`chunk_set`].
fn chunk_update<T: Elem, const N: usize>(
    out: &mut [T],
    a: T,
    c: [T; N],
    t: [&[T]; N],
    start: usize,
) {
    crate::simd_dispatch!(chunk_update_body, chunk_update_avx512, chunk_update_avx2,
        [T: Elem, const N: usize],
        (out: &mut [T], a: T, c: [T; N], t: [&[T]; N], start: usize) -> ());
}

#[allow(clippy::inline_always)] // compiled once per instruction set by the dispatch above
#[inline(always)]
fn chunk_update_body<T: Elem, const N: usize>(
    out: &mut [T],
    a: T,
    c: [T; N],
    t: [&[T]; N],
    start: usize,
) {
    let t: [&[T]; N] = std::array::from_fn(|k| &t[k][start..start + out.len()]);
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = a * *o;
        for k in 0..N {
            acc = acc + c[k] * t[k][i];
        }
        *o = acc;
    }
}

/// Splits `out` into chunks processed on the rayon pool when it is large, else runs `f` on
/// the whole slice; `f` gets each chunk and its offset.
#[inline]
fn split<O: Send>(out: &mut [O], f: impl Fn(&mut [O], usize) + Sync) {
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(j, o)| f(o, j * PAR_CHUNK));
    } else {
        f(out, 0);
    }
}

/// [`split`] for two outputs of one length, cut at the same places.
#[inline]
fn split2<A: Send, C: Send>(
    a: &mut [A],
    c: &mut [C],
    f: impl Fn(&mut [A], &mut [C], usize) + Sync,
) {
    if a.len() >= PAR_THRESHOLD {
        a.par_chunks_mut(PAR_CHUNK)
            .zip(c.par_chunks_mut(PAR_CHUNK))
            .enumerate()
            .for_each(|(j, (a, c))| f(a, c, j * PAR_CHUNK));
    } else {
        f(a, c, 0);
    }
}

fn run_set<T: Elem, O: Put<T>, const N: usize>(out: &mut [O], terms: &[(T, &[T])]) {
    let c: [T; N] = std::array::from_fn(|k| terms[k].0);
    let t: [&[T]; N] = std::array::from_fn(|k| terms[k].1);
    split(out, |o, start| chunk_set::<T, O, N>(o, c, t, start));
}

fn run_update<T: Elem, const N: usize>(out: &mut [T], a: T, terms: &[(T, &[T])]) {
    let c: [T; N] = std::array::from_fn(|k| terms[k].0);
    let t: [&[T]; N] = std::array::from_fn(|k| terms[k].1);
    split(out, |o, start| chunk_update::<T, N>(o, a, c, t, start));
}

/// `out = sum c_k t_k` for 1 to 6 terms of `out`'s length.
fn set<T: Elem, O: Put<T>>(out: &mut [O], terms: &[(T, &[T])]) {
    match terms.len() {
        0 => out.iter_mut().for_each(|o| o.put(T::ZERO)),
        1 => run_set::<T, O, 1>(out, terms),
        2 => run_set::<T, O, 2>(out, terms),
        3 => run_set::<T, O, 3>(out, terms),
        4 => run_set::<T, O, 4>(out, terms),
        5 => run_set::<T, O, 5>(out, terms),
        _ => run_set::<T, O, 6>(out, terms),
    }
}

/// `out = [a*out +] sum c_k t_k`; slices are pre-checked to have `out`'s length.
pub(crate) fn lincomb<T: Elem>(out: &mut [T], a: Option<T>, terms: &[(T, &[T])]) {
    let Some(a) = a else {
        return set(out, terms);
    };
    match terms.len() {
        0 => out.iter_mut().for_each(|o| *o = a * *o),
        1 => run_update::<T, 1>(out, a, terms),
        2 => run_update::<T, 2>(out, a, terms),
        3 => run_update::<T, 3>(out, a, terms),
        4 => run_update::<T, 4>(out, a, terms),
        5 => run_update::<T, 5>(out, a, terms),
        _ => run_update::<T, 6>(out, a, terms),
    }
}

/// A new vector of `n` elements handed to `fill` unwritten, then returned as written: new
/// results are written once and never zero-filled first (a sampler step allocates its result
/// every step; clearing it would be one more pass over memory).
///
/// # Safety
/// `fill` must write every element of the slice (the kernels here hand every chunk to a loop
/// that stores each position of it); `T` is a plain float.
#[allow(unsafe_code)]
unsafe fn written<T: Elem>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: the caller's `fill` wrote the first `n` elements.
    unsafe {
        out.set_len(n);
    }
    out
}

/// [`written`] for two vectors filled together.
///
/// # Safety
/// `fill` must write every element of both slices.
#[allow(unsafe_code)]
unsafe fn written_pair<T: Elem>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
) -> (Vec<T>, Vec<T>) {
    let mut first: Vec<T> = Vec::with_capacity(n);
    let mut second: Vec<T> = Vec::with_capacity(n);
    fill(
        &mut first.spare_capacity_mut()[..n],
        &mut second.spare_capacity_mut()[..n],
    );
    // SAFETY: the caller's `fill` wrote the first `n` elements of both.
    unsafe {
        first.set_len(n);
        second.set_len(n);
    }
    (first, second)
}

/// `sum c_k t_k` (each slice `n` long) into new memory.
pub(crate) fn lincomb_new<T: Elem>(n: usize, terms: &[(T, &[T])]) -> Vec<T> {
    // SAFETY: `set` hands every chunk of the slice to a kernel that stores every position.
    #[allow(unsafe_code)]
    unsafe {
        written(n, |out| set(out, terms))
    }
}

/// One chunk of the multistep step: `d = a x + b den`, then `x = 1 x + c d + sum c_k h_k`,
/// with the operations of [`chunk_set`] and [`chunk_update`] in their order, dispatched like
/// them.
fn chunk_derivative_step<T: Elem, const N: usize>(
    x: &mut [T],
    d: &mut [MaybeUninit<T>],
    abc: (T, T, T),
    den: &[T],
    ch: [T; N],
    h: [&[T]; N],
    start: usize,
) {
    crate::simd_dispatch!(chunk_derivative_body, chunk_derivative_avx512,
        chunk_derivative_avx2, [T: Elem, const N: usize],
        (x: &mut [T], d: &mut [MaybeUninit<T>], abc: (T, T, T), den: &[T], ch: [T; N],
         h: [&[T]; N], start: usize) -> ());
}

#[allow(clippy::inline_always)] // compiled once per instruction set by the dispatch above
#[inline(always)]
fn chunk_derivative_body<T: Elem, const N: usize>(
    x: &mut [T],
    d: &mut [MaybeUninit<T>],
    (a, b, c): (T, T, T),
    den: &[T],
    ch: [T; N],
    h: [&[T]; N],
    start: usize,
) {
    let den = &den[start..start + x.len()];
    let h: [&[T]; N] = std::array::from_fn(|k| &h[k][start..start + x.len()]);
    let one = T::from_f64(1.0);
    for (i, (xo, dout)) in x.iter_mut().zip(d.iter_mut()).enumerate() {
        let dv = a * *xo + b * den[i];
        dout.write(dv);
        let mut acc = one * *xo;
        acc = acc + c * dv;
        for k in 0..N {
            acc = acc + ch[k] * h[k][i];
        }
        *xo = acc;
    }
}

fn run_derivative_step<T: Elem, const N: usize>(
    x: &mut [T],
    d: &mut [MaybeUninit<T>],
    abc: (T, T, T),
    den: &[T],
    history: &[(T, &[T])],
) {
    let ch: [T; N] = std::array::from_fn(|k| history[k].0);
    let h: [&[T]; N] = std::array::from_fn(|k| history[k].1);
    split2(x, d, |x, d, start| {
        chunk_derivative_step::<T, N>(x, d, abc, den, ch, h, start);
    });
}

/// `d = a x + b den` into new memory and `x = x + c d + sum c_k h_k` in the same pass; each
/// element as [`lincomb_new`] then [`lincomb`] compute it. At most 4 history terms; slices
/// are pre-checked to have `x`'s length.
pub(crate) fn derivative_step<T: Elem>(
    x: &mut [T],
    (a, b): (T, T),
    den: &[T],
    c: T,
    history: &[(T, &[T])],
) -> Vec<T> {
    let n = x.len();
    let abc = (a, b, c);
    // SAFETY: every chunk of `d` is handed to `chunk_derivative_step`, which writes each
    // position of it.
    #[allow(unsafe_code)]
    unsafe {
        written(n, |d| match history.len() {
            0 => run_derivative_step::<T, 0>(x, d, abc, den, history),
            1 => run_derivative_step::<T, 1>(x, d, abc, den, history),
            2 => run_derivative_step::<T, 2>(x, d, abc, den, history),
            3 => run_derivative_step::<T, 3>(x, d, abc, den, history),
            _ => run_derivative_step::<T, 4>(x, d, abc, den, history),
        })
    }
}

/// One chunk of [`lincomb_pair`]: `first = sum a_k t_k`, then `second = link first + sum b_k
/// t_k`, with the operations of [`chunk_set`] in its order for both, compiled for the widest
/// vector unit the CPU has (separate multiplies and adds in every variant, so the values do
/// not depend on which one runs).
fn chunk_pair<T: Elem, const N: usize>(
    out: (&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
    coefficients: ([T; N], T, [T; N]),
    t: [&[T]; N],
    start: usize,
) {
    crate::simd_dispatch!(chunk_pair_body, chunk_pair_avx512, chunk_pair_avx2,
        [T: Elem, const N: usize],
        (out: (&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]), coefficients: ([T; N], T, [T; N]),
         t: [&[T]; N], start: usize) -> ());
}

#[allow(clippy::inline_always)] // compiled once per instruction set by the dispatch above
#[inline(always)]
fn chunk_pair_body<T: Elem, const N: usize>(
    (first, second): (&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
    (a, link, b): ([T; N], T, [T; N]),
    t: [&[T]; N],
    start: usize,
) {
    let n = first.len();
    let second = &mut second[..n];
    let t: [&[T]; N] = std::array::from_fn(|k| &t[k][start..start + n]);
    for i in 0..n {
        let mut acc = a[0] * t[0][i];
        for k in 1..N {
            acc = acc + a[k] * t[k][i];
        }
        first[i].write(acc);
        let mut acc2 = link * acc;
        for k in 0..N {
            acc2 = acc2 + b[k] * t[k][i];
        }
        second[i].write(acc2);
    }
}

fn run_pair<T: Elem, const N: usize>(
    first: &mut [MaybeUninit<T>],
    second: &mut [MaybeUninit<T>],
    link: T,
    terms: &[(T, &[T])],
    b: &[T],
) {
    let a: [T; N] = std::array::from_fn(|k| terms[k].0);
    let b: [T; N] = std::array::from_fn(|k| b[k]);
    let t: [&[T]; N] = std::array::from_fn(|k| terms[k].1);
    split2(first, second, |f, s, start| {
        chunk_pair::<T, N>((f, s), (a, link, b), t, start);
    });
}

/// `first = sum a_k t_k` and `second = link first + sum b_k t_k` into new memory in one pass
/// over the operands; each element as two [`lincomb_new`] calls compute it. 1 to 5 terms,
/// pre-checked to be `n` long, and one `b` per term.
pub(crate) fn lincomb_pair<T: Elem>(
    n: usize,
    terms: &[(T, &[T])],
    link: T,
    b: &[T],
) -> (Vec<T>, Vec<T>) {
    // SAFETY: every chunk of both outputs is handed to `chunk_pair`, which writes each
    // position of it.
    #[allow(unsafe_code)]
    unsafe {
        written_pair(n, |f, s| match terms.len() {
            1 => run_pair::<T, 1>(f, s, link, terms, b),
            2 => run_pair::<T, 2>(f, s, link, terms, b),
            3 => run_pair::<T, 3>(f, s, link, terms, b),
            4 => run_pair::<T, 4>(f, s, link, terms, b),
            _ => run_pair::<T, 5>(f, s, link, terms, b),
        })
    }
}

/// `f` applied to every element into a new vector, on the rayon pool for large inputs.
pub(crate) fn map_new<S: Copy + Sync, T: Send>(v: &[S], f: impl Fn(S) -> T + Sync) -> Vec<T> {
    if v.len() >= PAR_THRESHOLD {
        v.par_iter().map(|&x| f(x)).collect()
    } else {
        v.iter().map(|&x| f(x)).collect()
    }
}

/// Values per block handed to the function of [`map_f64_new`]: 8 KiB of f64 on the stack,
/// so a block stays in the L1 cache between widening, the function and narrowing.
const MAP_BLOCK: usize = 1024;

/// `f` applied to `v` widened to f64, block by block, into new memory (never zero-filled),
/// on the rayon pool for large inputs.
pub(crate) fn map_f64_new<T: Elem>(v: &[T], f: &(dyn Fn(&mut [f64]) + Sync)) -> Vec<T> {
    // SAFETY: `split` hands every chunk of the slots to `map_f64_chunk`, which writes each
    // position of it.
    #[allow(unsafe_code)]
    unsafe {
        written(v.len(), |out| {
            split(out, |o, start| map_f64_chunk(o, start, v, f));
        })
    }
}

/// One chunk of [`map_f64_new`] (starting at `start` of `v`), block by block.
fn map_f64_chunk<T: Elem>(
    o: &mut [MaybeUninit<T>],
    start: usize,
    v: &[T],
    f: &(dyn Fn(&mut [f64]) + Sync),
) {
    let mut buf = [0.0f64; MAP_BLOCK];
    for (j, ob) in o.chunks_mut(MAP_BLOCK).enumerate() {
        let at = start + j * MAP_BLOCK;
        let b = &mut buf[..ob.len()];
        for (d, s) in b.iter_mut().zip(&v[at..at + ob.len()]) {
            *d = s.to_f64();
        }
        f(b);
        for (d, &s) in ob.iter_mut().zip(b.iter()) {
            d.put(T::from_f64(s));
        }
    }
}

fn sum_sq_chunk<T: Elem>(v: &[T]) -> f64 {
    // Eight independent accumulators keep the loop vectorisable and the sum well conditioned.
    let mut acc = [0.0f64; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let x = c[k].to_f64();
            acc[k] += x * x;
        }
    }
    let tail: f64 = it.remainder().iter().map(|x| x.to_f64() * x.to_f64()).sum();
    acc.iter().sum::<f64>() + tail
}

pub(crate) fn sum_squares<T: Elem>(v: &[T]) -> f64 {
    if v.len() >= PAR_THRESHOLD {
        v.par_chunks(PAR_CHUNK).map(sum_sq_chunk).sum()
    } else {
        sum_sq_chunk(v)
    }
}

pub(crate) fn max_abs<T: Elem>(v: &[T]) -> f64 {
    let f = |c: &[T]| c.iter().fold(0.0f64, |m, x| m.max(x.abs().to_f64()));
    if v.len() >= PAR_THRESHOLD {
        v.par_chunks(PAR_CHUNK).map(f).reduce(|| 0.0, f64::max)
    } else {
        f(v)
    }
}

pub(crate) fn scaled_error_sq<T: Elem>(e: &[T], a: &[T], b: &[T], atol: T, rtol: T) -> f64 {
    let max = |x: T, y: T| if x >= y { x } else { y };
    e.iter()
        .zip(a)
        .zip(b)
        .map(|((&e, &a), &b)| {
            let delta = max(atol, rtol * max(a.abs(), b.abs()));
            let r = (e / delta).to_f64();
            r * r
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use crate::{Backend, Cpu, DType, HostData, SamplerOps, Tensor};

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = crate::conformance::Rng(seed);
        (0..n).map(|_| rng.uniform(-2.0, 2.0)).collect()
    }

    fn tensor(cpu: Cpu, v: &[f64], dtype: DType) -> Tensor<Cpu> {
        cpu.upload(HostData::F64(v), &[v.len()], dtype).unwrap()
    }

    /// The combinations run in vector registers where the CPU has them; every element must
    /// still be the one the plain left-to-right evaluation in the element type gives (a
    /// contracted multiply-add or a reordered sum would change the last bits), for every term
    /// count, on both sides of the parallel threshold.
    #[test]
    fn vector_combinations_equal_the_scalar_evaluation() {
        let cpu = Cpu::new();
        let coeffs = [0.37, -1.3, 0.71, -0.05, 1.9, -0.6];
        for n in [1usize, 37, 65_536 + 4099] {
            let data: Vec<Vec<f64>> = (0..7).map(|k| values(n, 40 + k)).collect();
            for terms in 1..=6 {
                let ts: Vec<Tensor<Cpu>> = data[..terms]
                    .iter()
                    .map(|v| tensor(cpu, v, DType::F32))
                    .collect();
                let list: Vec<(f64, &Tensor<Cpu>)> = coeffs.iter().copied().zip(&ts).collect();
                let c32: Vec<f32> = coeffs.iter().map(|&c| c as f32).collect();
                let t32: Vec<Vec<f32>> = data
                    .iter()
                    .map(|v| v.iter().map(|&x| x as f32).collect())
                    .collect();

                let set = cpu.lincomb(&list).unwrap();
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let mut acc = c32[0] * t32[0][i];
                        for k in 1..terms {
                            acc += c32[k] * t32[k][i];
                        }
                        acc
                    })
                    .collect();
                assert_eq!(
                    cpu.download_f32(&set).unwrap(),
                    want,
                    "lincomb, {terms} terms, {n} elements"
                );

                // In place, `out` itself is one of the at most six operands.
                if terms == 6 {
                    continue;
                }
                let a = 0.83f64;
                let mut out = tensor(cpu, &data[6], DType::F32);
                cpu.lincomb_inplace(&mut out, a, &list).unwrap();
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let mut acc = a as f32 * t32[6][i];
                        for k in 0..terms {
                            acc += c32[k] * t32[k][i];
                        }
                        acc
                    })
                    .collect();
                assert_eq!(
                    cpu.download_f32(&out).unwrap(),
                    want,
                    "lincomb_inplace, {terms} terms, {n} elements"
                );
            }
        }
    }

    /// The fused step gives bit for bit what `lincomb` then `lincomb_inplace` give, on both
    /// sides of the parallel threshold, for every history length.
    #[test]
    fn derivative_step_equals_the_two_passes_it_fuses() {
        let cpu = Cpu::new();
        for dtype in [DType::F32, DType::F64] {
            for n in [1usize, 37, 65_536 + 4099] {
                for hist in 0..=4 {
                    let x0 = tensor(cpu, &values(n, 1), dtype);
                    let den = tensor(cpu, &values(n, 2), dtype);
                    let hs: Vec<Tensor<Cpu>> = (0..hist)
                        .map(|k| tensor(cpu, &values(n, 10 + k as u64), dtype))
                        .collect();
                    let coeffs = [0.37, -1.3, 0.71, -0.05];
                    let history: Vec<(f64, &Tensor<Cpu>)> =
                        coeffs.iter().copied().zip(&hs).collect();
                    let (a, b, c) = (1.0 / 0.83, -1.0 / 0.83, -0.117);

                    let mut fused_x = cpu.copy(&x0).unwrap();
                    let fused_d = cpu
                        .derivative_step(&mut fused_x, (a, b), &den, c, &history)
                        .unwrap();

                    let mut x = cpu.copy(&x0).unwrap();
                    let d = cpu.lincomb(&[(a, &x), (b, &den)]).unwrap();
                    let mut terms = vec![(c, &d)];
                    terms.extend_from_slice(&history);
                    cpu.lincomb_inplace(&mut x, 1.0, &terms).unwrap();

                    let bits = |t: &Tensor<Cpu>| {
                        cpu.download_f64(t)
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&fused_d), bits(&d), "d: {dtype} n={n} history={hist}");
                    assert_eq!(bits(&fused_x), bits(&x), "x: {dtype} n={n} history={hist}");
                }
            }
        }
    }

    /// The one-pass pair gives bit for bit what two `lincomb` calls give, on both sides of
    /// the parallel threshold, for every term count.
    #[test]
    fn lincomb_pair_equals_the_two_combinations_it_fuses() {
        let cpu = Cpu::new();
        let a = [0.81, -0.3, 1.7, -0.55, 0.02];
        let b = [0.0, 1.25, -0.4, 0.0, 2.5];
        let link = 0.93;
        for dtype in [DType::F32, DType::F64] {
            for n in [1usize, 37, 65_536 + 4099] {
                let ts: Vec<Tensor<Cpu>> = (0..5)
                    .map(|k| tensor(cpu, &values(n, 20 + k), dtype))
                    .collect();
                for count in 1..=5 {
                    let first: Vec<(f64, &Tensor<Cpu>)> =
                        a.iter().copied().zip(&ts).take(count).collect();
                    let (got_first, got_second) =
                        cpu.lincomb_pair(&first, link, &b[..count]).unwrap();

                    let want_first = cpu.lincomb(&first).unwrap();
                    let mut terms = vec![(link, &want_first)];
                    terms.extend(b.iter().copied().zip(&ts).take(count));
                    let want_second = cpu.lincomb(&terms).unwrap();

                    let bits = |t: &Tensor<Cpu>| {
                        cpu.download_f64(t)
                            .unwrap()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    };
                    let case = format!("{dtype} n={n} terms={count}");
                    assert_eq!(bits(&got_first), bits(&want_first), "first: {case}");
                    assert_eq!(bits(&got_second), bits(&want_second), "second: {case}");
                    assert_eq!(got_second.shape(), &[n]);
                    assert_eq!(got_second.dtype(), dtype);
                }
            }
        }
    }

    #[test]
    fn lincomb_pair_refuses_bad_arguments() {
        let cpu = Cpu::new();
        let x = tensor(cpu, &values(8, 1), DType::F32);
        let short = tensor(cpu, &values(7, 3), DType::F32);
        let wide = tensor(cpu, &values(8, 4), DType::F64);
        assert!(cpu.lincomb_pair(&[], 1.0, &[]).is_err());
        assert!(cpu.lincomb_pair(&[(1.0, &x)], 1.0, &[]).is_err());
        assert!(
            cpu.lincomb_pair(&[(1.0, &x), (1.0, &short)], 1.0, &[0.5, 0.5])
                .is_err()
        );
        assert!(
            cpu.lincomb_pair(&[(1.0, &x), (1.0, &wide)], 1.0, &[0.5, 0.5])
                .is_err()
        );
        let six: Vec<(f64, &Tensor<Cpu>)> = (0..6).map(|_| (1.0, &x)).collect();
        assert!(cpu.lincomb_pair(&six, 1.0, &[0.5; 6]).is_err());
    }

    #[test]
    fn derivative_step_refuses_bad_arguments() {
        let cpu = Cpu::new();
        let x = tensor(cpu, &values(8, 1), DType::F32);
        let den = tensor(cpu, &values(8, 2), DType::F32);
        let short = tensor(cpu, &values(7, 3), DType::F32);
        let wide = tensor(cpu, &values(8, 4), DType::F64);
        let mut y = cpu.copy(&x).unwrap();
        assert!(
            cpu.derivative_step(&mut y, (1.0, -1.0), &short, 0.5, &[])
                .is_err()
        );
        assert!(
            cpu.derivative_step(&mut y, (1.0, -1.0), &wide, 0.5, &[])
                .is_err()
        );
        assert!(
            cpu.derivative_step(&mut y, (1.0, -1.0), &den, 0.5, &[(1.0, &short)])
                .is_err()
        );
        let five: Vec<(f64, &Tensor<Cpu>)> = (0..5).map(|_| (1.0, &den)).collect();
        assert!(
            cpu.derivative_step(&mut y, (1.0, -1.0), &den, 0.5, &five)
                .is_err()
        );
    }
}
