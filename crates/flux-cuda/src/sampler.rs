//! Sampler ops on the device: memory, transfers, the fused linear combination, reductions.

use crate::device::{Arg, Cuda, CudaStorage, dev, suffix, u};
use flux_kernels::shapes;
use flux_kernels::{
    Backend, DType, HostData, KernelError, MAX_LINCOMB_TERMS, Result, SamplerOps, Tensor,
};

/// Host values as little-endian bytes of a compute dtype.
pub(crate) fn host_bytes(op: &'static str, data: HostData<'_>, dtype: DType) -> Result<Vec<u8>> {
    Ok(match (dtype, data) {
        (DType::F32, HostData::F32(v)) => bytemuck::cast_slice(v).to_vec(),
        (DType::F32, HostData::F64(v)) => {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            bytemuck::cast_slice(&f).to_vec()
        }
        (DType::F64, HostData::F64(v)) => bytemuck::cast_slice(v).to_vec(),
        (DType::F64, HostData::F32(v)) => {
            let f: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
            bytemuck::cast_slice(&f).to_vec()
        }
        (d, _) => {
            return Err(KernelError::Unsupported {
                backend: "cuda".into(),
                op,
                dtype: d,
            });
        }
    })
}

impl Cuda {
    /// The tensor's bytes on the host, widened to a compute dtype first when it is a weight.
    fn download_bytes(&self, t: &Tensor<Cuda>, as_dtype: DType) -> Result<Vec<u8>> {
        let n = t.numel();
        if n == 0 {
            return Ok(Vec::new());
        }
        let widened;
        let src = if t.dtype() == as_dtype {
            t
        } else {
            widened = self.cast_to(t, as_dtype)?;
            &widened
        };
        let bytes = n * as_dtype.size_in_bytes();
        let host = self
            .stream()
            .clone_dtoh(&src.storage().buf.slice(0..bytes))
            .map_err(dev("download"))?;
        // A copy into pageable memory returns when done; the sync also surfaces any error of
        // the queued work.
        self.stream().synchronize().map_err(dev("download"))?;
        Ok(host)
    }

    /// Sums (or maxes) the per-block partial results of a reduction kernel.
    fn reduce(&self, name: &str, n: usize, args: &[Arg<'_>], max: bool) -> Result<f64> {
        if n == 0 {
            return Ok(0.0);
        }
        let cfg = self.cfg_reduce(n);
        let blocks = cfg.grid_dim.0 as usize;
        let partial = self.alloc_bytes(blocks * 8)?;
        let mut all: Vec<Arg<'_>> = args.iter().map(Arg::clone_ref).collect();
        all.push(Arg::Buf(&partial));
        self.launch(name, cfg, &all)?;
        let host = self
            .stream()
            .clone_dtoh(&partial.slice(0..blocks * 8))
            .map_err(dev("reduction download"))?;
        self.stream()
            .synchronize()
            .map_err(dev("reduction download"))?;
        let vals: Vec<f64> = crate::sampler::from_bytes(&host);
        Ok(if max {
            vals.iter().fold(0.0, |m, &v| m.max(v))
        } else {
            vals.iter().sum()
        })
    }

    fn lincomb_launch(
        &self,
        out: &mut Tensor<Cuda>,
        a: Option<f64>,
        terms: &[(f64, &Tensor<Cuda>)],
    ) -> Result<()> {
        let s = suffix("lincomb", out.dtype())?;
        let n = out.numel();
        let out_buf = &out.storage().buf;
        let mut args = vec![Arg::Buf(out_buf)];
        for k in 0..MAX_LINCOMB_TERMS {
            args.push(Arg::Buf(
                terms.get(k).map_or(out_buf, |t| &t.1.storage().buf),
            ));
        }
        for k in 0..MAX_LINCOMB_TERMS {
            args.push(Arg::F64(terms.get(k).map_or(0.0, |t| t.0)));
        }
        args.push(Arg::I32(terms.len() as i32));
        args.push(Arg::I32(i32::from(a.is_some())));
        args.push(Arg::F64(a.unwrap_or(0.0)));
        args.push(u(n));
        self.launch(&format!("lincomb_{s}"), self.cfg_elems(n), &args)
    }
}

impl Arg<'_> {
    fn clone_ref(&self) -> Arg<'_> {
        match self {
            Arg::Buf(b) => Arg::Buf(b),
            Arg::U64(v) => Arg::U64(*v),
            Arg::I32(v) => Arg::I32(*v),
            Arg::F32(v) => Arg::F32(*v),
            Arg::F64(v) => Arg::F64(*v),
        }
    }
}

