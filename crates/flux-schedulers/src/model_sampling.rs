//! Model sampling: how a model maps sigma to its timestep and how noise enters the latent.

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
    Flux { shift: f64 },
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

impl ModelSampling {
    /// Flux model sampling with time shift `shift`.
    pub fn flux(shift: f64) -> Self {
        let e = shift.exp() as f32;
        let sigmas: Vec<f32> = (1..=FLUX_TABLE_LEN)
            .map(|i| {
                let t = i as f32 / FLUX_TABLE_LEN as f32;
                e / (e + (1.0 / t - 1.0))
            })
            .collect();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            kind: Kind::Flux { shift },
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
    pub fn sd15() -> Self {
        let (start, end) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let n = 1000usize;
        let mut acp = 1.0f64;
        let mut sigmas = Vec::with_capacity(n);
        for i in 0..n {
            let b = start + (end - start) * i as f64 / (n - 1) as f64;
            acp *= 1.0 - b * b;
            sigmas.push(((1.0 - acp) / acp).sqrt() as f32);
        }
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            kind: Kind::Discrete,
            sigmas,
            log_sigmas,
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
            Kind::Flux { shift } => Some(shift),
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

    /// Smallest sigma of the table.
    pub fn sigma_min(&self) -> f64 {
        f64::from(self.sigmas[0])
    }

    /// Largest sigma of the table.
    pub fn sigma_max(&self) -> f64 {
        f64::from(self.sigmas[self.sigmas.len() - 1])
    }

    /// Sigma at timestep `t` (Flux: `t` in (0, 1]; discrete: a fractional table index).
    pub fn sigma(&self, t: f64) -> f64 {
        match self.kind {
            Kind::Flux { shift } => {
                let e = shift.exp();
                e / (e + (1.0 / t - 1.0))
            }
            Kind::Discrete => {
                let n = self.log_sigmas.len();
                let t = t.clamp(0.0, (n - 1) as f64);
                let lo = t.floor() as usize;
                let hi = t.ceil() as usize;
                let w = t - t.floor();
                let ls =
                    (1.0 - w) * f64::from(self.log_sigmas[lo]) + w * f64::from(self.log_sigmas[hi]);
                ls.exp()
            }
        }
    }

    /// Timestep of `sigma` (Flux: sigma itself; discrete: index of the nearest log-sigma).
    pub fn timestep(&self, sigma: f64) -> f64 {
        match self.kind {
            Kind::Flux { .. } => sigma,
            Kind::Discrete => {
                let ls = sigma.ln();
                let mut best = 0usize;
                let mut best_d = f64::INFINITY;
                for (i, &l) in self.log_sigmas.iter().enumerate() {
                    let d = (ls - f64::from(l)).abs();
                    if d < best_d {
                        best_d = d;
                        best = i;
                    }
                }
                best as f64
            }
        }
    }

    /// Sigma at `percent` of the way through sampling (0 -> sigma_max), as ComfyUI's
    /// `percent_to_sigma` (Flux evaluates it in f32).
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        if percent <= 0.0 {
            return 999_999_999.9;
        }
        if percent >= 1.0 {
            return 0.0;
        }
        match self.kind {
            Kind::Flux { shift } => {
                let t = (1.0 - percent) as f32;
                let e = shift.exp() as f32;
                f64::from(e / (e + (1.0 / t - 1.0)))
            }
            Kind::Discrete => {
                let t = (1.0 - percent) * 999.0;
                self.sigma(t)
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
