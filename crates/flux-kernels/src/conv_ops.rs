//! Convolution-family ops: what the autoencoder needs beyond the transformer's ops (conv2d,
//! group norm, nearest upsampling, channel-major attention, channel and spatial slices).
//!
//! Image tensors are NCHW; conv weights are `[out, in, kh, kw]` as stored in the checkpoints.
//! Weights may be stored in any dtype the backend holds; compute happens in the input's dtype.

use crate::{Backend, DType, HostData, KernelError, Result, SamplerOps, Tensor};

pub use crate::shapes::{check_stats_len, group_layout};

/// Stride and zero padding of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Step between output pixels, in input pixels (both axes).
    pub stride: usize,
    /// Zero padding `[top, bottom, left, right]`; asymmetric padding is allowed.
    pub padding: [usize; 4],
}

impl Conv2dParams {
    /// Stride 1 with `p` zeros on every side (`p = k/2` keeps the size for odd kernels `k`).
    pub const fn same(p: usize) -> Self {
        Self {
            stride: 1,
            padding: [p; 4],
        }
    }

    /// Output height and width for an input of `h x w` and a `kh x kw` kernel, if non-empty.
    pub fn output_hw(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let [t, b, l, r] = self.padding;
        let ph = h + t + b;
        let pw = w + l + r;
        if self.stride == 0 || ph < kh || pw < kw {
            return None;
        }
        Some(((ph - kh) / self.stride + 1, (pw - kw) / self.stride + 1))
    }
}

/// Per-(image, group) moments of an `[N, C, ...]` tensor whose channels are split into
/// contiguous groups: what a group norm normalises with, kept as count, mean and sum of squared
/// deviations so that the moments of spatial pieces of an image merge exactly (Chan et al.'s
/// pairwise update) into the moments of the whole image.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupMoments {
    /// Elements per group (the same for every image and group).
    pub count: f64,
    /// Mean per `(image, group)`, image-major: `[N * groups]`.
    pub mean: Vec<f64>,
    /// Sum of squared deviations from the mean per `(image, group)`.
    pub m2: Vec<f64>,
}

impl GroupMoments {
    /// Moments of nothing, for `images * groups` groups: the neutral element of [`Self::merge`].
    pub fn empty(images: usize, groups: usize) -> Self {
        Self {
            count: 0.0,
            mean: vec![0.0; images * groups],
            m2: vec![0.0; images * groups],
        }
    }

    /// Moments of host values `x` of shape `[N, C, ...]` over `groups` channel groups
    /// (two passes in f64 per group).
    pub fn of_host(x: &[f64], shape: &[usize], groups: usize) -> Result<Self> {
        const OP: &str = "group_moments";
        let (n, c, spatial) = group_layout(OP, shape, groups)?;
        if x.len() != n * c * spatial {
            return Err(KernelError::LengthMismatch {
                op: OP,
                expected: n * c * spatial,
                found: x.len(),
            });
        }
        let glen = c / groups * spatial;
        let mut m = Self::empty(n, groups);
        m.count = glen as f64;
        if glen == 0 {
            return Ok(m);
        }
        for (k, grp) in x.chunks_exact(glen).enumerate() {
            let mean = grp.iter().sum::<f64>() / glen as f64;
            m.mean[k] = mean;
            m.m2[k] = grp.iter().map(|v| (v - mean) * (v - mean)).sum();
        }
        Ok(m)
    }

    /// Adds the moments of another, disjoint piece of the same images (same image and group
    /// counts).
    pub fn merge(&mut self, other: &Self) -> Result<()> {
        if other.mean.len() != self.mean.len() || other.m2.len() != self.m2.len() {
            return Err(KernelError::InvalidArgument {
                op: "group_moments",
                message: format!(
                    "cannot merge moments of {} groups into moments of {} groups",
                    other.mean.len(),
                    self.mean.len()
                ),
            });
        }
        let (na, nb) = (self.count, other.count);
        let n = na + nb;
        if nb == 0.0 {
            return Ok(());
        }
        for k in 0..self.mean.len() {
            let delta = other.mean[k] - self.mean[k];
            self.mean[k] += delta * (nb / n);
            self.m2[k] += other.m2[k] + delta * delta * (na * nb / n);
        }
        self.count = n;
        Ok(())
    }

    /// Mean and `1 / sqrt(var + eps)` (biased variance, as a group norm uses) per
    /// `(image, group)`.
    pub fn mean_rstd(&self, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let rstd = self
            .m2
            .iter()
            .map(|m2| 1.0 / (m2 / self.count.max(1.0) + eps).sqrt())
            .collect();
        (self.mean.clone(), rstd)
    }
}

/// Epsilon of the per-piece group norm inside [`group_norm_with_stats_composed`]; any positive
/// value works (it cancels), it only keeps a constant piece finite.
const COMPOSED_EPS: f64 = 1e-6;

