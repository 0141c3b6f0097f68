//! `ddpm` (ancestral DDPM steps in VP form) and `lcm` (denoise, then re-noise to the next
//! sigma).

use super::common;
use super::euler::non_negative;
use crate::{Result, SampleContext, SamplerError, SamplerOptions};
use flux_kernels::{Backend, HostData, Tensor};

/// `ddpm`: the DDPM posterior step, taken in VP space (`x / sqrt(1 + sigma^2)`) and mapped back.
pub(crate) fn ddpm<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    _opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let den = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        let acp = 1.0 / (s * s + 1.0);
        let acp_prev = 1.0 / (s1 * s1 + 1.0);
        let alpha = acp / acp_prev;
        let q = (1.0 + s * s).sqrt();
        let back = if s1 == 0.0 {
            1.0
        } else {
            (1.0 + s1 * s1).sqrt()
        };
        // mu = sqrt(1/alpha) (x/q - (1 - alpha) eps / sqrt(1 - acp)), eps = (x - D)/s
        let m = (1.0 / alpha).sqrt();
        let e = (1.0 - alpha) / (1.0 - acp).sqrt() / s;
        let cx = back * m * (1.0 / q - e);
        let cd = back * m * e;
        if s1 > 0.0 {
            let noise = common::noise(ctx, &x, s, s1)?;
            let cn = back * ((1.0 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt();
            ctx.backend
                .lincomb_inplace(&mut x, cx, &[(cd, &den), (cn, &noise)])?;
        } else {
            ctx.backend.lincomb_inplace(&mut x, cx, &[(cd, &den)])?;
        }
    }
    Ok(x)
}

/// `lcm`: the denoised prediction, re-noised to the next sigma with the model's noise scaling
/// (`s n + (1 - s) D` for flow models, `D + s n` otherwise). `s_noise` (to `s_noise_end`, linearly
/// over the steps) scales the noise; `noise_clip_std > 0` clamps it to that many of its standard
/// deviations.
pub(crate) fn lcm<B: Backend>(
    ctx: &mut SampleContext<'_, B>,
    x: Tensor<B>,
    sigmas: &[f64],
    opts: &SamplerOptions,
) -> Result<Tensor<B>> {
    let s_start = non_negative("s_noise", opts.s_noise, 1.0)?;
    let s_end = match opts.s_noise_end {
        None => s_start,
        Some(v) => non_negative("s_noise_end", Some(v), v)?,
    };
    let clip = non_negative("noise_clip_std", opts.noise_clip_std, 0.0)?;
    let n_steps = (sigmas.len() - 1).max(1);
    let mut x = x;
    for i in 0..sigmas.len() - 1 {
        let (s, s1) = (sigmas[i], sigmas[i + 1]);
        let den = common::model(ctx, &x, s, false)?.denoised;
        common::report(ctx, i, sigmas, &x, &den)?;
        x = den;
        if s1 > 0.0 {
            let mut noise = common::noise(ctx, &x, s, s1)?;
            if clip > 0.0 {
                noise = clip_noise(ctx.backend, &noise, clip)?;
            }
            let t = if n_steps > 1 {
                i as f64 / (n_steps - 1) as f64
            } else {
                0.0
            };
            let s_noise = s_start + (s_end - s_start) * t;
            let (c_noise, c_latent) = ctx.model.noise_scaling_coeffs(s1, false);
            ctx.backend
                .lincomb_inplace(&mut x, c_latent, &[(c_noise * s_noise, &noise)])?;
        }
    }
    Ok(x)
}

/// Clamps `noise` to `+- clip * std(noise)` (unbiased std, as `torch.std`). Done on the host:
/// it runs once per step on a latent-sized tensor.
fn clip_noise<B: Backend>(backend: &B, noise: &Tensor<B>, clip: f64) -> Result<Tensor<B>> {
    let mut v = backend.download_f64(noise)?;
    let n = v.len();
    if n < 2 {
        return Err(SamplerError::InvalidOption {
            option: "noise_clip_std".into(),
            message: "needs a latent of at least 2 elements".into(),
        });
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / (n - 1) as f64;
    let limit = clip * var.sqrt();
    for a in &mut v {
        *a = a.clamp(-limit, limit);
    }
    Ok(backend.upload(HostData::F64(&v), noise.shape(), noise.dtype())?)
}
