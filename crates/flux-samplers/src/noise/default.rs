//! ComfyUI's `default_noise_sampler`: fresh `randn` draws from a generator seeded `seed + 1`.

use super::NoiseSource;
use super::torch::TorchGenerator;
use crate::Result;
use flux_kernels::{Backend, DType, Tensor};

/// Noise of ComfyUI's `default_noise_sampler`: a CPU generator seeded with `seed + 1`, one
/// `randn` of the requested shape and dtype per call, whatever the sigmas.
#[derive(Clone, Debug)]
pub struct DefaultNoise {
    generator: TorchGenerator,
    draws: usize,
}

impl DefaultNoise {
    /// The noise source ComfyUI builds for a sampler run with `seed` (the generator gets
    /// `seed + 1`, wrapping like a 64-bit integer).
    pub fn new(seed: u64) -> Self {
        Self::with_generator_seed(seed.wrapping_add(1))
    }

    /// A source whose generator is seeded with exactly `generator_seed`.
    pub fn with_generator_seed(generator_seed: u64) -> Self {
        Self {
            generator: TorchGenerator::new(generator_seed),
            draws: 0,
        }
    }

    /// How many tensors were drawn so far.
    pub fn draws(&self) -> usize {
        self.draws
    }

    /// The next draw as host values.
    pub fn next_host(&mut self, shape: &[usize], dtype: DType) -> Result<super::HostNoise> {
        let v = self.generator.randn(shape, dtype)?;
        self.draws += 1;
        Ok(v)
    }
}

impl<B: Backend> NoiseSource<B> for DefaultNoise {
    fn sample(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        _sigma: f64,
        _sigma_next: f64,
    ) -> Result<Tensor<B>> {
        let values = self.next_host(shape, dtype)?;
        Ok(values.into_tensor(backend, shape, dtype)?)
    }

    /// Moves the generator past the draw without converting it (see
    /// [`TorchGenerator::skip_randn`]).
    fn skip(
        &mut self,
        _backend: &B,
        shape: &[usize],
        dtype: DType,
        _sigma: f64,
        _sigma_next: f64,
    ) -> Result<()> {
        self.generator.skip_randn(shape, dtype)?;
        self.draws += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flux_kernels::{Cpu, SamplerOps};

    #[test]
    fn draws_continue_one_stream_seeded_seed_plus_one() {
        let cpu = Cpu::new();
        let mut n = DefaultNoise::new(41);
        let a = n.sample(&cpu, &[2, 16], DType::F64, 1.0, 0.5).unwrap();
        let b = n.sample(&cpu, &[2, 16], DType::F64, 0.5, 0.0).unwrap();
        let mut g = TorchGenerator::new(42);
        assert_eq!(cpu.download_f64(&a).unwrap(), g.randn_f64(32));
        assert_eq!(cpu.download_f64(&b).unwrap(), g.randn_f64(32));
        assert_eq!(n.draws(), 2);
    }

    #[test]
    fn a_skipped_draw_leaves_the_stream_where_a_draw_does() {
        let cpu = Cpu::new();
        for (shape, dtype) in [
            (vec![1, 16, 8, 9], DType::F32),
            (vec![3, 5], DType::F32),
            (vec![2, 16], DType::F64),
            (vec![7], DType::F64),
        ] {
            let mut drawn = DefaultNoise::new(9);
            let mut skipped = DefaultNoise::new(9);
            drawn.sample(&cpu, &shape, dtype, 1.0, 0.5).unwrap();
            skipped.skip(&cpu, &shape, dtype, 1.0, 0.5).unwrap();
            assert_eq!(skipped.draws(), 1);
            let a = drawn.sample(&cpu, &shape, dtype, 0.5, 0.2).unwrap();
            let b = skipped.sample(&cpu, &shape, dtype, 0.5, 0.2).unwrap();
            assert_eq!(
                cpu.download_f64(&a).unwrap(),
                cpu.download_f64(&b).unwrap(),
                "{shape:?} {dtype}"
            );
        }
    }
}