impl SamplerOps for Cuda {
    type Storage = CudaStorage;

    fn name(&self) -> String {
        self.device_name().to_string()
    }

    fn supports_dtype(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        suffix("zeros", dtype).map_err(|_| KernelError::Unsupported {
            backend: "cuda".into(),
            op: "zeros",
            dtype,
        })?;
        let mut t = self.empty(shape, dtype)?;
        self.stream()
            .memset_zeros(&mut t.storage_mut().buf)
            .map_err(dev("zeros"))?;
        Ok(t)
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        shapes::host_len("upload", shape, data.len())?;
        let bytes = host_bytes("upload", data, dtype)?;
        let mut t = self.empty(shape, dtype)?;
        if !bytes.is_empty() {
            self.stream()
                .memcpy_htod(&bytes, &mut t.storage_mut().buf)
                .map_err(dev("upload"))?;
        }
        Ok(t)
    }

    fn write(&self, dst: &mut Tensor<Self>, data: HostData<'_>) -> Result<()> {
        shapes::host_len("write", dst.shape(), data.len())?;
        let bytes = host_bytes("write", data, dst.dtype())?;
        if dst.storage().buf.len() < bytes.len() {
            return Err(KernelError::Device(
                "write: tensor storage smaller than its shape".into(),
            ));
        }
        if !bytes.is_empty() {
            self.stream()
                .memcpy_htod(&bytes, &mut dst.storage_mut().buf)
                .map_err(dev("write"))?;
        }
        Ok(())
    }

    fn download_f64(&self, t: &Tensor<Self>) -> Result<Vec<f64>> {
        let b = self.download_bytes(t, DType::F64)?;
        Ok(crate::sampler::from_bytes(&b))
    }

    fn download_f32(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        let b = self.download_bytes(t, DType::F32)?;
        Ok(crate::sampler::from_bytes(&b))
    }

    fn copy(&self, t: &Tensor<Self>) -> Result<Tensor<Self>> {
        let src = &t.storage().buf;
        let mut buf = self.alloc_bytes(src.len())?;
        self.stream()
            .memcpy_dtod(src, &mut buf)
            .map_err(dev("copy"))?;
        Ok(Tensor::from_parts(
            CudaStorage {
                buf,
                scale: t.storage().scale,
            },
            t.shape().to_vec(),
            t.dtype(),
        ))
    }

    fn lincomb_into(&self, out: &mut Tensor<Self>, terms: &[(f64, &Tensor<Self>)]) -> Result<()> {
        shapes::lincomb_terms(out, terms, false)?;
        self.lincomb_launch(out, None, terms)
    }

    fn lincomb_inplace(
        &self,
        x: &mut Tensor<Self>,
        a: f64,
        terms: &[(f64, &Tensor<Self>)],
    ) -> Result<()> {
        shapes::lincomb_terms(x, terms, true)?;
        self.lincomb_launch(x, Some(a), terms)
    }

