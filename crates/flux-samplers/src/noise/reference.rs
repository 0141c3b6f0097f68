//! The noise source ComfyUI itself would use for a sampler and seed.

use super::{BrownianTreeNoise, DefaultNoise, NoiseSource};
use crate::{Result, Sampler};
use flux_kernels::Backend;

/// The noise ComfyUI's sampler draws for `seed` on `sigmas`: a Brownian tree with entropy
/// `seed` over the schedule's smallest positive and largest sigma for the SDE family
/// ([`Sampler::uses_brownian_tree`]), otherwise `default_noise_sampler` (a generator seeded
/// `seed + 1`). With these a run reproduces ComfyUI's noise for the same seed.
pub fn reference_noise<B: Backend>(
    sampler: Sampler,
    seed: u64,
    sigmas: &[f64],
) -> Result<Box<dyn NoiseSource<B>>> {
    if sampler.uses_brownian_tree() {
        // A schedule with no positive sigma draws no Brownian noise; any interval will do.
        let tree = if let Ok(tree) = BrownianTreeNoise::for_schedule(seed, sigmas) {
            tree
        } else {
            let sigma_max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            BrownianTreeNoise::new(seed, 0.5, sigma_max.max(1.0))?
        };
        Ok(Box::new(tree))
    } else {
        Ok(Box::new(DefaultNoise::new(seed)))
    }
}
