//! The sampler ops: memory, transfers, the fused linear combination and reductions.

use crate::context::{bind, grid};
use crate::{Chunk, Operand, Wgpu, WgpuStorage, shaders, u32_of, unsupported};
use flux_kernels::shapes;
use flux_kernels::{DType, HostData, Result, SamplerOps, Tensor};

fn host_f32(data: HostData<'_>) -> Vec<f32> {
    match data {
        HostData::F32(v) => v.to_vec(),
        HostData::F64(v) => v.iter().map(|&x| x as f32).collect(),
    }
}

fn require_f32(op: &'static str, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Ok(())
    } else {
        Err(unsupported(op, dtype))
    }
}

/// Reduction modes of `reduce.wgsl`.
#[derive(Clone, Copy)]
enum Reduce {
    SumSquares,
    MaxAbs,
    ScaledError,
}

impl Wgpu {
    /// Per-workgroup partials of a reduction over `n` elements, summed (or maxed) in f64.
    fn reduce(
        &self,
        mode: Reduce,
        x: &Operand,
        ab: Option<(&Operand, &Operand)>,
        n: usize,
        atol: f32,
        rtol: f32,
    ) -> Result<f64> {
        if n == 0 {
            return Ok(0.0);
        }
        let groups = n.div_ceil(1024);
        let partials = self.ctx.alloc(groups as u64 * 4)?;
        let (a, b) = ab.map_or((x.buffer(), x.buffer()), |(a, b)| (a.buffer(), b.buffer()));
        let code = match mode {
            Reduce::SumSquares => 0.0,
            Reduce::MaxAbs => 1.0,
            Reduce::ScaledError => 2.0,
        };
        self.ctx.dispatch(
            "reduce",
            &shaders::REDUCE,
            "reduce",
            &[("MODE", code)],
            &[
                bind(0, partials.buffer()),
                bind(1, x.buffer()),
                bind(2, a),
                bind(3, b),
            ],
            (
                4,
                &[u32_of("reduce", n)?, atol.to_bits(), rtol.to_bits(), 0],
            ),
            grid(groups as u64, 1),
        )?;
        let bytes = self.ctx.read(partials.buffer(), groups as u64 * 4)?;
        let vals: &[f32] = bytemuck::cast_slice(&bytes);
        Ok(match mode {
            Reduce::MaxAbs => vals.iter().fold(0.0f64, |m, &v| m.max(f64::from(v))),
            _ => vals.iter().map(|&v| f64::from(v)).sum(),
        })
    }

    /// Records `out = [a out +] sum c_i t_i`.
    fn lincomb_kernel(
        &self,
        out: &wgpu::Buffer,
        n: usize,
        a: Option<f64>,
        terms: &[(f64, &Tensor<Self>)],
    ) -> Result<()> {
        let ops: Vec<Operand> = terms
            .iter()
            .map(|(_, t)| self.operand("lincomb", t))
            .collect::<Result<_>>()?;
        let mut words = vec![u32_of("lincomb", n)?, (a.unwrap_or(0.0) as f32).to_bits()];
        words.extend((0..6).map(|k| terms.get(k).map_or(0.0f32, |t| t.0 as f32).to_bits()));
        let mut binds = vec![bind(0, out)];
        for k in 0..6 {
            let b = ops.get(k).map_or(self.ctx.dummy(), Operand::buffer);
            binds.push(bind(k as u32 + 1, b));
        }
        self.ctx.dispatch(
            "lincomb",
            &shaders::ELEMENTWISE,
            "lincomb",
            &[
                ("N_TERMS", terms.len() as f64),
                ("INPLACE", if a.is_some() { 1.0 } else { 0.0 }),
            ],
            &binds,
            (7, &words),
            grid(n as u64, 256),
        )
    }

