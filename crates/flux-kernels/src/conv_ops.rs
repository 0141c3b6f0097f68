//! Convolution-family ops: what the autoencoder needs beyond the transformer's ops (conv2d,
//! group norm, nearest upsampling, channel-major attention, channel and spatial slices).
//!
//! Image tensors are NCHW; conv weights are `[out, in, kh, kw]` as stored in the checkpoints.
//! Weights may be stored in any dtype the backend holds; compute happens in the input's dtype.

use crate::{Backend, Result, SamplerOps, Tensor};

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
