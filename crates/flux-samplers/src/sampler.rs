//! The sampler names, their options, and the entry point [`sample`].

use crate::{Denoiser, NoiseSource, Result, SamplerError};
use flux_kernels::{Backend, Tensor};
use flux_schedulers::ModelSampling;
use std::fmt;
use std::str::FromStr;

macro_rules! samplers {
    ($($variant:ident => $name:literal,)*) => {
        /// A sampler, named exactly as in ComfyUI and the hosted API.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Sampler {
            $(#[doc = concat!("`", $name, "`")] $variant,)*
        }

        impl Sampler {
            /// Every sampler, in ComfyUI's order: the hosted API's 26 first.
            pub const ALL: &'static [Sampler] = &[$(Sampler::$variant,)*];

            /// The exact API string.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Sampler::$variant => $name,)*
                }
            }
        }
    };
}

samplers! {
    Euler => "euler",
    EulerCfgPp => "euler_cfg_pp",
    EulerAncestral => "euler_ancestral",
    EulerAncestralCfgPp => "euler_ancestral_cfg_pp",
    Heun => "heun",
    Heunpp2 => "heunpp2",
    Dpm2 => "dpm_2",
    Dpm2Ancestral => "dpm_2_ancestral",
    Lms => "lms",
    DpmFast => "dpm_fast",
    DpmAdaptive => "dpm_adaptive",
    Dpmpp2sAncestral => "dpmpp_2s_ancestral",
    Dpmpp2sAncestralCfgPp => "dpmpp_2s_ancestral_cfg_pp",
    DpmppSde => "dpmpp_sde",
    DpmppSdeGpu => "dpmpp_sde_gpu",
    Dpmpp2m => "dpmpp_2m",
    Dpmpp2mCfgPp => "dpmpp_2m_cfg_pp",
    Dpmpp2mSde => "dpmpp_2m_sde",
    Dpmpp2mSdeGpu => "dpmpp_2m_sde_gpu",
    Dpmpp3mSde => "dpmpp_3m_sde",
    Dpmpp3mSdeGpu => "dpmpp_3m_sde_gpu",
    Ddpm => "ddpm",
    Lcm => "lcm",
    Ipndm => "ipndm",
    IpndmV => "ipndm_v",
    Deis => "deis",
    Ddim => "ddim",
    UniPc => "uni_pc",
    UniPcBh2 => "uni_pc_bh2",
    Dpmpp2mSdeHeun => "dpmpp_2m_sde_heun",
    Dpmpp2mSdeHeunGpu => "dpmpp_2m_sde_heun_gpu",
    ExpHeun2X0 => "exp_heun_2_x0",
    ExpHeun2X0Sde => "exp_heun_2_x0_sde",
    ResMultistep => "res_multistep",
    ResMultistepCfgPp => "res_multistep_cfg_pp",
    ResMultistepAncestral => "res_multistep_ancestral",
    ResMultistepAncestralCfgPp => "res_multistep_ancestral_cfg_pp",
    GradientEstimation => "gradient_estimation",
    GradientEstimationCfgPp => "gradient_estimation_cfg_pp",
    ErSde => "er_sde",
    Seeds2 => "seeds_2",
    Seeds3 => "seeds_3",
    SaSolver => "sa_solver",
    SaSolverPece => "sa_solver_pece",
}

