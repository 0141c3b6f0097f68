//! The convolution-family ops (NCHW): implicit-GEMM conv2d, group norm, upsampling, pixel
//! attention, channel slices and crops.

use crate::context::bind;
use crate::model::{Gemm, strides};
use crate::{Wgpu, invalid, shaders, u32_of, wdtype_code};
use flux_kernels::{Conv2dParams, ConvOps, DType, KernelError, Result, Tensor};

/// Score elements of one band of pixel attention (rows of queries at a time).
const SCORE_BUDGET: usize = 1 << 22;

fn shape4(op: &'static str, t: &Tensor<Wgpu>) -> Result<[usize; 4]> {
    match *t.shape() {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref s => Err(invalid(
            op,
            format!("expected a 4-D NCHW tensor, found shape {s:?}"),
        )),
    }
}

fn check_param_len(op: &'static str, what: &str, t: &Tensor<Wgpu>, len: usize) -> Result<()> {
    if t.numel() == len {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!(
                "{what} has shape {:?} ({} values), expected {len} values",
                t.shape(),
                t.numel()
            ),
        ))
    }
}

fn nc(op: &'static str, x: &Tensor<Wgpu>) -> Result<(usize, usize)> {
    match *x.shape() {
        [n, c, ..] => Ok((n, c)),
        ref s => Err(invalid(
            op,
            format!("expected [N, C, ...], found shape {s:?}"),
        )),
    }
}

