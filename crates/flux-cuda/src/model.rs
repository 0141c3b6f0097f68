//! Model ops on the device. Shapes are checked here exactly as the CPU backend checks them;
//! kernels then trust the sizes they are given.

use crate::blas::{Gemm, GemmKind};
use crate::device::{Arg, Cuda, CudaStorage, flag, suffix, u};
use cudarc::driver::CudaSlice;
use flux_kernels::shapes::{self, AttentionDims, DimSplit, MatmulDims, RowDims};
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

pub(crate) use flux_kernels::shapes::invalid;

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

impl Cuda {
    /// `t` as a plain tensor of exactly `dtype` (borrowed when it already is one).
    pub(crate) fn operand_as<'a>(&self, t: &'a Tensor<Cuda>, dtype: DType) -> Result<Operand<'a>> {
        if t.dtype() == dtype && t.storage().scale == 1.0 {
            Ok(Operand::Borrowed(t))
        } else {
            Ok(Operand::Owned(self.cast_to(t, dtype)?))
        }
    }

    /// The shapes of a modulation of `x` and its shift and scale as operands of `x`'s dtype
    /// (shared by `modulate` and the fused `layer_norm_modulate`).
    fn modulation_operands<'a>(
        &self,
        x: &Tensor<Cuda>,
        shift: &'a Tensor<Cuda>,
        scale: &'a Tensor<Cuda>,
    ) -> Result<(shapes::ModulateDims, Operand<'a>, Operand<'a>)> {
        let dims = shapes::modulate(x.shape(), shift.shape(), scale.shape())?;
        let sh = self.operand_as(shift, x.dtype())?;
        let sc = self.operand_as(scale, x.dtype())?;
        Ok((dims, sh, sc))
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

    /// `x` (f32) quantised to e4m3 for the fp8 GEMM, with its scale computed on the device:
    /// returns the `[m, k]` bytes and an 8-byte buffer holding (amax / 448, 448 / amax) as f32
    /// (see `fp8.cu`). Nothing waits for the host.
    fn fp8_activation(&self, x: &Tensor<Cuda>) -> Result<(CudaSlice<u8>, CudaSlice<u8>)> {
        let n = x.numel();
        let cfg = self.cfg_reduce(n);
        let blocks = cfg.grid_dim.0 as usize;
        let partial = self.alloc_bytes(blocks * 8)?;
        self.launch(
            "max_abs_f32",
            cfg,
            &[Arg::Buf(&x.storage().buf), u(n), Arg::Buf(&partial)],
        )?;
        let scale = self.alloc_bytes(8)?;
        self.launch(
            "fp8_scale",
            Self::cfg_rows(1, 32),
            &[Arg::Buf(&partial), u(blocks), Arg::Buf(&scale)],
        )?;
        let xq = self.alloc_bytes(n)?;
        self.launch(
            "quantize_f8e4m3",
            self.cfg_elems(n),
            &[
                Arg::Buf(&xq),
                Arg::Buf(&x.storage().buf),
                Arg::Buf(&scale),
                u(n),
            ],
        )?;
        Ok((xq, scale))
    }

    /// `out [m, n] = bias [n]` repeated over the rows (the initial value of a GEMM that adds
    /// its product, beta = 1).
    fn broadcast_bias(
        &self,
        out: &Tensor<Cuda>,
        bias: &Tensor<Cuda>,
        (m, n): (usize, usize),
    ) -> Result<()> {
        let s = Self::act("linear", out)?;
        let b = self.operand_as(bias, out.dtype())?;
        self.launch(
            &format!("broadcast_rows_{s}"),
            self.cfg_elems(m * n),
            &[Arg::Buf(&out.storage().buf), Arg::Buf(b.buf()), u(m), u(n)],
        )
    }

    /// `x W^T (+ b)` into `out` for e4m3 weights on the fp8 tensor cores when
    /// [`Cuda::with_fp8_gemm`] is on and the device and shape allow it. `Ok(false)` otherwise,
    /// and for a shape cuBLASLt refuses (remembered, so later calls skip the quantisation);
    /// `out` then holds nothing the caller may use (at most the broadcast bias).
    fn linear_fp8(
        &self,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        out: &Tensor<Cuda>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<bool> {
        // cuBLASLt's fp8 kernels: sm_89 or newer, dimensions multiples of 16 (16-byte rows).
        let eligible = self.fp8_gemm
            && self.inner.capability >= (8, 9)
            && x.dtype() == DType::F32
            && w.dtype() == DType::F8E4M3
            && m % 16 == 0
            && n % 16 == 0
            && k % 16 == 0
            && m > 0
            && n > 0
            && k > 0;
        let refused = |dims| {
            self.inner
                .fp8_refused
                .lock()
                .map_or(true, |set| set.contains(&dims))
        };
        if !eligible || refused((m, n, k)) {
            return Ok(false);
        }
        let (xq, scale) = self.fp8_activation(x)?;
        let beta = if let Some(b) = bias {
            self.broadcast_bias(out, b, (m, n))?;
            1.0
        } else {
            0.0
        };
        let done = self.linear_fp8_lt(
            (m, n, k),
            self.ptr(&xq),
            self.ptr(&w.storage().buf),
            self.ptr(&scale),
            self.ptr(&out.storage().buf),
            w.storage().scale,
            beta,
        );
        if done.is_err() {
            if let Ok(mut set) = self.inner.fp8_refused.lock() {
                set.insert((m, n, k));
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// `x W^T + b`, with GELU (tanh form) applied in cuBLASLt's epilogue when `gelu` asks for
    /// it and the fused bf16 path runs; the flag returned says whether GELU was applied.
    fn linear_impl(
        &self,
        x: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        gelu: bool,
    ) -> Result<(Tensor<Cuda>, bool)> {
        Self::act("linear", x)?;
        let shapes::LinearDims {
            m,
            k,
            n,
            out_shape: shape,
        } = shapes::linear(x.shape(), w.shape(), bias.map(Tensor::shape))?;
        let out = self.empty(&shape, x.dtype())?;
        if self.linear_fp8(x, w, bias, &out, (m, n, k))? {
            return Ok((out, false));
        }
        let tensor_cores = self.bf16_gemm
            && x.dtype() == DType::F32
            && matches!(w.dtype(), DType::BF16 | DType::F8E4M3);
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
                gelu,
            );
            if fused.is_ok() {
                return Ok((out, gelu));
            }
        }
        if let Some(b) = bias {
            self.broadcast_bias(&out, b, (m, n))?;
        } else if k == 0 {
            return Ok((self.zeros(&shape, x.dtype())?, false));
        }
        if k == 0 {
            return Ok((out, false));
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
        Ok((out, false))
    }

    fn matmul_impl(
        &self,
        a: &Tensor<Cuda>,
        b: &Tensor<Cuda>,
        transpose_b: bool,
    ) -> Result<Tensor<Cuda>> {
        Self::act("matmul", a)?;
        let MatmulDims {
            batch,
            m,
            k,
            n,
            shared_b: shared,
            out_shape: shape,
        } = shapes::matmul(a.shape(), b.shape(), transpose_b)?;
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
        let AttentionDims {
            b,
            lq,
            lk,
            h,
            d,
            bias: bias_dims,
        } = shapes::attention(s, k.shape(), v.shape(), bias.map(Tensor::shape))?;
        if d > 256 {
            return Err(invalid(
                OP,
                format!("head dim {d} exceeds the 256 the attention kernel holds per warp"),
            ));
        }
        let (bb, bh) = bias_dims.unwrap_or((1, 1));
        let bias_op = bias.map(|t| self.operand_as(t, q.dtype())).transpose()?;
        let out = self.empty(s, q.dtype())?;
        if lk == 0 || out.numel() == 0 {
            return self.zeros(s, q.dtype());
        }
        let alpha = scale.unwrap_or(1.0 / (d as f64).sqrt());
        if self.bf16_attention
            && q.dtype() == DType::F32
            && matches!(d, 16 | 32 | 64 | 128)
            && self.inner.capability.0 >= 8
        {
            let bias_buf = bias_op.as_ref().map(Operand::buf);
            let dims = TcDims {
                b,
                lq,
                lk,
                h,
                d,
                bias_b: bb,
                bias_h: bh,
                scale: alpha,
            };
            self.attention_tc(&out, q, k, v, bias_buf, dims)?;
            return Ok(out);
        }
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

    /// The tensor-core attention of `attention_tc.cu` into `out` (f32 q, k, v of head dim 16,
    /// 32, 64 or 128; the caller checked the shapes and the device). k and v are rounded to
    /// bf16 once into padded scratch buffers, v transposed, then one block per 64 query rows
    /// and head runs the flash loop.
    fn attention_tc(
        &self,
        out: &Tensor<Cuda>,
        q: &Tensor<Cuda>,
        k: &Tensor<Cuda>,
        v: &Tensor<Cuda>,
        bias: Option<&CudaSlice<u8>>,
        dims: TcDims,
    ) -> Result<()> {
        // Must match TC_BM, TC_BN and TC_THREADS in attention_tc.cu.
        const BM: usize = 64;
        const BN: usize = 64;
        const THREADS: u32 = 128;
        let TcDims {
            b,
            lq,
            lk,
            h,
            d,
            bias_b,
            bias_h,
            scale,
        } = dims;
        let lk_pad = lk.div_ceil(BN) * BN;
        let kb = self.alloc_bytes(b * h * lk_pad * d * 2)?;
        let vt = self.alloc_bytes(b * h * lk_pad * d * 2)?;
        self.launch(
            "attention_pack_k_bf16",
            self.cfg_elems(b * h * lk_pad * d),
            &[
                Arg::Buf(&kb),
                Arg::Buf(&k.storage().buf),
                u(b * h),
                u(lk),
                u(lk_pad),
                u(h),
                u(d),
            ],
        )?;
        self.launch(
            "attention_pack_vt_bf16",
            cudarc::driver::LaunchConfig {
                grid_dim: ((lk_pad / 32) as u32, d.div_ceil(32) as u32, (b * h) as u32),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Buf(&vt),
                Arg::Buf(&v.storage().buf),
                u(lk),
                u(lk_pad),
                u(h),
                u(d),
            ],
        )?;
        let out_buf = &out.storage().buf;
        self.launch(
            &format!("attention_tc_d{d}"),
            cudarc::driver::LaunchConfig {
                grid_dim: (lq.div_ceil(BM) as u32, (b * h) as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Buf(out_buf),
                Arg::Buf(&q.storage().buf),
                Arg::Buf(&kb),
                Arg::Buf(&vt),
                Arg::Buf(bias.unwrap_or(out_buf)),
                u(lq),
                u(lk),
                u(lk_pad),
                u(h),
                Arg::F64(scale),
                flag(bias.is_some()),
                u(bias_b),
                u(bias_h),
            ],
        )
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

/// Shapes of one tensor-core attention call.
#[derive(Clone, Copy)]
struct TcDims {
    b: usize,
    lq: usize,
    lk: usize,
    h: usize,
    d: usize,
    bias_b: usize,
    bias_h: usize,
    /// Score scale (1/sqrt(d) unless given).
    scale: f64,
}

impl ModelOps for Cuda {
    fn upload_weight(
        &self,
        bytes: ByteView,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Result<Tensor<Self>> {
        shapes::weight_len(shape, dtype, bytes.len())?;
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
        Ok(self.linear_impl(x, w, bias, false)?.0)
    }

    fn linear_act(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        let (y, applied) = self.linear_impl(x, w, bias, act == Activation::GeluTanh)?;
        if applied {
            Ok(y)
        } else {
            self.activation(&y, act)
        }
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
        let RowDims { rows, len: c } = shapes::layer_norm(
            x.shape(),
            weight.map(Tensor::shape),
            bias.map(Tensor::shape),
        )?;
        let w = weight.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let b = bias.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let xb = &x.storage().buf;
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
        let RowDims { rows, len: c } = shapes::rms_norm(x.shape(), scale.map(Tensor::shape))?;
        let sc = scale.map(|t| self.operand_as(t, x.dtype())).transpose()?;
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
        let (
            shapes::ModulateDims {
                l,
                c,
                shift_shared: sh_shared,
                scale_shared: sc_shared,
                ..
            },
            sh,
            sc,
        ) = self.modulation_operands(x, shift, scale)?;
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

    fn layer_norm_modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("layer_norm_modulate", x)?;
        let (
            shapes::ModulateDims {
                l,
                c,
                shift_shared: sh_shared,
                scale_shared: sc_shared,
                ..
            },
            sh,
            sc,
        ) = self.modulation_operands(x, shift, scale)?;
        let rows = x.numel().checked_div(c).unwrap_or(0);
        self.unary(
            &format!("layer_norm_modulate_{s}"),
            x,
            x.shape(),
            &[
                Arg::Buf(sh.buf()),
                Arg::Buf(sc.buf()),
                u(c),
                u(l),
                Arg::F64(eps),
                flag(sh_shared),
                flag(sc_shared),
            ],
            Self::cfg_rows(rows, row_threads(c)),
        )
    }

    fn gated_add(
        &self,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let s = Self::act("gated_add", x)?;
        let shapes::PerBatch { l, c, shared, .. } =
            shapes::gated_add(x.shape(), y.shape(), gate.shape())?;
        if y.dtype() != x.dtype() {
            return Err(KernelError::DTypeMismatch {
                op: "gated_add",
                expected: x.dtype(),
                found: y.dtype(),
            });
        }
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
        let nb = shapes::binary(a.shape(), b.shape())?;
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
            a.shape(),
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
        let RowDims { rows, len: c } = shapes::rows("softmax", x.shape())?;
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
        let shapes::RopeDims {
            b,
            l,
            h,
            d,
            shared_table,
        } = shapes::rope(sh, cos_sin.shape())?;
        let t = self.operand_as(cos_sin, x.dtype())?;
        self.unary(
            &format!("rope_{s}"),
            x,
            sh,
            &[
                Arg::Buf(t.buf()),
                u(b),
                u(l),
                u(h),
                u(d),
                flag(shared_table),
            ],
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
        let DimSplit {
            outer,
            inner,
            out_shape,
            ..
        } = shapes::concat(xs.iter().map(|t| t.shape()), dim)?;
        let first = xs
            .first()
            .ok_or_else(|| invalid("concat", "needs at least one tensor"))?;
        Self::act("concat", first)?;
        if let Some(t) = xs.iter().find(|t| t.dtype() != first.dtype()) {
            return Err(KernelError::DTypeMismatch {
                op: "concat",
                expected: first.dtype(),
                found: t.dtype(),
            });
        }
        let out = self.empty(&out_shape, first.dtype())?;
        let row = out_shape[dim] * inner;
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
        let DimSplit {
            outer,
            size,
            inner,
            out_shape,
        } = shapes::narrow(x.shape(), dim, start, len)?;
        let out = self.empty(&out_shape, x.dtype())?;
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
        let shapes::Permuted {
            out_shape: shape,
            src_strides,
        } = shapes::permute(x.shape(), perm)?;
        let r = shape.len();
        if r > 6 {
            return Err(invalid(
                "permute",
                format!("rank {r} exceeds the 6 dims the permute kernel handles"),
            ));
        }
        // Pad to six dims with leading size-1 dims.
        let mut s6 = [1usize; 6];
        let mut st6 = [0usize; 6];
        for i in 0..r {
            s6[6 - r + i] = shape[i];
            st6[6 - r + i] = src_strides[i];
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
        let (_, c) = shapes::gather_rows(table.shape(), ids)?;
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
