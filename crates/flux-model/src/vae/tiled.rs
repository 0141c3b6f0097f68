//! Tiled encode/decode that reproduces the untiled autoencoder.
//!
//! The network runs layer by layer over a grid of spatial tiles that partition the activation.
//! A convolution of a tile reads the tile plus the halo its kernel needs from the neighbouring
//! tiles (and the network's zero padding only at the image border), so every tile's output is
//! exactly the untiled output there. Every group norm uses the statistics of the whole image:
//! the per-tile moments are merged (count, mean and sum of squared deviations, in f64) before any
//! tile is normalised. The single-head attention in the middle mixes every latent pixel with every
//! other one, so it runs on the whole latent-resolution activation; the backend's attention
//! bounds its score buffer itself.
//!
//! Against the untiled encoder and decoder (tiny configuration, random weights, several sizes and
//! tile sizes, `tests/vae_tiled.rs`): rel_l2 about 5e-15 in f64 and 5e-7 in f32, asserted below
//! 1e-12 and 2e-6.
//!
//! What stays bounded by the tile: the normalised and halo-padded copies a convolution reads,
//! the convolution's own buffers, and the output of one tile before it joins the grid. What does
//! not: the activations between layers (held as tiles), and the attention's input at latent
//! resolution.

use super::{Attn, Conv, Gn, Norm, ResBlock, Vae};
use crate::tensor_source::NetError;
use flux_kernels::{Backend, Conv2dParams, GroupMoments, Tensor};

/// Tile geometry for [`Vae::encode_tiled`] / [`Vae::decode_tiled`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    /// Tile side in latent pixels; an image tile is `downsample_factor()` times larger. Tiles
    /// partition the image (the last row and column of tiles may be smaller).
    pub tile: usize,
}

impl Default for TileConfig {
    fn default() -> Self {
        // 512x512 image tiles.
        Self { tile: 64 }
    }
}

/// An activation held as spatial tiles: tile `(i, j)` covers rows `rows[i] .. rows[i + 1]` and
/// columns `cols[j] .. cols[j + 1]`; tiles are stored row-major.
struct Grid<B: Backend> {
    rows: Vec<usize>,
    cols: Vec<usize>,
    tiles: Vec<Tensor<B>>,
}

/// Tile boundaries along one axis: `0`, the interior `cuts` (latent pixels) times `scale`, and
/// `size`.
fn bounds(cuts: &[usize], scale: usize, size: usize) -> Vec<usize> {
    let mut v = vec![0];
    v.extend(
        cuts.iter()
            .map(|c| c * scale)
            .filter(|&c| c > 0 && c < size),
    );
    v.push(size);
    v
}

/// Interior cuts every `tile` latent pixels along an axis of `len` latent pixels.
fn cuts(len: usize, tile: usize) -> Vec<usize> {
    (1..len.div_ceil(tile)).map(|i| i * tile).collect()
}

impl<B: Backend> Grid<B> {
    /// A grid of one tile holding `x` `[N, C, H, W]`.
    fn whole(x: Tensor<B>) -> Self {
        let (h, w) = (x.shape()[2], x.shape()[3]);
        Self {
            rows: vec![0, h],
            cols: vec![0, w],
            tiles: vec![x],
        }
    }

    fn height(&self) -> usize {
        self.rows.last().copied().unwrap_or(0)
    }

    fn width(&self) -> usize {
        self.cols.last().copied().unwrap_or(0)
    }

    /// `x` `[N, C, H, W]` cut along the given boundaries.
    fn split(be: &B, x: &Tensor<B>, rows: Vec<usize>, cols: Vec<usize>) -> Result<Self, NetError> {
        let mut tiles = Vec::with_capacity((rows.len() - 1) * (cols.len() - 1));
        for r in rows.windows(2) {
            for c in cols.windows(2) {
                tiles.push(be.crop2d(x, r[0], c[0], r[1] - r[0], c[1] - c[0])?);
            }
        }
        Ok(Self { rows, cols, tiles })
    }