impl ConvOps for Wgpu {
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: Conv2dParams,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "conv2d";
        let [n, c, h, w] = shape4(OP, x)?;
        let [o, wc, kh, kw] = match *weight.shape() {
            [o, wc, kh, kw] => [o, wc, kh, kw],
            ref s => {
                return Err(invalid(
                    OP,
                    format!("weight must be [out, in, kh, kw], found shape {s:?}"),
                ));
            }
        };
        if wc != c {
            return Err(invalid(
                OP,
                format!(
                    "weight {:?} expects {wc} input channels, input has {c}",
                    weight.shape()
                ),
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
            check_param_len(OP, "bias", b, o)?;
        }
        let xs = self.act(OP, x)?;
        let ws = weight.storage();
        let (wbuf, wdtype, wscale, _keep) = match ws.single() {
            Some(b) if ws.dtype != DType::F64 => (b.clone(), ws.dtype, ws.scale, None),
            _ => {
                let t = self.operand(OP, weight)?;
                (t.buffer().clone(), DType::F32, 1.0, Some(t))
            }
        };
        let bo = match bias {
            Some(b) => Some(self.operand(OP, b)?),
            None => None,
        };
        let out = self.empty(&[n, o, oh, ow])?;
        if out.numel() == 0 {
            return Ok(out);
        }
        let u = |v: usize| u32_of(OP, v);
        let words = [
            u(c)?,
            u(h)?,
            u(w)?,
            u(o)?,
            u(kh)?,
            u(kw)?,
            u(oh)?,
            u(ow)?,
            u(p.stride)?,
            u(p.padding[0])?,
            u(p.padding[2])?,
            u32::from(bo.is_some()),
            wscale.to_bits(),
        ];
        self.ctx.dispatch(
            OP,
            &shaders::CONV,
            "conv2d",
            &[("WDTYPE", wdtype_code(wdtype))],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, xs.buffer()),
                bind(2, &wbuf),
                bind(3, self.dummy_or(bo.as_ref())),
            ],
            (4, &words),
            [u((oh * ow).div_ceil(64))?, u(o.div_ceil(64))?, u(n)?],
        )?;
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
        let (n, c) = nc(OP, x)?;
        if groups == 0 || c % groups != 0 {
            return Err(invalid(
                OP,
                format!("{c} channels cannot be split into {groups} groups"),
            ));
        }
        if let Some(t) = weight {
            check_param_len(OP, "weight", t, c)?;
        }
        if let Some(t) = bias {
            check_param_len(OP, "bias", t, c)?;
        }
        let xs = self.act(OP, x)?;
        let wo = self.opt_operand(OP, weight, c)?;
        let bo = self.opt_operand(OP, bias, c)?;
        let out = self.empty(x.shape())?;
        let spatial = x.numel() / (n * c).max(1);
        let cpg = c / groups;
        let glen = cpg * spatial;
        if glen == 0 || n == 0 {
            return Ok(out);
        }
        let rows = n * groups;
        let words = [
            u32_of(OP, glen)?,
            u32_of(OP, rows)?,
            (eps as f32).to_bits(),
            u32::from(wo.is_some()),
            u32::from(bo.is_some()),
            u32_of(OP, spatial)?,
            u32_of(OP, cpg)?,
            u32_of(OP, groups)?,
            u32::from(swish),
        ];
        self.rows(
            OP,
            &shaders::NORMS,
            "norm",
            &[("MODE", 2.0)],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, xs.buffer()),
                bind(2, self.dummy_or(wo.as_ref())),
                bind(3, self.dummy_or(bo.as_ref())),
            ],
            (4, &words),
            rows,
        )?;
        Ok(out)
    }

    fn upsample_nearest2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        const OP: &str = "upsample_nearest2x";
        let [n, c, h, w] = shape4(OP, x)?;
        let xs = self.act(OP, x)?;
        let out = self.empty(&[n, c, 2 * h, 2 * w])?;
        // View the output as [N C, H, 2, W, 2]; the source repeats with stride 0.
        let view = [n * c, h, 2, w, 2];
        self.strided_copy(
            OP,
            Self::out_buf(&out),
            xs.buffer(),
            &view,
            &[h * w, w, 0, 1, 0],
            &strides(&view),
            0,
            0,
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
        let [n, c, h, w] = shape4(OP, q)?;
        for t in [k, v] {
            if t.shape() != q.shape() {
                return Err(KernelError::ShapeMismatch {
                    op: OP,
                    expected: q.shape().to_vec(),
                    found: t.shape().to_vec(),
                });
            }
        }
        let (qs, ks, vs) = (self.act(OP, q)?, self.act(OP, k)?, self.act(OP, v)?);
        let l = h * w;
        let out = self.empty(q.shape())?;
        if l == 0 || c == 0 || n == 0 {
            if out.numel() > 0 {
                self.ctx.clear(Self::out_buf(&out), out.numel() as u64 * 4);
            }
            return Ok(out);
        }
        // Bands of query pixels: scores [N, rows, L] = scale q^T k, softmax, then v P^T. Channel
        // counts here (512 in the autoencoder) exceed the fused kernel's head dim, and the band
        // keeps the score memory bounded.
        let band = (SCORE_BUDGET / (n * l)).clamp(1, l);
        let scores = self.ctx.alloc((n * band * l) as u64 * 4)?;
        let probs = self.ctx.alloc((n * band * l) as u64 * 4)?;
        let mut i0 = 0;
        while i0 < l {
            let rows = band.min(l - i0);
            // S[z, i, j] = scale * sum_c q[z, c, i0 + i] k[z, c, j]
            self.gemm(
                OP,
                scores.buffer(),
                qs.buffer(),
                ks.buffer(),
                DType::F32,
                None,
                &Gemm {
                    m: rows,
                    n: l,
                    k: c,
                    a_sm: 1,
                    a_sk: l,
                    a_sz: c * l,
                    a_off: i0,
                    b_sk: l,
                    b_sn: 1,
                    b_sz: c * l,
                    ldc: l,
                    c_sz: rows * l,
                    batch: n,
                    alpha: scale as f32,
                    wscale: 1.0,
                    ..Gemm::default()
                },
            )?;
            self.softmax_rows(probs.buffer(), scores.buffer(), l, n * rows)?;
            // out[z, c, i0 + i] = sum_j v[z, c, j] P[z, i, j]
            self.gemm(
                OP,
                Self::out_buf(&out),
                vs.buffer(),
                probs.buffer(),
                DType::F32,
                None,
                &Gemm {
                    m: c,
                    n: rows,
                    k: l,
                    a_sm: l,
                    a_sk: 1,
                    a_sz: c * l,
                    b_sk: 1,
                    b_sn: l,
                    b_sz: rows * l,
                    ldc: l,
                    c_sz: c * l,
                    col0: i0,
                    batch: n,
                    alpha: 1.0,
                    wscale: 1.0,
                    ..Gemm::default()
                },
            )?;
            i0 += rows;
        }
        Ok(out)
    }

    fn narrow_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        const OP: &str = "narrow_channels";
        let (n, c) = nc(OP, x)?;
        if start + len > c {
            return Err(invalid(
                OP,
                format!(
                    "channels {start}..{} out of range for {c} channels",
                    start + len
                ),
            ));
        }
        let xs = self.act(OP, x)?;
        let inner = x.numel() / (n * c).max(1);
        let mut shape = x.shape().to_vec();
        shape[1] = len;
        let out = self.empty(&shape)?;
        self.strided_copy(
            OP,
            Self::out_buf(&out),
            xs.buffer(),
            &[n, len * inner],
            &[c * inner, 1],
            &[len * inner, 1],
            start * inner,
            0,
        )?;
        Ok(out)
    }

    fn crop2d(
        &self,
        x: &Tensor<Self>,
        y0: usize,
        x0: usize,
        ch: usize,
        cw: usize,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "crop2d";
        let [n, c, h, w] = shape4(OP, x)?;
        if y0 + ch > h || x0 + cw > w {
            return Err(invalid(
                OP,
                format!(
                    "window rows {y0}..{} cols {x0}..{} exceeds {h}x{w}",
                    y0 + ch,
                    x0 + cw
                ),
            ));
        }
        let xs = self.act(OP, x)?;
        let out = self.empty(&[n, c, ch, cw])?;
        self.strided_copy(
            OP,
            Self::out_buf(&out),
            xs.buffer(),
            &[n * c, ch, cw],
            &[h * w, w, 1],
            &[ch * cw, cw, 1],
            y0 * w + x0,
            0,
        )?;
        Ok(out)
    }
}
