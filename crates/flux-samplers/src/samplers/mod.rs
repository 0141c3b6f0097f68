//! One module per sampler family; `dispatch` maps a [`Sampler`] to its function.

pub(crate) mod common;
pub(crate) mod er_sde;
pub(crate) mod gradient_estimation;
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
        other => Err(SamplerError::InvalidOption {
            option: "sampler".into(),
            message: format!("{other} is not implemented"),
        }),
    }
}
