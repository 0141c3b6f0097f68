//! Model sampling: how a model maps sigma to its timestep and how noise enters the latent.

use crate::error::ScheduleError;
use crate::torch_f32;

/// How the model relates noise, data and its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameterization {
    /// Rectified flow (Flux): `x = (1 - sigma) * x0 + sigma * noise`.
    Const,
    /// Epsilon prediction on a variance-exploding latent (SD 1.x): `x = x0 + sigma * noise`.
    Eps,
}

#[derive(Clone, Debug)]
enum Kind {
    /// `e_mu` is the Python float `math.exp(shift)`; PyTorch rounds it to float32 in every f32
    /// tensor operation it enters.
    Flux {
        shift: f64,
        e_mu: f64,
    },
    Discrete,
}

/// A model's sigma table and conversions, as ComfyUI's `ModelSamplingFlux` / `ModelSamplingDiscrete`.
#[derive(Clone, Debug)]
pub struct ModelSampling {
    kind: Kind,
    /// The f32 sigma table (ascending).
    sigmas: Vec<f32>,
    /// `ln(sigmas)` in f32 (discrete models).
    log_sigmas: Vec<f32>,
}

/// Number of entries of the Flux sigma table.
pub const FLUX_TABLE_LEN: usize = 10_000;

/// Number of entries of the SD 1.x sigma table.
pub const SD15_TABLE_LEN: usize = 1000;

/// Model names accepted by [`ModelSampling::from_name`].
pub const MODEL_NAMES: [&str; 3] = ["flux-dev", "flux-schnell", "sd15"];

/// Flux's resolution-dependent time shift `mu` for an image of `image_tokens` transformer tokens
/// (one token per 16x16 pixels): the line through (256 tokens, 0.5) and (4096 tokens, 1.15) of
/// the original Flux sampling code (`get_lin_function`), which ComfyUI's `ModelSamplingFlux` node
/// also uses. Extrapolates linearly outside that range, as the original does.
pub fn flux_shift_for_tokens(image_tokens: u64) -> f64 {
    const X1: f64 = 256.0;
    const Y1: f64 = 0.5;
    const X2: f64 = 4096.0;
    const Y2: f64 = 1.15;
    let m = (Y2 - Y1) / (X2 - X1);
    let b = Y1 - m * X1;
    image_tokens as f64 * m + b
}

/// [`flux_shift_for_tokens`] for an image of `width` x `height` pixels
/// (`width * height / 256` tokens, as ComfyUI's `ModelSamplingFlux` node counts them).
pub fn flux_shift_for_size(width: u32, height: u32) -> f64 {
    flux_shift_for_tokens(u64::from(width) * u64::from(height) / 256)
}