/// [`ConvOps::group_norm_with_stats`] built from [`ConvOps::group_norm`] and
/// [`ConvOps::group_moments`]: a group norm with the piece's own statistics `(m_l, r_l)` and the
/// affine `w' = w r / r_l`, `b' = b + w (m_l - m) r`, which gives `(x - m) r w + b` for the given
/// statistics `(m, r)`. The default for backends without a dedicated kernel.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with_stats_composed<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    groups: usize,
    mean: &[f64],
    rstd: &[f64],
    weight: Option<&Tensor<B>>,
    bias: Option<&Tensor<B>>,
    swish: bool,
) -> Result<Tensor<B>> {
    const OP: &str = "group_norm_with_stats";
    let (n, c, _) = group_layout(OP, x.shape(), groups)?;
    check_stats_len(OP, n * groups, mean, rstd)?;
    let param = |t: Option<&Tensor<B>>, what: &str, fill: f64| -> Result<Vec<f64>> {
        let v = match t {
            Some(t) => be.download_f64(t)?,
            None => vec![fill; c],
        };
        if v.len() != c {
            return Err(KernelError::InvalidArgument {
                op: OP,
                message: format!("{what} has {} values, expected {c}", v.len()),
            });
        }
        Ok(v)
    };
    let w = param(weight, "weight", 1.0)?;
    let b = param(bias, "bias", 0.0)?;
    if x.numel() == 0 {
        return be.copy(x);
    }
    let cpg = c / groups;
    let mut parts = Vec::with_capacity(n);
    for i in 0..n {
        let own = if n == 1 {
            None
        } else {
            Some(be.narrow(x, 0, i, 1)?)
        };
        let xi = own.as_ref().unwrap_or(x);
        let (lm, lr) = be.group_moments(xi, groups)?.mean_rstd(COMPOSED_EPS);
        let mut wv = vec![0.0; c];
        let mut bv = vec![0.0; c];
        for ch in 0..c {
            let g = ch / cpg;
            let (m, r) = (mean[i * groups + g], rstd[i * groups + g]);
            wv[ch] = w[ch] * r / lr[g];
            bv[ch] = b[ch] + w[ch] * (lm[g] - m) * r;
        }
        let dt: DType = x.dtype();
        let wt = be.upload(HostData::F64(&wv), &[c], dt)?;
        let bt = be.upload(HostData::F64(&bv), &[c], dt)?;
        parts.push(be.group_norm(xi, groups, COMPOSED_EPS, Some(&wt), Some(&bt), swish)?);
    }
    if n == 1
        && let Some(p) = parts.pop()
    {
        return Ok(p);
    }
    let refs: Vec<&Tensor<B>> = parts.iter().collect();
    be.concat(&refs, 0)
}

