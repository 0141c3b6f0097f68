//! The model ops: weights, GEMMs, norms, modulation, activations, RoPE, attention, layout.

use crate::context::{Binding, MAX_GROUPS, bind, grid};
use crate::{
    Chunk, Operand, Wgpu, WgpuStorage, invalid, shaders, u32_of, unsupported, wdtype_code,
};
use flux_kernels::shapes::{self, AttentionDims, DimSplit, MatmulDims, RowDims, strides};
use flux_kernels::{Activation, BinaryOp, ByteView, DType, KernelError, ModelOps, Result, Tensor};

/// Largest head dimension of the fused attention kernel (private arrays of this length).
const ATTN_DMAX: usize = 128;
/// Most dims of a strided copy.
const COPY_RANK: usize = 8;

/// The matmul kernel's parameter block.
#[derive(Default)]
pub(crate) struct Gemm {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) a_sm: usize,
    pub(crate) a_sk: usize,
    pub(crate) a_sz: usize,
    pub(crate) b_sk: usize,
    pub(crate) b_sn: usize,
    pub(crate) b_sz: usize,
    pub(crate) ldc: usize,
    pub(crate) c_sz: usize,
    pub(crate) col0: usize,
    pub(crate) c_off: usize,
    pub(crate) a_off: usize,
    pub(crate) b_off: usize,
    pub(crate) batch: usize,
    pub(crate) alpha: f32,
    pub(crate) wscale: f32,
}

impl Wgpu {
    /// Records `C = alpha A B (+ bias)` with the tiled kernel; `b` is a packed buffer of `bdtype`.
    pub(crate) fn gemm(
        &self,
        op: &'static str,
        c: &wgpu::Buffer,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        bdtype: DType,
        bias: Option<&wgpu::Buffer>,
        g: &Gemm,
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let u = |n: usize| u32_of(op, n);
        let words = [
            u(g.m)?,
            u(g.n)?,
            u(g.k)?,
            u(g.a_sm)?,
            u(g.a_sk)?,
            u(g.a_sz)?,
            u(g.b_sk)?,
            u(g.b_sn)?,
            u(g.b_sz)?,
            u(g.ldc)?,
            u(g.c_sz)?,
            u(g.col0)?,
            u32::from(bias.is_some()),
            g.wscale.to_bits(),
            g.alpha.to_bits(),
            u(g.c_off)?,
            u(g.a_off)?,
            u(g.b_off)?,
        ];
        let groups = [u(g.n.div_ceil(64))?, u(g.m.div_ceil(64))?, u(g.batch)?];
        self.ctx.dispatch(
            op,
            &shaders::MATMUL,
            "matmul",
            &[("WDTYPE", wdtype_code(bdtype))],
            &[
                bind(0, c),
                bind(1, a),
                bind(2, b),
                bind(3, bias.unwrap_or(self.ctx.dummy())),
            ],
            (4, &words),
            groups,
        )
    }

    /// Records one strided copy: `dst[dst_off + idx . dst_stride] = src[src_off + idx . src_stride]`
    /// for every index `idx` of `shape`.
    pub(crate) fn strided_copy(
        &self,
        op: &'static str,
        dst: &wgpu::Buffer,
        src: &wgpu::Buffer,
        shape: &[usize],
        src_stride: &[usize],
        dst_stride: &[usize],
        src_off: usize,
        dst_off: usize,
    ) -> Result<()> {
        let n: usize = shape.iter().product();
        if n == 0 {
            return Ok(());
        }
        if shape.len() > COPY_RANK {
            return Err(invalid(
                op,
                format!("tensors of rank {} (at most {COPY_RANK})", shape.len()),
            ));
        }
        let mut words = vec![
            u32_of(op, n)?,
            shape.len() as u32,
            u32_of(op, src_off)?,
            u32_of(op, dst_off)?,
        ];
        for list in [shape, src_stride, dst_stride] {
            for i in 0..COPY_RANK {
                words.push(u32_of(op, list.get(i).copied().unwrap_or(1))?);
            }
        }
        self.ctx.dispatch(
            op,
            &shaders::LAYOUT,
            "strided_copy",
            &[],
            &[bind(0, dst), bind(1, src)],
            (2, &words),
            grid(n as u64, 256),
        )
    }

