//! The Flux autoencoder (`ae.safetensors`): encoder, decoder, latent scaling and tiled
//! encode/decode for large images.
//!
//! Layout follows the reference `modules/autoencoder.py`: GroupNorm (32 groups, eps 1e-6) with
//! swish, ResNet blocks, a stride-2 downsample after padding right/bottom by one, nearest
//! upsampling followed by a 3x3 conv, and one single-head attention block in the middle.

use crate::tensor_source::{NetError, TensorSource, detect_prefix};
use flux_kernels::{Backend, Conv2dParams, HostData, Tensor};

mod tiled;
pub use tiled::TileConfig;

/// Hyperparameters of the autoencoder (`AutoEncoderParams` of the reference).
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Base channel count.
    pub ch: usize,
    /// Image channels out.
    pub out_ch: usize,
    /// Channel multiplier per level; `len - 1` downsamplings.
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Latent channels.
    pub z_channels: usize,
    /// Latent scale.
    pub scale_factor: f64,
    /// Latent shift.
    pub shift_factor: f64,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
}

impl VaeConfig {
    /// The released Flux.1 autoencoder.
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
            groups: 32,
            eps: 1e-6,
        }
    }

    /// The tiles that keep every activation of a latent `lh x lw` within `limit` bytes
    /// (elements of `elem` bytes), or `None` when the untiled network already does. The bound
    /// per tile is the widest channel count at full resolution over the tile and the halo a
    /// layer reads around it (at most 4 pixels each side: the upsampling's input halo, doubled).
    pub fn tiles_within(
        &self,
        limit: usize,
        elem: usize,
        lh: usize,
        lw: usize,
    ) -> Option<TileConfig> {
        const HALO: usize = 8;
        let f = self.downsample_factor();
        let widest = self.ch * self.ch_mult.iter().copied().max().unwrap_or(1);
        let bytes = |h: usize, w: usize| {
            widest
                .saturating_mul(h)
                .saturating_mul(w)
                .saturating_mul(elem)
        };
        if bytes(lh.saturating_mul(f), lw.saturating_mul(f)) <= limit {
            return None;
        }
        // The largest square tile within the limit (at least one latent pixel).
        let side = |t: usize| t.saturating_mul(f).saturating_add(HALO);
        let mut tile = 1;
        while tile < lh.max(lw) && bytes(side(tile + 1), side(tile + 1)) <= limit {
            tile += 1;
        }
        Some(TileConfig { tile })
    }

    /// Spatial factor between image and latent (`2^(levels - 1)`).
    pub fn downsample_factor(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    fn validate(&self) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::Invalid(format!("autoencoder config: {m}")));
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(format!(
                "ch_mult {:?} must be non-empty and positive",
                self.ch_mult
            ));
        }
        if self.ch == 0 || self.z_channels == 0 || self.in_channels == 0 || self.out_ch == 0 {
            return bad("channel counts must be positive".into());
        }
        if self.groups == 0 {
            return bad("groupnorm groups must be positive".into());
        }
        for m in std::iter::once(1).chain(self.ch_mult.iter().copied()) {
            if !(self.ch * m).is_multiple_of(self.groups) {
                return bad(format!(
                    "{} channels are not divisible into {} groups",
                    self.ch * m,
                    self.groups
                ));
            }
        }
        if self.scale_factor == 0.0 || !self.scale_factor.is_finite() {
            return bad("scale_factor must be finite and non-zero".into());
        }
        Ok(())
    }

    /// Every parameter name (without prefix) and shape, encoder first.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Shapes(Vec::new());
        let levels = self.ch_mult.len();
        let top = self.ch * self.ch_mult[levels - 1];
        v.conv("encoder.conv_in", self.ch, self.in_channels, 3);
        let mut cin = self.ch;
        for l in 0..levels {
            let cout = self.ch * self.ch_mult[l];
            for b in 0..self.num_res_blocks {
                v.res(&format!("encoder.down.{l}.block.{b}"), cin, cout);
                cin = cout;
            }
            if l + 1 != levels {
                v.conv(&format!("encoder.down.{l}.downsample.conv"), cin, cin, 3);
            }
        }
        v.res("encoder.mid.block_1", top, top);
        v.attn("encoder.mid.attn_1", top);
        v.res("encoder.mid.block_2", top, top);
        v.norm("encoder.norm_out", top);
        v.conv("encoder.conv_out", 2 * self.z_channels, top, 3);

        v.conv("decoder.conv_in", top, self.z_channels, 3);
        v.res("decoder.mid.block_1", top, top);
        v.attn("decoder.mid.attn_1", top);
        v.res("decoder.mid.block_2", top, top);
        let mut cin = top;
        for l in (0..levels).rev() {
            let cout = self.ch * self.ch_mult[l];
            for b in 0..=self.num_res_blocks {
                v.res(&format!("decoder.up.{l}.block.{b}"), cin, cout);
                cin = cout;
            }
            if l != 0 {
                v.conv(&format!("decoder.up.{l}.upsample.conv"), cin, cin, 3);
            }
        }
        v.norm("decoder.norm_out", self.ch);
        v.conv("decoder.conv_out", self.out_ch, self.ch, 3);
        v.0
    }
}

