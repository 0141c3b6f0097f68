//! Argument and shape checks of the model, conv and sampler ops, shared by every backend.
//!
//! Each function takes operand shapes (and the op's scalar arguments), checks them the way the
//! op's contract in [`ModelOps`](crate::ModelOps) / [`ConvOps`](crate::ConvOps) states, and
//! returns the sizes a kernel needs. The errors name the op (or the op and the offending
//! operand, as in `"attention bias"`) and carry the shape that was refused, so every backend
//! reports the same [`KernelError`] for the same bad call. Element types are not checked here:
//! which dtypes an op accepts is the backend's business.

use crate::conv_ops::Conv2dParams;
use crate::model_ops::split_at_dim;
use crate::{Backend, DType, KernelError, Result, Tensor};

/// [`KernelError::ShapeMismatch`] of `op`.
pub fn shape_err(op: &'static str, expected: Vec<usize>, found: &[usize]) -> KernelError {
    KernelError::ShapeMismatch {
        op,
        expected,
        found: found.to_vec(),
    }
}

/// [`KernelError::InvalidArgument`] of `op`.
pub fn invalid(op: &'static str, message: impl Into<String>) -> KernelError {
    KernelError::InvalidArgument {
        op,
        message: message.into(),
    }
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The element count of a weight of `shape` stored as `dtype`, when `len` bytes hold exactly
/// that many elements ([`KernelError::LengthMismatch`] otherwise, also when the size overflows).
pub fn weight_len(shape: &[usize], dtype: DType, len: usize) -> Result<usize> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let need = n.and_then(|n| n.checked_mul(dtype.size_in_bytes()));
    match (n, need) {
        (Some(n), Some(need)) if need == len => Ok(n),
        _ => Err(KernelError::LengthMismatch {
            op: "upload_weight",
            expected: need.unwrap_or(usize::MAX),
            found: len,
        }),
    }
}

/// Checks that host data of `len` elements fills a tensor of `shape` (uploads and writes).
pub fn host_len(op: &'static str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == len {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            op,
            expected: n,
            found: len,
        })
    }
}

/// Rows and row length of an op over the last dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowDims {
    /// Number of rows (every dim but the last, flattened; 0 when the last dim is 0).
    pub rows: usize,
    /// Length of the last dim.
    pub len: usize,
}

/// The last dim of `shape` (rank >= 1).
pub fn last_dim(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .last()
        .copied()
        .ok_or_else(|| invalid(op, "needs a tensor of rank >= 1"))
}

/// Rows of a row op (softmax) over `shape`.
pub fn rows(op: &'static str, shape: &[usize]) -> Result<RowDims> {
    let len = last_dim(op, shape)?;
    let rows = shape
        .iter()
        .product::<usize>()
        .checked_div(len)
        .unwrap_or(0);
    Ok(RowDims { rows, len })
}

/// Checks that an optional per-channel vector holds `len` elements.
pub fn vector_len(op: &'static str, v: Option<&[usize]>, len: usize) -> Result<()> {
    match v {
        Some(s) if s.iter().product::<usize>() != len => Err(shape_err(op, vec![len], s)),
        _ => Ok(()),
    }
}

/// [`ModelOps::layer_norm`](crate::ModelOps::layer_norm): `x [..., C]`, `weight`, `bias` of
/// `C` elements.
pub fn layer_norm(
    x: &[usize],
    weight: Option<&[usize]>,
    bias: Option<&[usize]>,
) -> Result<RowDims> {
    let d = rows("layer_norm", x)?;
    vector_len("layer_norm weight", weight, d.len)?;
    vector_len("layer_norm bias", bias, d.len)?;
    Ok(d)
}

/// [`ModelOps::rms_norm`](crate::ModelOps::rms_norm): `x [..., C]`, `scale` of `C` elements.
pub fn rms_norm(x: &[usize], scale: Option<&[usize]>) -> Result<RowDims> {
    let d = rows("rms_norm", x)?;
    vector_len("rms_norm scale", scale, d.len)?;
    Ok(d)
}

/// Sizes of [`ModelOps::linear`](crate::ModelOps::linear).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows of `x` (every dim but the last, flattened).
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// `x`'s shape with the last dim `n`.
    pub out_shape: Vec<usize>,
}

/// [`ModelOps::linear`](crate::ModelOps::linear): `x [..., K]`, `w [N, K]`, `bias [N]`.
pub fn linear(x: &[usize], w: &[usize], bias: Option<&[usize]>) -> Result<LinearDims> {
    let RowDims { rows: m, len: k } = rows("linear", x)?;
    if w.len() != 2 || w[1] != k {
        return Err(shape_err(
            "linear",
            vec![w.first().copied().unwrap_or(0), k],
            w,
        ));
    }
    let n = w[0];
    if let Some(b) = bias
        && b != [n]
    {
        return Err(shape_err("linear bias", vec![n], b));
    }
    let mut out_shape = x.to_vec();
    if let Some(last) = out_shape.last_mut() {
        *last = n;
    }
    Ok(LinearDims { m, k, n, out_shape })
}

/// Sizes of [`ModelOps::matmul`](crate::ModelOps::matmul).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    /// Product of `a`'s batch dims.
    pub batch: usize,
    /// Rows of each `a` matrix.
    pub m: usize,
    /// Shared dim.
    pub k: usize,
    /// Columns of each output matrix.
    pub n: usize,
    /// `b` is one matrix shared by every batch (rank 2).
    pub shared_b: bool,
    /// `a`'s shape with the last dim `n`.
    pub out_shape: Vec<usize>,
}

