//! Elementwise kernels and reductions of the CPU backend.

use super::{CpuStorage, PAR_CHUNK, PAR_THRESHOLD};
use rayon::prelude::*;

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

/// One chunk of `out = [a*out +] sum c_k t_k`, with the term count fixed at compile time.
#[inline]
fn chunk<T: Elem, const N: usize>(
    out: &mut [T],
    a: Option<T>,
    c: [T; N],
    t: [&[T]; N],
    start: usize,
) {
    let t: [&[T]; N] = std::array::from_fn(|k| &t[k][start..start + out.len()]);
    match a {
        None => {
            for (i, o) in out.iter_mut().enumerate() {
                let mut acc = c[0] * t[0][i];
                for k in 1..N {
                    acc = acc + c[k] * t[k][i];
                }
                *o = acc;
            }
        }
        Some(a) => {
            for (i, o) in out.iter_mut().enumerate() {
                let mut acc = a * *o;
                for k in 0..N {
                    acc = acc + c[k] * t[k][i];
                }
                *o = acc;
            }
        }
    }
}

fn run<T: Elem, const N: usize>(out: &mut [T], a: Option<T>, terms: &[(T, &[T])]) {
    let c: [T; N] = std::array::from_fn(|k| terms[k].0);
    let t: [&[T]; N] = std::array::from_fn(|k| terms[k].1);
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(j, o)| chunk::<T, N>(o, a, c, t, j * PAR_CHUNK));
    } else {
        chunk::<T, N>(out, a, c, t, 0);
    }
}

/// `out = [a*out +] sum c_k t_k`; slices are pre-checked to have `out`'s length.
pub(crate) fn lincomb<T: Elem>(out: &mut [T], a: Option<T>, terms: &[(T, &[T])]) {
    match terms.len() {
        0 => match a {
            None => out.iter_mut().for_each(|o| *o = T::ZERO),
            Some(a) => out.iter_mut().for_each(|o| *o = a * *o),
        },
        1 => run::<T, 1>(out, a, terms),
        2 => run::<T, 2>(out, a, terms),
        3 => run::<T, 3>(out, a, terms),
        4 => run::<T, 4>(out, a, terms),
        5 => run::<T, 5>(out, a, terms),
        _ => run::<T, 6>(out, a, terms),
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