/// Collects parameter names and shapes in loading order.
struct Shapes(Vec<(String, Vec<usize>)>);

impl Shapes {
    fn conv(&mut self, n: &str, o: usize, i: usize, k: usize) {
        self.0.push((format!("{n}.weight"), vec![o, i, k, k]));
        self.0.push((format!("{n}.bias"), vec![o]));
    }

    fn norm(&mut self, n: &str, c: usize) {
        self.0.push((format!("{n}.weight"), vec![c]));
        self.0.push((format!("{n}.bias"), vec![c]));
    }

    fn res(&mut self, n: &str, i: usize, o: usize) {
        self.norm(&format!("{n}.norm1"), i);
        self.conv(&format!("{n}.conv1"), o, i, 3);
        self.norm(&format!("{n}.norm2"), o);
        self.conv(&format!("{n}.conv2"), o, o, 3);
        if i != o {
            self.conv(&format!("{n}.nin_shortcut"), o, i, 1);
        }
    }

    fn attn(&mut self, n: &str, c: usize) {
        self.norm(&format!("{n}.norm"), c);
        for p in ["q", "k", "v", "proj_out"] {
            self.conv(&format!("{n}.{p}"), c, c, 1);
        }
    }
}

/// Prefixes under which checkpoints store the autoencoder (`ae.safetensors`: none).
const PREFIXES: [&str; 3] = ["", "vae.", "first_stage_model."];

struct Loader<'a, B: Backend> {
    src: &'a mut dyn TensorSource<B>,
    prefix: &'static str,
}

impl<B: Backend> Loader<'_, B> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B>, NetError> {
        self.src.tensor(&format!("{}{name}", self.prefix), shape)
    }

    fn conv(
        &mut self,
        name: &str,
        o: usize,
        i: usize,
        k: usize,
        p: Conv2dParams,
    ) -> Result<Conv<B>, NetError> {
        Ok(Conv {
            w: self.get(&format!("{name}.weight"), &[o, i, k, k])?,
            b: self.get(&format!("{name}.bias"), &[o])?,
            p,
        })
    }

    fn norm(&mut self, name: &str, c: usize) -> Result<Norm<B>, NetError> {
        Ok(Norm {
            w: self.get(&format!("{name}.weight"), &[c])?,
            b: self.get(&format!("{name}.bias"), &[c])?,
        })
    }

    fn res(&mut self, name: &str, i: usize, o: usize) -> Result<ResBlock<B>, NetError> {
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), i)?,
            conv1: self.conv(&format!("{name}.conv1"), o, i, 3, Conv2dParams::same(1))?,
            norm2: self.norm(&format!("{name}.norm2"), o)?,
            conv2: self.conv(&format!("{name}.conv2"), o, o, 3, Conv2dParams::same(1))?,
            skip: if i == o {
                None
            } else {
                Some(self.conv(
                    &format!("{name}.nin_shortcut"),
                    o,
                    i,
                    1,
                    Conv2dParams::same(0),
                )?)
            },
        })
    }

    fn attn(&mut self, name: &str, c: usize) -> Result<Attn<B>, NetError> {
        let one = Conv2dParams::same(0);
        Ok(Attn {
            norm: self.norm(&format!("{name}.norm"), c)?,
            q: self.conv(&format!("{name}.q"), c, c, 1, one)?,
            k: self.conv(&format!("{name}.k"), c, c, 1, one)?,
            v: self.conv(&format!("{name}.v"), c, c, 1, one)?,
            proj: self.conv(&format!("{name}.proj_out"), c, c, 1, one)?,
        })
    }
}

