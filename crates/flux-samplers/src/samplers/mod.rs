//! One module per sampler family; `dispatch` maps a [`Sampler`] to its function.

pub(crate) mod common;
pub(crate) mod dpm;
pub(crate) mod dpmpp;
pub(crate) mod euler;
pub(crate) mod heun;
pub(crate) mod lms;
pub(crate) mod misc;
pub(crate) mod multistep;

use crate::{Result, SampleContext, Sampler, SamplerError, SamplerOptions};
use flux_kernels::{Backend, Tensor};

pub(crate) fn dispatch<B: Backend>(
    sampler: Sampler,
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    options: &SamplerOptions,
) -> Result<Tensor<B>> {
    match sampler {
        Sampler::Euler | Sampler::Ddim => euler::euler(ctx, x, sigmas, options),
        Sampler::EulerCfgPp => euler::euler_cfg_pp(ctx, x, sigmas, options),
        Sampler::EulerAncestral => euler::euler_ancestral(ctx, x, sigmas, options),
        Sampler::EulerAncestralCfgPp => euler::euler_ancestral_cfg_pp(ctx, x, sigmas, options),
        Sampler::Heun => heun::heun(ctx, x, sigmas, options),
        Sampler::Heunpp2 => heun::heunpp2(ctx, x, sigmas, options),
        Sampler::Dpm2 => dpm::dpm_2(ctx, x, sigmas, options),
        Sampler::Dpm2Ancestral => dpm::dpm_2_ancestral(ctx, x, sigmas, options),
        Sampler::Lms => lms::lms(ctx, x, sigmas, options),
        Sampler::DpmFast => dpm::dpm_fast(ctx, x, sigmas, options),
        Sampler::DpmAdaptive => dpm::dpm_adaptive(ctx, x, sigmas, options),
        Sampler::Dpmpp2sAncestral => dpmpp::dpmpp_2s_ancestral(ctx, x, sigmas, options),
        Sampler::Dpmpp2sAncestralCfgPp => dpmpp::dpmpp_2s_ancestral_cfg_pp(ctx, x, sigmas, options),
        Sampler::Dpmpp2m => dpmpp::dpmpp_2m(ctx, x, sigmas, options),
        Sampler::Dpmpp2mCfgPp => dpmpp::dpmpp_2m_cfg_pp(ctx, x, sigmas, options),
        Sampler::Ddpm => misc::ddpm(ctx, x, sigmas, options),
        Sampler::Lcm => misc::lcm(ctx, x, sigmas, options),
        Sampler::Ipndm => multistep::ipndm(ctx, x, sigmas, options),
        Sampler::IpndmV => multistep::ipndm_v(ctx, x, sigmas, options),
        Sampler::Deis => multistep::deis(ctx, x, sigmas, options),
        // Kept for builds where some samplers are still missing.
        #[allow(unreachable_patterns)]
        other => Err(SamplerError::InvalidOption {
            option: "sampler".into(),
            message: format!("{other} is not implemented"),
        }),
    }
}

/// Whether [`dispatch`] has a function for `sampler` (keep in step with its arms).
pub(crate) const fn implemented(sampler: Sampler) -> bool {
    matches!(
        sampler,
        Sampler::Euler
            | Sampler::Ddim
            | Sampler::EulerCfgPp
            | Sampler::EulerAncestral
            | Sampler::EulerAncestralCfgPp
            | Sampler::Heun
            | Sampler::Heunpp2
            | Sampler::Dpm2
            | Sampler::Dpm2Ancestral
            | Sampler::Lms
            | Sampler::DpmFast
            | Sampler::DpmAdaptive
            | Sampler::Dpmpp2sAncestral
            | Sampler::Dpmpp2sAncestralCfgPp
            | Sampler::Dpmpp2m
            | Sampler::Dpmpp2mCfgPp
            | Sampler::Ddpm
            | Sampler::Lcm
            | Sampler::Ipndm
            | Sampler::IpndmV
            | Sampler::Deis
    )
}