    /// Records an elementwise kernel of `shader`/`entry` over `n` outputs.
    pub(crate) fn pointwise(
        &self,
        op: &'static str,
        shader: &crate::shaders::Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        bindings: &[Binding<'_>],
        params: (u32, &[u32]),
        n: usize,
    ) -> Result<()> {
        self.ctx.dispatch(
            op,
            shader,
            entry,
            constants,
            bindings,
            params,
            grid(n as u64, 256),
        )
    }

    /// Records a row kernel (one workgroup per row).
    pub(crate) fn rows(
        &self,
        op: &'static str,
        shader: &crate::shaders::Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        bindings: &[Binding<'_>],
        params: (u32, &[u32]),
        rows: usize,
    ) -> Result<()> {
        self.ctx.dispatch(
            op,
            shader,
            entry,
            constants,
            bindings,
            params,
            grid(rows as u64, 1),
        )
    }

    /// Layer norm (mode 0) or RMS norm (mode 1) over the last dim (`dims`, checked).
    #[allow(clippy::too_many_arguments)]
    fn row_norm(
        &self,
        op: &'static str,
        mode: f64,
        x: &Tensor<Self>,
        w: Option<&Tensor<Self>>,
        b: Option<&Tensor<Self>>,
        eps: f64,
        RowDims { rows, len: c }: RowDims,
    ) -> Result<Tensor<Self>> {
        let xs = self.act(op, x)?;
        let wo = self.opt_operand(op, w, c)?;
        let bo = self.opt_operand(op, b, c)?;
        let out = self.empty(x.shape())?;
        let words = [
            u32_of(op, c)?,
            u32_of(op, rows)?,
            (eps as f32).to_bits(),
            u32::from(wo.is_some()),
            u32::from(bo.is_some()),
            1,
            1,
            1,
            0,
        ];
        self.rows(
            op,
            &shaders::NORMS,
            "norm",
            &[("MODE", mode)],
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

    fn modulation(
        &self,
        op: &'static str,
        x: &Tensor<Self>,
        u: &Operand,
        v: &Operand,
        mask: u32,
    ) -> Result<Tensor<Self>> {
        let xs = self.act(op, x)?;
        let s = x.shape();
        let out = self.empty(s)?;
        let n = x.numel();
        self.pointwise(
            op,
            &shaders::MODULATION,
            op,
            &[],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, xs.buffer()),
                bind(2, u.buffer()),
                bind(3, v.buffer()),
            ],
            (
                4,
                &[u32_of(op, n)?, u32_of(op, s[1])?, u32_of(op, s[2])?, mask],
            ),
            n,
        )?;
        Ok(out)
    }
}

impl ModelOps for Wgpu {
    fn upload_weight(
        &self,
        bytes: ByteView,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Result<Tensor<Self>> {
        if dtype == DType::F64 {
            return Err(unsupported("upload_weight", dtype));
        }
        let n = shapes::weight_len(shape, dtype, bytes.len())?;
        let es = dtype.size_in_bytes();
        // Split by rows of the first dim so each chunk stays under the binding limit.
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let row_len = n.checked_div(rows).unwrap_or(0);
        let limit = self.ctx.weight_chunk_bytes as usize;
        let row_bytes = (row_len * es).max(1);
        if row_bytes > limit {
            return Err(invalid(
                "upload_weight",
                format!(
                    "one row of {shape:?} ({row_bytes} bytes) exceeds the device's storage binding limit ({limit} bytes)"
                ),
            ));
        }
        let rows_per_chunk = (limit / row_bytes).max(1);
        let data = bytes.bytes();
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < rows || chunks.is_empty() {
            let nr = rows_per_chunk.min(rows - r0.min(rows));
            let (e0, e1) = (r0 * row_len, ((r0 + nr) * row_len).min(n));
            let buf = self.ctx.buffer_from_bytes(&data[e0 * es..e1 * es])?;
            chunks.push(Chunk {
                buf,
                first: e0,
                len: e1 - e0,
            });
            r0 += nr.max(1);
        }
        Ok(Tensor::from_parts(
            WgpuStorage {
                chunks,
                dtype,
                scale: scale.unwrap_or(1.0),
            },
            shape.to_vec(),
            dtype,
        ))
    }

    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>> {
        if dtype != DType::F32 {
            return Err(unsupported("cast", dtype));
        }
        let out = self.empty(x.shape())?;
        if x.numel() > 0 {
            let s = x.storage();
            if s.dtype == DType::F64 {
                return Err(unsupported("cast", DType::F64));
            }
            self.widen_into(Self::out_buf(&out), s)?;
        }
        Ok(out)
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let xs = self.act("linear", x)?;
        let shapes::LinearDims { m, k, n, out_shape } =
            shapes::linear(x.shape(), w.shape(), bias.map(Tensor::shape))?;
        let bo = self.opt_operand("linear bias", bias, n)?;
        let out = self.empty(&out_shape)?;
        let ws = w.storage();
        if ws.dtype == DType::F64 {
            return Err(unsupported("linear", DType::F64));
        }
        if k == 0 {
            // No products: the output is the bias (or zeros).
            match &bo {
                Some(b) => self.binary_into(&out, None, b, m * n, n, BinaryOp::Add)?,
                None => self.ctx.clear(Self::out_buf(&out), (m * n) as u64 * 4),
            }
            return Ok(out);
        }
        for c in &ws.chunks {
            let n0 = c.first / k;
            let nn = c.len / k;
            self.gemm(
                "linear",
                Self::out_buf(&out),
                xs.buffer(),
                c.buf.buffer(),
                ws.dtype,
                bo.as_ref().map(Operand::buffer),
                &Gemm {
                    m,
                    n: nn,
                    k,
                    a_sm: k,
                    a_sk: 1,
                    b_sk: 1,
                    b_sn: k,
                    ldc: n,
                    col0: n0,
                    batch: 1,
                    alpha: 1.0,
                    wscale: ws.scale,
                    ..Gemm::default()
                },
            )?;
        }
        Ok(out)
    }

    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        transpose_b: bool,
    ) -> Result<Tensor<Self>> {
        let av = self.act("matmul", a)?;
        let MatmulDims {
            batch,
            m,
            k,
            n,
            shared_b: shared,
            out_shape,
        } = shapes::matmul(a.shape(), b.shape(), transpose_b)?;
        let out = self.empty(&out_shape)?;
        let bs = b.storage();
        // A packed single-chunk weight is read in place; anything else is widened first.
        let (bbuf, bdtype, bscale, _keep) = match bs.single() {
            Some(buf) if bs.dtype != DType::F64 => (buf.clone(), bs.dtype, bs.scale, None),
            _ => {
                let o = self.operand("matmul", b)?;
                (o.buffer().clone(), DType::F32, 1.0, Some(o))
            }
        };
        if k == 0 {
            self.ctx.clear(Self::out_buf(&out), out.numel() as u64 * 4);
            return Ok(out);
        }
        let (b_sk, b_sn) = if transpose_b { (1, k) } else { (n, 1) };
        // Batches beyond one dispatch dimension go in several dispatches.
        let step = MAX_GROUPS as usize;
        let mut z0 = 0;
        while z0 < batch {
            let nz = step.min(batch - z0);
            self.gemm(
                "matmul",
                Self::out_buf(&out),
                av.buffer(),
                &bbuf,
                bdtype,
                None,
                &Gemm {
                    m,
                    n,
                    k,
                    a_sm: k,
                    a_sk: 1,
                    a_sz: m * k,
                    b_sk,
                    b_sn,
                    b_sz: if shared { 0 } else { k * n },
                    ldc: n,
                    c_sz: m * n,
                    c_off: z0 * m * n,
                    a_off: z0 * m * k,
                    b_off: if shared { 0 } else { z0 * k * n },
                    batch: nz,
                    alpha: 1.0,
                    wscale: bscale,
                    ..Gemm::default()
                },
            )?;
            z0 += nz;
        }
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &Tensor<Self>,
        weight: Option<&Tensor<Self>>,
        bias: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        let d = shapes::layer_norm(
            x.shape(),
            weight.map(Tensor::shape),
            bias.map(Tensor::shape),
        )?;
        self.row_norm("layer_norm", 0.0, x, weight, bias, eps, d)
    }

    fn rms_norm(
        &self,
        x: &Tensor<Self>,
        scale: Option<&Tensor<Self>>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        let d = shapes::rms_norm(x.shape(), scale.map(Tensor::shape))?;
        self.row_norm("rms_norm", 1.0, x, scale, None, eps, d)
    }

    fn modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let d = shapes::modulate(x.shape(), shift.shape(), scale.shape())?;
        let (sh, sc) = (
            self.operand("modulate", shift)?,
            self.operand("modulate", scale)?,
        );
        let mask = u32::from(d.shift_shared) | (u32::from(d.scale_shared) << 1);
        self.modulation("modulate", x, &sh, &sc, mask)
    }

    fn layer_norm_modulate(
        &self,
        x: &Tensor<Self>,
        shift: &Tensor<Self>,
        scale: &Tensor<Self>,
        eps: f64,
    ) -> Result<Tensor<Self>> {
        const OP: &str = "layer_norm_modulate";
        let d = shapes::modulate(x.shape(), shift.shape(), scale.shape())?;
        let xs = self.act(OP, x)?;
        let (sh, sc) = (self.operand(OP, shift)?, self.operand(OP, scale)?);
        let rows = x.numel().checked_div(d.c).unwrap_or(0);
        let out = self.empty(x.shape())?;
        let words = [
            u32_of(OP, d.c)?,
            u32_of(OP, rows)?,
            (eps as f32).to_bits(),
            0,
            0,
            1,
            1,
            1,
            0,
            u32_of(OP, d.l.max(1))?,
            u32::from(d.shift_shared),
            u32::from(d.scale_shared),
        ];
        self.rows(
            OP,
            &shaders::NORMS,
            "norm",
            &[("MODE", 3.0)],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, xs.buffer()),
                bind(2, sh.buffer()),
                bind(3, sc.buffer()),
            ],
            (4, &words),
            rows,
        )?;
        Ok(out)
    }

    fn gated_add(
        &self,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let d = shapes::gated_add(x.shape(), y.shape(), gate.shape())?;
        let (ys, g) = (self.act("gated_add", y)?, self.operand("gated_add", gate)?);
        self.modulation("gated_add", x, &ys, &g, u32::from(d.shared) << 1)
    }

    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        let xs = self.act("activation", x)?;
        let out = self.empty(x.shape())?;
        let code = match act {
            Activation::Silu => 0.0,
            Activation::GeluTanh => 1.0,
            Activation::GeluErf => 2.0,
            Activation::QuickGelu => 3.0,
            Activation::Relu => 4.0,
        };
        let n = x.numel();
        self.pointwise(
            "activation",
            &shaders::ACTIVATIONS,
            "activation",
            &[("ACT", code)],
            &[bind(0, Self::out_buf(&out)), bind(1, xs.buffer())],
            (2, &[u32_of("activation", n)?]),
            n,
        )?;
        Ok(out)
    }

    fn binary(&self, a: &Tensor<Self>, b: &Tensor<Self>, op: BinaryOp) -> Result<Tensor<Self>> {
        let av = self.act("binary", a)?;
        let nb = shapes::binary(a.shape(), b.shape())?;
        let bv = self.operand("binary", b)?;
        let out = self.empty(a.shape())?;
        if nb == 0 {
            let n = a.numel();
            self.ctx
                .copy(av.buffer(), Self::out_buf(&out), n as u64 * 4);
            return Ok(out);
        }
        self.binary_into(&out, Some(&av), &bv, a.numel(), nb, op)?;
        Ok(out)
    }

    fn affine(&self, x: &Tensor<Self>, mul: f64, add: f64) -> Result<Tensor<Self>> {
        let xs = self.act("affine", x)?;
        let out = self.empty(x.shape())?;
        let n = x.numel();
        self.pointwise(
            "affine",
            &shaders::ELEMENTWISE,
            "affine",
            &[],
            &[bind(0, Self::out_buf(&out)), bind(1, xs.buffer())],
            (
                8,
                &[
                    u32_of("affine", n)?,
                    1,
                    (mul as f32).to_bits(),
                    (add as f32).to_bits(),
                ],
            ),
            n,
        )?;
        Ok(out)
    }

    fn softmax(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let xs = self.act("softmax", x)?;
        let RowDims { rows, len } = shapes::rows("softmax", x.shape())?;
        let out = self.empty(x.shape())?;
        self.softmax_rows(Self::out_buf(&out), xs.buffer(), len, rows)?;
        Ok(out)
    }

    fn rope(&self, x: &Tensor<Self>, cos_sin: &Tensor<Self>) -> Result<Tensor<Self>> {
        let xs = self.act("rope", x)?;
        let shapes::RopeDims {
            l,
            h,
            d,
            shared_table,
            ..
        } = shapes::rope(x.shape(), cos_sin.shape())?;
        let t = self.operand("rope", cos_sin)?;
        let out = self.empty(x.shape())?;
        let pairs = x.numel() / 2;
        self.pointwise(
            "rope",
            &shaders::ROPE,
            "rope",
            &[],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, xs.buffer()),
                bind(2, t.buffer()),
            ],
            (
                3,
                &[
                    u32_of("rope", pairs)?,
                    u32_of("rope", l)?,
                    u32_of("rope", h)?,
                    u32_of("rope", d)?,
                    u32::from(shared_table),
                ],
            ),
            pairs,
        )?;
        Ok(out)
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        scale: Option<f64>,
    ) -> Result<Tensor<Self>> {
        let s = q.shape();
        let AttentionDims {
            b,
            lq,
            lk,
            h,
            d,
            bias: bias_dims,
        } = shapes::attention(s, k.shape(), v.shape(), bias.map(Tensor::shape))?;
        let (bias_b, bias_h) = bias_dims.unwrap_or((1, 1));
        if d > ATTN_DMAX {
            return Err(invalid(
                "attention",
                format!("head dim {d} exceeds the kernel's maximum of {ATTN_DMAX}"),
            ));
        }
        let (qs, ks, vs) = (
            self.act("attention", q)?,
            self.act("attention", k)?,
            self.act("attention", v)?,
        );
        let bo = match bias {
            Some(t) => Some(self.operand("attention", t)?),
            None => None,
        };
        let out = self.empty(s)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        if lk == 0 {
            // Softmax over no keys: the reference divides 0 by 0.
            return Err(invalid("attention", "needs at least one key"));
        }
        let alpha = scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32;
        let u = |n: usize| u32_of("attention", n);
        self.ctx.dispatch(
            "attention",
            &shaders::ATTENTION,
            "attention",
            &[],
            &[
                bind(0, Self::out_buf(&out)),
                bind(1, qs.buffer()),
                bind(2, ks.buffer()),
                bind(3, vs.buffer()),
                bind(4, self.dummy_or(bo.as_ref())),
            ],
            (
                5,
                &[
                    u(lq)?,
                    u(lk)?,
                    u(h)?,
                    u(d)?,
                    alpha.to_bits(),
                    u32::from(bo.is_some()),
                    u(bias_b)?,
                    u(bias_h)?,
                ],
            ),
            [u(lq.div_ceil(64))?, u(b * h)?, 1],
        )?;
        Ok(out)
    }

    fn max_activation_bytes(&self) -> usize {
        let limits = &self.ctx.limits;
        let bytes = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    fn concat(&self, xs: &[&Tensor<Self>], dim: usize) -> Result<Tensor<Self>> {
        let DimSplit { out_shape, .. } = shapes::concat(xs.iter().map(|t| t.shape()), dim)?;
        let out = self.empty(&out_shape)?;
        let ost = strides(&out_shape);
        let mut at = 0;
        for t in xs {
            let src = self.act("concat", t)?;
            self.strided_copy(
                "concat",
                Self::out_buf(&out),
                src.buffer(),
                t.shape(),
                &strides(t.shape()),
                &ost,
                0,
                at * ost[dim],
            )?;
            at += t.shape()[dim];
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
        let xs = self.act("narrow", x)?;
        let DimSplit {
            outer,
            size,
            inner,
            out_shape,
        } = shapes::narrow(x.shape(), dim, start, len)?;
        let out = self.empty(&out_shape)?;
        self.strided_copy(
            "narrow",
            Self::out_buf(&out),
            xs.buffer(),
            &[outer, len * inner],
            &[size * inner, 1],
            &[len * inner, 1],
            start * inner,
            0,
        )?;
        Ok(out)
    }

    fn permute(&self, x: &Tensor<Self>, perm: &[usize]) -> Result<Tensor<Self>> {
        let xs = self.act("permute", x)?;
        let shapes::Permuted {
            out_shape: shape,
            src_strides: pst,
        } = shapes::permute(x.shape(), perm)?;
        let out = self.empty(&shape)?;
        self.strided_copy(
            "permute",
            Self::out_buf(&out),
            xs.buffer(),
            &shape,
            &pst,
            &strides(&shape),
            0,
            0,
        )?;
        Ok(out)
    }

    fn gather_rows(
        &self,
        table: &Tensor<Self>,
        ids: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        if dtype != DType::F32 {
            return Err(KernelError::InvalidArgument {
                op: "gather_rows",
                message: format!("activations must be f32 on wgpu, found {dtype}"),
            });
        }
        let (_, c) = shapes::gather_rows(table.shape(), ids)?;
        let ts = table.storage();
        if ts.dtype == DType::F64 {
            return Err(unsupported("gather_rows", DType::F64));
        }
        let out = self.empty(&[ids.len(), c])?;
        if c == 0 || ids.is_empty() {
            return Ok(out);
        }
        // Group the ids by the chunk holding their row; each chunk gathers its own rows.
        for ch in &ts.chunks {
            let (r0, r1) = (ch.first / c, (ch.first + ch.len) / c);
            let (pos, local): (Vec<usize>, Vec<u32>) = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| (r0..r1).contains(*id))
                .map(|(i, &id)| (i, (id - r0) as u32))
                .unzip();
            if pos.is_empty() {
                continue;
            }
            // Contiguous runs of output rows: one dispatch per run.
            let mut start = 0;
            while start < pos.len() {
                let mut end = start + 1;
                while end < pos.len() && pos[end] == pos[end - 1] + 1 {
                    end += 1;
                }
                let idb = self
                    .ctx
                    .buffer_from_bytes(bytemuck::cast_slice(&local[start..end]))?;
                let n = (end - start) * c;
                self.pointwise(
                    "gather_rows",
                    &shaders::CASTS,
                    "gather",
                    &[("WDTYPE", wdtype_code(ts.dtype))],
                    &[
                        bind(0, Self::out_buf(&out)),
                        bind(1, ch.buf.buffer()),
                        bind(3, idb.buffer()),
                    ],
                    (
                        2,
                        &[
                            u32_of("gather_rows", n)?,
                            u32_of("gather_rows", pos[start] * c)?,
                            ts.scale.to_bits(),
                            u32_of("gather_rows", c)?,
                        ],
                    ),
                    n,
                )?;
                start = end;
            }
        }
        Ok(out)
    }
}