/// Convolution-family ops (NCHW image tensors).
pub trait ConvOps: SamplerOps {
    /// 2-D convolution of `x` `[N, C, H, W]` with `weight` `[O, C, kh, kw]` and optional `bias`
    /// `[O]`, giving `[N, O, OH, OW]`.
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        params: Conv2dParams,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Group normalisation of `x` `[N, C, ...]` over `groups` contiguous channel ranges (biased
    /// variance, `eps` inside the square root), then the per-channel affine `weight`, `bias`
    /// `[C]`, then swish when `swish` is set.
    fn group_norm(
        &self,
        x: &Tensor<Self>,
        groups: usize,
        eps: f64,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        swish: bool,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Moments per image and group of `groups` contiguous channels of `x` `[N, C, ...]`, for
    /// group norms whose statistics span several tensors (a tiled image). The default reads `x`
    /// back to the host; a backend may reduce on the device instead.
    fn group_moments(&self, x: &Tensor<Self>, groups: usize) -> Result<GroupMoments>
    where
        Self: Backend,
    {
        GroupMoments::of_host(&self.download_f64(x)?, x.shape(), groups)
    }

    /// [`ConvOps::group_norm`] with caller-given statistics: `(x - mean) * rstd` per image and
    /// group (`mean`, `rstd` `[N * groups]`, image-major), then the affine and swish. The default
    /// is [`group_norm_with_stats_composed`].
    #[allow(clippy::too_many_arguments)]
    fn group_norm_with_stats(
        &self,
        x: &Tensor<Self>,
        groups: usize,
        mean: &[f64],
        rstd: &[f64],
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        swish: bool,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        group_norm_with_stats_composed(self, x, groups, mean, rstd, weight, bias, swish)
    }

    /// Nearest-neighbour upsampling by 2 along both spatial axes: `[N, C, H, W] -> [N, C, 2H, 2W]`.
    fn upsample_nearest2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Single-head attention over pixels in channel-major layout: `q`, `k`, `v` are
    /// `[N, C, H, W]` (tokens = pixels in row-major order, features = channels); the result
    /// `[N, C, H, W]` holds `softmax(q^T k * scale) v^T` per image, transposed back.
    fn attention_nchw(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        scale: f64,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Channels `start .. start + len` of `x` `[N, C, ...]`.
    fn narrow_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// The spatial window `rows y0 .. y0 + h`, `cols x0 .. x0 + w` of `x` `[N, C, H, W]`.
    fn crop2d(
        &self,
        x: &Tensor<Self>,
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;
}

/// A deterministic pseudo-random sequence in [-1, 1) (SplitMix64), for tests.
#[cfg(test)]
pub(crate) fn splitmix_values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    /// Deterministic values in [-1, 1) with a per-channel offset, so groups differ in mean.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        splitmix_values(n, seed)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v + (i % 7) as f64 * 0.3)
            .collect()
    }

    /// Group mean and biased variance from the definition.
    fn direct(x: &[f64], n: usize, groups: usize) -> (Vec<f64>, Vec<f64>) {
        let glen = x.len() / (n * groups);
        x.chunks(glen)
            .map(|g| {
                let m = g.iter().sum::<f64>() / glen as f64;
                (
                    m,
                    g.iter().map(|v| (v - m).powi(2)).sum::<f64>() / glen as f64,
                )
            })
            .unzip()
    }

    /// Columns `x0 .. x0 + w` of an `[N, C, H, W]` host array.
    fn columns(x: &[f64], [n, c, h, wd]: [usize; 4], x0: usize, w: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for p in 0..n * c {
            for y in 0..h {
                let o = (p * h + y) * wd + x0;
                out.extend_from_slice(&x[o..o + w]);
            }
        }
        out
    }

    #[test]
    fn moments_of_pieces_merge_into_the_whole() {
        let shape = [2, 6, 4, 9];
        let x = values(shape.iter().product(), 1);
        let (mean, var) = direct(&x, 2, 3);
        let mut m = GroupMoments::empty(2, 3);
        for (x0, w) in [(0, 2), (2, 4), (6, 3)] {
            let piece = columns(&x, shape, x0, w);
            m.merge(&GroupMoments::of_host(&piece, &[2, 6, 4, w], 3).unwrap())
                .unwrap();
        }
        assert_eq!(m.count, 2.0 * 4.0 * 9.0);
        let (got_mean, rstd) = m.mean_rstd(0.0);
        for k in 0..6 {
            assert!((got_mean[k] - mean[k]).abs() < 1e-14, "{k}");
            assert!((1.0 / rstd[k].powi(2) - var[k]).abs() < 1e-13, "{k}");
        }
        let other = GroupMoments::empty(2, 4);
        assert!(m.merge(&other).is_err());
        assert!(GroupMoments::of_host(&x, &[2, 6, 4, 9], 4).is_err());
        assert!(GroupMoments::of_host(&x[1..], &[2, 6, 4, 9], 3).is_err());
    }

    #[test]
    fn composed_group_norm_with_stats_uses_the_given_statistics() {
        // A crop normalised with the whole image's statistics equals the crop of the whole
        // image's group norm, for the composed default as for the CPU kernel.
        let shape = [2, 6, 5, 8];
        let x = values(shape.iter().product(), 2);
        let wt = values(6, 3);
        let b = values(6, 4);
        for dtype in [DType::F64, DType::F32] {
            let up = |v: &[f64], s: &[usize]| Cpu.upload(HostData::F64(v), s, dtype).unwrap();
            let (xt, wt_t, bt) = (up(&x, &shape), up(&wt, &[6]), up(&b, &[6]));
            let eps = 1e-6;
            for swish in [false, true] {
                let whole = Cpu
                    .group_norm(&xt, 3, eps, Some(&wt_t), Some(&bt), swish)
                    .unwrap();
                let want = Cpu
                    .download_f64(&Cpu.crop2d(&whole, 0, 3, 5, 4).unwrap())
                    .unwrap();
                let (mean, rstd) = Cpu.group_moments(&xt, 3).unwrap().mean_rstd(eps);
                let crop = up(&columns(&x, shape, 3, 4), &[2, 6, 5, 4]);
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
                for got in [
                    group_norm_with_stats_composed(
                        &Cpu,
                        &crop,
                        3,
                        &mean,
                        &rstd,
                        Some(&wt_t),
                        Some(&bt),
                        swish,
                    )
                    .unwrap(),
                    Cpu.group_norm_with_stats(
                        &crop,
                        3,
                        &mean,
                        &rstd,
                        Some(&wt_t),
                        Some(&bt),
                        swish,
                    )
                    .unwrap(),
                ] {
                    let got = Cpu.download_f64(&got).unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= tol * (1.0 + w.abs()),
                            "{dtype:?} [{i}] {g} vs {w}"
                        );
                    }
                }
            }
            // Wrong statistics lengths are refused by both.
            let crop = up(&columns(&x, shape, 0, 2), &[2, 6, 5, 2]);
            let short = [0.0; 5];
            assert!(
                group_norm_with_stats_composed(&Cpu, &crop, 3, &short, &short, None, None, false)
                    .is_err()
            );
            assert!(
                Cpu.group_norm_with_stats(&crop, 3, &short, &short, None, None, false)
                    .is_err()
            );
        }
    }
}
