//! Model ops on the device. Shapes are checked here exactly as the CPU backend checks them;
//! kernels then trust the sizes they are given.

use crate::blas::{Gemm, GemmKind};
use crate::device::{Arg, Cuda, CudaStorage, flag, suffix, u};
use flux_kernels::model_ops::split_at_dim;
use flux_kernels::{
    Activation, BinaryOp, ByteView, DType, KernelError, ModelOps, Result, SamplerOps, Tensor,
};

/// A tensor used as it is, or a converted temporary.
pub(crate) enum Operand<'a> {
    Borrowed(&'a Tensor<Cuda>),
    Owned(Tensor<Cuda>),
}

impl Operand<'_> {
    pub(crate) fn as_ref(&self) -> &Tensor<Cuda> {
        match self {
            Operand::Borrowed(t) => t,
            Operand::Owned(t) => t,
        }
    }

    pub(crate) fn buf(&self) -> &cudarc::driver::CudaSlice<u8> {
        &self.as_ref().storage().buf
    }
}

pub(crate) fn shape_err(op: &'static str, expected: Vec<usize>, found: &[usize]) -> KernelError {
    KernelError::ShapeMismatch {
        op,
        expected,
        found: found.to_vec(),
    }
}

pub(crate) fn invalid(op: &'static str, message: String) -> KernelError {
    KernelError::InvalidArgument { op, message }
}

fn last_dim(op: &'static str, t: &Tensor<Cuda>) -> Result<usize> {
    t.shape()
        .last()
        .copied()
        .ok_or_else(|| invalid(op, "needs a tensor of rank >= 1".into()))
}

fn check_vec(op: &'static str, t: Option<&Tensor<Cuda>>, c: usize) -> Result<()> {
    match t {
        Some(t) if t.numel() != c => Err(shape_err(op, vec![c], t.shape())),
        _ => Ok(()),
    }
}

/// Threads per block of the row kernels (norms, softmax).
fn row_threads(c: usize) -> u32 {
    if c >= 1024 {
        256
    } else if c >= 256 {
        128
    } else {
        64
    }
}

/// Checks `x [B, L, C]` against a per-batch vector `[B, C]` (or a shared `[C]`).
fn per_batch(
    op: &'static str,
    x: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
) -> Result<(usize, usize, usize, bool)> {
    let s = x.shape();
    if s.len() != 3 {
        return Err(invalid(op, format!("expects [B, L, C], found {s:?}")));
    }
    let (b, l, c) = (s[0], s[1], s[2]);
    if v.numel() == b * c {
        Ok((b, l, c, false))
    } else if v.numel() == c {
        Ok((b, l, c, true))
    } else {
        Err(shape_err(op, vec![b, c], v.shape()))
    }
}