    /// A copy of rows `ys[0] .. ys[1]`, columns `xs[0] .. xs[1]` (inside the grid), assembled from
    /// the tiles it overlaps.
    fn window(&self, be: &B, ys: [usize; 2], xs: [usize; 2]) -> Result<Tensor<B>, NetError> {
        let nc = self.cols.len() - 1;
        let mut bands = Vec::new();
        for (i, r) in self.rows.windows(2).enumerate() {
            let (y0, y1) = (ys[0].max(r[0]), ys[1].min(r[1]));
            if y0 >= y1 {
                continue;
            }
            let mut pieces = Vec::new();
            for (j, c) in self.cols.windows(2).enumerate() {
                let (x0, x1) = (xs[0].max(c[0]), xs[1].min(c[1]));
                if x0 >= x1 {
                    continue;
                }
                let t = &self.tiles[i * nc + j];
                pieces.push(be.crop2d(t, y0 - r[0], x0 - c[0], y1 - y0, x1 - x0)?);
            }
            bands.push(concat(be, pieces, 3)?);
        }
        concat(be, bands, 2)
    }

    /// The whole activation as one tensor.
    fn into_full(mut self, be: &B) -> Result<Tensor<B>, NetError> {
        if self.tiles.len() == 1
            && let Some(t) = self.tiles.pop()
        {
            return Ok(t);
        }
        self.window(be, [0, self.height()], [0, self.width()])
    }

    /// Mean and reciprocal standard deviation per image and group over all tiles.
    fn norm_stats(&self, be: &B, g: Gn) -> Result<(Vec<f64>, Vec<f64>), NetError> {
        let n = self.tiles.first().map_or(0, |t| t.shape()[0]);
        let mut m = GroupMoments::empty(n, g.groups);
        for t in &self.tiles {
            m.merge(&be.group_moments(t, g.groups)?)?;
        }
        Ok(m.mean_rstd(g.eps))
    }
}

fn concat<B: Backend>(
    be: &B,
    mut parts: Vec<Tensor<B>>,
    dim: usize,
) -> Result<Tensor<B>, NetError> {
    if parts.len() == 1
        && let Some(t) = parts.pop()
    {
        return Ok(t);
    }
    if parts.is_empty() {
        return Err(NetError::Invalid("tiling: empty window".into()));
    }
    let refs: Vec<&Tensor<B>> = parts.iter().collect();
    Ok(be.concat(&refs, dim)?)
}

/// The input span a convolution reads for output positions `o0 .. o1` along one axis of an input
/// of `size`: the span clipped to the input, and the zero padding to add before and after it.
fn input_span(
    o0: usize,
    o1: usize,
    stride: usize,
    pad_before: usize,
    k: usize,
    size: usize,
) -> (usize, usize, usize, usize) {
    let lo = (o0 * stride) as isize - pad_before as isize;
    let hi = ((o1 - 1) * stride + k) as isize - pad_before as isize;
    let a = lo.clamp(0, size as isize);
    let b = hi.clamp(a, size as isize);
    (a as usize, b as usize, (a - lo) as usize, (hi - b) as usize)
}

/// A group norm (with swish) applied to every window a convolution reads, with whole-image
/// statistics.
struct Pre<'a, B: Backend> {
    norm: &'a Norm<B>,
    groups: usize,
    mean: Vec<f64>,
    rstd: Vec<f64>,
}

impl<B: Backend> Pre<'_, B> {
    fn apply(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>, NetError> {
        Ok(be.group_norm_with_stats(
            x,
            self.groups,
            &self.mean,
            &self.rstd,
            Some(&self.norm.w),
            Some(&self.norm.b),
            true,
        )?)
    }
}