/// [`ModelOps::matmul`](crate::ModelOps::matmul): `a [.., M, K]`, `b [.., K, N]` (or
/// `[.., N, K]` with `transpose_b`), `b`'s batch dims equal to `a`'s or absent.
pub fn matmul(a: &[usize], b: &[usize], transpose_b: bool) -> Result<MatmulDims> {
    let (ar, br) = (a.len(), b.len());
    if ar < 2 || br < 2 {
        return Err(invalid(
            "matmul",
            format!("needs rank >= 2 operands, found {a:?} and {b:?}"),
        ));
    }
    let (m, k) = (a[ar - 2], a[ar - 1]);
    let (kb, n) = if transpose_b {
        (b[br - 1], b[br - 2])
    } else {
        (b[br - 2], b[br - 1])
    };
    let shared_b = br == 2;
    if kb != k || (!shared_b && b[..br - 2] != a[..ar - 2]) {
        return Err(shape_err("matmul", a.to_vec(), b));
    }
    let mut out_shape = a.to_vec();
    out_shape[ar - 1] = n;
    Ok(MatmulDims {
        batch: a[..ar - 2].iter().product(),
        m,
        k,
        n,
        shared_b,
        out_shape,
    })
}

/// `x [B, L, C]` against a per-batch vector: see [`per_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerBatch {
    /// Batch.
    pub b: usize,
    /// Tokens.
    pub l: usize,
    /// Channels.
    pub c: usize,
    /// The vector is one `[C]` (or `[1, C]`) shared by every batch.
    pub shared: bool,
}

/// Checks `x [B, L, C]` against a per-batch vector `v` of `B * C` elements (or `C`, shared).
pub fn per_batch(op: &'static str, x: &[usize], v: &[usize]) -> Result<PerBatch> {
    let &[b, l, c] = x else {
        return Err(invalid(op, format!("expects [B, L, C], found {x:?}")));
    };
    let nv: usize = v.iter().product();
    if nv == b * c {
        Ok(PerBatch {
            b,
            l,
            c,
            shared: false,
        })
    } else if nv == c {
        Ok(PerBatch {
            b,
            l,
            c,
            shared: true,
        })
    } else {
        Err(shape_err(op, vec![b, c], v))
    }
}

/// Sizes of [`ModelOps::modulate`](crate::ModelOps::modulate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModulateDims {
    /// Batch.
    pub b: usize,
    /// Tokens.
    pub l: usize,
    /// Channels.
    pub c: usize,
    /// `shift` is shared by every batch.
    pub shift_shared: bool,
    /// `scale` is shared by every batch.
    pub scale_shared: bool,
}

/// [`ModelOps::modulate`](crate::ModelOps::modulate): `x [B, L, C]`, `shift`, `scale` `[B, C]`
/// (or `[C]`).
pub fn modulate(x: &[usize], shift: &[usize], scale: &[usize]) -> Result<ModulateDims> {
    let sh = per_batch("modulate shift", x, shift)?;
    let sc = per_batch("modulate scale", x, scale)?;
    Ok(ModulateDims {
        b: sh.b,
        l: sh.l,
        c: sh.c,
        shift_shared: sh.shared,
        scale_shared: sc.shared,
    })
}

/// [`ModelOps::gated_add`](crate::ModelOps::gated_add): `x`, `y` `[B, L, C]`, `gate [B, C]`
/// (or `[C]`).
pub fn gated_add(x: &[usize], y: &[usize], gate: &[usize]) -> Result<PerBatch> {
    if y != x {
        return Err(shape_err("gated_add", x.to_vec(), y));
    }
    per_batch("gated_add gate", x, gate)
}

/// [`ModelOps::binary`](crate::ModelOps::binary): `b` is `a`'s shape or a suffix of it.
/// Returns the element count of `b` (the period of the broadcast).
pub fn binary(a: &[usize], b: &[usize]) -> Result<usize> {
    if b.len() > a.len() || a[a.len() - b.len()..] != *b {
        return Err(shape_err("binary", a.to_vec(), b));
    }
    Ok(b.iter().product())
}

/// Sizes of [`ModelOps::rope`](crate::ModelOps::rope).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeDims {
    /// Batch.
    pub b: usize,
    /// Tokens.
    pub l: usize,
    /// Heads.
    pub h: usize,
    /// Head dim (even).
    pub d: usize,
    /// The table has batch 1 and serves every batch.
    pub shared_table: bool,
}

/// [`ModelOps::rope`](crate::ModelOps::rope): `x [B, L, H, D]` with even `D`, `table
/// [B or 1, L, D/2, 2]`.
pub fn rope(x: &[usize], table: &[usize]) -> Result<RopeDims> {
    let [b, l, h, d] = match *x {
        [b, l, h, d] if d.is_multiple_of(2) => [b, l, h, d],
        _ => {
            return Err(invalid(
                "rope",
                format!("expects x [B, L, H, D] with even D, found {x:?}"),
            ));
        }
    };
    let tb = table.first().copied().unwrap_or(0);
    if table.len() != 4 || !(tb == 1 || tb == b) || table[1..] != [l, d / 2, 2] {
        return Err(shape_err("rope table", vec![b, l, d / 2, 2], table));
    }
    Ok(RopeDims {
        b,
        l,
        h,
        d,
        shared_table: tb == 1,
    })
}

