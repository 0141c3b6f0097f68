//! Sigma schedules and model sampling for Flux.1 (flow matching) and discrete DDPM models,
//! numerically matching ComfyUI.
//!
//! Every schedule is computed with the float32 operations, in the order, that ComfyUI's PyTorch
//! code performs them, so the values are ComfyUI's bit for bit wherever only IEEE arithmetic
//! (add, multiply, divide, square root) is involved: the model sigma tables, `normal`,
//! `sgm_uniform`, `simple`, `ddim_uniform`, `beta` and `linear_quadratic`, and the `normal`
//! / `sgm_uniform` conversions of the discrete model apart from its final `exp`.
//!
//! Three schedulers (and the discrete model's `sigma()`) end in a float32 transcendental function
//! that PyTorch evaluates with its own CPU kernels (vectorised polynomial approximations, not
//! always correctly rounded), where this crate calls the platform's `powf` / `expf` / `tanf`:
//! `karras` (`x ** 7`), `exponential` (`exp`), `kl_optimal` (`tan`), and `normal` /
//! `sgm_uniform` on the discrete model (`exp` of the interpolated log-sigma). Those values may
//! differ from ComfyUI's in the last place: 1 ulp at most on the reference data (105 of 1083
//! cases have such a value), and the parity checks allow 2 ulps (1 ulp of error on each side).
//!
//! The KSampler path ([`ksampler_sigmas`]) adds ComfyUI's denoise trimming and the penultimate
//! discard of dpm_2, dpm_2_ancestral, uni_pc and uni_pc_bh2.

pub mod error;
pub mod model_sampling;
pub mod scheduler;
mod torch_f32;

pub use error::ScheduleError;
pub use model_sampling::{
    MODEL_NAMES, ModelSampling, Parameterization, flux_shift_for_size, flux_shift_for_tokens,
};
pub use scheduler::{MAX_STEPS, Scheduler, calculate_sigmas, ksampler_check, ksampler_sigmas};