impl ModelSampling {
    /// Flux model sampling with time shift `shift`.
    ///
    /// The table is `sigma(arange(1, 10001) / 10000)` evaluated on float32 tensors exactly as
    /// PyTorch does it (see `crate::torch_f32`), so it matches ComfyUI's bit for bit.
    pub fn flux(shift: f64) -> Self {
        let e_mu = shift.exp();
        let e32 = e_mu as f32;
        let n = FLUX_TABLE_LEN as f32;
        let sigmas: Vec<f32> = (1..=FLUX_TABLE_LEN)
            .map(|i| torch_f32::flux_sigma_f32(e32, i as f32 / n))
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            kind: Kind::Flux { shift, e_mu },
            sigmas,
            log_sigmas,
        }
    }

    /// flux-dev's default (shift 1.15).
    pub fn flux_dev() -> Self {
        Self::flux(1.15)
    }

    /// flux-schnell's default (shift 1.0).
    pub fn flux_schnell() -> Self {
        Self::flux(1.0)
    }

    /// SD 1.5: 1000 linear betas from 0.00085 to 0.012, eps prediction.
    ///
    /// As ComfyUI: `betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float64) ** 2`, the
    /// cumulative product and the sigmas in float64, then `sigmas.float()` and
    /// `sigmas.log().float()` (the log is taken in float64 before rounding).
    pub fn sd15() -> Self {
        let start = 0.00085f64.powf(0.5);
        let end = 0.012f64.powf(0.5);
        let roots = torch_f32::linspace(start, end, SD15_TABLE_LEN);
        let mut acp = 1.0f64;
        let mut sigmas = Vec::with_capacity(SD15_TABLE_LEN);
        let mut log_sigmas = Vec::with_capacity(SD15_TABLE_LEN);
        for r in roots {
            acp *= 1.0 - r * r;
            let s = ((1.0 - acp) / acp).sqrt();
            sigmas.push(s as f32);
            log_sigmas.push(s.ln() as f32);
        }
        Self {
            kind: Kind::Discrete,
            sigmas,
            log_sigmas,
        }
    }

    /// The model sampling of a model by name: `flux-dev`, `flux-schnell` (with an optional
    /// override of the flow shift) or `sd15` (no shift).
    pub fn from_name(name: &str, shift: Option<f64>) -> Result<Self, ScheduleError> {
        let flux_shift = |default: f64| -> Result<f64, ScheduleError> {
            match shift {
                None => Ok(default),
                Some(s) if s.is_finite() => Ok(s),
                Some(s) => Err(ScheduleError::InvalidShift {
                    model: name.to_string(),
                    shift: s,
                    why: "expected a finite number",
                }),
            }
        };
        match name {
            "flux-dev" => Ok(Self::flux(flux_shift(1.15)?)),
            "flux-schnell" => Ok(Self::flux(flux_shift(1.0)?)),
            "sd15" => match shift {
                None => Ok(Self::sd15()),
                Some(s) => Err(ScheduleError::InvalidShift {
                    model: name.to_string(),
                    shift: s,
                    why: "sd15 is a discrete model without a time shift",
                }),
            },
            _ => Err(ScheduleError::UnknownModel {
                name: name.to_string(),
                valid: MODEL_NAMES.join(", "),
            }),
        }
    }

    /// The parameterisation (flow or eps).
    pub fn parameterization(&self) -> Parameterization {
        match self.kind {
            Kind::Flux { .. } => Parameterization::Const,
            Kind::Discrete => Parameterization::Eps,
        }
    }

    /// Whether this is a rectified-flow model (ComfyUI's `CONST`).
    pub fn is_flow(&self) -> bool {
        self.parameterization() == Parameterization::Const
    }

    /// The flow shift, for flow models.
    pub fn shift(&self) -> Option<f64> {
        match self.kind {
            Kind::Flux { shift, .. } => Some(shift),
            Kind::Discrete => None,
        }
    }

    /// The f32 sigma table, ascending.
    pub fn table(&self) -> &[f32] {
        &self.sigmas
    }

    /// The f32 log-sigma table.
    pub fn log_table(&self) -> &[f32] {
        &self.log_sigmas
    }

    /// Smallest sigma of the table (an f32 value).
    pub fn sigma_min(&self) -> f64 {
        f64::from(self.sigmas[0])
    }

    /// Largest sigma of the table.
    pub fn sigma_max(&self) -> f64 {
        f64::from(self.sigmas[self.sigmas.len() - 1])
    }

    /// Sigma at timestep `t` (Flux: `t` in (0, 1]; discrete: a fractional table index).
    ///
    /// Flux evaluates the shift on a float64 value with PyTorch's operation order; discrete
    /// models convert the timestep to float32 and interpolate the f32 log-sigma table in f32, as
    /// ComfyUI's `ModelSamplingDiscrete.sigma` does for any input dtype.
    pub fn sigma(&self, t: f64) -> f64 {
        match self.kind {
            Kind::Flux { e_mu, .. } => torch_f32::flux_sigma_f64(e_mu, t),
            Kind::Discrete => f64::from(self.sigma_f32(t as f32)),
        }
    }

    /// Sigma at timestep `t` evaluated on a float32 tensor, as the schedulers do.
    pub(crate) fn sigma_f32(&self, t: f32) -> f32 {
        match self.kind {
            Kind::Flux { e_mu, .. } => torch_f32::flux_sigma_f32(e_mu as f32, t),
            Kind::Discrete => {
                let n = self.log_sigmas.len();
                let t = t.clamp(0.0, (n - 1) as f32);
                let lo = t.floor() as usize;
                let hi = t.ceil() as usize;
                let w = t.fract();
                let log_sigma = (1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi];
                log_sigma.exp()
            }
        }
    }

    /// Timestep of `sigma` (Flux: sigma itself; discrete: index of the nearest log-sigma,
    /// the first one on ties, as `argmin`).
    pub fn timestep(&self, sigma: f64) -> f64 {
        match self.kind {
            Kind::Flux { .. } => sigma,
            Kind::Discrete => {
                let ls = sigma.ln();
                nearest_index(self.log_sigmas.iter().map(|&l| (ls - f64::from(l)).abs())) as f64
            }
        }
    }

    /// [`Self::timestep`] of a float32 sigma, computed in float32.
    pub(crate) fn timestep_f32(&self, sigma: f32) -> f32 {
        match self.kind {
            Kind::Flux { .. } => sigma,
            Kind::Discrete => {
                let ls = sigma.ln();
                nearest_index(self.log_sigmas.iter().map(|&l| (ls - l).abs())) as f32
            }
        }
    }

    /// Sigma at `percent` of the way through sampling (0 -> sigma_max), as ComfyUI's
    /// `percent_to_sigma`: both models evaluate it on a float32 tensor
    /// (Flux: `sigma(tensor(1 - p, float32))`; discrete: `sigma(tensor((1 - p) * 999.0))`).
    /// Flux returns 1.0 at `percent <= 0`, discrete models 999999999.9; both 0 at `percent >= 1`.
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        match self.kind {
            Kind::Flux { .. } => {
                if percent <= 0.0 {
                    return 1.0;
                }
                if percent >= 1.0 {
                    return 0.0;
                }
                f64::from(self.sigma_f32((1.0 - percent) as f32))
            }
            Kind::Discrete => {
                if percent <= 0.0 {
                    return 999_999_999.9;
                }
                if percent >= 1.0 {
                    return 0.0;
                }
                f64::from(self.sigma_f32(((1.0 - percent) * 999.0) as f32))
            }
        }
    }

    /// Coefficients `(c_noise, c_latent)` of ComfyUI's `noise_scaling`:
    /// the sampler's start is `c_noise * noise + c_latent * latent`.
    pub fn noise_scaling_coeffs(&self, sigma: f64, max_denoise: bool) -> (f64, f64) {
        match self.parameterization() {
            Parameterization::Const => (sigma, 1.0 - sigma),
            Parameterization::Eps => {
                if max_denoise {
                    ((1.0 + sigma * sigma).sqrt(), 1.0)
                } else {
                    (sigma, 1.0)
                }
            }
        }
    }

    /// Factor of ComfyUI's `inverse_noise_scaling(sigma, x)` (`x / (1 - sigma)` for flow models).
    pub fn inverse_noise_scaling_coeff(&self, sigma: f64) -> f64 {
        match self.parameterization() {
            Parameterization::Const => 1.0 / (1.0 - sigma),
            Parameterization::Eps => 1.0,
        }
    }
}

/// Index of the smallest distance; the first on ties (as `torch.argmin`).
fn nearest_index<T: PartialOrd>(dists: impl Iterator<Item = T>) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (i, d) in dists.enumerate() {
        match &best {
            Some((_, b)) if d.partial_cmp(b) != Some(std::cmp::Ordering::Less) => {}
            _ => best = Some((i, d)),
        }
    }
    best.map_or(0, |(i, _)| i)
}