impl Wgpu {
    /// Records `out = a op b[i % nb]`; without `a`, `out = 0 + b` (broadcast copy).
    fn binary_into(
        &self,
        out: &Tensor<Self>,
        a: Option<&Operand>,
        b: &Operand,
        n: usize,
        nb: usize,
        op: BinaryOp,
    ) -> Result<()> {
        let zeros;
        let a_buf = if let Some(a) = a {
            a.buffer().clone()
        } else {
            zeros = self.ctx.alloc(n as u64 * 4)?;
            self.ctx.clear(zeros.buffer(), n as u64 * 4);
            zeros.buffer().clone()
        };
        let code = match op {
            BinaryOp::Add => 0.0,
            BinaryOp::Sub => 1.0,
            BinaryOp::Mul => 2.0,
        };
        self.pointwise(
            "binary",
            &shaders::ELEMENTWISE,
            "binary",
            &[("OP", code)],
            &[
                bind(0, Self::out_buf(out)),
                bind(1, &a_buf),
                bind(2, b.buffer()),
            ],
            (8, &[u32_of("binary", n)?, u32_of("binary", nb)?, 0, 0]),
            n,
        )
    }

    /// Records a row softmax of `rows` rows of `len` from `x` into `out`.
    pub(crate) fn softmax_rows(
        &self,
        out: &wgpu::Buffer,
        x: &wgpu::Buffer,
        len: usize,
        rows: usize,
    ) -> Result<()> {
        if len == 0 || rows == 0 {
            return Ok(());
        }
        self.rows(
            "softmax",
            &shaders::SOFTMAX,
            "softmax",
            &[],
            &[bind(0, out), bind(1, x)],
            (2, &[u32_of("softmax", len)?, u32_of("softmax", rows)?]),
            rows,
        )
    }
}