/// Sizes of [`ModelOps::attention`](crate::ModelOps::attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch.
    pub b: usize,
    /// Query tokens.
    pub lq: usize,
    /// Key (and value) tokens.
    pub lk: usize,
    /// Heads.
    pub h: usize,
    /// Head dim.
    pub d: usize,
    /// The bias's batch and head dims (each 1 or the full size), when there is a bias.
    pub bias: Option<(usize, usize)>,
}

/// [`ModelOps::attention`](crate::ModelOps::attention): `q [B, Lq, H, D]`, `k`, `v`
/// `[B, Lk, H, D]`, `bias [B or 1, H or 1, Lq, Lk]`.
pub fn attention(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    bias: Option<&[usize]>,
) -> Result<AttentionDims> {
    let &[b, lq, h, d] = q else {
        return Err(invalid(
            "attention",
            format!("expects q [B, L, H, D], found {q:?}"),
        ));
    };
    let lk = k.get(1).copied().unwrap_or(0);
    if k != [b, lk, h, d] {
        return Err(shape_err("attention k", vec![b, lk, h, d], k));
    }
    if v != k {
        return Err(shape_err("attention v", k.to_vec(), v));
    }
    let bias = match bias {
        None => None,
        Some(bs) => {
            let ok = bs.len() == 4
                && (bs[0] == 1 || bs[0] == b)
                && (bs[1] == 1 || bs[1] == h)
                && bs[2..] == [lq, lk];
            if !ok {
                return Err(shape_err("attention bias", vec![b, h, lq, lk], bs));
            }
            Some((bs[0], bs[1]))
        }
    };
    Ok(AttentionDims {
        b,
        lq,
        lk,
        h,
        d,
        bias,
    })
}

/// A tensor split at one dim, and the shape of the op's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DimSplit {
    /// Product of the dims before `dim`.
    pub outer: usize,
    /// Size of `dim` in the input (of the first input for [`concat()`]).
    pub size: usize,
    /// Product of the dims after `dim`.
    pub inner: usize,
    /// Shape of the result.
    pub out_shape: Vec<usize>,
}

/// [`ModelOps::concat`](crate::ModelOps::concat): at least one shape, all equal but along
/// `dim`; `out_shape` has their total along `dim`.
pub fn concat<'a>(shapes: impl IntoIterator<Item = &'a [usize]>, dim: usize) -> Result<DimSplit> {
    let mut shapes = shapes.into_iter();
    let first = shapes
        .next()
        .ok_or_else(|| invalid("concat", "needs at least one tensor"))?;
    let (outer, size, inner) = split_at_dim("concat", first, dim)?;
    let mut total = size;
    for s in shapes {
        if s.len() != first.len() || s[..dim] != first[..dim] || s[dim + 1..] != first[dim + 1..] {
            return Err(shape_err("concat", first.to_vec(), s));
        }
        total += s[dim];
    }
    let mut out_shape = first.to_vec();
    out_shape[dim] = total;
    Ok(DimSplit {
        outer,
        size,
        inner,
        out_shape,
    })
}

/// [`ModelOps::narrow`](crate::ModelOps::narrow): `start + len` within `dim`.
pub fn narrow(shape: &[usize], dim: usize, start: usize, len: usize) -> Result<DimSplit> {
    let (outer, size, inner) = split_at_dim("narrow", shape, dim)?;
    if start.checked_add(len).is_none_or(|e| e > size) {
        return Err(invalid(
            "narrow",
            format!("range {start}+{len} exceeds dim {dim} of size {size}"),
        ));
    }
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    Ok(DimSplit {
        outer,
        size,
        inner,
        out_shape,
    })
}

/// A permutation of a tensor's dims: see [`permute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permuted {
    /// `out_shape[i] = shape[perm[i]]`.
    pub out_shape: Vec<usize>,
    /// The input's stride of dim `perm[i]`: output index `i` steps the input by this much.
    pub src_strides: Vec<usize>,
}

/// [`ModelOps::permute`](crate::ModelOps::permute): `perm` is a permutation of `shape`'s dims.
pub fn permute(shape: &[usize], perm: &[usize]) -> Result<Permuted> {
    let r = shape.len();
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        return Err(invalid(
            "permute",
            format!("{perm:?} is not a permutation of {r} dims"),
        ));
    }
    let st = strides(shape);
    Ok(Permuted {
        out_shape: perm.iter().map(|&p| shape[p]).collect(),
        src_strides: perm.iter().map(|&p| st[p]).collect(),
    })
}

/// [`ModelOps::gather_rows`](crate::ModelOps::gather_rows): `table [V, C]`, every id `< V`.
/// Returns `(V, C)`.
pub fn gather_rows(table: &[usize], ids: &[usize]) -> Result<(usize, usize)> {
    let &[v, c] = table else {
        return Err(shape_err("gather_rows", vec![0, 0], table));
    };
    if let Some(&id) = ids.iter().find(|&&id| id >= v) {
        return Err(invalid(
            "gather_rows",
            format!("id {id} out of range for a table of {v} rows"),
        ));
    }
    Ok((v, c))
}

/// `[N, C, H, W]` of a 4-D image tensor.
pub fn nchw(op: &'static str, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(invalid(
            op,
            format!("expected a 4-D NCHW tensor, found shape {s:?}"),
        )),
    }
}

/// `(N, C)` of an `[N, C, ...]` tensor.
pub fn nc(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [n, c, ..] => Ok((n, c)),
        ref s => Err(invalid(
            op,
            format!("expected [N, C, ...], found shape {s:?}"),
        )),
    }
}

