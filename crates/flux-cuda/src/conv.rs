//! Convolution-family ops (NCHW) on the device: conv2d as im2col + GEMM in row bands, group
//! norm, nearest upsampling, pixel attention as banded GEMMs, channel and spatial slices.

use crate::blas::{Gemm, GemmKind};
use crate::device::{Arg, Cuda, flag, suffix, u};
use crate::model::Operand;
use flux_kernels::shapes::{self, ChannelSlice, Conv2dDims, GroupNormDims};
use flux_kernels::{Conv2dParams, ConvOps, DType, KernelError, Result, SamplerOps, Tensor};

/// Largest temporary (im2col columns, a band of attention scores) in bytes.
const TEMP_BUDGET: usize = 256 << 20;

fn gemm_kind(d: DType) -> GemmKind {
    if d == DType::F64 {
        GemmKind::F64
    } else {
        GemmKind::F32
    }
}

impl ConvOps for Cuda {
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: Conv2dParams,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "conv2d";
        let s = suffix(OP, x.dtype())?;
        let Conv2dDims {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh,
            ow,
        } = shapes::conv2d(x.shape(), weight.shape(), bias.map(Tensor::shape), p)?;
        let wt = self.operand_as(weight, x.dtype())?;
        let k = c * kh * kw;
        let plane = oh * ow;
        let out = self.empty(&[n, o, oh, ow], x.dtype())?;
        let total = out.numel();
        if let Some(b) = bias {
            let b = self.operand_as(b, x.dtype())?;
            self.launch(
                &format!("bias_nchw_{s}"),
                self.cfg_elems(total),
                &[
                    Arg::Buf(&out.storage().buf),
                    Arg::Buf(b.buf()),
                    u(o),
                    u(plane),
                    u(total),
                ],
            )?;
        } else if k == 0 || total == 0 {
            return self.zeros(&[n, o, oh, ow], x.dtype());
        }
        if k == 0 || total == 0 {
            return Ok(out);
        }
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        let es = x.dtype().size_in_bytes();
        let kind = gemm_kind(x.dtype());
        let (xp, wp, op) = (
            self.ptr(&x.storage().buf),
            self.ptr(wt.buf()),
            self.ptr(&out.storage().buf),
        );
        let pointwise = kh == 1 && kw == 1 && p.stride == 1 && p.padding == [0; 4];
        if pointwise {
            return self
                .gemm(
                    kind,
                    &Gemm {
                        m: o,
                        n: plane,
                        k: c,
                        trans_a: false,
                        trans_b: false,
                        a: wp,
                        lda: k,
                        stride_a: 0,
                        b: xp,
                        ldb: plane,
                        stride_b: c * h * w,
                        c: op,
                        ldc: plane,
                        stride_c: o * plane,
                        batch: n,
                        alpha: 1.0,
                        beta,
                    },
                )
                .map(|()| out);
        }
        let band = (TEMP_BUDGET / (k * ow * es).max(1)).clamp(1, oh.max(1));
        let col = self.alloc_bytes(k * band * ow * es)?;
        let colp = self.ptr(&col);
        for b in 0..n {
            let mut oh0 = 0;
            while oh0 < oh {
                let rows = band.min(oh - oh0);
                let width = rows * ow;
                // Pointer arguments are plain device addresses: image b starts at an offset.
                let ximg = xp + (b * c * h * w * es) as u64;
                self.launch(
                    &format!("im2col_{s}"),
                    self.cfg_elems(k * width),
                    &[
                        Arg::Buf(&col),
                        Arg::U64(ximg),
                        u(c),
                        u(h),
                        u(w),
                        u(kh),
                        u(kw),
                        u(oh0),
                        u(rows),
                        u(ow),
                        u(p.stride),
                        u(p.padding[0]),
                        u(p.padding[2]),
                    ],
                )
                .map_err(|e| match e {
                    KernelError::Device(m) => KernelError::Device(format!("conv2d: {m}")),
                    e => e,
                })?;
                self.gemm(
                    kind,
                    &Gemm {
                        m: o,
                        n: width,
                        k,
                        trans_a: false,
                        trans_b: false,
                        a: wp,
                        lda: k,
                        stride_a: 0,
                        b: colp,
                        ldb: width,
                        stride_b: 0,
                        c: op + ((b * o * plane + oh0 * ow) * es) as u64,
                        ldc: plane,
                        stride_c: 0,
                        batch: 1,
                        alpha: 1.0,
                        beta,
                    },
                )?;
                oh0 += rows;
            }
        }
        Ok(out)
    }

    fn group_norm(
        &self,
        x: &Tensor<Self>,
        groups: usize,
        eps: f64,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        swish: bool,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "group_norm";
        let s = suffix(OP, x.dtype())?;
        let GroupNormDims {
            n, spatial, cpg, ..
        } = shapes::group_norm(
            OP,
            x.shape(),
            groups,
            weight.map(Tensor::shape),
            bias.map(Tensor::shape),
        )?;
        let wt = weight.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let bt = bias.map(|t| self.operand_as(t, x.dtype())).transpose()?;
        let out = self.empty(x.shape(), x.dtype())?;
        if n * cpg * spatial == 0 {
            return self.zeros(x.shape(), x.dtype());
        }
        let xb = &x.storage().buf;
        self.launch(
            &format!("group_norm_{s}"),
            Cuda::cfg_rows(n * groups, 256),
            &[
                Arg::Buf(&out.storage().buf),
                Arg::Buf(xb),
                Arg::Buf(wt.as_ref().map_or(xb, Operand::buf)),
                Arg::Buf(bt.as_ref().map_or(xb, Operand::buf)),
                u(spatial),
                u(cpg),
                u(groups),
                Arg::F64(eps),
                flag(wt.is_some()),
                flag(bt.is_some()),
                flag(swish),
            ],
        )?;
        Ok(out)
    }

    fn upsample_nearest2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        const OP: &str = "upsample_nearest2x";
        let s = suffix(OP, x.dtype())?;
        let [n, c, h, w] = shapes::nchw(OP, x.shape())?;
        let out = self.empty(&[n, c, 2 * h, 2 * w], x.dtype())?;
        self.launch(
            &format!("upsample2x_{s}"),
            self.cfg_elems(out.numel()),
            &[
                Arg::Buf(&out.storage().buf),
                Arg::Buf(&x.storage().buf),
                u(n * c),
                u(h),
                u(w),
            ],
        )?;
        Ok(out)
    }

    fn attention_nchw(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        scale: f64,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "attention_nchw";
        let s = suffix(OP, q.dtype())?;
        let [n, c, h, w] = shapes::attention_nchw(q.shape(), k.shape(), v.shape())?;
        for t in [k, v] {
            if t.dtype() != q.dtype() {
                return Err(KernelError::DTypeMismatch {
                    op: OP,
                    expected: q.dtype(),
                    found: t.dtype(),
                });
            }
        }
        let l = h * w;
        if l == 0 || c == 0 {
            return self.zeros(q.shape(), q.dtype());
        }
        let es = q.dtype().size_in_bytes();
        let kind = gemm_kind(q.dtype());
        let band = (TEMP_BUDGET / (l * es)).clamp(1, l);
        let scores = self.alloc_bytes(band * l * es)?;
        let sp = self.ptr(&scores);
        let out = self.empty(q.shape(), q.dtype())?;
        let (qp, kp, vp, op) = (
            self.ptr(&q.storage().buf),
            self.ptr(&k.storage().buf),
            self.ptr(&v.storage().buf),
            self.ptr(&out.storage().buf),
        );
        for b in 0..n {
            let img = (b * c * l * es) as u64;
            let mut i0 = 0;
            while i0 < l {
                let rows = band.min(l - i0);
                // S [rows, L] = scale * q[:, i0..i0+rows]^T k.
                self.gemm(
                    kind,
                    &Gemm {
                        m: rows,
                        n: l,
                        k: c,
                        trans_a: true,
                        trans_b: false,
                        a: qp + img + (i0 * es) as u64,
                        lda: l,
                        stride_a: 0,
                        b: kp + img,
                        ldb: l,
                        stride_b: 0,
                        c: sp,
                        ldc: l,
                        stride_c: 0,
                        batch: 1,
                        alpha: scale,
                        beta: 0.0,
                    },
                )?;
                self.launch(
                    &format!("softmax_{s}"),
                    Cuda::cfg_rows(rows, 256),
                    &[Arg::Buf(&scores), Arg::Buf(&scores), u(l)],
                )?;
                // out[:, i0..i0+rows] = v P^T.
                self.gemm(
                    kind,
                    &Gemm {
                        m: c,
                        n: rows,
                        k: l,
                        trans_a: false,
                        trans_b: true,
                        a: vp + img,
                        lda: l,
                        stride_a: 0,
                        b: sp,
                        ldb: l,
                        stride_b: 0,
                        c: op + img + (i0 * es) as u64,
                        ldc: l,
                        stride_c: 0,
                        batch: 1,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                )?;
                i0 += rows;
            }
        }
        Ok(out)
    }

    fn narrow_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        const OP: &str = "narrow_channels";
        suffix(OP, x.dtype())?;
        let ChannelSlice {
            n,
            c,
            inner,
            out_shape,
        } = shapes::narrow_channels(x.shape(), start, len)?;
        let out = self.empty(&out_shape, x.dtype())?;
        self.copy_rows(
            &out,
            x,
            n,
            len * inner,
            (len * inner, 0),
            (c * inner, start * inner),
        )?;
        Ok(out)
    }

    fn crop2d(
        &self,
        x: &Tensor<Self>,
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "crop2d";
        let s = suffix(OP, x.dtype())?;
        let [n, c, ih, iw] = shapes::crop2d(x.shape(), y0, x0, h, w)?;
        let out = self.empty(&[n, c, h, w], x.dtype())?;
        self.launch(
            &format!("crop_{s}"),
            self.cfg_elems(out.numel()),
            &[
                Arg::Buf(&out.storage().buf),
                Arg::Buf(&x.storage().buf),
                u(n * c),
                u(ih),
                u(iw),
                u(y0),
                u(x0),
                u(h),
                u(w),
            ],
        )?;
        Ok(out)
    }
}