impl Cuda {
    /// `t` as a plain tensor of exactly `dtype` (borrowed when it already is one).
    pub(crate) fn operand_as<'a>(&self, t: &'a Tensor<Cuda>, dtype: DType) -> Result<Operand<'a>> {
        if t.dtype() == dtype && t.storage().scale == 1.0 {
            Ok(Operand::Borrowed(t))
        } else {
            Ok(Operand::Owned(self.cast_to(t, dtype)?))
        }
    }

    /// `t` as a plain compute tensor: borrowed when f32/f64, else widened to `fallback`.
    pub(crate) fn compute_operand<'a>(
        &self,
        t: &'a Tensor<Cuda>,
        fallback: DType,
    ) -> Result<Operand<'a>> {
        if t.dtype().is_compute() && t.storage().scale == 1.0 {
            Ok(Operand::Borrowed(t))
        } else {
            Ok(Operand::Owned(self.cast_to(t, fallback)?))
        }
    }

    /// A new compute tensor of `dtype` (f32/f64) holding `t`'s values, widened with its scale.
    pub(crate) fn cast_to(&self, t: &Tensor<Cuda>, dtype: DType) -> Result<Tensor<Cuda>> {
        let s = suffix("cast", dtype)?;
        let src = match t.dtype() {
            DType::F32 => "widen_f32",
            DType::F64 => "widen_f64",
            DType::BF16 => "widen_bf16",
            DType::F16 => "widen_f16",
            DType::F8E4M3 => "dequant_f8e4m3",
        };
        let n = t.numel();
        let out = self.empty(t.shape(), dtype)?;
        self.launch(
            &format!("{src}_{s}"),
            self.cfg_elems(n),
            &[
                Arg::Buf(&out.storage().buf),
                Arg::Buf(&t.storage().buf),
                Arg::F32(t.storage().scale),
                u(n),
            ],
        )?;
        Ok(out)
    }

    /// A bf16 copy of `t` for the tensor-core GEMMs: f32 activations are rounded, fp8 weights
    /// converted exactly (their scale is returned for the GEMM's alpha), bf16 weights borrowed.
    fn bf16_operand<'a>(&self, t: &'a Tensor<Cuda>) -> Result<(Operand<'a>, f32)> {
        let n = t.numel();
        let scale = t.storage().scale;
        match t.dtype() {
            DType::BF16 => Ok((Operand::Borrowed(t), scale)),
            DType::F32 | DType::F8E4M3 => {
                let out = self.empty(t.shape(), DType::BF16)?;
                let name = if t.dtype() == DType::F32 {
                    "narrow_f32_to_bf16"
                } else {
                    "f8e4m3_to_bf16"
                };
                self.launch(
                    name,
                    self.cfg_elems(n),
                    &[
                        Arg::Buf(&out.storage().buf),
                        Arg::Buf(&t.storage().buf),
                        u(n),
                    ],
                )?;
                Ok((Operand::Owned(out), scale))
            }
            d => Err(KernelError::Unsupported {
                backend: "cuda".into(),
                op: "bf16 GEMM operand",
                dtype: d,
            }),
        }
    }

    /// The kernel suffix of `x` when it is an activation of a compute dtype.
    fn act(op: &'static str, x: &Tensor<Cuda>) -> Result<&'static str> {
        suffix(op, x.dtype())
    }

    /// A new tensor of `shape` from a one-input elementwise kernel `name_{s}(out, x, ...)`.
    fn unary(
        &self,
        name: &str,
        x: &Tensor<Cuda>,
        shape: &[usize],
        extra: &[Arg<'_>],
        cfg: cudarc::driver::LaunchConfig,
    ) -> Result<Tensor<Cuda>> {
        let out = self.empty(shape, x.dtype())?;
        let mut args = vec![Arg::Buf(&out.storage().buf), Arg::Buf(&x.storage().buf)];
        args.extend(extra.iter().map(|a| match a {
            Arg::Buf(b) => Arg::Buf(b),
            Arg::U64(v) => Arg::U64(*v),
            Arg::I32(v) => Arg::I32(*v),
            Arg::F32(v) => Arg::F32(*v),
            Arg::F64(v) => Arg::F64(*v),
        }));
        self.launch(name, cfg, &args)?;
        Ok(out)
    }

    fn linear_impl(
        &self,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
    ) -> Result<Tensor<Cuda>> {
        let s = Self::act("linear", x)?;
        let k = last_dim("linear", x)?;
        if w.shape().len() != 2 || w.shape()[1] != k {
            return Err(shape_err(
                "linear",
                vec![w.shape().first().copied().unwrap_or(0), k],
                w.shape(),
            ));
        }
        let n = w.shape()[0];
        if let Some(b) = bias
            && b.shape() != [n]
        {
            return Err(shape_err("linear bias", vec![n], b.shape()));
        }
        let m = x.numel().checked_div(k).unwrap_or(0);
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        let out = self.empty(&shape, x.dtype())?;
        let tensor_cores =
            x.dtype() == DType::F32 && matches!(w.dtype(), DType::BF16 | DType::F8E4M3);
        if tensor_cores
            && k > 0
            && m > 0
            && n > 0
            && let Some(b) = bias
        {
            // bf16 GEMM with the bias added in cuBLASLt's epilogue; on any refusal fall
            // through to the GEMM plus a separate bias pass.
            let (xb, _) = self.bf16_operand(x)?;
            let (wb, scale) = self.bf16_operand(w)?;
            let bv = self.operand_as(b, DType::F32)?;
            let fused = self.linear_bf16_bias_lt(
                (m, n, k),
                self.ptr(xb.buf()),
                self.ptr(wb.buf()),
                self.ptr(bv.buf()),
                self.ptr(&out.storage().buf),
                scale,
            );
            if fused.is_ok() {
                return Ok(out);
            }
        }
        if let Some(b) = bias {
            let b = self.operand_as(b, x.dtype())?;
            self.launch(
                &format!("broadcast_rows_{s}"),
                self.cfg_elems(m * n),
                &[Arg::Buf(&out.storage().buf), Arg::Buf(b.buf()), u(m), u(n)],
            )?;
        } else if k == 0 {
            return self.zeros(&shape, x.dtype());
        }
        if k == 0 {
            return Ok(out);
        }
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        let (xa, wa, kind, alpha);
        if tensor_cores {
            let (xb, _) = self.bf16_operand(x)?;
            let (wb, scale) = self.bf16_operand(w)?;
            (xa, wa, kind, alpha) = (xb, wb, GemmKind::Bf16F32, f64::from(scale));
        } else {
            let kind_c = if x.dtype() == DType::F64 {
                GemmKind::F64
            } else {
                GemmKind::F32
            };
            (xa, wa, kind, alpha) = (
                Operand::Borrowed(x),
                self.operand_as(w, x.dtype())?,
                kind_c,
                1.0,
            );
        }
        self.gemm(
            kind,
            &Gemm {
                m,
                n,
                k,
                trans_a: false,
                trans_b: true,
                a: self.ptr(xa.buf()),
                lda: k,
                stride_a: 0,
                b: self.ptr(wa.buf()),
                ldb: k,
                stride_b: 0,
                c: self.ptr(&out.storage().buf),
                ldc: n,
                stride_c: 0,
                batch: 1,
                alpha,
                beta,
            },
        )?;
        Ok(out)
    }

    fn matmul_impl(
        &self,
        a: &Tensor<Cuda>,
        b: &Tensor<Cuda>,
        transpose_b: bool,
    ) -> Result<Tensor<Cuda>> {
        Self::act("matmul", a)?;
        let (ar, br) = (a.shape().len(), b.shape().len());
        if ar < 2 || br < 2 {
            return Err(invalid(
                "matmul",
                format!(
                    "needs rank >= 2 operands, found {:?} and {:?}",
                    a.shape(),
                    b.shape()
                ),
            ));
        }
        let (m, k) = (a.shape()[ar - 2], a.shape()[ar - 1]);
        let (kb, n) = if transpose_b {
            (b.shape()[br - 1], b.shape()[br - 2])
        } else {
            (b.shape()[br - 2], b.shape()[br - 1])
        };
        let batch: usize = a.shape()[..ar - 2].iter().product();
        let shared = br == 2;
        if kb != k || (!shared && b.shape()[..br - 2] != a.shape()[..ar - 2]) {
            return Err(shape_err("matmul", a.shape().to_vec(), b.shape()));
        }
        let mut shape = a.shape().to_vec();
        shape[ar - 1] = n;
        if k == 0 {
            return self.zeros(&shape, a.dtype());
        }
        let bv = self.operand_as(b, a.dtype())?;
        let out = self.empty(&shape, a.dtype())?;
        let kind = if a.dtype() == DType::F64 {
            GemmKind::F64
        } else {
            GemmKind::F32
        };
        self.gemm(
            kind,
            &Gemm {
                m,
                n,
                k,
                trans_a: false,
                trans_b: transpose_b,
                a: self.ptr(&a.storage().buf),
                lda: k,
                stride_a: m * k,
                b: self.ptr(bv.buf()),
                ldb: if transpose_b { k } else { n },
                stride_b: if shared { 0 } else { k * n },
                c: self.ptr(&out.storage().buf),
                ldc: n,
                stride_c: m * n,
                batch,
                alpha: 1.0,
                beta: 0.0,
            },
        )?;
        Ok(out)
    }

    fn attention_impl(
        &self,
        q: &Tensor<Cuda>,
        k: &Tensor<Cuda>,
        v: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        scale: Option<f64>,
    ) -> Result<Tensor<Cuda>> {
        const OP: &str = "attention";
        let sfx = Self::act(OP, q)?;
        for t in [k, v] {
            if t.dtype() != q.dtype() {
                return Err(KernelError::DTypeMismatch {
                    op: OP,
                    expected: q.dtype(),
                    found: t.dtype(),
                });
            }
        }
        let s = q.shape();
        if s.len() != 4 {
            return Err(invalid(OP, format!("expects q [B, L, H, D], found {s:?}")));
        }
        let (b, lq, h, d) = (s[0], s[1], s[2], s[3]);
        let lk = k.shape().get(1).copied().unwrap_or(0);
        if k.shape() != [b, lk, h, d] {
            return Err(shape_err("attention k", vec![b, lk, h, d], k.shape()));
        }
        if v.shape() != k.shape() {
            return Err(shape_err("attention v", k.shape().to_vec(), v.shape()));
        }
        if d > 256 {
            return Err(invalid(
                OP,
                format!("head dim {d} exceeds the 256 the attention kernel holds per warp"),
            ));
        }
        let (bias_op, bb, bh) = match bias {
            None => (None, 1, 1),
            Some(t) => {
                let bs = t.shape();
                let ok = bs.len() == 4
                    && (bs[0] == 1 || bs[0] == b)
                    && (bs[1] == 1 || bs[1] == h)
                    && bs[2..] == [lq, lk];
                if !ok {
                    return Err(shape_err("attention bias", vec![b, h, lq, lk], bs));
                }
                (Some(self.operand_as(t, q.dtype())?), bs[0], bs[1])
            }
        };
        let out = self.empty(s, q.dtype())?;
        if lk == 0 || out.numel() == 0 {
            return self.zeros(s, q.dtype());
        }
        let alpha = scale.unwrap_or(1.0 / (d as f64).sqrt());
        // Must match ATT_ROWS in attention.cu.
        const ROWS_PER_WARP: usize = 2;
        const WARPS: usize = 4;
        let rows_per_block = WARPS * ROWS_PER_WARP;
        let es = q.dtype().size_in_bytes();
        // Key tile: as many keys (up to one per lane) as fit next to the query rows in 48 KiB.
        let smem = |bk: usize| (bk * (d + 1) + bk * d + rows_per_block * d) * es;
        let bk = [32usize, 16, 8]
            .into_iter()
            .find(|&bk| smem(bk) <= 48 * 1024)
            .ok_or_else(|| invalid(OP, format!("head dim {d} too large for shared memory")))?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (lq.div_ceil(rows_per_block) as u32, (b * h) as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem(bk) as u32,
        };
        let out_buf = &out.storage().buf;
        let bias_buf = bias_op.as_ref().map_or(out_buf, Operand::buf);
        self.launch(
            &format!("attention_{sfx}"),
            cfg,
            &[
                Arg::Buf(out_buf),
                Arg::Buf(&q.storage().buf),
                Arg::Buf(&k.storage().buf),
                Arg::Buf(&v.storage().buf),
                Arg::Buf(bias_buf),
                u(lq),
                u(lk),
                u(h),
                u(d),
                Arg::F64(alpha),
                flag(bias_op.is_some()),
                u(bb),
                u(bh),
                u(bk),
            ],
        )?;
        Ok(out)
    }

    /// `dst[o, dst_off + j] = src[o, src_off + j]` (row strides given) for `o < outer, j < len`.
    pub(crate) fn copy_rows(
        &self,
        dst: &Tensor<Cuda>,
        src: &Tensor<Cuda>,
        outer: usize,
        len: usize,
        dst_stride_off: (usize, usize),
        src_stride_off: (usize, usize),
    ) -> Result<()> {
        let s = suffix("copy", dst.dtype())?;
        self.launch(
            &format!("copy_rows_{s}"),
            self.cfg_elems(outer * len),
            &[
                Arg::Buf(&dst.storage().buf),
                Arg::Buf(&src.storage().buf),
                u(outer),
                u(len),
                u(dst_stride_off.0),
                u(dst_stride_off.1),
                u(src_stride_off.0),
                u(src_stride_off.1),
            ],
        )
    }
}

impl ModelOps for Cuda {
    fn upload_weight(
        &self,
        bytes: ByteView,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Result<Tensor<Self>> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let need = n.and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        if need != Some(bytes.len()) {
            return Err(KernelError::LengthMismatch {
                op: "upload_weight",
                expected: need.unwrap_or(usize::MAX),
                found: bytes.len(),
            });
        }
        let mut buf = self.alloc_bytes(bytes.len())?;
        if !bytes.is_empty() {
            self.stream()
                .memcpy_htod(bytes.bytes(), &mut buf)
                .map_err(crate::device::dev("upload_weight"))?;
        }
        let scale = scale.unwrap_or(1.0);
        let t = Tensor::from_parts(CudaStorage { buf, scale }, shape.to_vec(), dtype);
        // Compute-dtype weights are stored plain (scale applied), so they work as activations.
        if dtype.is_compute() && scale != 1.0 {
            return self.cast_to(&t, dtype);
        }
        Ok(t)
    }

    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>> {
        suffix("cast", dtype).map_err(|_| KernelError::Unsupported {
            backend: "cuda".into(),
            op: "cast",
            dtype,
        })?;
        self.cast_to(x, dtype)
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        self.linear_impl(x, w, bias)
    }

    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        transpose_b: bool,
    ) -> Result<Tensor<Self>> {
        self.matmul_impl(a, b, transpose_b)
    }

    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("layer_norm", x)?;
        let c = last_dim("layer_norm", x)?;
        check_vec("layer_norm weight", weight, c)?;
        check_vec("layer_norm bias", bias, c)?;
        let w = weight.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let b = bias.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let xb = &x.storage().buf;
        let rows = x.numel().checked_div(c).unwrap_or(0);
        self.unary(
            &format!("layer_norm_{s}"),
            x,
            x.shape(),
            &[
                Arg::Buf(w.as_ref().map_or(xb, Operand::buf)),
                Arg::Buf(b.as_ref().map_or(xb, Operand::buf)),
                u(c),
                Arg::F64(eps),
                flag(w.is_some()),
                flag(b.is_some()),
            ],
            Self::cfg_rows(rows, row_threads(c)),
        )
    }

    fn rms_norm(
        &self,
        x: &Tensor<Self>,
        scale: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("rms_norm", x)?;
        let c = last_dim("rms_norm", x)?;
        check_vec("rms_norm scale", scale, c)?;
        let sc = scale.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let rows = x.numel().checked_div(c).unwrap_or(0);
        self.unary(
            &format!("rms_norm_{s}"),
            x,
            x.shape(),
            &[
                Arg::Buf(sc.as_ref().map_or(&x.storage().buf, Operand::buf)),
                u(c),
                Arg::F64(eps),
                flag(sc.is_some()),
            ],
            Self::cfg_rows(rows, row_threads(c)),
        )
    }

    fn modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("modulate", x)?;
        let (_, l, c, sh_shared) = per_batch("modulate shift", x, shift)?;
        let (_, _, _, sc_shared) = per_batch("modulate scale", x, scale)?;
        let sh = self.operand_as(shift, x.dtype())?;
        let sc = self.operand_as(scale, x.dtype())?;
        let n = x.numel();
        self.unary(
            &format!("modulate_{s}"),
            x,
            x.shape(),
            &[
                Arg::Buf(sh.buf()),
                Arg::Buf(sc.buf()),
                u(l),
                u(c),
                u(n),
                flag(sh_shared),
                flag(sc_shared),
            ],
            self.cfg_elems(n),
        )
    }

    fn gated_add(
        &self,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("gated_add", x)?;
        if y.shape() != x.shape() {
            return Err(shape_err("gated_add", x.shape().to_vec(), y.shape()));
        }
        if y.dtype() != x.dtype() {
            return Err(KernelError::DTypeMismatch {
                op: "gated_add",
                expected: x.dtype(),
                found: y.dtype(),
            });
        }
        let (_, l, c, shared) = per_batch("gated_add gate", x, gate)?;
        let g = self.operand_as(gate, x.dtype())?;
        let n = x.numel();
        self.unary(
            &format!("gated_add_{s}"),
            x,
            x.shape(),
            &[
                Arg::Buf(&y.storage().buf),
                Arg::Buf(g.buf()),
                u(l),
                u(c),
                u(n),
                flag(shared),
            ],
            self.cfg_elems(n),
        )
    }

    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        let s = Self::act("activation", x)?;
        let kind = match act {
            Activation::Silu => 0,
            Activation::GeluTanh => 1,
            Activation::GeluErf => 2,
            Activation::QuickGelu => 3,
            Activation::Relu => 4,
        };
        let n = x.numel();
        self.unary(
            &format!("activation_{s}"),
            x,
            x.shape(),
            &[u(n), Arg::I32(kind)],
            self.cfg_elems(n),
        )
    }

    fn binary(&self, a: &Tensor<Self>, b: &Tensor<Self>, op: BinaryOp) -> Result<Tensor<Self>> {
        let s = Self::act("binary", a)?;
        let (sa, sb) = (a.shape(), b.shape());
        if sb.len() > sa.len() || sa[sa.len() - sb.len()..] != *sb {
            return Err(shape_err("binary", sa.to_vec(), sb));
        }
        let nb = b.numel();
        if nb == 0 {
            return self.copy(a);
        }
        let bv = self.operand_as(b, a.dtype())?;
        let n = a.numel();
        let code = match op {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
        };
        self.unary(
            &format!("binary_{s}"),
            a,
            sa,
            &[Arg::Buf(bv.buf()), u(n), u(nb), Arg::I32(code)],
            self.cfg_elems(n),
        )
    }

    fn affine(&self, x: &Tensor<Self>, mul: f64, add: f64) -> Result<Tensor<Self>> {
        let s = Self::act("affine", x)?;
        let n = x.numel();
        self.unary(
            &format!("affine_{s}"),
            x,
            x.shape(),
            &[Arg::F64(mul), Arg::F64(add), u(n)],
            self.cfg_elems(n),
        )
    }

    fn softmax(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let s = Self::act("softmax", x)?;
        let c = last_dim("softmax", x)?;
        let rows = x.numel().checked_div(c).unwrap_or(0);
        self.unary(
            &format!("softmax_{s}"),
            x,
            x.shape(),
            &[u(c)],
            Self::cfg_rows(rows, row_threads(c)),
        )
    }

    fn rope(&self, x: &Tensor<Self>, cos_sin: &Tensor<Self>) -> Result<Tensor<Self>> {
        let s = Self::act("rope", x)?;
        let sh = x.shape();
        if sh.len() != 4 || !sh[3].is_multiple_of(2) {
            return Err(invalid(
                "rope",
                format!("expects x [B, L, H, D] with even D, found {sh:?}"),
            ));
        }
        let (b, l, h, d) = (sh[0], sh[1], sh[2], sh[3]);
        let cb = cos_sin.shape().first().copied().unwrap_or(0);
        if cos_sin.shape().len() != 4
            || !(cb == 1 || cb == b)
            || cos_sin.shape()[1..] != [l, d / 2, 2]
        {
            return Err(shape_err(
                "rope table",
                vec![b, l, d / 2, 2],
                cos_sin.shape(),
            ));
        }
        let t = self.operand_as(cos_sin, x.dtype())?;
        self.unary(
            &format!("rope_{s}"),
            x,
            sh,
            &[Arg::Buf(t.buf()), u(b), u(l), u(h), u(d), flag(cb == 1)],
            self.cfg_elems(x.numel() / 2),
        )
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        scale: Option<f64>,
    ) -> Result<Tensor<Self>> {
        self.attention_impl(q, k, v, bias, scale)
    }

    fn concat(&self, xs: &[&Tensor<Self>], dim: usize) -> Result<Tensor<Self>> {
        let first = xs
            .first()
            .ok_or_else(|| invalid("concat", "needs at least one tensor".into()))?;
        Self::act("concat", first)?;
        let (outer, _, inner) = split_at_dim("concat", first.shape(), dim)?;
        let mut total = 0;
        for t in xs {
            let s = t.shape();
            if s.len() != first.shape().len()
                || s[..dim] != first.shape()[..dim]
                || s[dim + 1..] != first.shape()[dim + 1..]
            {
                return Err(shape_err("concat", first.shape().to_vec(), s));
            }
            if t.dtype() != first.dtype() {
                return Err(KernelError::DTypeMismatch {
                    op: "concat",
                    expected: first.dtype(),
                    found: t.dtype(),
                });
            }
            total += s[dim];
        }
        let mut shape = first.shape().to_vec();
        shape[dim] = total;
        let out = self.empty(&shape, first.dtype())?;
        let row = total * inner;
        let mut off = 0;
        for t in xs {
            let blk = t.shape()[dim] * inner;
            self.copy_rows(&out, t, outer, blk, (row, off), (blk, 0))?;
            off += blk;
        }
        Ok(out)
    }

    fn narrow(
        &self,
        x: &Tensor<Self>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor<Self>> {
        Self::act("narrow", x)?;
        let (outer, size, inner) = split_at_dim("narrow", x.shape(), dim)?;
        if start.checked_add(len).is_none_or(|e| e > size) {
            return Err(invalid(
                "narrow",
                format!("range {start}+{len} exceeds dim {dim} of size {size}"),
            ));
        }
        let mut shape = x.shape().to_vec();
        shape[dim] = len;
        let out = self.empty(&shape, x.dtype())?;
        self.copy_rows(
            &out,
            x,
            outer,
            len * inner,
            (len * inner, 0),
            (size * inner, start * inner),
        )?;
        Ok(out)
    }

    fn permute(&self, x: &Tensor<Self>, perm: &[usize]) -> Result<Tensor<Self>> {
        let sfx = Self::act("permute", x)?;
        let s = x.shape();
        let r = s.len();
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
        if r > 6 {
            return Err(invalid(
                "permute",
                format!("rank {r} exceeds the 6 dims the permute kernel handles"),
            ));
        }
        let mut strides = vec![1usize; r];
        for i in (0..r.saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * s[i + 1];
        }
        let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        // Pad to six dims with leading size-1 dims.
        let mut s6 = [1usize; 6];
        let mut st6 = [0usize; 6];
        for (i, &p) in perm.iter().enumerate() {
            s6[6 - r + i] = s[p];
            st6[6 - r + i] = strides[p];
        }
        let n = x.numel();
        let mut args = vec![u(n)];
        args.extend(s6.iter().map(|&v| u(v)));
        args.extend(st6.iter().map(|&v| u(v)));
        self.unary(
            &format!("permute_{sfx}"),
            x,
            &shape,
            &args,
            self.cfg_elems(n),
        )
    }

    fn gather_rows(
        &self,
        table: &Tensor<Self>,
        ids: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        suffix("gather_rows", dtype)?;
        let s = table.shape();
        if s.len() != 2 {
            return Err(shape_err("gather_rows", vec![0, 0], s));
        }
        let (v, c) = (s[0], s[1]);
        if let Some(&id) = ids.iter().find(|&&id| id >= v) {
            return Err(invalid(
                "gather_rows",
                format!("id {id} out of range for a table of {v} rows"),
            ));
        }
        let row_bytes = c * table.dtype().size_in_bytes();
        let ids64: Vec<u64> = ids.iter().map(|&i| i as u64).collect();
        let mut idbuf = self.alloc_bytes(ids64.len() * 8)?;
        if !ids64.is_empty() {
            self.stream()
                .memcpy_htod(bytemuck::cast_slice::<u64, u8>(&ids64), &mut idbuf)
                .map_err(crate::device::dev("gather_rows"))?;
        }
        let raw = self.alloc_bytes(ids.len() * row_bytes)?;
        self.launch(
            "gather_rows_bytes",
            self.cfg_elems(ids.len() * row_bytes),
            &[
                Arg::Buf(&raw),
                Arg::Buf(&table.storage().buf),
                Arg::Buf(&idbuf),
                u(ids.len()),
                u(row_bytes),
            ],
        )?;
        let gathered: Tensor<Cuda> = Tensor::from_parts(
            CudaStorage {
                buf: raw,
                scale: table.storage().scale,
            },
            vec![ids.len(), c],
            table.dtype(),
        );
        if gathered.dtype() == dtype && gathered.storage().scale == 1.0 {
            Ok(gathered)
        } else {
            self.cast_to(&gathered, dtype)
        }
    }
}