impl<B: Backend> Conv<B> {
    /// Output height and width for an `h x w` input.
    fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize), NetError> {
        let s = self.w.shape();
        self.p.output_hw(h, w, s[2], s[3]).ok_or_else(|| {
            NetError::Invalid(format!(
                "autoencoder: a {h}x{w} activation is too small for its {}x{} convolution",
                s[2], s[3]
            ))
        })
    }

    /// This convolution over a grid, producing a grid with boundaries `rows` x `cols`. With `up`
    /// the input is upsampled 2x (nearest) first; `pre` normalises the input.
    fn grid(
        &self,
        be: &B,
        x: &Grid<B>,
        up: bool,
        pre: Option<&Pre<'_, B>>,
        rows: Vec<usize>,
        cols: Vec<usize>,
    ) -> Result<Grid<B>, NetError> {
        let f = if up { 2 } else { 1 };
        let (h, w) = (x.height() * f, x.width() * f);
        let ks = self.w.shape();
        let (kh, kw) = (ks[2], ks[3]);
        let [pt, _, pl, _] = self.p.padding;
        let st = self.p.stride;
        let mut tiles = Vec::with_capacity((rows.len() - 1) * (cols.len() - 1));
        for r in rows.windows(2) {
            let (y0, y1, top, bottom) = input_span(r[0], r[1], st, pt, kh, h);
            for c in cols.windows(2) {
                let (x0, x1, left, right) = input_span(c[0], c[1], st, pl, kw, w);
                // The window in the grid's own resolution (halved back when upsampling).
                let mut t = x.window(be, [y0 / f, y1.div_ceil(f)], [x0 / f, x1.div_ceil(f)])?;
                if let Some(p) = pre {
                    t = p.apply(be, &t)?;
                }
                if up {
                    let u = be.upsample_nearest2x(&t)?;
                    t = be.crop2d(&u, y0 % 2, x0 % 2, y1 - y0, x1 - x0)?;
                }
                // Zero padding only where the window meets the image border; elsewhere the halo
                // holds the neighbours' values.
                let params = Conv2dParams {
                    stride: st,
                    padding: [top, bottom, left, right],
                };
                let out = be.conv2d(&t, &self.w, Some(&self.b), params)?;
                if out.shape()[2] != r[1] - r[0] || out.shape()[3] != c[1] - c[0] {
                    return Err(NetError::Invalid(format!(
                        "tiling: tile rows {}..{} cols {}..{} came out {:?}",
                        r[0],
                        r[1],
                        c[0],
                        c[1],
                        out.shape()
                    )));
                }
                tiles.push(out);
            }
        }
        Ok(Grid { rows, cols, tiles })
    }
}

impl<B: Backend> ResBlock<B> {
    fn fwd_grid(&self, be: &B, g: Gn, x: &Grid<B>) -> Result<Grid<B>, NetError> {
        let (mean, rstd) = x.norm_stats(be, g)?;
        let pre = Pre {
            norm: &self.norm1,
            groups: g.groups,
            mean,
            rstd,
        };
        let h = self
            .conv1
            .grid(be, x, false, Some(&pre), x.rows.clone(), x.cols.clone())?;
        let (mean, rstd) = h.norm_stats(be, g)?;
        let pre = Pre {
            norm: &self.norm2,
            groups: g.groups,
            mean,
            rstd,
        };
        let mut out = self
            .conv2
            .grid(be, &h, false, Some(&pre), x.rows.clone(), x.cols.clone())?;
        drop(h);
        for (o, xt) in out.tiles.iter_mut().zip(&x.tiles) {
            match &self.skip {
                Some(s) => {
                    let s = s.fwd(be, xt)?;
                    be.lincomb_inplace(o, 1.0, &[(1.0, &s)])?;
                }
                None => be.lincomb_inplace(o, 1.0, &[(1.0, xt)])?,
            }
        }
        Ok(out)
    }
}