    /// Downloads any tensor as f32 values (weights widened on the device first).
    fn download_values(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        let n = t.numel();
        let x = self.operand("download", t)?;
        let bytes = self.ctx.read(x.buffer(), n as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

impl SamplerOps for Wgpu {
    type Storage = WgpuStorage;

    fn name(&self) -> String {
        format!("wgpu ({}, {:?})", self.ctx.info.name, self.ctx.info.backend)
    }

    fn supports_dtype(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        require_f32("zeros", dtype)?;
        let t = self.empty(shape)?;
        self.ctx.clear(Self::out_buf(&t), t.numel() as u64 * 4);
        Ok(t)
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        require_f32("upload", dtype)?;
        shapes::host_len("upload", shape, data.len())?;
        let t = self.empty(shape)?;
        let v = host_f32(data);
        self.ctx
            .write(Self::out_buf(&t), 0, bytemuck::cast_slice(&v));
        Ok(t)
    }

    fn write(&self, dst: &mut Tensor<Self>, data: HostData<'_>) -> Result<()> {
        shapes::host_len("write", dst.shape(), data.len())?;
        let s = dst.storage();
        if !s.is_plain() {
            return Err(unsupported("write", s.dtype));
        }
        let v = host_f32(data);
        self.ctx
            .write(Self::out_buf(dst), 0, bytemuck::cast_slice(&v));
        Ok(())
    }

    fn download_f64(&self, t: &Tensor<Self>) -> Result<Vec<f64>> {
        Ok(self
            .download_values(t)?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    fn download_f32(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        self.download_values(t)
    }

    fn copy(&self, t: &Tensor<Self>) -> Result<Tensor<Self>> {
        let s = t.storage();
        let mut chunks = Vec::with_capacity(s.chunks.len());
        for c in &s.chunks {
            let bytes = c.buf.buffer().size();
            let buf = self.ctx.alloc(bytes)?;
            self.ctx.copy(c.buf.buffer(), buf.buffer(), bytes);
            chunks.push(Chunk {
                buf,
                first: c.first,
                len: c.len,
            });
        }
        Ok(Tensor::from_parts(
            WgpuStorage {
                chunks,
                dtype: s.dtype,
                scale: s.scale,
            },
            t.shape().to_vec(),
            t.dtype(),
        ))
    }

    fn lincomb_into(&self, out: &mut Tensor<Self>, terms: &[(f64, &Tensor<Self>)]) -> Result<()> {
        shapes::lincomb_terms(out, terms, false)?;
        require_f32("lincomb", out.dtype())?;
        if !out.storage().is_plain() {
            return Err(unsupported("lincomb", out.storage().dtype));
        }
        self.lincomb_kernel(Self::out_buf(out), out.numel(), None, terms)
    }

    fn lincomb_inplace(
        &self,
        x: &mut Tensor<Self>,
        a: f64,
        terms: &[(f64, &Tensor<Self>)],
    ) -> Result<()> {
        shapes::lincomb_terms(x, terms, true)?;
        require_f32("lincomb_inplace", x.dtype())?;
        if !x.storage().is_plain() {
            return Err(unsupported("lincomb_inplace", x.storage().dtype));
        }
        self.lincomb_kernel(Self::out_buf(x), x.numel(), Some(a), terms)
    }

    /// One dispatch: each thread writes its element's `d` and updates its `x`.
    fn derivative_step(
        &self,
        x: &mut Tensor<Self>,
        (a, b): (f64, f64),
        den: &Tensor<Self>,
        c: f64,
        history: &[(f64, &Tensor<Self>)],
    ) -> Result<Tensor<Self>> {
        let operands = flux_kernels::backend::derivative_step_operands(x, b, den, history)?;
        require_f32("derivative_step", x.dtype())?;
        if !x.storage().is_plain() {
            return Err(unsupported("derivative_step", x.storage().dtype));
        }
        let n = x.numel();
        let ops: Vec<Operand> = operands
            .iter()
            .map(|(_, t)| self.operand("derivative_step", t))
            .collect::<Result<_>>()?;
        let d = self.empty(x.shape())?;
        let mut words = vec![u32_of("derivative_step", n)?];
        words.extend([a, b, c].iter().map(|&v| (v as f32).to_bits()));
        words.extend((0..4).map(|k| history.get(k).map_or(0.0f32, |h| h.0 as f32).to_bits()));
        let mut binds = vec![bind(0, Self::out_buf(x)), bind(9, Self::out_buf(&d))];
        for k in 0..5 {
            let buf = ops.get(k).map_or(self.ctx.dummy(), Operand::buffer);
            binds.push(bind(k as u32 + 1, buf));
        }
        self.ctx.dispatch(
            "derivative_step",
            &shaders::ELEMENTWISE,
            "derivative_step",
            &[("N_TERMS", history.len() as f64)],
            &binds,
            (11, &words),
            grid(n as u64, 256),
        )?;
        Ok(d)
    }

    /// One dispatch: each thread writes both results of its element.
    fn lincomb_pair(
        &self,
        first: &[(f64, &Tensor<Self>)],
        link: f64,
        b: &[f64],
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let head = flux_kernels::backend::check_pair("lincomb_pair", first, b)?;
        require_f32("lincomb_pair", head.dtype())?;
        let n = head.numel();
        let ops: Vec<Operand> = first
            .iter()
            .map(|(_, t)| self.operand("lincomb_pair", t))
            .collect::<Result<_>>()?;
        let (out, out2) = (self.empty(head.shape())?, self.empty(head.shape())?);
        let mut words = vec![u32_of("lincomb_pair", n)?, (link as f32).to_bits()];
        let a: Vec<f64> = first.iter().map(|t| t.0).collect();
        for coefficients in [&a[..], b] {
            words.extend(
                (0..5).map(|k| (coefficients.get(k).copied().unwrap_or(0.0) as f32).to_bits()),
            );
        }
        let mut binds = vec![bind(0, Self::out_buf(&out)), bind(9, Self::out_buf(&out2))];
        for k in 0..5 {
            let buf = ops.get(k).map_or(self.ctx.dummy(), Operand::buffer);
            binds.push(bind(k as u32 + 1, buf));
        }
        self.ctx.dispatch(
            "lincomb_pair",
            &shaders::ELEMENTWISE,
            "lincomb_pair",
            &[("N_TERMS", first.len() as f64)],
            &binds,
            (10, &words),
            grid(n as u64, 256),
        )?;
        Ok((out, out2))
    }

    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64> {
        let x = self.operand("sum_squares", t)?;
        self.reduce(Reduce::SumSquares, &x, None, t.numel(), 0.0, 0.0)
    }

    fn max_abs(&self, t: &Tensor<Self>) -> Result<f64> {
        let x = self.operand("max_abs", t)?;
        self.reduce(Reduce::MaxAbs, &x, None, t.numel(), 0.0, 0.0)
    }

    fn scaled_error_rms(
        &self,
        e: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        atol: f64,
        rtol: f64,
    ) -> Result<f64> {
        shapes::scaled_error(e, a, b)?;
        require_f32("scaled_error_rms", e.dtype())?;
        let (xe, xa, xb) = (
            self.operand("scaled_error_rms", e)?,
            self.operand("scaled_error_rms", a)?,
            self.operand("scaled_error_rms", b)?,
        );
        let s = self.reduce(
            Reduce::ScaledError,
            &xe,
            Some((&xa, &xb)),
            e.numel(),
            atol as f32,
            rtol as f32,
        )?;
        Ok((s / e.numel().max(1) as f64).sqrt())
    }
}