    /// One launch: each thread writes its element's `d` and updates its `x`.
    fn derivative_step(
        &self,
        x: &mut Tensor<Self>,
        (a, b): (f64, f64),
        den: &Tensor<Self>,
        c: f64,
        history: &[(f64, &Tensor<Self>)],
    ) -> Result<Tensor<Self>> {
        flux_kernels::backend::derivative_step_operands(x, b, den, history)?;
        let s = suffix("derivative_step", x.dtype())?;
        let n = x.numel();
        let d = self.empty(x.shape(), x.dtype())?;
        let (xb, db) = (&x.storage().buf, &d.storage().buf);
        let mut args = vec![Arg::Buf(xb), Arg::Buf(db), Arg::Buf(&den.storage().buf)];
        for k in 0..4 {
            args.push(Arg::Buf(history.get(k).map_or(xb, |h| &h.1.storage().buf)));
        }
        args.extend([Arg::F64(a), Arg::F64(b), Arg::F64(c)]);
        for k in 0..4 {
            args.push(Arg::F64(history.get(k).map_or(0.0, |h| h.0)));
        }
        args.push(Arg::I32(history.len() as i32));
        args.push(u(n));
        self.launch(&format!("derivative_step_{s}"), self.cfg_elems(n), &args)?;
        Ok(d)
    }

    /// One launch: each thread writes both results of its element.
    fn lincomb_pair(
        &self,
        first: &[(f64, &Tensor<Self>)],
        link: f64,
        b: &[f64],
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let head = flux_kernels::backend::check_pair("lincomb_pair", first, b)?;
        let s = suffix("lincomb_pair", head.dtype())?;
        let n = head.numel();
        let out = self.empty(head.shape(), head.dtype())?;
        let out2 = self.empty(head.shape(), head.dtype())?;
        let (o1, o2) = (&out.storage().buf, &out2.storage().buf);
        let mut args = vec![Arg::Buf(o1), Arg::Buf(o2)];
        for k in 0..MAX_LINCOMB_TERMS - 1 {
            args.push(Arg::Buf(first.get(k).map_or(o1, |t| &t.1.storage().buf)));
        }
        for k in 0..MAX_LINCOMB_TERMS - 1 {
            args.push(Arg::F64(first.get(k).map_or(0.0, |t| t.0)));
        }
        args.push(Arg::F64(link));
        for k in 0..MAX_LINCOMB_TERMS - 1 {
            args.push(Arg::F64(b.get(k).copied().unwrap_or(0.0)));
        }
        args.push(Arg::I32(first.len() as i32));
        args.push(u(n));
        self.launch(&format!("lincomb_pair_{s}"), self.cfg_elems(n), &args)?;
        Ok((out, out2))
    }

    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64> {
        let x = self.compute_operand(t, DType::F64)?;
        let x = x.as_ref();
        let s = suffix("sum_squares", x.dtype())?;
        self.reduce(
            &format!("sum_squares_{s}"),
            t.numel(),
            &[Arg::Buf(&x.storage().buf), u(t.numel())],
            false,
        )
    }

    fn max_abs(&self, t: &Tensor<Self>) -> Result<f64> {
        let x = self.compute_operand(t, DType::F64)?;
        let x = x.as_ref();
        let s = suffix("max_abs", x.dtype())?;
        self.reduce(
            &format!("max_abs_{s}"),
            t.numel(),
            &[Arg::Buf(&x.storage().buf), u(t.numel())],
            true,
        )
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
        let s = suffix("scaled_error_rms", e.dtype())?;
        let n = e.numel();
        let sum = self.reduce(
            &format!("scaled_error_sq_{s}"),
            n,
            &[
                Arg::Buf(&e.storage().buf),
                Arg::Buf(&a.storage().buf),
                Arg::Buf(&b.storage().buf),
                Arg::F64(atol),
                Arg::F64(rtol),
                u(n),
            ],
            false,
        )?;
        Ok((sum / n.max(1) as f64).sqrt())
    }
}

impl Backend for Cuda {}

/// Host bytes read back from the device as values (copied, so alignment does not matter).
pub(crate) fn from_bytes<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}