impl<B: Backend> Attn<B> {
    /// The attention block on the whole activation (it mixes all pixels), cut back into tiles.
    fn fwd_grid(&self, be: &B, g: Gn, x: Grid<B>) -> Result<Grid<B>, NetError> {
        let (rows, cols) = (x.rows.clone(), x.cols.clone());
        let full = x.into_full(be)?;
        let out = self.fwd(be, g, &full)?;
        drop(full);
        Grid::split(be, &out, rows, cols)
    }
}

fn check_tiles(t: TileConfig) -> Result<usize, NetError> {
    if t.tile == 0 {
        return Err(NetError::Invalid("tile size must be positive".into()));
    }
    Ok(t.tile)
}

impl<B: Backend> Vae<B> {
    /// [`Vae::encode`] over tiles of `tiles.tile` latent pixels (the image cut into squares of
    /// `tile * downsample_factor()` pixels), giving the untiled result up to rounding while the
    /// convolutions' temporaries stay bounded by the tile. Any image size the untiled encoder
    /// takes works.
    pub fn encode_tiled(
        &self,
        be: &B,
        x: &Tensor<B>,
        tiles: TileConfig,
    ) -> Result<Tensor<B>, NetError> {
        let mean = self.encode_mean_tiled(be, x, tiles)?;
        self.scale_latent(be, &mean)
    }

    /// [`Vae::encode_tiled`] before the latent scaling: the Gaussian's mean.
    pub fn encode_mean_tiled(
        &self,
        be: &B,
        x: &Tensor<B>,
        tiles: TileConfig,
    ) -> Result<Tensor<B>, NetError> {
        self.check_image(x)?;
        let tile = check_tiles(tiles)?;
        let g = self.gn();
        let e = &self.enc;
        // Latent size: the image size through every downsampling.
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let (mut lh, mut lw) = e.conv_in.out_hw(h, w)?;
        for d in e.levels.iter().filter_map(|l| l.resample.as_ref()) {
            (lh, lw) = d.out_hw(lh, lw)?;
        }
        if lh <= tile && lw <= tile {
            return Ok(self.encode_dist(be, x, &mut |_, _| {})?.mean);
        }
        let (cy, cx) = (cuts(lh, tile), cuts(lw, tile));
        let mut scale = self.cfg.downsample_factor();
        let image = Grid::whole(be.copy(x)?);
        let (oh, ow) = e.conv_in.out_hw(h, w)?;
        let mut g_h = e.conv_in.grid(
            be,
            &image,
            false,
            None,
            bounds(&cy, scale, oh),
            bounds(&cx, scale, ow),
        )?;
        drop(image);
        for lvl in &e.levels {
            for b in &lvl.blocks {
                g_h = b.fwd_grid(be, g, &g_h)?;
            }
            if let Some(d) = &lvl.resample {
                scale /= 2;
                let (oh, ow) = d.out_hw(g_h.height(), g_h.width())?;
                g_h = d.grid(
                    be,
                    &g_h,
                    false,
                    None,
                    bounds(&cy, scale, oh),
                    bounds(&cx, scale, ow),
                )?;
            }
        }
        g_h = e.mid1.fwd_grid(be, g, &g_h)?;
        g_h = e.attn.fwd_grid(be, g, g_h)?;
        g_h = e.mid2.fwd_grid(be, g, &g_h)?;
        let (mean, rstd) = g_h.norm_stats(be, g)?;
        let pre = Pre {
            norm: &e.norm_out,
            groups: g.groups,
            mean,
            rstd,
        };
        let (rows, cols) = (g_h.rows.clone(), g_h.cols.clone());
        let m = e.conv_out.grid(be, &g_h, false, Some(&pre), rows, cols)?;
        drop(g_h);
        let m = m.into_full(be)?;
        Ok(be.narrow_channels(&m, 0, self.cfg.z_channels)?)
    }