impl Sampler {
    /// The 26 names the hosted API accepts.
    pub const API: &'static [Sampler] = {
        let (api, _) = Self::ALL.split_at(26);
        api
    };

    /// Whether ComfyUI's KSampler computes `steps + 1` sigmas and drops the second-to-last one
    /// for this sampler (`DISCARD_PENULTIMATE_SIGMA_SAMPLERS`).
    pub const fn discards_penultimate_sigma(self) -> bool {
        matches!(
            self,
            Sampler::Dpm2 | Sampler::Dpm2Ancestral | Sampler::UniPc | Sampler::UniPcBh2
        )
    }

    /// Whether the sampler needs the unconditional prediction at every call (cfg++ family).
    pub const fn needs_uncond(self) -> bool {
        matches!(
            self,
            Sampler::EulerCfgPp
                | Sampler::EulerAncestralCfgPp
                | Sampler::Dpmpp2sAncestralCfgPp
                | Sampler::Dpmpp2mCfgPp
                | Sampler::ResMultistepCfgPp
                | Sampler::ResMultistepAncestralCfgPp
                | Sampler::GradientEstimationCfgPp
        )
    }

    /// The last sigma as ComfyUI's `inverse_noise_scaling` sees it after this sampler ran on a
    /// schedule ending in `last_sigma`: `uni_pc` and `uni_pc_bh2` replace a final 0 by 0.001
    /// (rounded to f32 for f32 latents) in the caller's schedule, so flow models then divide the
    /// output by `1 - 0.001`. Every other sampler leaves it unchanged.
    pub fn effective_last_sigma(self, last_sigma: f64, dtype: flux_kernels::DType) -> f64 {
        if matches!(self, Sampler::UniPc | Sampler::UniPcBh2) && last_sigma == 0.0 {
            crate::samplers::uni_pc::replacement_last_sigma(dtype)
        } else {
            last_sigma
        }
    }

    /// Whether ComfyUI draws this sampler's noise from a Brownian tree (the SDE family) rather
    /// than from `default_noise_sampler`.
    pub const fn uses_brownian_tree(self) -> bool {
        matches!(
            self,
            Sampler::DpmppSde
                | Sampler::DpmppSdeGpu
                | Sampler::Dpmpp2mSde
                | Sampler::Dpmpp2mSdeGpu
                | Sampler::Dpmpp2mSdeHeun
                | Sampler::Dpmpp2mSdeHeunGpu
                | Sampler::Dpmpp3mSde
                | Sampler::Dpmpp3mSdeGpu
        )
    }

    /// Whether this build has an implementation of the sampler ([`sample`] fails for the others).
    pub const fn is_implemented(self) -> bool {
        crate::samplers::implemented(self)
    }

    /// A one-line description (for `flux samplers`).
    pub const fn description(self) -> &'static str {
        match self {
            Sampler::Euler => "first-order Euler step of the probability-flow ODE",
            Sampler::EulerCfgPp => "Euler with CFG++ (renoises with the unconditional prediction)",
            Sampler::EulerAncestral => "Euler with ancestral noise (rectified-flow form for Flux)",
            Sampler::EulerAncestralCfgPp => "ancestral Euler with CFG++",
            Sampler::Heun => "second-order Heun (two model calls per step)",
            Sampler::Heunpp2 => "Heun++ with a weighted third-order correction",
            Sampler::Dpm2 => "DPM-Solver-2 midpoint step (two calls per step)",
            Sampler::Dpm2Ancestral => "DPM-Solver-2 with ancestral noise",
            Sampler::Lms => "linear multistep (Adams-Bashforth, order 4)",
            Sampler::DpmFast => "DPM-Solver fast: fixed orders 3/2/1 over the schedule's range",
            Sampler::DpmAdaptive => "DPM-Solver with adaptive step size (error control)",
            Sampler::Dpmpp2sAncestral => "DPM-Solver++(2S) single-step with ancestral noise",
            Sampler::Dpmpp2sAncestralCfgPp => "DPM-Solver++(2S) ancestral with CFG++",
            Sampler::DpmppSde => "DPM-Solver++ SDE (two calls per step, Brownian-tree noise)",
            Sampler::DpmppSdeGpu => "dpmpp_sde; ComfyUI evaluates its Brownian tree on the GPU",
            Sampler::Dpmpp2m => "DPM-Solver++(2M) multistep",
            Sampler::Dpmpp2mCfgPp => "DPM-Solver++(2M) with CFG++",
            Sampler::Dpmpp2mSde => "DPM-Solver++(2M) SDE, midpoint, Brownian-tree noise",
            Sampler::Dpmpp2mSdeGpu => {
                "dpmpp_2m_sde; ComfyUI evaluates its Brownian tree on the GPU"
            }
            Sampler::Dpmpp3mSde => "DPM-Solver++(3M) SDE, Brownian-tree noise",
            Sampler::Dpmpp3mSdeGpu => {
                "dpmpp_3m_sde; ComfyUI evaluates its Brownian tree on the GPU"
            }
            Sampler::Ddpm => "ancestral DDPM posterior sampling",
            Sampler::Lcm => "latent consistency: denoise, then renoise to the next sigma",
            Sampler::Ipndm => "improved pseudo-numerical multistep (order 4)",
            Sampler::IpndmV => "iPNDM with variable step sizes",
            Sampler::Deis => "diffusion exponential integrator sampler (order 3)",
            Sampler::Ddim => "DDIM; in ComfyUI the same update as euler",
            Sampler::UniPc => "UniPC predictor-corrector, B(h) = h",
            Sampler::UniPcBh2 => "UniPC predictor-corrector, B(h) = expm1(h)",
            Sampler::Dpmpp2mSdeHeun => "DPM-Solver++(2M) SDE with the Heun solver type",
            Sampler::Dpmpp2mSdeHeunGpu => {
                "dpmpp_2m_sde_heun; ComfyUI evaluates its Brownian tree on the GPU"
            }
            Sampler::ExpHeun2X0 => "exponential Heun, second order, data prediction",
            Sampler::ExpHeun2X0Sde => "exponential Heun second order with SDE noise",
            Sampler::ResMultistep => "RES multistep exponential integrator",
            Sampler::ResMultistepCfgPp => "RES multistep with CFG++",
            Sampler::ResMultistepAncestral => "RES multistep with ancestral noise",
            Sampler::ResMultistepAncestralCfgPp => "RES multistep ancestral with CFG++",
            Sampler::GradientEstimation => {
                "gradient-estimation sampler (Euler with momentum on the update)"
            }
            Sampler::GradientEstimationCfgPp => "gradient estimation with CFG++",
            Sampler::ErSde => "extended reverse-time SDE solver (stage 3)",
            Sampler::Seeds2 => "SEEDS-2 exponential SDE solver",
            Sampler::Seeds3 => "SEEDS-3 exponential SDE solver",
            Sampler::SaSolver => "SA-Solver stochastic Adams predictor-corrector",
            Sampler::SaSolverPece => "SA-Solver in PECE mode (extra corrector call)",
        }
    }

    /// Comma-separated list of every valid name (for error messages).
    pub fn valid_names() -> String {
        Self::ALL
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sampler {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|x| x.name() == s)
            .ok_or_else(|| SamplerError::UnknownSampler {
                name: s.to_string(),
                valid: Self::valid_names(),
            })
    }
}

