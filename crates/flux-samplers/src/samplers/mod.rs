//! One module per sampler family; `dispatch` maps a [`Sampler`] to its function.

pub(crate) mod common;

use crate::{Result, SampleContext, Sampler, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

pub(crate) fn dispatch<B: Backend>(
    sampler: Sampler,
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    options: &SamplerOptions,
) -> Result<Tensor<B>> {
    let _ = (ctx, sigmas, options, &x);
    #[allow(clippy::match_single_binding)]
    match sampler {
        other => Err(SamplerError::InvalidOption {
            option: "sampler".into(),
            message: format!("{other} is not implemented"),
        }),
    }
}
