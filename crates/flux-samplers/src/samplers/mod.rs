//! One module per sampler family; `dispatch` maps a [`Sampler`] to its function.

pub(crate) mod common;
pub(crate) mod dpm;
pub(crate) mod dpmpp;
pub(crate) mod er_sde;
pub(crate) mod euler;
pub(crate) mod gradient_estimation;
pub(crate) mod heun;
pub(crate) mod lms;
pub(crate) mod misc;
pub(crate) mod multistep;
pub(crate) mod res_multistep;
pub(crate) mod sa_solver;
pub(crate) mod sde;
pub(crate) mod seeds;
pub(crate) mod uni_pc;

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
        Sampler::DpmppSde | Sampler::DpmppSdeGpu => sde::dpmpp_sde(ctx, x, sigmas, options),
        Sampler::Dpmpp2mSde | Sampler::Dpmpp2mSdeGpu => sde::dpmpp_2m_sde(ctx, x, sigmas, options),
        Sampler::Dpmpp2mSdeHeun | Sampler::Dpmpp2mSdeHeunGpu => {
            sde::dpmpp_2m_sde_heun(ctx, x, sigmas, options)
        }
        Sampler::Dpmpp3mSde | Sampler::Dpmpp3mSdeGpu => sde::dpmpp_3m_sde(ctx, x, sigmas, options),
        Sampler::ExpHeun2X0 => seeds::exp_heun_2_x0(ctx, x, sigmas, options),
        Sampler::ExpHeun2X0Sde => seeds::exp_heun_2_x0_sde(ctx, x, sigmas, options),
        Sampler::Seeds2 => seeds::seeds_2(ctx, x, sigmas, options),
        Sampler::Seeds3 => seeds::seeds_3(ctx, x, sigmas, options),
        Sampler::ResMultistep => res_multistep::res_multistep(ctx, x, sigmas, options),
        Sampler::ResMultistepCfgPp => res_multistep::res_multistep_cfg_pp(ctx, x, sigmas, options),
        Sampler::ResMultistepAncestral => {
            res_multistep::res_multistep_ancestral(ctx, x, sigmas, options)
        }
        Sampler::ResMultistepAncestralCfgPp => {
            res_multistep::res_multistep_ancestral_cfg_pp(ctx, x, sigmas, options)
        }
        Sampler::GradientEstimation => {
            gradient_estimation::gradient_estimation(ctx, x, sigmas, options)
        }
        Sampler::GradientEstimationCfgPp => {
            gradient_estimation::gradient_estimation_cfg_pp(ctx, x, sigmas, options)
        }
        Sampler::ErSde => er_sde::er_sde(ctx, x, sigmas, options),
        Sampler::SaSolver => sa_solver::sa_solver(ctx, x, sigmas, options),
        Sampler::SaSolverPece => sa_solver::sa_solver_pece(ctx, x, sigmas, options),
        Sampler::UniPc => uni_pc::uni_pc(ctx, x, sigmas, options),
        Sampler::UniPcBh2 => uni_pc::uni_pc_bh2(ctx, x, sigmas, options),
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
            | Sampler::DpmppSde
            | Sampler::DpmppSdeGpu
            | Sampler::Dpmpp2mSde
            | Sampler::Dpmpp2mSdeGpu
            | Sampler::Dpmpp2mSdeHeun
            | Sampler::Dpmpp2mSdeHeunGpu
            | Sampler::Dpmpp3mSde
            | Sampler::Dpmpp3mSdeGpu
            | Sampler::ExpHeun2X0
            | Sampler::ExpHeun2X0Sde
            | Sampler::Seeds2
            | Sampler::Seeds3
            | Sampler::ResMultistep
            | Sampler::ResMultistepCfgPp
            | Sampler::ResMultistepAncestral
            | Sampler::ResMultistepAncestralCfgPp
            | Sampler::GradientEstimation
            | Sampler::GradientEstimationCfgPp
            | Sampler::ErSde
            | Sampler::SaSolver
            | Sampler::SaSolverPece
            | Sampler::UniPc
            | Sampler::UniPcBh2
    )
}
