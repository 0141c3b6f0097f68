//! Replays recorded noise draws in order, checking what each draw was requested for.

use super::NoiseSource;
use crate::{Result, SamplerError};
use flux_kernels::{Backend, DType, Tensor};

/// One recorded draw: its values and the `[sigma, sigma_next]` it was requested for
/// (`[NaN, NaN]` for a draw that did not come from the sampler's noise source).
pub type RecordedDraw = (Vec<f64>, [f64; 2]);

/// A noise source that returns recorded tensors in order (the reference data's `noise.NNN`)
/// and checks each request's `(sigma, sigma_next)` against the recorded `noise_sigma.NNN`.
///
/// A recorded pair of NaNs matches any request. A request with other sigmas, a different
/// shape or dtype, or one past the last recorded draw is an error naming the draw.
#[derive(Clone, Debug)]
pub struct ReplayNoise {
    shape: Vec<usize>,
    dtype: DType,
    draws: Vec<RecordedDraw>,
    next: usize,
    rel_tol: f64,
}

impl ReplayNoise {
    /// A replay of `draws` (values in row-major order, each `shape` elements) for tensors of
    /// `shape` and `dtype`. Sigmas must match to a relative 1e-12 (see [`Self::with_tolerance`]).
    pub fn new(shape: Vec<usize>, dtype: DType, draws: Vec<RecordedDraw>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if let Some((i, (v, _))) = draws
            .iter()
            .enumerate()
            .find(|(_, (v, _))| v.len() != numel)
        {
            return Err(SamplerError::Noise(format!(
                "recorded draw {i} has {} values, shape {shape:?} needs {numel}",
                v.len()
            )));
        }
        Ok(Self {
            shape,
            dtype,
            draws,
            next: 0,
            rel_tol: 1e-12,
        })
    }

    /// Sets the relative tolerance of the sigma check (`|a - b| <= tol * max(|a|, |b|)`).
    pub fn with_tolerance(mut self, rel_tol: f64) -> Self {
        self.rel_tol = rel_tol;
        self
    }

    /// Drops the draws recorded with NaN sigmas (draws from the global RNG that a sampler
    /// need not make).
    pub fn without_global_draws(mut self) -> Self {
        let rest = self.draws.split_off(self.next);
        self.draws.extend(
            rest.into_iter()
                .filter(|(_, s)| !(s[0].is_nan() && s[1].is_nan())),
        );
        self
    }

    /// How many draws were handed out.
    pub fn consumed(&self) -> usize {
        self.next
    }

    /// How many recorded draws are left.
    pub fn remaining(&self) -> usize {
        self.draws.len() - self.next
    }

    /// Total number of recorded draws.
    pub fn len(&self) -> usize {
        self.draws.len()
    }

    /// Whether no draws were recorded.
    pub fn is_empty(&self) -> bool {
        self.draws.is_empty()
    }

    fn matches(&self, recorded: f64, requested: f64) -> bool {
        recorded == requested
            || (recorded - requested).abs() <= self.rel_tol * recorded.abs().max(requested.abs())
    }

    /// The next recorded values after checking the request against the recording.
    pub fn next_values(
        &mut self,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<&[f64]> {
        let i = self.next;
        let Some((values, [s0, s1])) = self.draws.get(i) else {
            return Err(SamplerError::Noise(format!(
                "replay ran out: draw {i} requested for sigma {sigma} -> {sigma_next}, \
                 only {} recorded",
                self.draws.len()
            )));
        };
        if shape != self.shape.as_slice() || dtype != self.dtype {
            return Err(SamplerError::Noise(format!(
                "draw {i}: requested shape {shape:?} {dtype}, recorded {:?} {}",
                self.shape, self.dtype
            )));
        }
        let global = s0.is_nan() && s1.is_nan();
        let same = self.matches(*s0, sigma) && self.matches(*s1, sigma_next);
        if !(global || same) {
            return Err(SamplerError::Noise(format!(
                "draw {i}: requested for sigma {sigma:e} -> {sigma_next:e}, recorded for \
                 {s0:e} -> {s1:e}"
            )));
        }
        self.next += 1;
        Ok(values)
    }
}

impl<B: Backend> NoiseSource<B> for ReplayNoise {
    fn sample(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<B>> {
        let values = self.next_values(shape, dtype, sigma, sigma_next)?;
        Ok(backend.upload(flux_kernels::HostData::F64(values), shape, dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flux_kernels::{Cpu, SamplerOps};

    fn replay() -> ReplayNoise {
        ReplayNoise::new(
            vec![2],
            DType::F64,
            vec![
                (vec![1.0, 2.0], [1.0, 0.5]),
                (vec![3.0, 4.0], [f64::NAN, f64::NAN]),
                (vec![5.0, 6.0], [0.5, 0.0]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn returns_draws_in_order_and_checks_sigmas() {
        let cpu = Cpu::new();
        let mut r = replay();
        let a = r.sample(&cpu, &[2], DType::F64, 1.0, 0.5).unwrap();
        assert_eq!(cpu.download_f64(&a).unwrap(), [1.0, 2.0]);
        let b = r.sample(&cpu, &[2], DType::F64, 0.7, 0.1).unwrap();
        assert_eq!(cpu.download_f64(&b).unwrap(), [3.0, 4.0]);
        assert_eq!(r.consumed(), 2);
        let err = r.sample(&cpu, &[2], DType::F64, 0.4, 0.0).unwrap_err();
        assert!(err.to_string().contains("draw 2"), "{err}");
        r.sample(&cpu, &[2], DType::F64, 0.5, 0.0).unwrap();
        let err = r.sample(&cpu, &[2], DType::F64, 0.5, 0.0).unwrap_err();
        assert!(err.to_string().contains("ran out"), "{err}");
        assert_eq!(r.consumed(), 3);
    }

    #[test]
    fn shape_dtype_and_lengths_are_checked() {
        let cpu = Cpu::new();
        let mut r = replay();
        assert!(r.sample(&cpu, &[1, 2], DType::F64, 1.0, 0.5).is_err());
        assert!(r.sample(&cpu, &[2], DType::F32, 1.0, 0.5).is_err());
        assert_eq!(r.consumed(), 0);
        assert!(ReplayNoise::new(vec![3], DType::F64, vec![(vec![1.0], [1.0, 0.0])]).is_err());
    }

    #[test]
    fn global_draws_can_be_dropped() {
        let cpu = Cpu::new();
        let mut r = replay().without_global_draws();
        assert_eq!(r.len(), 2);
        r.sample(&cpu, &[2], DType::F64, 1.0, 0.5).unwrap();
        let b = r.sample(&cpu, &[2], DType::F64, 0.5, 0.0).unwrap();
        assert_eq!(cpu.download_f64(&b).unwrap(), [5.0, 6.0]);
    }
}