struct Conv<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
    p: Conv2dParams,
}

impl<B: Backend> Conv<B> {
    fn fwd(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        Ok(be.conv2d(x, &self.w, Some(&self.b), self.p)?)
    }
}

struct Norm<B: Backend> {
    w: Tensor<B>,
    b: Tensor<B>,
}

/// GroupNorm settings shared by every norm of the network.
#[derive(Clone, Copy)]
struct Gn {
    groups: usize,
    eps: f64,
}

impl<B: Backend> Norm<B> {
    fn fwd(&self, be: &B, g: Gn, x: &Tensor<B>, swish: bool) -> Result<Tensor<B>, NetError> {
        Ok(be.group_norm(x, g.groups, g.eps, Some(&self.w), Some(&self.b), swish)?)
    }
}

struct ResBlock<B: Backend> {
    norm1: Norm<B>,
    conv1: Conv<B>,
    norm2: Norm<B>,
    conv2: Conv<B>,
    skip: Option<Conv<B>>,
}

impl<B: Backend> ResBlock<B> {
    fn fwd(&self, be: &B, g: Gn, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        let h = self.conv1.fwd(be, &self.norm1.fwd(be, g, x, true)?)?;
        let mut h = self.conv2.fwd(be, &self.norm2.fwd(be, g, &h, true)?)?;
        match &self.skip {
            Some(s) => {
                let s = s.fwd(be, x)?;
                be.lincomb_inplace(&mut h, 1.0, &[(1.0, &s)])?;
            }
            None => be.lincomb_inplace(&mut h, 1.0, &[(1.0, x)])?,
        }
        Ok(h)
    }
}

struct Attn<B: Backend> {
    norm: Norm<B>,
    q: Conv<B>,
    k: Conv<B>,
    v: Conv<B>,
    proj: Conv<B>,
}

impl<B: Backend> Attn<B> {
    fn fwd(&self, be: &B, g: Gn, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        let h = self.norm.fwd(be, g, x, false)?;
        let (q, k, v) = (
            self.q.fwd(be, &h)?,
            self.k.fwd(be, &h)?,
            self.v.fwd(be, &h)?,
        );
        let c = x.shape()[1];
        let a = be.attention_nchw(&q, &k, &v, 1.0 / (c as f64).sqrt())?;
        let mut out = self.proj.fwd(be, &a)?;
        be.lincomb_inplace(&mut out, 1.0, &[(1.0, x)])?;
        Ok(out)
    }
}

struct Level<B: Backend> {
    blocks: Vec<ResBlock<B>>,
    resample: Option<Conv<B>>,
}

struct Encoder<B: Backend> {
    conv_in: Conv<B>,
    levels: Vec<Level<B>>,
    mid1: ResBlock<B>,
    attn: Attn<B>,
    mid2: ResBlock<B>,
    norm_out: Norm<B>,
    conv_out: Conv<B>,
}

