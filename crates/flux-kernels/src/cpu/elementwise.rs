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

/// One chunk of `out = sum c_k t_k`, with the term count fixed at compile time.
#[inline]
fn chunk_set<T: Elem, O: Put<T>, const N: usize>(
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

/// One chunk of `out = a*out + sum c_k t_k`.
#[inline]
fn chunk_update<T: Elem, const N: usize>(
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

/// `sum c_k t_k` (each slice `n` long) into new memory, which is written once and never
/// zero-filled (a sampler step allocates its result every step; clearing it first would be one
/// more pass over memory).
pub(crate) fn lincomb_new<T: Elem>(n: usize, terms: &[(T, &[T])]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    set(&mut out.spare_capacity_mut()[..n], terms);
    // SAFETY: `set` wrote each of the first `n` elements (every chunk of the slice is handed
    // to a kernel that stores every position of it), and `T` is a plain float.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(n);
    }
    out
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
    let n = v.len();
    let mut out: Vec<T> = Vec::with_capacity(n);
    split(&mut out.spare_capacity_mut()[..n], |o, start| {
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
    });
    // SAFETY: `split` hands every chunk of the first `n` slots to the closure, which writes
    // each position of it, and `T` is a plain float.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(n);
    }
    out
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
