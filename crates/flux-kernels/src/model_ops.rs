//! Model ops: what the networks (Flux transformer, text encoders, autoencoder) need beyond the
//! sampler ops.
//!
//! Activations are dense, contiguous, row-major tensors of a compute dtype (f32, or f64 on the
//! CPU backend for exact parity). Weights may stay in their stored dtype (f32, f64, bf16, f16,
//! fp8 e4m3fn): ops that take a weight widen it inside the kernel, so memory stays at the stored
//! size. Every op returns a new tensor of the activation's dtype.

use crate::{Backend, DType, KernelError, Result, SamplerOps, Tensor};
use std::sync::Arc;

/// Something that owns bytes (a memory map, a vector) and can be shared between tensors.
pub type ByteOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A range of bytes inside a shared owner: how weights reach a backend without a copy.
#[derive(Clone)]
pub struct ByteView {
    owner: ByteOwner,
    offset: usize,
    len: usize,
}

impl ByteView {
    /// The range `offset..offset + len` of `owner`; fails when it does not lie inside.
    pub fn new(owner: ByteOwner, offset: usize, len: usize) -> Result<Self> {
        let total = (*owner).as_ref().len();
        match offset.checked_add(len) {
            Some(end) if end <= total => Ok(Self { owner, offset, len }),
            _ => Err(KernelError::InvalidArgument {
                op: "byte_view",
                message: format!("range {offset}+{len} lies outside the {total} bytes available"),
            }),
        }
    }

    /// Owns a vector of bytes.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            offset: 0,
            len,
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // In bounds: checked in the constructors, and owners are immutable.
        &(*self.owner).as_ref()[self.offset..self.offset + self.len]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for ByteView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteView")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Pointwise activation functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// GELU with the exact erf.
    GeluErf,
    /// `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// `max(x, 0)`.
    Relu,
}

/// Elementwise binary operations (the second operand may broadcast, see [`ModelOps::binary`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
}

/// The ops the networks need. Shapes are row-major; "batched over leading dims" means every
/// dimension but the last one or two is flattened into a batch.
pub trait ModelOps: SamplerOps {
    /// A weight tensor of `dtype` read from `bytes` (little-endian elements; `scale` multiplies
    /// every element, as fp8 checkpoints store it). The CPU backend keeps the bytes without a copy.
    fn upload_weight(
        &self,
        bytes: ByteView,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// A copy of `x` in the compute dtype `dtype` (f32 or f64); widens weights.
    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// `y = x W^T + b`: `x [..., K]`, `w [N, K]` (any weight dtype), `bias [N]`; output `[..., N]`
    /// in `x`'s dtype.
    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// `act(x W^T + b)`: [`ModelOps::linear`] followed by [`ModelOps::activation`]. Backends
    /// whose GEMM library can apply the activation in the GEMM's epilogue override it to save
    /// the pass over the output.
    fn linear_act(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        act: Activation,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        self.activation(&self.linear(x, w, bias)?, act)
    }

    /// Batched matmul `a [.., M, K] x b [.., K, N]` (or `b [.., N, K]` with `transpose_b`); the
    /// batch dims of `b` are either equal to `a`'s or absent (shared).
    fn matmul(&self, a: &Tensor<Self>, b: &Tensor<Self>, transpose_b: bool) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Layer norm over the last dim with optional affine `weight`/`bias` of that length.
    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// RMS norm over the last dim: `x * rsqrt(mean(x^2) + eps) * scale`.
    fn rms_norm(
        &self,
        x: &Tensor<Self>,
        scale: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// adaLN modulation `(1 + scale) * x + shift`: `x [B, L, C]`, `shift`/`scale` `[B, C]`
    /// broadcast over the `L` tokens.
    fn modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// adaLN on a normalised input: `(1 + scale) * layer_norm(x) + shift`, the layer norm over
    /// the last dim without affine parameters, the shapes those of [`ModelOps::modulate`]. A
    /// backend may do both in one pass over `x`; the default runs the two ops.
    fn layer_norm_modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
        eps: f64,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        let normed = self.layer_norm(x, None, None, eps)?;
        self.modulate(&normed, shift, scale)
    }

    /// Gated residual `x + gate * y`: `x`, `y` `[B, L, C]`, `gate [B, C]` broadcast over tokens.
    fn gated_add(
        &self,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Pointwise activation.
    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// `a op b` where `b` has `a`'s shape or a suffix of it (broadcast over the leading dims).
    fn binary(&self, a: &Tensor<Self>, b: &Tensor<Self>, op: BinaryOp) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// `x * mul + add` with host scalars.
    fn affine(&self, x: &Tensor<Self>, mul: f64, add: f64) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Softmax over the last dim.
    fn softmax(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Rotary embedding on interleaved pairs: `x [B, L, H, D]`, `cos_sin [B or 1, L, D/2, 2]`
    /// holding `(cos, sin)` per pair; pair `j` is elements `(2j, 2j+1)`.
    fn rope(&self, x: &Tensor<Self>, cos_sin: &Tensor<Self>) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Multi-head attention `softmax(scale * q k^T + bias) v` per head, with `q [B, Lq, H, D]`,
    /// `k`, `v` `[B, Lk, H, D]` (token-major, as out of a linear layer), output `[B, Lq, H, D]`.
    /// `scale` defaults to `1/sqrt(D)`; `bias [B or 1, H or 1, Lq, Lk]` is added to the scores
    /// (position bias, causal or padding mask with `-inf`). Never materialises more than a tile
    /// of the score matrix.
    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        scale: Option<f64>,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Concatenation along `dim` (all other dims equal).
    fn concat(&self, xs: &[&Tensor<Self>], dim: usize) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// The largest tensor (bytes) one op of this backend can read or write in one piece, where
    /// the device limits it (a wgpu storage binding). Models split their token-wise work so
    /// that no activation is larger. Unlimited by default.
    fn max_activation_bytes(&self) -> usize {
        usize::MAX
    }

    /// The slice `start..start + len` along `dim`, copied.
    fn narrow(
        &self,
        x: &Tensor<Self>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Dimension permutation (`out.shape[i] = x.shape[perm[i]]`), copied.
    fn permute(&self, x: &Tensor<Self>, perm: &[usize]) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// Rows of `table [V, C]` (any weight dtype) picked by `ids`, as `[ids.len(), C]` of `dtype`.
    fn gather_rows(
        &self,
        table: &Tensor<Self>,
        ids: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>>
    where
        Self: Backend;
}

/// Splits `shape` at `dim` into (outer, size, inner) element counts.
pub fn split_at_dim(
    op: &'static str,
    shape: &[usize],
    dim: usize,
) -> Result<(usize, usize, usize)> {
    if dim >= shape.len() {
        return Err(KernelError::InvalidArgument {
            op,
            message: format!(
                "dim {dim} out of range for a tensor of rank {}",
                shape.len()
            ),
        });
    }
    Ok((
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    ))
}