struct Decoder<B: Backend> {
    conv_in: Conv<B>,
    mid1: ResBlock<B>,
    attn: Attn<B>,
    mid2: ResBlock<B>,
    /// Indexed by level; run from the last to the first.
    levels: Vec<Level<B>>,
    norm_out: Norm<B>,
    conv_out: Conv<B>,
}

/// A callback that sees named intermediate activations (names as in the reference goldens,
/// e.g. `enc.down.0`, `dec.mid`).
pub type Trace<'a, B> = &'a mut dyn FnMut(&str, &Tensor<B>);

/// What the encoder produces for one image batch.
#[derive(Debug)]
pub struct Encoded<B: Backend> {
    /// Mean of the diagonal Gaussian `[N, z, h, w]` (unscaled).
    pub mean: Tensor<B>,
    /// Log-variance `[N, z, h, w]`.
    pub logvar: Tensor<B>,
}

/// The autoencoder on backend `B`.
pub struct Vae<B: Backend> {
    cfg: VaeConfig,
    enc: Encoder<B>,
    dec: Decoder<B>,
}

impl<B: Backend> std::fmt::Debug for Vae<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Vae<B> {
    /// Builds the network from `src` (`encoder.*`/`decoder.*`, optionally under `vae.` or
    /// `first_stage_model.`), checking every tensor's presence and shape.
    pub fn load(cfg: VaeConfig, src: &mut dyn TensorSource<B>) -> Result<Self, NetError> {
        cfg.validate()?;
        let prefix = detect_prefix(src, &PREFIXES, "encoder.conv_in.weight").unwrap_or("");
        let mut ld = Loader { src, prefix };
        let levels = cfg.ch_mult.len();
        let top = cfg.ch * cfg.ch_mult[levels - 1];
        let down = Conv2dParams {
            stride: 2,
            padding: [0, 1, 0, 1],
        };
        let same = Conv2dParams::same(1);

        let conv_in = ld.conv("encoder.conv_in", cfg.ch, cfg.in_channels, 3, same)?;
        let mut enc_levels = Vec::with_capacity(levels);
        let mut cin = cfg.ch;
        for l in 0..levels {
            let cout = cfg.ch * cfg.ch_mult[l];
            let mut blocks = Vec::new();
            for b in 0..cfg.num_res_blocks {
                blocks.push(ld.res(&format!("encoder.down.{l}.block.{b}"), cin, cout)?);
                cin = cout;
            }
            let resample = if l + 1 == levels {
                None
            } else {
                Some(ld.conv(
                    &format!("encoder.down.{l}.downsample.conv"),
                    cin,
                    cin,
                    3,
                    down,
                )?)
            };
            enc_levels.push(Level { blocks, resample });
        }
        let enc = Encoder {
            conv_in,
            levels: enc_levels,
            mid1: ld.res("encoder.mid.block_1", top, top)?,
            attn: ld.attn("encoder.mid.attn_1", top)?,
            mid2: ld.res("encoder.mid.block_2", top, top)?,
            norm_out: ld.norm("encoder.norm_out", top)?,
            conv_out: ld.conv("encoder.conv_out", 2 * cfg.z_channels, top, 3, same)?,
        };

        let conv_in = ld.conv("decoder.conv_in", top, cfg.z_channels, 3, same)?;
        let mid1 = ld.res("decoder.mid.block_1", top, top)?;
        let attn = ld.attn("decoder.mid.attn_1", top)?;
        let mid2 = ld.res("decoder.mid.block_2", top, top)?;
        let mut dec_levels: Vec<Option<Level<B>>> = (0..levels).map(|_| None).collect();
        let mut cin = top;
        for l in (0..levels).rev() {
            let cout = cfg.ch * cfg.ch_mult[l];
            let mut blocks = Vec::new();
            for b in 0..=cfg.num_res_blocks {
                blocks.push(ld.res(&format!("decoder.up.{l}.block.{b}"), cin, cout)?);
                cin = cout;
            }
            let resample = if l == 0 {
                None
            } else {
                Some(ld.conv(&format!("decoder.up.{l}.upsample.conv"), cin, cin, 3, same)?)
            };
            dec_levels[l] = Some(Level { blocks, resample });
        }
        let dec = Decoder {
            conv_in,
            mid1,
            attn,
            mid2,
            levels: dec_levels.into_iter().flatten().collect(),
            norm_out: ld.norm("decoder.norm_out", cfg.ch)?,
            conv_out: ld.conv("decoder.conv_out", cfg.out_ch, cfg.ch, 3, same)?,
        };
        Ok(Self { cfg, enc, dec })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    fn gn(&self) -> Gn {
        Gn {
            groups: self.cfg.groups,
            eps: self.cfg.eps,
        }
    }

    fn check_image(&self, x: &Tensor<B>) -> Result<(), NetError> {
        match *x.shape() {
            [_, c, h, w] if c == self.cfg.in_channels && h > 0 && w > 0 => Ok(()),
            ref s => Err(NetError::Invalid(format!(
                "autoencoder input must be [N, {}, H, W] with H, W > 0, found {s:?}",
                self.cfg.in_channels
            ))),
        }
    }

    /// The latent's height and width, after checking its shape.
    pub(crate) fn check_latent(&self, z: &Tensor<B>) -> Result<(usize, usize), NetError> {
        match *z.shape() {
            [_, c, h, w] if c == self.cfg.z_channels && h > 0 && w > 0 => Ok((h, w)),
            ref s => Err(NetError::Invalid(format!(
                "latent must be [N, {}, h, w] with h, w > 0, found {s:?}",
                self.cfg.z_channels
            ))),
        }
    }

    /// The raw encoder output (`2 * z_channels` moments), reporting intermediates to `trace`.
    pub fn encode_moments(
        &self,
        be: &B,
        x: &Tensor<B>,
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B>, NetError> {
        self.check_image(x)?;
        let g = self.gn();
        let e = &self.enc;
        let mut h = e.conv_in.fwd(be, x)?;
        trace("enc.conv_in", &h);
        for (l, lvl) in e.levels.iter().enumerate() {
            for b in &lvl.blocks {
                h = b.fwd(be, g, &h)?;
            }
            if let Some(d) = &lvl.resample {
                h = d.fwd(be, &h)?;
            }
            trace(&format!("enc.down.{l}"), &h);
        }
        h = e.mid1.fwd(be, g, &h)?;
        h = e.attn.fwd(be, g, &h)?;
        trace("enc.mid.attn_1", &h);
        h = e.mid2.fwd(be, g, &h)?;
        trace("enc.mid", &h);
        let h = e.norm_out.fwd(be, g, &h, true)?;
        let m = e.conv_out.fwd(be, &h)?;
        trace("enc.moments", &m);
        Ok(m)
    }

    /// Encodes an image `[N, 3, H, W]` (values in [-1, 1]) to the Gaussian's mean and log-variance.
    pub fn encode_dist(
        &self,
        be: &B,
        x: &Tensor<B>,
        trace: Trace<'_, B>,
    ) -> Result<Encoded<B>, NetError> {
        let m = self.encode_moments(be, x, trace)?;
        let z = self.cfg.z_channels;
        Ok(Encoded {
            mean: be.narrow_channels(&m, 0, z)?,
            logvar: be.narrow_channels(&m, z, z)?,
        })
    }

    /// `scale * (z - shift)`: from the encoder's space to the latent the transformer sees.
    pub fn scale_latent(&self, be: &B, z: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        affine(
            be,
            z,
            self.cfg.scale_factor,
            -self.cfg.scale_factor * self.cfg.shift_factor,
        )
    }

    /// `z / scale + shift`: the inverse of [`Vae::scale_latent`].
    pub fn unscale_latent(&self, be: &B, z: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        affine(be, z, 1.0 / self.cfg.scale_factor, self.cfg.shift_factor)
    }

    /// Encodes an image to the scaled latent (the reference `ae.encode`: the Gaussian's mean).
    pub fn encode(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        let mean = self.encode_mean(be, x)?;
        self.scale_latent(be, &mean)
    }

    /// The Gaussian's mean (unscaled). Where the backend's activation limit
    /// ([`flux_kernels::ModelOps::max_activation_bytes`]) is below the network's widest
    /// activation at this size, the encoder runs over tiles that keep within it
    /// ([`VaeConfig::tiles_within`]); the result is the untiled one up to rounding.
    pub fn encode_mean(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        self.check_image(x)?;
        let f = self.cfg.downsample_factor();
        let (lh, lw) = (x.shape()[2].div_ceil(f), x.shape()[3].div_ceil(f));
        match self
            .cfg
            .tiles_within(be.max_activation_bytes(), x.dtype().size_in_bytes(), lh, lw)
        {
            Some(tiles) => self.encode_mean_tiled(be, x, tiles),
            None => Ok(self.encode_dist(be, x, &mut |_, _| {})?.mean),
        }
    }

    /// Decodes an unscaled latent `[N, z, h, w]` through the decoder network. Over the
    /// backend's activation limit it runs over tiles, as [`Vae::encode_mean`] does; `trace`
    /// then sees no intermediates.
    pub fn decode_unscaled(
        &self,
        be: &B,
        z: &Tensor<B>,
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B>, NetError> {
        let (lh, lw) = self.check_latent(z)?;
        if let Some(tiles) =
            self.cfg
                .tiles_within(be.max_activation_bytes(), z.dtype().size_in_bytes(), lh, lw)
        {
            return self.decode_unscaled_tiled(be, z, tiles);
        }
        self.decode_whole(be, z, trace)
    }

    /// [`Vae::decode_unscaled`] in one piece.
    pub(crate) fn decode_whole(
        &self,
        be: &B,
        z: &Tensor<B>,
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B>, NetError> {
        self.check_latent(z)?;
        let g = self.gn();
        let d = &self.dec;
        let mut h = d.conv_in.fwd(be, z)?;
        trace("dec.conv_in", &h);
        h = d.mid1.fwd(be, g, &h)?;
        h = d.attn.fwd(be, g, &h)?;
        trace("dec.mid.attn_1", &h);
        h = d.mid2.fwd(be, g, &h)?;
        trace("dec.mid", &h);
        for (l, lvl) in d.levels.iter().enumerate().rev() {
            for b in &lvl.blocks {
                h = b.fwd(be, g, &h)?;
            }
            if let Some(u) = &lvl.resample {
                h = u.fwd(be, &be.upsample_nearest2x(&h)?)?;
            }
            trace(&format!("dec.up.{l}"), &h);
        }
        let h = d.norm_out.fwd(be, g, &h, true)?;
        d.conv_out.fwd(be, &h)
    }

    /// Decodes a scaled latent to an image (not clamped), reporting intermediates to `trace`.
    pub fn decode_traced(
        &self,
        be: &B,
        z: &Tensor<B>,
        trace: Trace<'_, B>,
    ) -> Result<Tensor<B>, NetError> {
        let u = self.unscale_latent(be, z)?;
        trace("dec.z_unscaled", &u);
        self.decode_unscaled(be, &u, trace)
    }

    /// Decodes a scaled latent `[N, z, h, w]` to an image `[N, 3, 8h, 8w]` (not clamped).
    pub fn decode(&self, be: &B, z: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        self.decode_traced(be, z, &mut |_, _| {})
    }
}

fn affine<B: Backend>(be: &B, x: &Tensor<B>, mul: f64, add: f64) -> Result<Tensor<B>, NetError> {
    // Latents are small: the scaling runs on the host in f64 and rounds once.
    let v: Vec<f64> = be
        .download_f64(x)?
        .into_iter()
        .map(|z| z * mul + add)
        .collect();
    Ok(be.upload(HostData::F64(&v), x.shape(), x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_source::{MapSource, random_source};
    use flux_kernels::{Cpu, DType, SamplerOps};
    use proptest::prelude::*;

    #[test]
    fn tiles_are_chosen_only_over_the_limit_and_shrink_with_it() {
        let cfg = VaeConfig::flux();
        // 1024x1024 in f32: 512 channels of 1024^2 would be 2 GiB.
        assert_eq!(cfg.tiles_within(usize::MAX, 4, 128, 128), None);
        assert_eq!(cfg.tiles_within(2 << 30, 4, 128, 128), None);
        let mut last = usize::MAX;
        for mib in [1024usize, 512, 128, 16, 1] {
            let t = cfg
                .tiles_within(mib << 20, 4, 128, 128)
                .expect("over the limit")
                .tile;
            assert!((1..128).contains(&t) && t <= last, "{mib} MiB: tile {t}");
            // The widest full-resolution tile with its halo fits (or the tile is the smallest).
            let side = 8 * t + 8;
            assert!(
                t == 1 || 512 * side * side * 4 <= mib << 20,
                "{mib} MiB: tile {t}"
            );
            last = t;
        }
        // f64 elements halve the area that fits.
        let t32 = cfg.tiles_within(128 << 20, 4, 128, 128).map(|t| t.tile);
        let t64 = cfg.tiles_within(128 << 20, 8, 128, 128).map(|t| t.tile);
        assert!(t64 < t32, "{t64:?} vs {t32:?}");
    }

    fn tiny() -> VaeConfig {
        VaeConfig {
            ch: 8,
            ch_mult: vec![1, 1, 2, 2],
            num_res_blocks: 1,
            groups: 4,
            ..VaeConfig::flux()
        }
    }

    fn vae(cfg: &VaeConfig) -> Vae<Cpu> {
        let mut src = random_source(&Cpu, &cfg.weight_shapes(), 7, DType::F32).unwrap();
        Vae::load(cfg.clone(), &mut src).unwrap()
    }

    fn image(h: usize, w: usize) -> Tensor<Cpu> {
        // A smooth image, like photographs are at the tile scale.
        let v: Vec<f64> = (0..3 * h * w)
            .map(|i| {
                let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
                ((x as f64 * 0.11 + c as f64).sin() * (y as f64 * 0.07).cos()) * 0.8
            })
            .collect();
        Cpu.upload(HostData::F64(&v), &[1, 3, h, w], DType::F32)
            .unwrap()
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let cfg = tiny();
        let mut src = random_source(&Cpu, &cfg.weight_shapes(), 1, DType::F32).unwrap();
        src.take("decoder.conv_out.bias");
        let err = Vae::load(cfg.clone(), &mut src).unwrap_err().to_string();
        assert!(err.contains("decoder.conv_out.bias"), "{err}");
        let mut src = random_source(&Cpu, &cfg.weight_shapes(), 1, DType::F32).unwrap();
        src.insert(
            "encoder.conv_in.weight",
            Cpu.zeros(&[8, 4, 3, 3], DType::F32).unwrap(),
        );
        let err = Vae::load(cfg, &mut src).unwrap_err().to_string();
        assert!(
            err.contains("encoder.conv_in.weight") && err.contains("[8, 3, 3, 3]"),
            "{err}"
        );
        let mut empty = MapSource::<Cpu>::new();
        assert!(Vae::load(tiny(), &mut empty).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]

        #[test]
        fn encode_decode_shapes(h in 1usize..5, w in 1usize..5) {
            let v = vae(&tiny());
            let f = tiny().downsample_factor();
            let x = image(h * f, w * f);
            let z = v.encode(&Cpu, &x).unwrap();
            prop_assert_eq!(z.shape(), &[1, 16, h, w]);
            let y = v.decode(&Cpu, &z).unwrap();
            prop_assert_eq!(y.shape(), &[1, 3, h * f, w * f]);
        }
    }
}