/// Keyword options of the samplers. `None` means the reference's default for that sampler.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerOptions {
    /// Ancestral / SDE noise amount.
    pub eta: Option<f64>,
    /// Noise multiplier.
    pub s_noise: Option<f64>,
    /// Churn of the Karras-style samplers (euler, heun, dpm_2).
    pub s_churn: Option<f64>,
    /// Lower sigma bound for churn.
    pub s_tmin: Option<f64>,
    /// Upper sigma bound for churn.
    pub s_tmax: Option<f64>,
    /// Intermediate-point ratio (dpmpp_sde, seeds).
    pub r: Option<f64>,
    /// Multistep order (lms, ipndm, deis, ...).
    pub order: Option<usize>,
    /// `midpoint` or `heun` (dpmpp_2m_sde family).
    pub solver_type: Option<String>,
    /// Highest multistep order (ipndm, ipndm_v, deis).
    pub max_order: Option<usize>,
    /// `tab` or `rhoab` (deis).
    pub deis_mode: Option<String>,
    /// Relative error tolerance (dpm_adaptive).
    pub rtol: Option<f64>,
    /// Absolute error tolerance (dpm_adaptive).
    pub atol: Option<f64>,
    /// First step size in log-sigma (dpm_adaptive).
    pub h_init: Option<f64>,
    /// Proportional gain of the step-size controller (dpm_adaptive).
    pub pcoeff: Option<f64>,
    /// Integral gain of the step-size controller (dpm_adaptive).
    pub icoeff: Option<f64>,
    /// Derivative gain of the step-size controller (dpm_adaptive).
    pub dcoeff: Option<f64>,
    /// Smallest step-size factor that accepts a step (dpm_adaptive).
    pub accept_safety: Option<f64>,
    /// Noise multiplier at the last step, interpolated linearly from `s_noise` (lcm).
    pub s_noise_end: Option<f64>,
    /// Clamp re-injected noise to this many standard deviations; 0 disables (lcm).
    pub noise_clip_std: Option<f64>,
    /// First intermediate-point ratio (seeds_3).
    pub r_1: Option<f64>,
    /// Second intermediate-point ratio (seeds_3).
    pub r_2: Option<f64>,
    /// Gradient-estimation weight (gradient_estimation).
    pub ge_gamma: Option<f64>,
    /// Highest stage (er_sde).
    pub max_stage: Option<usize>,
    /// Predictor order (sa_solver).
    pub predictor_order: Option<usize>,
    /// Corrector order (sa_solver).
    pub corrector_order: Option<usize>,
    /// Use the simplified second-order coefficients (sa_solver).
    pub simple_order_2: Option<bool>,
}

/// Progress of one sampler step, handed to the step callback.
pub struct StepInfo<'a, B: Backend> {
    /// Index of the step (0-based).
    pub step: usize,
    /// Number of steps (`sigmas.len() - 1`).
    pub total: usize,
    /// Sigma at the start of the step.
    pub sigma: f64,
    /// Sigma at its end.
    pub sigma_next: f64,
    /// The latent at the start of the step.
    pub x: &'a Tensor<B>,
    /// The denoised prediction of the step.
    pub denoised: &'a Tensor<B>,
}

/// Per-step callback: return `false` to cancel sampling.
pub type Callback<'a, B> = dyn FnMut(&StepInfo<'_, B>) -> bool + 'a;

/// Everything a sampler works with besides the latent and the schedule.
pub struct SampleContext<'a, B: Backend> {
    /// The device.
    pub backend: &'a B,
    /// The model's sampling (flow or eps; `percent_to_sigma`).
    pub model: &'a ModelSampling,
    /// The model.
    pub denoiser: &'a mut dyn Denoiser<B>,
    /// Randomness.
    pub noise: &'a mut dyn NoiseSource<B>,
    /// Per-step progress callback.
    pub callback: Option<&'a mut Callback<'a, B>>,
}

/// Runs `sampler` from `x` (already noise-scaled, as ComfyUI's `KSAMPLER` hands it over) along
/// `sigmas` and returns the sampler's raw output (before `inverse_noise_scaling`).
pub fn sample<B: Backend>(
    sampler: Sampler,
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    options: &SamplerOptions,
) -> Result<Tensor<B>> {
    if sigmas.len() < 2 {
        return Ok(x);
    }
    crate::samplers::dispatch(sampler, ctx, x, sigmas, options)
}
