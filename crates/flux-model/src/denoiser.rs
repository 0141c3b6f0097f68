//! The Flux transformer as a sampler's [`Denoiser`]: flow matching (the model predicts the
//! velocity, `denoised = x - sigma * v`, timestep = sigma), latent packing, text conditioning,
//! guidance (dev) and classifier-free guidance with a negative conditioning.

use crate::transformer::{FluxInputs, FluxTransformer};
use flux_kernels::{Backend, HostData, Tensor};
use flux_samplers::{Denoised, Denoiser, SamplerError};

/// Text conditioning of one prompt: T5 tokens `[1, L, context_in_dim]` and the pooled CLIP
/// vector `[1, vec_in_dim]`, as host f64 values.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// T5 hidden states, row-major `[L, context_in_dim]`.
    pub txt: Vec<f64>,
    /// Number of text tokens `L`.
    pub txt_len: usize,
    /// Pooled vector `[vec_in_dim]`.
    pub y: Vec<f64>,
}

/// Packs a latent `[B, C, h, w]` into tokens `[B, ceil(h/2) * ceil(w/2), 4C]` (feature
/// `c*4 + dy*2 + dx`), padding odd sizes circularly (bottom/right copied from top/left).
pub fn pack(x: &[f64], b: usize, c: usize, h: usize, w: usize) -> (Vec<f64>, usize, usize) {
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    let mut out = Vec::with_capacity(b * hp * wp * 4 * c);
    for bi in 0..b {
        for r in 0..hp {
            for col in 0..wp {
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let y = (2 * r + dy) % h;
                            let xx = (2 * col + dx) % w;
                            out.push(x[((bi * c + ch) * h + y) * w + xx]);
                        }
                    }
                }
            }
        }
    }
    (out, hp, wp)
}