/// Checks that a per-channel parameter (`what`: "weight", "bias") holds `len` values.
pub fn param_len(op: &'static str, what: &str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == len {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!("{what} has shape {shape:?} ({n} values), expected {len} values"),
        ))
    }
}

/// Sizes of [`ConvOps::conv2d`](crate::ConvOps::conv2d).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl Conv2dDims {
    /// The output shape `[N, O, OH, OW]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }
}

/// [`ConvOps::conv2d`](crate::ConvOps::conv2d): `x [N, C, H, W]`, `weight [O, C, kh, kw]`,
/// `bias` of `O` values, a kernel that fits the padded input, stride > 0.
pub fn conv2d(
    x: &[usize],
    weight: &[usize],
    bias: Option<&[usize]>,
    p: Conv2dParams,
) -> Result<Conv2dDims> {
    const OP: &str = "conv2d";
    let [n, c, h, w] = nchw(OP, x)?;
    let &[o, wc, kh, kw] = weight else {
        return Err(invalid(
            OP,
            format!("weight must be [out, in, kh, kw], found shape {weight:?}"),
        ));
    };
    if wc != c {
        return Err(invalid(
            OP,
            format!("weight {weight:?} expects {wc} input channels, input has {c}"),
        ));
    }
    let (oh, ow) = p.output_hw(h, w, kh, kw).ok_or_else(|| {
        invalid(
            OP,
            format!(
                "input {h}x{w} with padding {:?} is smaller than the {kh}x{kw} kernel (or stride 0)",
                p.padding
            ),
        )
    })?;
    if let Some(b) = bias {
        param_len(OP, "bias", b, o)?;
    }
    Ok(Conv2dDims {
        n,
        c,
        h,
        w,
        o,
        kh,
        kw,
        oh,
        ow,
    })
}

/// `(N, C, spatial)` of an `[N, C, ...]` tensor whose `C` splits into `groups`.
pub fn group_layout(
    op: &'static str,
    shape: &[usize],
    groups: usize,
) -> Result<(usize, usize, usize)> {
    let (n, c) = nc(op, shape)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(invalid(
            op,
            format!("{c} channels cannot be split into {groups} groups"),
        ));
    }
    Ok((n, c, shape[2..].iter().product()))
}

/// Sizes of [`ConvOps::group_norm`](crate::ConvOps::group_norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupNormDims {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Elements per channel (product of the dims after `C`).
    pub spatial: usize,
    /// Channels per group.
    pub cpg: usize,
}

/// [`ConvOps::group_norm`](crate::ConvOps::group_norm) and its variants (`op` names which):
/// `x [N, C, ...]` with `C` a multiple of `groups`, `weight`, `bias` of `C` values.
pub fn group_norm(
    op: &'static str,
    x: &[usize],
    groups: usize,
    weight: Option<&[usize]>,
    bias: Option<&[usize]>,
) -> Result<GroupNormDims> {
    let (n, c, spatial) = group_layout(op, x, groups)?;
    if let Some(t) = weight {
        param_len(op, "weight", t, c)?;
    }
    if let Some(t) = bias {
        param_len(op, "bias", t, c)?;
    }
    Ok(GroupNormDims {
        n,
        c,
        spatial,
        cpg: c / groups,
    })
}