    /// [`Vae::decode`] over latent tiles of `tiles.tile` pixels, giving the untiled result up to
    /// rounding while the convolutions' temporaries stay bounded by the tile.
    pub fn decode_tiled(
        &self,
        be: &B,
        z: &Tensor<B>,
        tiles: TileConfig,
    ) -> Result<Tensor<B>, NetError> {
        self.check_latent(z)?;
        let u = self.unscale_latent(be, z)?;
        self.decode_unscaled_tiled(be, &u, tiles)
    }

    /// [`Vae::decode_tiled`] of a latent already unscaled ([`Vae::unscale_latent`]).
    pub fn decode_unscaled_tiled(
        &self,
        be: &B,
        z: &Tensor<B>,
        tiles: TileConfig,
    ) -> Result<Tensor<B>, NetError> {
        let tile = check_tiles(tiles)?;
        let (lh, lw) = self.check_latent(z)?;
        if lh <= tile && lw <= tile {
            return self.decode_whole(be, z, &mut |_, _| {});
        }
        let g = self.gn();
        let d = &self.dec;
        let (cy, cx) = (cuts(lh, tile), cuts(lw, tile));
        let latent = Grid::whole(be.copy(z)?);
        let mut scale = 1;
        let mut g_h = d.conv_in.grid(
            be,
            &latent,
            false,
            None,
            bounds(&cy, scale, lh),
            bounds(&cx, scale, lw),
        )?;
        drop(latent);
        g_h = d.mid1.fwd_grid(be, g, &g_h)?;
        g_h = d.attn.fwd_grid(be, g, g_h)?;
        g_h = d.mid2.fwd_grid(be, g, &g_h)?;
        for lvl in d.levels.iter().rev() {
            for b in &lvl.blocks {
                g_h = b.fwd_grid(be, g, &g_h)?;
            }
            if let Some(u) = &lvl.resample {
                scale *= 2;
                let (oh, ow) = u.out_hw(2 * g_h.height(), 2 * g_h.width())?;
                g_h = u.grid(
                    be,
                    &g_h,
                    true,
                    None,
                    bounds(&cy, scale, oh),
                    bounds(&cx, scale, ow),
                )?;
            }
        }
        let (mean, rstd) = g_h.norm_stats(be, g)?;
        let pre = Pre {
            norm: &d.norm_out,
            groups: g.groups,
            mean,
            rstd,
        };
        let (rows, cols) = (g_h.rows.clone(), g_h.cols.clone());
        let out = d.conv_out.grid(be, &g_h, false, Some(&pre), rows, cols)?;
        drop(g_h);
        out.into_full(be)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_kernel_and_pad_only_at_the_border() {
        // 3x3, stride 1, padding 1, input 10: interior tile 4..7 reads 3..8 without padding.
        assert_eq!(input_span(4, 7, 1, 1, 3, 10), (3, 8, 0, 0));
        // First and last tiles get the border's zero padding.
        assert_eq!(input_span(0, 4, 1, 1, 3, 10), (0, 5, 1, 0));
        assert_eq!(input_span(7, 10, 1, 1, 3, 10), (6, 10, 0, 1));
        // The stride-2 downsample padded after by one: output 0..3 of input 6 reads 0..6 + 1 pad.
        assert_eq!(input_span(0, 3, 2, 0, 3, 6), (0, 6, 0, 1));
        assert_eq!(input_span(1, 2, 2, 0, 3, 6), (2, 5, 0, 0));
    }

    #[test]
    fn bounds_partition_every_level() {
        assert_eq!(cuts(10, 4), vec![4, 8]);
        assert_eq!(cuts(8, 4), vec![4]);
        assert!(cuts(3, 4).is_empty());
        assert_eq!(bounds(&[4, 8], 2, 20), vec![0, 8, 16, 20]);
        assert_eq!(bounds(&[4, 8], 1, 10), vec![0, 4, 8, 10]);
    }
}