/// Inverse of [`pack`], cropped back to `h x w`.
pub fn unpack(t: &[f64], b: usize, c: usize, h: usize, w: usize) -> Vec<f64> {
    let (hp, wp) = (h.div_ceil(2), w.div_ceil(2));
    let mut out = vec![0.0; b * c * h * w];
    for bi in 0..b {
        for r in 0..hp {
            for col in 0..wp {
                let tok = (bi * hp + r) * wp + col;
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let (y, xx) = (2 * r + dy, 2 * col + dx);
                            if y < h && xx < w {
                                out[((bi * c + ch) * h + y) * w + xx] =
                                    t[(tok * c + ch) * 4 + dy * 2 + dx];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Image position ids `(0, row, col)` for `batch` packed latents of `hp x wp` tokens.
pub fn img_ids(batch: usize, hp: usize, wp: usize) -> Vec<f64> {
    (0..batch)
        .flat_map(|_| (0..hp * wp).flat_map(move |t| [0.0, (t / wp) as f64, (t % wp) as f64]))
        .collect()
}

/// The Flux transformer driven by a sampler.
pub struct FluxDenoiser<'m, B: Backend> {
    model: &'m FluxTransformer<B>,
    cond: Conditioning,
    uncond: Option<Conditioning>,
    guidance: f64,
    cfg: f64,
}

fn err(e: impl std::fmt::Display) -> SamplerError {
    SamplerError::Denoiser(e.to_string())
}

impl<'m, B: Backend> FluxDenoiser<'m, B> {
    /// A denoiser with positive conditioning `cond`, distilled guidance `guidance` (dev models;
    /// ignored by schnell) and no classifier-free guidance.
    pub fn new(model: &'m FluxTransformer<B>, cond: Conditioning, guidance: f64) -> Self {
        Self {
            model,
            cond,
            uncond: None,
            guidance,
            cfg: 1.0,
        }
    }

    /// Adds true classifier-free guidance with a negative conditioning:
    /// `denoised = uncond + cfg * (cond - uncond)`. With `cfg > 1` both passes run as one batch.
    pub fn with_cfg(mut self, negative: Conditioning, cfg: f64) -> Self {
        self.uncond = Some(negative);
        self.cfg = cfg;
        self
    }

    /// Velocity predictions for the packed latent `tokens` (batch `b`) under each conditioning,
    /// batched into one forward when the text lengths match.
    fn velocities(
        &self,
        be: &B,
        tokens: &[f64],
        b: usize,
        hp: usize,
        wp: usize,
        conds: &[&Conditioning],
        sigma: f64,
    ) -> flux_samplers::Result<Vec<Vec<f64>>> {
        let cfg = self.model.config();
        let dt = self.model.dtype();
        let li = hp * wp;
        let tok_len = li * cfg.in_channels;
        let same_len = conds.iter().all(|c| c.txt_len == conds[0].txt_len);
        let groups: Vec<Vec<&Conditioning>> = if same_len {
            vec![conds.to_vec()]
        } else {
            conds.iter().map(|c| vec![*c]).collect()
        };
        let mut out = Vec::new();
        for group in groups {
            let n = group.len() * b;
            let lt = group[0].txt_len;
            let mut img = Vec::with_capacity(n * tok_len);
            let mut txt = Vec::with_capacity(n * lt * cfg.context_in_dim);
            let mut y = Vec::with_capacity(n * cfg.vec_in_dim);
            for c in &group {
                if c.txt.len() != lt * cfg.context_in_dim || c.y.len() != cfg.vec_in_dim {
                    return Err(err(format!(
                        "conditioning has {} text values and a pooled vector of {}; the model needs {lt} x {} and {}",
                        c.txt.len(),
                        c.y.len(),
                        cfg.context_in_dim,
                        cfg.vec_in_dim
                    )));
                }
                img.extend_from_slice(tokens);
                for _ in 0..b {
                    txt.extend_from_slice(&c.txt);
                    y.extend_from_slice(&c.y);
                }
            }
            let up = |v: &[f64], s: &[usize]| be.upload(HostData::F64(v), s, dt).map_err(err);
            let img_t: Tensor<B> = up(&img, &[n, li, cfg.in_channels])?;
            let txt_t = up(&txt, &[n, lt, cfg.context_in_dim])?;
            let y_t = up(&y, &[n, cfg.vec_in_dim])?;
            let ids = img_ids(n, hp, wp);
            let txt_ids = vec![0.0; n * lt * 3];
            let ts = vec![sigma; n];
            let g = vec![self.guidance; n];
            let inp = FluxInputs {
                img: &img_t,
                img_ids: &ids,
                txt: &txt_t,
                txt_ids: &txt_ids,
                timesteps: &ts,
                y: &y_t,
                guidance: Some(&g),
            };
            let v = be.download_f64(&self.model.forward(be, &inp).map_err(err)?)?;
            let per = b * li * cfg.out_channels;
            out.extend(v.chunks(per.max(1)).map(<[f64]>::to_vec));
        }
        Ok(out)
    }
}

impl<B: Backend> Denoiser<B> for FluxDenoiser<'_, B> {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        let s = x.shape();
        let cfg = self.model.config();
        let c = cfg.out_channels / 4;
        if s.len() != 4 || s[1] * 4 != cfg.in_channels || s[2] == 0 || s[3] == 0 {
            return Err(err(format!(
                "latent must be [B, {}, h, w], found {s:?}",
                cfg.in_channels / 4
            )));
        }
        let (b, h, w) = (s[0], s[2], s[3]);
        let xv = backend.download_f64(x)?;
        let (tokens, hp, wp) = pack(&xv, b, s[1], h, w);
        let run_uncond = self.uncond.is_some() && (self.cfg != 1.0 || want_uncond);
        let conds: Vec<&Conditioning> = match (&self.uncond, run_uncond) {
            (Some(u), true) => vec![&self.cond, u],
            _ => vec![&self.cond],
        };
        let vs = self.velocities(backend, &tokens, b, hp, wp, &conds, sigma)?;
        let to_denoised = |v: &[f64]| -> Vec<f64> {
            let v = unpack(v, b, c, h, w);
            xv.iter().zip(&v).map(|(x, v)| x - sigma * v).collect()
        };
        let d_cond = to_denoised(&vs[0]);
        let d_uncond = vs.get(1).map(|v| to_denoised(v));
        let guided = match &d_uncond {
            Some(u) if self.cfg != 1.0 => u
                .iter()
                .zip(&d_cond)
                .map(|(u, c)| u + self.cfg * (c - u))
                .collect(),
            _ => d_cond.clone(),
        };
        let dt = x.dtype();
        let denoised = backend.upload(HostData::F64(&guided), s, dt)?;
        let uncond = if want_uncond {
            // Without a negative conditioning the unconditional prediction is the conditional one.
            let u = d_uncond.as_ref().unwrap_or(&d_cond);
            Some(backend.upload(HostData::F64(u), s, dt)?)
        } else {
            None
        };
        Ok(Denoised { denoised, uncond })
    }
}