/// Checks that `mean` and `rstd` hold one value per `(image, group)`.
pub fn check_stats_len(op: &'static str, want: usize, mean: &[f64], rstd: &[f64]) -> Result<()> {
    for (what, v) in [("mean", mean), ("rstd", rstd)] {
        if v.len() != want {
            return Err(invalid(
                op,
                format!(
                    "{what} has {} values, expected one per image and group ({want})",
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

/// [`ConvOps::attention_nchw`](crate::ConvOps::attention_nchw): `q [N, C, H, W]`, `k` and `v`
/// of `q`'s shape.
pub fn attention_nchw(q: &[usize], k: &[usize], v: &[usize]) -> Result<[usize; 4]> {
    const OP: &str = "attention_nchw";
    let dims = nchw(OP, q)?;
    for t in [k, v] {
        if t != q {
            return Err(shape_err(OP, q.to_vec(), t));
        }
    }
    Ok(dims)
}

/// Sizes of [`ConvOps::narrow_channels`](crate::ConvOps::narrow_channels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSlice {
    /// Images.
    pub n: usize,
    /// Channels of the input.
    pub c: usize,
    /// Elements per channel.
    pub inner: usize,
    /// The input's shape with `len` channels.
    pub out_shape: Vec<usize>,
}

/// [`ConvOps::narrow_channels`](crate::ConvOps::narrow_channels): channels
/// `start .. start + len` of `x [N, C, ...]` exist.
pub fn narrow_channels(x: &[usize], start: usize, len: usize) -> Result<ChannelSlice> {
    const OP: &str = "narrow_channels";
    let (n, c) = nc(OP, x)?;
    if start.checked_add(len).is_none_or(|e| e > c) {
        return Err(invalid(
            OP,
            format!(
                "channels {start}..{} out of range for {c} channels",
                start.saturating_add(len)
            ),
        ));
    }
    let mut out_shape = x.to_vec();
    out_shape[1] = len;
    Ok(ChannelSlice {
        n,
        c,
        inner: x[2..].iter().product(),
        out_shape,
    })
}

/// [`ConvOps::crop2d`](crate::ConvOps::crop2d): the window `rows y0 .. y0 + h`, `cols
/// x0 .. x0 + w` lies inside `x [N, C, H, W]`. Returns `x`'s `[N, C, H, W]`.
pub fn crop2d(x: &[usize], y0: usize, x0: usize, h: usize, w: usize) -> Result<[usize; 4]> {
    const OP: &str = "crop2d";
    let dims @ [_, _, ih, iw] = nchw(OP, x)?;
    if y0.checked_add(h).is_none_or(|e| e > ih) || x0.checked_add(w).is_none_or(|e| e > iw) {
        return Err(invalid(
            OP,
            format!(
                "window rows {y0}..{} cols {x0}..{} exceeds {ih}x{iw}",
                y0.saturating_add(h),
                x0.saturating_add(w)
            ),
        ));
    }
    Ok(dims)
}

/// Checks the terms of [`SamplerOps::lincomb_into`](crate::SamplerOps::lincomb_into) (`inplace`
/// false: up to [`MAX_LINCOMB_TERMS`](crate::MAX_LINCOMB_TERMS) terms) or
/// [`SamplerOps::lincomb_inplace`](crate::SamplerOps::lincomb_inplace) (`inplace` true: one
/// fewer, the output is an input): every term has `out`'s shape and dtype.
pub fn lincomb_terms<B: Backend>(
    out: &Tensor<B>,
    terms: &[(f64, &Tensor<B>)],
    inplace: bool,
) -> Result<()> {
    let (op, max) = if inplace {
        ("lincomb_inplace", crate::MAX_LINCOMB_TERMS - 1)
    } else {
        ("lincomb", crate::MAX_LINCOMB_TERMS)
    };
    crate::backend::check_terms(op, out.shape(), out.dtype(), terms, max)
}

/// Checks the operands of [`SamplerOps::scaled_error_rms`](crate::SamplerOps::scaled_error_rms):
/// `a` and `b` have `e`'s shape and dtype.
pub fn scaled_error<B: Backend>(e: &Tensor<B>, a: &Tensor<B>, b: &Tensor<B>) -> Result<()> {
    crate::backend::check_terms(
        "scaled_error_rms",
        e.shape(),
        e.dtype(),
        &[(1.0, a), (1.0, b)],
        2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts a shape mismatch of `op` that reports `found`.
    fn assert_mismatch(r: Result<impl std::fmt::Debug>, op: &str, found: &[usize]) {
        match r {
            Err(KernelError::ShapeMismatch {
                op: o, found: f, ..
            }) => {
                assert_eq!(o, op);
                assert_eq!(f, found);
            }
            other => panic!("expected a shape mismatch of {op}, got {other:?}"),
        }
    }

    /// Asserts an invalid argument of `op` whose message contains `part`.
    fn assert_invalid(r: Result<impl std::fmt::Debug>, op: &str, part: &str) {
        match r {
            Err(KernelError::InvalidArgument { op: o, message }) => {
                assert_eq!(o, op);
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
            other => panic!("expected an invalid argument of {op}, got {other:?}"),
        }
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(strides(&[5]), [1]);
        assert!(strides(&[]).is_empty());
    }

    #[test]
    fn weight_len_counts_elements_and_refuses_other_lengths() {
        assert_eq!(weight_len(&[3, 4], DType::BF16, 24).unwrap(), 12);
        assert_eq!(weight_len(&[], DType::F32, 4).unwrap(), 1);
        match weight_len(&[3, 4], DType::F32, 47) {
            Err(KernelError::LengthMismatch {
                op,
                expected,
                found,
            }) => assert_eq!((op, expected, found), ("upload_weight", 48, 47)),
            other => panic!("{other:?}"),
        }
        assert!(weight_len(&[usize::MAX, 2], DType::F32, 8).is_err());
    }

    #[test]
    fn host_len_is_the_element_count() {
        assert!(host_len("upload", &[2, 3], 6).is_ok());
        assert!(host_len("upload", &[], 1).is_ok());
        match host_len("write", &[2, 3], 5) {
            Err(KernelError::LengthMismatch {
                op,
                expected,
                found,
            }) => assert_eq!((op, expected, found), ("write", 6, 5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn linear_dims_and_errors() {
        let d = linear(&[2, 5, 8], &[3, 8], Some(&[3])).unwrap();
        assert_eq!((d.m, d.k, d.n), (10, 8, 3));
        assert_eq!(d.out_shape, [2, 5, 3]);
        // k == 0: no rows to count.
        assert_eq!(linear(&[4, 0], &[3, 0], None).unwrap().m, 0);
        assert_mismatch(linear(&[2, 8], &[3, 7], None), "linear", &[3, 7]);
        assert_mismatch(linear(&[2, 8], &[8], None), "linear", &[8]);
        assert_mismatch(linear(&[2, 8], &[3, 8], Some(&[4])), "linear bias", &[4]);
        assert_mismatch(
            linear(&[2, 8], &[3, 8], Some(&[1, 3])),
            "linear bias",
            &[1, 3],
        );
        assert_invalid(linear(&[], &[3, 8], None), "linear", "rank >= 1");
    }

    #[test]
    fn matmul_dims_and_errors() {
        let d = matmul(&[2, 3, 4, 5], &[2, 3, 5, 6], false).unwrap();
        assert_eq!((d.batch, d.m, d.k, d.n, d.shared_b), (6, 4, 5, 6, false));
        assert_eq!(d.out_shape, [2, 3, 4, 6]);
        let d = matmul(&[2, 4, 5], &[6, 5], true).unwrap();
        assert_eq!((d.batch, d.m, d.k, d.n, d.shared_b), (2, 4, 5, 6, true));
        assert_eq!(d.out_shape, [2, 4, 6]);
        let d = matmul(&[4, 5], &[5, 7], false).unwrap();
        assert_eq!((d.batch, d.n), (1, 7));
        assert_invalid(matmul(&[5], &[5, 7], false), "matmul", "[5] and [5, 7]");
        assert_invalid(matmul(&[4, 5], &[7], false), "matmul", "rank >= 2");
        // k disagrees (with and without the transpose).
        assert_mismatch(matmul(&[4, 5], &[6, 7], false), "matmul", &[6, 7]);
        assert_mismatch(matmul(&[4, 5], &[5, 7], true), "matmul", &[5, 7]);
        // Batch dims neither equal nor absent.
        assert_mismatch(matmul(&[2, 4, 5], &[3, 5, 7], false), "matmul", &[3, 5, 7]);
        assert_mismatch(
            matmul(&[2, 4, 5], &[1, 2, 5, 7], false),
            "matmul",
            &[1, 2, 5, 7],
        );
    }

    #[test]
    fn norms_check_their_vectors() {
        assert_eq!(
            layer_norm(&[2, 3, 8], Some(&[8]), Some(&[8])).unwrap(),
            RowDims { rows: 6, len: 8 }
        );
        assert_eq!(
            rms_norm(&[5, 4], None).unwrap(),
            RowDims { rows: 5, len: 4 }
        );
        assert_eq!(
            rows("softmax", &[0, 7]).unwrap(),
            RowDims { rows: 0, len: 7 }
        );
        assert_eq!(rows("softmax", &[3, 0]).unwrap().rows, 0);
        assert_mismatch(
            layer_norm(&[2, 8], Some(&[7]), None),
            "layer_norm weight",
            &[7],
        );
        assert_mismatch(
            layer_norm(&[2, 8], None, Some(&[2, 8])),
            "layer_norm bias",
            &[2, 8],
        );
        assert_mismatch(rms_norm(&[2, 8], Some(&[9])), "rms_norm scale", &[9]);
        assert_invalid(rms_norm(&[], None), "rms_norm", "rank >= 1");
    }

    #[test]
    fn per_batch_vectors_may_be_shared() {
        let x = [2, 5, 8];
        let d = modulate(&x, &[2, 8], &[8]).unwrap();
        assert_eq!((d.b, d.l, d.c), (2, 5, 8));
        assert!(!d.shift_shared && d.scale_shared);
        assert!(modulate(&x, &[1, 8], &[2, 1, 8]).unwrap().shift_shared);
        assert_mismatch(modulate(&x, &[3, 8], &[8]), "modulate shift", &[3, 8]);
        assert_mismatch(modulate(&x, &[8], &[7]), "modulate scale", &[7]);
        assert_invalid(modulate(&[5, 8], &[8], &[8]), "modulate shift", "[5, 8]");
        let g = gated_add(&x, &x, &[2, 8]).unwrap();
        assert_eq!(
            g,
            PerBatch {
                b: 2,
                l: 5,
                c: 8,
                shared: false
            }
        );
        assert_mismatch(gated_add(&x, &[2, 5, 7], &[8]), "gated_add", &[2, 5, 7]);
        assert_mismatch(gated_add(&x, &x, &[16, 2]), "gated_add gate", &[16, 2]);
    }

    #[test]
    fn binary_takes_a_suffix() {
        assert_eq!(binary(&[2, 3, 4], &[3, 4]).unwrap(), 12);
        assert_eq!(binary(&[2, 3, 4], &[2, 3, 4]).unwrap(), 24);
        assert_eq!(binary(&[2, 3], &[]).unwrap(), 1);
        assert_mismatch(binary(&[2, 3, 4], &[2, 3]), "binary", &[2, 3]);
        assert_mismatch(binary(&[3, 4], &[1, 3, 4]), "binary", &[1, 3, 4]);
    }

    #[test]
    fn rope_dims_and_errors() {
        let d = rope(&[2, 6, 3, 8], &[1, 6, 4, 2]).unwrap();
        assert_eq!((d.b, d.l, d.h, d.d, d.shared_table), (2, 6, 3, 8, true));
        assert!(!rope(&[2, 6, 3, 8], &[2, 6, 4, 2]).unwrap().shared_table);
        assert_invalid(rope(&[2, 6, 3, 7], &[1, 6, 3, 2]), "rope", "[2, 6, 3, 7]");
        assert_invalid(rope(&[6, 3, 8], &[1, 6, 4, 2]), "rope", "[6, 3, 8]");
        assert_mismatch(
            rope(&[2, 6, 3, 8], &[3, 6, 4, 2]),
            "rope table",
            &[3, 6, 4, 2],
        );
        assert_mismatch(
            rope(&[2, 6, 3, 8], &[1, 5, 4, 2]),
            "rope table",
            &[1, 5, 4, 2],
        );
        assert_mismatch(rope(&[2, 6, 3, 8], &[6, 4, 2]), "rope table", &[6, 4, 2]);
    }

    #[test]
    fn attention_dims_and_errors() {
        let (q, kv) = ([2, 5, 3, 16], [2, 7, 3, 16]);
        let d = attention(&q, &kv, &kv, None).unwrap();
        assert_eq!((d.b, d.lq, d.lk, d.h, d.d, d.bias), (2, 5, 7, 3, 16, None));
        for (bias, want) in [
            ([1, 1, 5, 7], (1, 1)),
            ([2, 1, 5, 7], (2, 1)),
            ([1, 3, 5, 7], (1, 3)),
            ([2, 3, 5, 7], (2, 3)),
        ] {
            assert_eq!(
                attention(&q, &kv, &kv, Some(&bias)).unwrap().bias,
                Some(want)
            );
        }
        assert_invalid(
            attention(&[2, 5, 48], &kv, &kv, None),
            "attention",
            "[2, 5, 48]",
        );
        assert_mismatch(
            attention(&q, &[2, 7, 4, 16], &kv, None),
            "attention k",
            &[2, 7, 4, 16],
        );
        assert_mismatch(
            attention(&q, &[1, 7, 3, 16], &kv, None),
            "attention k",
            &[1, 7, 3, 16],
        );
        assert_mismatch(
            attention(&q, &[2, 7, 3, 8], &kv, None),
            "attention k",
            &[2, 7, 3, 8],
        );
        assert_mismatch(
            attention(&q, &kv, &[2, 6, 3, 16], None),
            "attention v",
            &[2, 6, 3, 16],
        );
        for bad in [&[3, 1, 5, 7][..], &[1, 2, 5, 7], &[1, 1, 7, 5], &[1, 5, 7]] {
            assert_mismatch(attention(&q, &kv, &kv, Some(bad)), "attention bias", bad);
        }
    }

    #[test]
    fn layout_ops_check_dims() {
        let d = concat([&[2, 3, 4][..], &[2, 5, 4]], 1).unwrap();
        assert_eq!((d.outer, d.size, d.inner), (2, 3, 4));
        assert_eq!(d.out_shape, [2, 8, 4]);
        assert_invalid(concat(std::iter::empty(), 0), "concat", "at least one");
        assert_invalid(concat([&[2, 3][..]], 2), "concat", "dim 2 out of range");
        assert_mismatch(
            concat([&[2, 3, 4][..], &[3, 5, 4]], 1),
            "concat",
            &[3, 5, 4],
        );
        assert_mismatch(concat([&[2, 3, 4][..], &[2, 5]], 1), "concat", &[2, 5]);

        let d = narrow(&[2, 6, 4], 1, 2, 3).unwrap();
        assert_eq!((d.outer, d.size, d.inner), (2, 6, 4));
        assert_eq!(d.out_shape, [2, 3, 4]);
        assert_invalid(
            narrow(&[2, 6, 4], 1, 4, 3),
            "narrow",
            "4+3 exceeds dim 1 of size 6",
        );
        assert_invalid(narrow(&[2, 6, 4], 1, usize::MAX, 3), "narrow", "exceeds");
        assert_invalid(narrow(&[2, 6], 2, 0, 0), "narrow", "rank 2");

        let p = permute(&[2, 3, 4], &[2, 0, 1]).unwrap();
        assert_eq!(p.out_shape, [4, 2, 3]);
        assert_eq!(p.src_strides, [1, 12, 4]);
        for bad in [&[0, 1][..], &[0, 1, 1], &[0, 1, 3]] {
            assert_invalid(permute(&[2, 3, 4], bad), "permute", "not a permutation");
        }

        assert_eq!(gather_rows(&[10, 4], &[0, 9, 3]).unwrap(), (10, 4));
        assert_mismatch(gather_rows(&[10], &[0]), "gather_rows", &[10]);
        assert_invalid(
            gather_rows(&[10, 4], &[2, 10, 11]),
            "gather_rows",
            "id 10 out of range",
        );
    }

    #[test]
    fn conv2d_dims_and_errors() {
        let x = [2, 3, 8, 10];
        let d = conv2d(&x, &[5, 3, 3, 3], Some(&[5]), Conv2dParams::same(1)).unwrap();
        assert_eq!(
            d,
            Conv2dDims {
                n: 2,
                c: 3,
                h: 8,
                w: 10,
                o: 5,
                kh: 3,
                kw: 3,
                oh: 8,
                ow: 10
            }
        );
        assert_eq!(d.out_shape(), [2, 5, 8, 10]);
        // Stride 2, asymmetric padding: (8 + 0 + 1 - 3) / 2 + 1 = 4, (10 + 1 + 0 - 3) / 2 + 1 = 5.
        let p = Conv2dParams {
            stride: 2,
            padding: [0, 1, 1, 0],
        };
        let d = conv2d(&x, &[4, 3, 3, 3], None, p).unwrap();
        assert_eq!((d.oh, d.ow), (4, 5));
        assert_invalid(
            conv2d(&[3, 8, 10], &[5, 3, 3, 3], None, Conv2dParams::same(1)),
            "conv2d",
            "[3, 8, 10]",
        );
        assert_invalid(
            conv2d(&x, &[5, 3, 9], None, Conv2dParams::same(1)),
            "conv2d",
            "[5, 3, 9]",
        );
        assert_invalid(
            conv2d(&x, &[5, 2, 3, 3], None, Conv2dParams::same(1)),
            "conv2d",
            "expects 2 input channels, input has 3",
        );
        assert_invalid(
            conv2d(&x, &[5, 3, 11, 3], None, Conv2dParams::same(0)),
            "conv2d",
            "8x10",
        );
        let zero_stride = Conv2dParams {
            stride: 0,
            padding: [0; 4],
        };
        assert_invalid(
            conv2d(&x, &[5, 3, 1, 1], None, zero_stride),
            "conv2d",
            "stride 0",
        );
        assert_invalid(
            conv2d(&x, &[5, 3, 3, 3], Some(&[4]), Conv2dParams::same(1)),
            "conv2d",
            "bias has shape [4]",
        );
    }

    #[test]
    fn group_norm_dims_and_errors() {
        let d = group_norm("group_norm", &[2, 8, 3, 5], 4, Some(&[8]), Some(&[8])).unwrap();
        assert_eq!(
            d,
            GroupNormDims {
                n: 2,
                c: 8,
                spatial: 15,
                cpg: 2
            }
        );
        assert_eq!(
            group_norm("group_norm", &[2, 8], 8, None, None)
                .unwrap()
                .spatial,
            1
        );
        assert_invalid(
            group_norm("group_norm", &[8], 4, None, None),
            "group_norm",
            "[8]",
        );
        assert_invalid(
            group_norm("group_norm", &[2, 8, 3], 3, None, None),
            "group_norm",
            "8 channels cannot be split into 3 groups",
        );
        assert_invalid(
            group_norm("group_norm", &[2, 8, 3], 0, None, None),
            "group_norm",
            "0 groups",
        );
        assert_invalid(
            group_norm("group_norm_with_stats", &[2, 8, 3], 4, Some(&[4]), None),
            "group_norm_with_stats",
            "weight has shape [4]",
        );
        assert_invalid(
            group_norm("group_norm", &[2, 8, 3], 4, None, Some(&[2, 3])),
            "group_norm",
            "bias has shape [2, 3] (6 values), expected 8 values",
        );
        // Parameters are counted, not shaped: [2, 4] holds the 8 values of 8 channels.
        assert!(group_norm("group_norm", &[2, 8, 3], 4, None, Some(&[2, 4])).is_ok());
        assert!(check_stats_len("g", 4, &[0.0; 4], &[0.0; 4]).is_ok());
        assert_invalid(
            check_stats_len("g", 4, &[0.0; 4], &[0.0; 3]),
            "g",
            "rstd has 3 values",
        );
    }

    #[test]
    fn image_slices_check_ranges() {
        let x = [2, 6, 4, 5];
        assert_eq!(attention_nchw(&x, &x, &x).unwrap(), x);
        assert_mismatch(
            attention_nchw(&x, &[2, 6, 5, 4], &x),
            "attention_nchw",
            &[2, 6, 5, 4],
        );
        assert_mismatch(
            attention_nchw(&x, &x, &[1, 6, 4, 5]),
            "attention_nchw",
            &[1, 6, 4, 5],
        );
        assert_invalid(attention_nchw(&[6, 4, 5], &x, &x), "attention_nchw", "4-D");
        assert_invalid(
            nchw("upsample_nearest2x", &[1, 2, 3]),
            "upsample_nearest2x",
            "[1, 2, 3]",
        );

        let s = narrow_channels(&x, 1, 4).unwrap();
        assert_eq!((s.n, s.c, s.inner), (2, 6, 20));
        assert_eq!(s.out_shape, [2, 4, 4, 5]);
        assert_eq!(narrow_channels(&[3, 6], 6, 0).unwrap().inner, 1);
        assert_invalid(
            narrow_channels(&x, 3, 4),
            "narrow_channels",
            "channels 3..7 out of range for 6 channels",
        );
        assert_invalid(
            narrow_channels(&x, usize::MAX, 2),
            "narrow_channels",
            "out of range",
        );
        assert_invalid(narrow_channels(&[6], 0, 1), "narrow_channels", "[6]");

        assert_eq!(crop2d(&x, 1, 2, 3, 3).unwrap(), x);
        assert_invalid(
            crop2d(&x, 2, 0, 3, 5),
            "crop2d",
            "window rows 2..5 cols 0..5 exceeds 4x5",
        );
        assert_invalid(crop2d(&x, 0, 1, 4, 5), "crop2d", "cols 1..6");
        assert_invalid(crop2d(&x, 0, usize::MAX, 1, 1), "crop2d", "exceeds");
    }

    #[test]
    fn lincomb_terms_follow_the_output() {
        use crate::{Cpu, HostData, MAX_LINCOMB_TERMS, SamplerOps};
        let t = |shape: &[usize], d: DType| {
            let n = shape.iter().product();
            Cpu.upload(HostData::F64(&vec![0.0; n]), shape, d).unwrap()
        };
        let out = t(&[2, 3], DType::F64);
        let same = t(&[2, 3], DType::F64);
        let many: Vec<(f64, &Tensor<Cpu>)> = vec![(1.0, &same); MAX_LINCOMB_TERMS];
        assert!(lincomb_terms(&out, &many, false).is_ok());
        assert_invalid(
            lincomb_terms(&out, &many, true),
            "lincomb_inplace",
            "at most",
        );
        assert_invalid(
            lincomb_terms(&out, &[(1.0, &same); MAX_LINCOMB_TERMS + 1], false),
            "lincomb",
            "at most",
        );
        let other = t(&[3, 2], DType::F64);
        assert_mismatch(
            lincomb_terms(&out, &[(1.0, &same), (2.0, &other)], true),
            "lincomb_inplace",
            &[3, 2],
        );
        let f32t = t(&[2, 3], DType::F32);
        let e = lincomb_terms(&out, &[(1.0, &f32t)], false).unwrap_err();
        assert!(
            matches!(e, KernelError::DTypeMismatch { op: "lincomb", .. }),
            "{e}"
        );
        assert!(scaled_error(&out, &same, &same).is_ok());
        assert_mismatch(
            scaled_error(&out, &same, &other),
            "scaled_error_rms",
            &[3, 2],
        );
    }
}
