//! The `Backend` trait: the only code that touches tensor memory.

use crate::{DType, KernelError, Result, Tensor};

/// Most inputs a single fused linear combination accepts.
pub const MAX_LINCOMB_TERMS: usize = 6;

/// Host-side data handed to or read from a backend.
#[derive(Clone, Copy, Debug)]
pub enum HostData<'a> {
    /// Double precision values.
    F64(&'a [f64]),
    /// Single precision values.
    F32(&'a [f32]),
}

impl HostData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F64(v) => v.len(),
            HostData::F32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The natural dtype of the host values.
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F64(_) => DType::F64,
            HostData::F32(_) => DType::F32,
        }
    }
}

/// The ops samplers need: memory, transfers, one fused linear combination, reductions.
///
/// Every sampler update is written as one `lincomb` with coefficients computed on the host in
/// f64, so a backend only has to make that one kernel fast.
pub trait SamplerOps {
    /// Device memory holding a tensor's elements.
    type Storage: Send + Sync;

    /// A short human-readable name (`cpu`, `wgpu (llvmpipe)`, `cuda:0 (H100)`).
    fn name(&self) -> String;

    /// Whether tensors of `dtype` can be created and computed on this backend.
    fn supports_dtype(&self, dtype: DType) -> bool;

    /// A new tensor filled with zeros.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// A new tensor of `dtype` holding `data` (converted to `dtype`; f64 -> f32 rounds to nearest).
    fn upload(&self, data: HostData<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// [`SamplerOps::upload`] of values the caller hands over: a backend whose tensors live in
    /// host memory keeps the vector when it already has `dtype`, with no copy (a fresh noise
    /// draw every step). The default uploads a copy.
    fn upload_f32_vec(&self, data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        self.upload(HostData::F32(&data), shape, dtype)
    }

    /// [`SamplerOps::upload_f32_vec`] for f64 values.
    fn upload_f64_vec(&self, data: Vec<f64>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        self.upload(HostData::F64(&data), shape, dtype)
    }

    /// Overwrites an existing tensor with host values (e.g. a fresh noise draw).
    fn write(&self, dst: &mut Tensor<Self>, data: HostData<'_>) -> Result<()>
    where
        Self: Backend;

    /// Reads a tensor back as f64 values (exact for f32 and f64 tensors).
    fn download_f64(&self, t: &Tensor<Self>) -> Result<Vec<f64>>
    where
        Self: Backend;

    /// Reads a tensor back as f32 values (rounds f64 tensors).
    fn download_f32(&self, t: &Tensor<Self>) -> Result<Vec<f32>>
    where
        Self: Backend;

    /// A copy of `t` in new memory.
    fn copy(&self, t: &Tensor<Self>) -> Result<Tensor<Self>>
    where
        Self: Backend;

    /// `out = sum_i c_i * t_i` in one pass over memory, with at most [`MAX_LINCOMB_TERMS`] terms,
    /// all of `out`'s shape and dtype. f32 tensors are accumulated in f32 with each coefficient
    /// rounded to f32 once; f64 tensors in f64.
    fn lincomb_into(&self, out: &mut Tensor<Self>, terms: &[(f64, &Tensor<Self>)]) -> Result<()>
    where
        Self: Backend;

    /// `x = a * x + sum_i c_i * t_i` in place (same rules as [`SamplerOps::lincomb_into`], at most
    /// `MAX_LINCOMB_TERMS - 1` extra terms).
    fn lincomb_inplace(
        &self,
        x: &mut Tensor<Self>,
        a: f64,
        terms: &[(f64, &Tensor<Self>)],
    ) -> Result<()>
    where
        Self: Backend;

    /// The step of the multistep samplers: `d = a x + b den` into a new tensor, then
    /// `x = x + c d + sum_k c_k h_k` in place (at most `MAX_LINCOMB_TERMS - 2` history terms
    /// `h_k`); returns `d`. Each element is computed exactly as [`Backend::lincomb`] followed
    /// by [`SamplerOps::lincomb_inplace`] computes it (which is what the default does); a
    /// backend may do both in one pass over memory.
    fn derivative_step(
        &self,
        x: &mut Tensor<Self>,
        (a, b): (f64, f64),
        den: &Tensor<Self>,
        c: f64,
        history: &[(f64, &Tensor<Self>)],
    ) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        let d = self.lincomb(&[(a, x), (b, den)])?;
        let mut terms = Vec::with_capacity(history.len() + 1);
        terms.push((c, &d));
        terms.extend_from_slice(history);
        self.lincomb_inplace(x, 1.0, &terms)?;
        Ok(d)
    }

    /// Two combinations of the same operands: `first = sum_i a_i t_i` (the terms `(a_i, t_i)`),
    /// then `second = link * first + sum_i b_i t_i` (`b` one coefficient per term, zeros
    /// included), both new tensors; at most `MAX_LINCOMB_TERMS - 1` terms. Each element is
    /// computed exactly as the two [`Backend::lincomb`] calls of the default compute it; a
    /// backend may write both in one pass over the operands (a corrector whose result feeds
    /// the next step's predictor).
    fn lincomb_pair(
        &self,
        first: &[(f64, &Tensor<Self>)],
        link: f64,
        b: &[f64],
    ) -> Result<(Tensor<Self>, Tensor<Self>)>
    where
        Self: Backend,
    {
        check_pair("lincomb_pair", first, b)?;
        let first_out = self.lincomb(first)?;
        let mut terms = Vec::with_capacity(first.len() + 1);
        terms.push((link, &first_out));
        terms.extend(b.iter().zip(first).map(|(&c, &(_, t))| (c, t)));
        let second_out = self.lincomb(&terms)?;
        Ok((first_out, second_out))
    }

    /// A new tensor of `x`'s shape and dtype holding `f` applied to `x`'s values: `f` gets
    /// blocks of the values widened to f64 and overwrites each value with its result, which is
    /// rounded back to the dtype. Blocks may be of any length and are processed in any order,
    /// possibly in parallel, so `f` must treat every element on its own. For host-side
    /// elementwise functions such as an analytic test denoiser; the default implementation
    /// downloads the whole tensor, applies `f` once and uploads the result.
    fn map_f64(&self, x: &Tensor<Self>, f: &(dyn Fn(&mut [f64]) + Sync)) -> Result<Tensor<Self>>
    where
        Self: Backend,
    {
        let mut host = self.download_f64(x)?;
        f(&mut host);
        self.upload(HostData::F64(&host), x.shape(), x.dtype())
    }

    /// Sum of squares of all elements, accumulated in f64.
    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64>
    where
        Self: Backend;

    /// Largest absolute value of all elements.
    fn max_abs(&self, t: &Tensor<Self>) -> Result<f64>
    where
        Self: Backend;

    /// Root-mean-square of the elementwise ratio `e / max(atol, rtol * max(|a|, |b|))`: the error
    /// norm of adaptive step-size control.
    fn scaled_error_rms(
        &self,
        e: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        atol: f64,
        rtol: f64,
    ) -> Result<f64>
    where
        Self: Backend;
}

/// A compute device. Model op families join as further supertraits.
pub trait Backend:
    SamplerOps + crate::ModelOps + crate::ConvOps + Clone + Send + Sync + std::fmt::Debug + 'static
{
    /// `out = sum_i c_i * t_i` into a new tensor of the first term's shape and dtype.
    fn lincomb(&self, terms: &[(f64, &Tensor<Self>)]) -> Result<Tensor<Self>> {
        let first = terms.first().ok_or(KernelError::InvalidArgument {
            op: "lincomb",
            message: "needs at least one term".into(),
        })?;
        let mut out = self.zeros(first.1.shape(), first.1.dtype())?;
        self.lincomb_into(&mut out, terms)?;
        Ok(out)
    }

    /// Root-mean-square of all elements.
    fn rms(&self, t: &Tensor<Self>) -> Result<f64> {
        let n = t.numel().max(1) as f64;
        Ok((self.sum_squares(t)? / n).sqrt())
    }
}

/// Checks the arguments of [`SamplerOps::derivative_step`] and returns its operands: `den`
/// (with coefficient `b`) then the history, at most `MAX_LINCOMB_TERMS - 1` in all, each of
/// `x`'s shape and dtype.
pub fn derivative_step_operands<'t, B: Backend>(
    x: &Tensor<B>,
    b: f64,
    den: &'t Tensor<B>,
    history: &[(f64, &'t Tensor<B>)],
) -> Result<Vec<(f64, &'t Tensor<B>)>> {
    let mut operands = Vec::with_capacity(history.len() + 1);
    operands.push((b, den));
    operands.extend_from_slice(history);
    check_terms(
        "derivative_step",
        x.shape(),
        x.dtype(),
        &operands,
        MAX_LINCOMB_TERMS - 1,
    )?;
    Ok(operands)
}

/// Checks the arguments of [`SamplerOps::lincomb_pair`]: 1 to `MAX_LINCOMB_TERMS - 1` terms of
/// one shape and dtype, and one second-combination coefficient per term. Returns the first
/// term's tensor, whose shape and dtype the results take.
pub fn check_pair<'t, B: Backend>(
    op: &'static str,
    first: &[(f64, &'t Tensor<B>)],
    b: &[f64],
) -> Result<&'t Tensor<B>> {
    let Some(&(_, head)) = first.first() else {
        return Err(KernelError::InvalidArgument {
            op,
            message: "needs at least one term".into(),
        });
    };
    if b.len() != first.len() {
        return Err(KernelError::InvalidArgument {
            op,
            message: format!(
                "{} second coefficients given for {} terms",
                b.len(),
                first.len()
            ),
        });
    }
    check_terms(op, head.shape(), head.dtype(), first, MAX_LINCOMB_TERMS - 1)?;
    Ok(head)
}

/// Checks that every term matches `shape` and `dtype`; shared by backend implementations.
pub fn check_terms<B: Backend>(
    op: &'static str,
    shape: &[usize],
    dtype: DType,
    terms: &[(f64, &Tensor<B>)],
    max_terms: usize,
) -> Result<()> {
    if terms.len() > max_terms {
        return Err(KernelError::InvalidArgument {
            op,
            message: format!("{} terms given, at most {max_terms} allowed", terms.len()),
        });
    }
    for (_, t) in terms {
        if t.shape() != shape {
            return Err(KernelError::ShapeMismatch {
                op,
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        if t.dtype() != dtype {
            return Err(KernelError::DTypeMismatch {
                op,
                expected: dtype,
                found: t.dtype(),
            });
        }
    }
    Ok(())
}
