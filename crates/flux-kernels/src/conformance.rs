//! The backend conformance suite: every op of [`Backend`] run on random inputs of awkward sizes
//! (odd, prime, not multiples of any workgroup or tile) and compared with the CPU backend's f64
//! result on the same inputs.
//!
//! One generic body serves every backend: each op family is a `pub fn op<B: Backend>(be, tol)`
//! returning the list of [`Failure`]s (empty when the backend conforms), [`run_all`] runs them
//! all, and [`conformance_tests!`](crate::conformance_tests) turns them into one `#[test]` per
//! family for a backend crate.
//!
//! Inputs are drawn in f64, rounded to f32, and the same rounded values are given to both sides,
//! so the only difference is the backend's arithmetic. An element `got` passes against the
//! reference `want` when `|got - want| <= rel * max(|want|, rms(want))`: relative per element,
//! with the tensor's RMS as the floor so values that cancel to nearly zero are judged on the
//! scale of the tensor. Packed weights (f16, bf16, fp8) decode exactly to f32, so they are
//! judged with [`Tolerances::weight_rel`], which is the f32 bound unless a backend computes in a
//! narrower type. A backend that does (tensor cores rounding the activations to bf16) makes an
//! error proportional to the sizes of the terms summed, not to their sum, so `linear` with
//! packed weights is judged on the scale of the terms: `|got - want| <= rel * max(t, rms(t))`
//! with `t = |x| |W|^T + |b|` per element (the usual rounding-error bound of a dot product),
//! which equals the first form where nothing cancels.

use crate::{
    Activation, Backend, BinaryOp, ByteView, Conv2dParams, ConvOps, Cpu, DType, HostData, ModelOps,
    Result, SamplerOps, Tensor,
};

/// Error bounds of one backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerances {
    /// Relative bound for f32 compute on f32 inputs.
    pub rel: f64,
    /// Relative bound for ops that read a packed weight (f16, bf16, fp8).
    pub weight_rel: f64,
}

impl Tolerances {
    /// f32 compute: `1e-5` relative for every op.
    pub const F32: Tolerances = Tolerances {
        rel: 1e-5,
        weight_rel: 1e-5,
    };
}

impl Default for Tolerances {
    fn default() -> Self {
        Self::F32
    }
}

/// One op that did not match the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The op family (`linear`, `attention`, ...).
    pub op: &'static str,
    /// Which case: shapes, dtypes and options.
    pub case: String,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]: {}", self.op, self.case, self.message)
    }
}

/// A backend-generic check of one op family.
pub type Check<B> = fn(&B, Tolerances) -> Vec<Failure>;

/// Every op family of the suite, by name.
pub fn checks<B: Backend>() -> Vec<(&'static str, Check<B>)> {
    vec![
        ("memory", memory::<B>),
        ("dtype_support", dtype_support::<B>),
        ("lincomb", lincomb::<B>),
        ("reductions", reductions::<B>),
        ("weights", weights::<B>),
        ("linear", linear::<B>),
        ("matmul", matmul::<B>),
        ("norms", norms::<B>),
        ("modulation", modulation::<B>),
        ("activations", activations::<B>),
        ("elementwise", elementwise::<B>),
        ("softmax", softmax::<B>),
        ("rope", rope::<B>),
        ("attention", attention::<B>),
        ("layout", layout::<B>),
        ("conv2d", conv2d::<B>),
        ("group_norm", group_norm::<B>),
        ("image_ops", image_ops::<B>),
        ("bad_input", bad_input::<B>),
    ]
}

/// Runs every op family and returns all failures (empty when the backend conforms).
pub fn run_all<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    checks::<B>()
        .into_iter()
        .flat_map(|(_, f)| f(be, tol))
        .collect()
}

/// One `#[test]` per op family of the conformance suite for a backend.
///
/// `$backend` is an expression of type `Option<B>`: `None` means the device is missing and the
/// test returns early (the caller decides whether that is allowed and says so). Attributes in
/// brackets before the backend (for example `[#[ignore = "..."]]`) are put on every test.
///
/// ```ignore
/// flux_kernels::conformance_tests!(Some(flux_kernels::Cpu), flux_kernels::conformance::Tolerances::F32);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ([$(#[$attr:meta])*] $backend:expr, $tol:expr) => {
        $crate::conformance_tests!(@each [$(#[$attr])*] ($backend) ($tol);
            memory, dtype_support, lincomb, reductions, weights, linear, matmul, norms,
            modulation, activations, elementwise, softmax, rope, attention, layout, conv2d,
            group_norm, image_ops, bad_input);
    };
    (@each $attrs:tt ($backend:expr) ($tol:expr); $($op:ident),*) => {
        $( $crate::conformance_tests!(@one $attrs ($backend) ($tol) $op); )*
    };
    (@one [$($attr:tt)*] ($backend:expr) ($tol:expr) $op:ident) => {
        $($attr)*
        #[test]
        fn $op() {
            let Some(be) = $backend else { return };
            let failures = $crate::conformance::$op(&be, $tol);
            assert!(
                failures.is_empty(),
                "{} conformance failures on {}:\n{}",
                failures.len(),
                $crate::SamplerOps::name(&be),
                failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n")
            );
        }
    };
    ($backend:expr, $tol:expr) => {
        $crate::conformance_tests!([] $backend, $tol);
    };
}

/// A small deterministic generator (SplitMix64): the suite must not depend on a crate's RNG.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`, rounded to f32 (both sides get exactly these values).
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        f64::from((lo + (hi - lo) * u) as f32)
    }

    fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Per-family state: the backend, the reference, the tolerances and the failures so far.
struct Ctx<'a, B: Backend> {
    be: &'a B,
    cpu: Cpu,
    rng: Rng,
    op: &'static str,
    failures: Vec<Failure>,
}

impl<'a, B: Backend> Ctx<'a, B> {
    fn new(be: &'a B, _tol: Tolerances, op: &'static str, seed: u64) -> Self {
        Self {
            be,
            cpu: Cpu,
            rng: Rng(seed),
            op,
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, case: &str, message: String) {
        self.failures.push(Failure {
            op: self.op,
            case: case.to_string(),
            message,
        });
    }

    /// Uploads the same values to both sides: f32 on the backend, f64 on the reference.
    fn pair(&mut self, case: &str, v: &[f64], shape: &[usize]) -> Option<(Tensor<B>, Tensor<Cpu>)> {
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let got = self.be.upload(HostData::F32(&f), shape, DType::F32);
        let want = self.cpu.upload(HostData::F64(v), shape, DType::F64);
        match (got, want) {
            (Ok(g), Ok(w)) => Some((g, w)),
            (Err(e), _) => {
                self.fail(case, format!("upload {shape:?} failed: {e}"));
                None
            }
            (_, Err(e)) => {
                self.fail(case, format!("reference upload {shape:?} failed: {e}"));
                None
            }
        }
    }

    /// Random values in `[lo, hi)` on both sides.
    fn rand(
        &mut self,
        case: &str,
        shape: &[usize],
        lo: f64,
        hi: f64,
    ) -> Option<(Tensor<B>, Tensor<Cpu>)> {
        let n = shape.iter().product();
        let v = self.rng.values(n, lo, hi);
        self.pair(case, &v, shape)
    }

    /// A packed weight of `dtype` on both sides, from the same bytes.
    fn weight(
        &mut self,
        case: &str,
        shape: &[usize],
        dtype: DType,
        scale: Option<f32>,
    ) -> Option<(Tensor<B>, Tensor<Cpu>)> {
        let n: usize = shape.iter().product();
        let bytes = random_weight_bytes(&mut self.rng, n, dtype);
        let view = ByteView::from_vec(bytes);
        let got = self.be.upload_weight(view.clone(), shape, dtype, scale);
        let want = self.cpu.upload_weight(view, shape, dtype, scale);
        match (got, want) {
            (Ok(g), Ok(w)) => Some((g, w)),
            (Err(e), _) => {
                self.fail(case, format!("upload_weight {shape:?} {dtype} failed: {e}"));
                None
            }
            (_, Err(e)) => {
                self.fail(case, format!("reference upload_weight failed: {e}"));
                None
            }
        }
    }

    /// Compares a backend result with the reference at relative bound `rel`.
    fn check(&mut self, case: &str, got: Result<Tensor<B>>, want: Result<Tensor<Cpu>>, rel: f64) {
        let want = match want {
            Ok(w) => w,
            Err(e) => return self.fail(case, format!("reference failed: {e}")),
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => return self.fail(case, format!("backend failed: {e}")),
        };
        if got.shape() != want.shape() {
            return self.fail(
                case,
                format!("shape {:?}, expected {:?}", got.shape(), want.shape()),
            );
        }
        if got.dtype() != DType::F32 {
            return self.fail(case, format!("dtype {}, expected f32", got.dtype()));
        }
        let g = match self.be.download_f64(&got) {
            Ok(g) => g,
            Err(e) => return self.fail(case, format!("download failed: {e}")),
        };
        let w = match self.cpu.download_f64(&want) {
            Ok(w) => w,
            Err(e) => return self.fail(case, format!("reference download failed: {e}")),
        };
        if let Some(msg) = compare(&g, &w, rel) {
            self.fail(case, msg);
        }
    }

    /// Like [`Ctx::check`], judged on the scale of `terms` (same shape as the result) instead
    /// of the result's own magnitude (see the module docs).
    fn check_on_terms(
        &mut self,
        case: &str,
        got: Result<Tensor<B>>,
        want: Result<Tensor<Cpu>>,
        terms: std::result::Result<&[f64], &crate::KernelError>,
        rel: f64,
    ) {
        let terms = match terms {
            Ok(t) => t,
            Err(e) => return self.fail(case, format!("reference (term sizes) failed: {e}")),
        };
        let (g, w) = match (got, want) {
            (Ok(g), Ok(w)) if g.shape() == w.shape() => (g, w),
            (got, want) => return self.check(case, got, want, rel),
        };
        match (self.be.download_f64(&g), self.cpu.download_f64(&w)) {
            (Ok(g), Ok(w)) => {
                if let Some(msg) = compare_on(&g, &w, terms, rel) {
                    self.fail(case, msg);
                }
            }
            (Err(e), _) => self.fail(case, format!("download failed: {e}")),
            (_, Err(e)) => self.fail(case, format!("reference download failed: {e}")),
        }
    }

    /// Compares a scalar result.
    fn check_scalar(&mut self, case: &str, got: Result<f64>, want: Result<f64>, rel: f64) {
        match (got, want) {
            (Ok(g), Ok(w)) => {
                if let Some(msg) = compare(&[g], &[w], rel) {
                    self.fail(case, msg);
                }
            }
            (Err(e), _) => self.fail(case, format!("backend failed: {e}")),
            (_, Err(e)) => self.fail(case, format!("reference failed: {e}")),
        }
    }

    fn done(self) -> Vec<Failure> {
        self.failures
    }
}

/// `None` when `got` matches `want` within `rel` (see the module docs), else a description of
/// the worst element.
pub fn compare(got: &[f64], want: &[f64], rel: f64) -> Option<String> {
    compare_on(got, want, want, rel)
}

/// [`compare`] with the error of element `i` judged against `max(|scale[i]|, rms(scale))`
/// instead of the reference's own magnitude.
pub fn compare_on(got: &[f64], want: &[f64], scale: &[f64], rel: f64) -> Option<String> {
    if got.len() != want.len() || scale.len() != want.len() {
        return Some(format!("{} elements, expected {}", got.len(), want.len()));
    }
    let n = scale.len().max(1) as f64;
    let rms = (scale.iter().map(|w| w * w).sum::<f64>() / n).sqrt();
    let mut worst: Option<(usize, f64)> = None;
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(scale).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            let err = (g - w).abs();
            let bound = rel * m.abs().max(rms);
            err <= bound || (bound == 0.0 && err == 0.0)
        };
        if !ok {
            let ratio = if w.is_finite() {
                (g - w).abs() / m.abs().max(rms).max(f64::MIN_POSITIVE)
            } else {
                f64::INFINITY
            };
            let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
            if worst.is_none_or(|(_, r)| ratio > r) {
                worst = Some((i, ratio));
            }
        }
    }
    worst.map(|(i, r)| {
        format!(
            "element {i}: got {}, expected {} (relative error {r:.3e} > {rel:.1e}; rms of the scale {rms:.3e})",
            got[i], want[i]
        )
    })
}

/// Random little-endian elements of `dtype` in about `[-1, 1)` (finite; fp8 never NaN).
fn random_weight_bytes(rng: &mut Rng, n: usize, dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size_in_bytes());
    for _ in 0..n {
        let x = rng.uniform(-1.0, 1.0);
        match dtype {
            DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
            DType::F8E4M3 => {
                // Any code but the two NaNs (0x7f, 0xff); exponents up to 2^1 keep values small.
                let sign = if x < 0.0 { 0x80u8 } else { 0 };
                let code = (rng.next_u64() % 0x48) as u8;
                out.push(sign | code);
            }
        }
    }
    out
}

fn case(parts: std::fmt::Arguments<'_>) -> String {
    parts.to_string()
}

/// Allocation and transfers: zeros, upload/download round trips (exact for f32), write, copy.
pub fn memory<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "memory", 1);
    for n in [1usize, 7, 1021, 65_537] {
        let label = case(format_args!("n={n}"));
        let v = c.rng.values(n, -3.0, 3.0);
        let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        match be.upload(HostData::F32(&f), &[n], DType::F32) {
            Ok(t) => match be.download_f32(&t) {
                Ok(back) if back == f => {}
                Ok(_) => c.fail(&label, "f32 round trip changed values".into()),
                Err(e) => c.fail(&label, format!("download_f32 failed: {e}")),
            },
            Err(e) => c.fail(&label, format!("upload failed: {e}")),
        }
        // f64 host data rounds to nearest f32.
        match be.upload(HostData::F64(&v), &[n], DType::F32) {
            Ok(t) => match be.download_f64(&t) {
                Ok(back) if back == v => {}
                Ok(_) => c.fail(&label, "f64 host data not rounded to the same f32".into()),
                Err(e) => c.fail(&label, format!("download_f64 failed: {e}")),
            },
            Err(e) => c.fail(&label, format!("upload of f64 host data failed: {e}")),
        }
        // Handing the vectors over gives the same tensors as uploading a view of them.
        match be
            .upload_f32_vec(f.clone(), &[n], DType::F32)
            .and_then(|t| Ok((be.download_f32(&t)?, t)))
        {
            Ok((back, t)) if back == f && t.shape() == [n] && t.dtype() == DType::F32 => {}
            Ok(_) => c.fail(
                &label,
                "upload_f32_vec gave other values, shape or dtype".into(),
            ),
            Err(e) => c.fail(&label, format!("upload_f32_vec failed: {e}")),
        }
        match be
            .upload_f64_vec(v.clone(), &[n], DType::F32)
            .and_then(|t| be.download_f64(&t))
        {
            Ok(back) if back == v => {}
            Ok(_) => c.fail(
                &label,
                "upload_f64_vec to f32 not rounded like upload".into(),
            ),
            Err(e) => c.fail(&label, format!("upload_f64_vec to f32 failed: {e}")),
        }
        if be.supports_dtype(DType::F64) {
            let wide: Vec<f64> = v.iter().map(|&x| x / 3.0).collect();
            match be
                .upload_f64_vec(wide.clone(), &[1, n], DType::F64)
                .and_then(|t| Ok((be.download_f64(&t)?, t)))
            {
                Ok((back, t)) if back == wide && t.shape() == [1, n] => {}
                Ok(_) => c.fail(&label, "upload_f64_vec gave other values or shape".into()),
                Err(e) => c.fail(&label, format!("upload_f64_vec failed: {e}")),
            }
        }
        match be.zeros(&[n], DType::F32).and_then(|t| be.download_f32(&t)) {
            Ok(z) if z.len() == n && z.iter().all(|&x| x == 0.0) => {}
            Ok(_) => c.fail(&label, "zeros not all zero".into()),
            Err(e) => c.fail(&label, format!("zeros failed: {e}")),
        }
        let w = c.rng.values(n, -1.0, 1.0);
        let wf: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        let written = be.zeros(&[n], DType::F32).and_then(|mut t| {
            be.write(&mut t, HostData::F32(&wf))?;
            let cp = be.copy(&t)?;
            // Overwriting the original must not change the copy.
            be.write(&mut t, HostData::F32(&f))?;
            Ok((be.download_f32(&cp)?, be.download_f32(&t)?))
        });
        match written {
            Ok((cp, t)) if cp == wf && t == f => {}
            Ok(_) => c.fail(&label, "write/copy gave other values".into()),
            Err(e) => c.fail(&label, format!("write/copy failed: {e}")),
        }
        // A host function over f64 blocks, rounded back once: exact on every backend.
        let sq = |b: &mut [f64]| b.iter_mut().for_each(|x| *x = *x * *x - 0.5);
        let want: Vec<f32> = f
            .iter()
            .map(|&x| (f64::from(x) * f64::from(x) - 0.5) as f32)
            .collect();
        let mapped = be
            .upload(HostData::F32(&f), &[n], DType::F32)
            .and_then(|t| {
                be.map_f64(&t, &sq)
                    .and_then(|m| Ok((be.download_f32(&m)?, m)))
            });
        match mapped {
            Ok((got, m)) if got == want && m.shape() == [n] && m.dtype() == DType::F32 => {}
            Ok(_) => c.fail(&label, "map_f64 gave other values, shape or dtype".into()),
            Err(e) => c.fail(&label, format!("map_f64 failed: {e}")),
        }
        if be.supports_dtype(DType::F64) {
            let want: Vec<f64> = v.iter().map(|&x| x * x - 0.5).collect();
            match be
                .upload(HostData::F64(&v), &[n], DType::F64)
                .and_then(|t| be.map_f64(&t, &sq))
                .and_then(|m| be.download_f64(&m))
            {
                Ok(got) if got == want => {}
                Ok(_) => c.fail(&label, "map_f64 on f64 gave other values".into()),
                Err(e) => c.fail(&label, format!("map_f64 on f64 failed: {e}")),
            }
        }
    }
    // Empty tensors are legal.
    if let Err(e) = be
        .zeros(&[0, 5], DType::F32)
        .and_then(|t| be.download_f32(&t))
    {
        c.fail("empty", format!("zeros of an empty shape failed: {e}"));
    }
    c.done()
}

/// A backend that does not support a dtype says so and returns errors, never panics.
pub fn dtype_support<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "dtype_support", 2);
    if !be.supports_dtype(DType::F32) {
        c.fail("f32", "every backend must support f32".into());
    }
    for d in [DType::F64, DType::F16, DType::BF16, DType::F8E4M3] {
        if be.supports_dtype(d) {
            continue;
        }
        let label = case(format_args!("{d}"));
        if be.zeros(&[3], d).is_ok() {
            c.fail(&label, "zeros succeeded for an unsupported dtype".into());
        }
        if be.upload(HostData::F64(&[1.0, 2.0]), &[2], d).is_ok() {
            c.fail(&label, "upload succeeded for an unsupported dtype".into());
        }
    }
    c.done()
}

/// The fused linear combination, 1 to 6 terms, into a new tensor and in place.
pub fn lincomb<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "lincomb", 3);
    for (n, terms) in [(1usize, 1usize), (13, 2), (257, 3), (4099, 4), (65_539, 6)] {
        let label = case(format_args!("n={n} terms={terms}"));
        let mut got_t = Vec::new();
        let mut want_t = Vec::new();
        for _ in 0..terms {
            let Some((g, w)) = c.rand(&label, &[n], -2.0, 2.0) else {
                return c.done();
            };
            got_t.push(g);
            want_t.push(w);
        }
        let coef: Vec<f64> = (0..terms).map(|_| c.rng.uniform(-1.5, 1.5)).collect();
        // The f32 contract rounds each coefficient to f32 once; the reference uses those values.
        let gt: Vec<(f64, &Tensor<B>)> = coef.iter().copied().zip(&got_t).collect();
        let wt: Vec<(f64, &Tensor<Cpu>)> = coef.iter().copied().zip(&want_t).collect();
        let got = be.lincomb(&gt);
        let want = c.cpu.lincomb(&wt);
        c.check(&label, got, want, tol.rel);
        // In place: x = a x + sum c_i t_i with up to 5 extra terms.
        let a = c.rng.uniform(-1.0, 1.0);
        let extra = terms.min(5);
        let got = be.copy(&got_t[0]).and_then(|mut x| {
            be.lincomb_inplace(&mut x, a, &gt[1..extra.max(1)])?;
            Ok(x)
        });
        let want = c.cpu.copy(&want_t[0]).and_then(|mut x| {
            c.cpu.lincomb_inplace(&mut x, a, &wt[1..extra.max(1)])?;
            Ok(x)
        });
        c.check(&format!("{label} inplace"), got, want, tol.rel);
        // The multistep step: d = a x + b t_1 into a new tensor and x = x + c d + the other
        // terms (at most 4) in place.
        if terms >= 2 {
            let (b, step) = (c.rng.uniform(-1.0, 1.0), c.rng.uniform(-1.0, 1.0));
            let history = 2..terms.min(6);
            let got = be.copy(&got_t[0]).and_then(|mut x| {
                let d =
                    be.derivative_step(&mut x, (a, b), &got_t[1], step, &gt[history.clone()])?;
                Ok((x, d))
            });
            let want = c.cpu.copy(&want_t[0]).and_then(|mut x| {
                let d = c.cpu.derivative_step(
                    &mut x,
                    (a, b),
                    &want_t[1],
                    step,
                    &wt[history.clone()],
                )?;
                Ok((x, d))
            });
            let case = format!("{label} derivative_step");
            match (got, want) {
                (Ok((got_x, got_d)), Ok((want_x, want_d))) => {
                    c.check(&format!("{case} d"), Ok(got_d), Ok(want_d), tol.rel);
                    c.check(&format!("{case} x"), Ok(got_x), Ok(want_x), tol.rel);
                }
                (got, want) => c.check(&case, got.map(|p| p.0), want.map(|p| p.0), tol.rel),
            }
        }
        // The pair: first = sum a_i t_i, second = link first + sum b_i t_i (at most 5 terms,
        // one of the second's coefficients zero).
        let count = terms.min(5);
        let link = c.rng.uniform(-1.0, 1.0);
        let mut b: Vec<f64> = (0..count).map(|_| c.rng.uniform(-1.0, 1.0)).collect();
        b[0] = 0.0;
        let case = format!("{label} lincomb_pair");
        match (
            be.lincomb_pair(&gt[..count], link, &b),
            c.cpu.lincomb_pair(&wt[..count], link, &b),
        ) {
            (Ok((got_first, got_second)), Ok((want_first, want_second))) => {
                c.check(
                    &format!("{case} first"),
                    Ok(got_first),
                    Ok(want_first),
                    tol.rel,
                );
                c.check(
                    &format!("{case} second"),
                    Ok(got_second),
                    Ok(want_second),
                    tol.rel,
                );
            }
            (got, want) => c.check(&case, got.map(|p| p.0), want.map(|p| p.0), tol.rel),
        }
    }
    c.done()
}

/// Reductions: sum of squares, max |x|, rms and the scaled error norm.
pub fn reductions<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "reductions", 4);
    for n in [1usize, 31, 1000, 65_537, 300_007] {
        let label = case(format_args!("n={n}"));
        let Some((g, w)) = c.rand(&label, &[n], -3.0, 3.0) else {
            return c.done();
        };
        c.check_scalar(
            &format!("{label} sum_squares"),
            be.sum_squares(&g),
            c.cpu.sum_squares(&w),
            tol.rel,
        );
        c.check_scalar(
            &format!("{label} max_abs"),
            be.max_abs(&g),
            c.cpu.max_abs(&w),
            0.0,
        );
        c.check_scalar(&format!("{label} rms"), be.rms(&g), c.cpu.rms(&w), tol.rel);
        let Some((ga, wa)) = c.rand(&label, &[n], -1.0, 1.0) else {
            return c.done();
        };
        let Some((gb, wb)) = c.rand(&label, &[n], -1.0, 1.0) else {
            return c.done();
        };
        c.check_scalar(
            &format!("{label} scaled_error_rms"),
            be.scaled_error_rms(&g, &ga, &gb, 0.05, 0.01),
            c.cpu.scaled_error_rms(&w, &wa, &wb, 0.05, 0.01),
            tol.rel,
        );
    }
    c.done()
}

const WEIGHT_DTYPES: [(DType, Option<f32>); 5] = [
    (DType::F32, None),
    (DType::F16, None),
    (DType::BF16, None),
    (DType::F8E4M3, Some(0.37)),
    (DType::BF16, Some(1.5)),
];

/// Packed weights: upload in every stored dtype, cast to f32, download, gather rows.
pub fn weights<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "weights", 5);
    for (dtype, scale) in WEIGHT_DTYPES {
        for shape in [vec![1usize], vec![3, 5], vec![17, 33], vec![7, 1, 11]] {
            let label = case(format_args!("{dtype} scale={scale:?} {shape:?}"));
            let Some((g, w)) = c.weight(&label, &shape, dtype, scale) else {
                return c.done();
            };
            let got = be.cast(&g, DType::F32);
            let want = c.cpu.cast(&w, DType::F64);
            c.check(&format!("{label} cast"), got, want, 0.0);
            match (be.download_f64(&g), c.cpu.download_f64(&w)) {
                (Ok(a), Ok(b)) => {
                    if let Some(m) = compare(&a, &b, 0.0) {
                        c.fail(&format!("{label} download"), m);
                    }
                }
                (Err(e), _) | (_, Err(e)) => c.fail(&label, format!("download failed: {e}")),
            }
            if shape.len() == 2 {
                let ids: Vec<usize> = (0..9).map(|i| (i * 7 + 3) % shape[0]).collect();
                let got = be.gather_rows(&g, &ids, DType::F32);
                let want = c.cpu.gather_rows(&w, &ids, DType::F64);
                c.check(&format!("{label} gather_rows"), got, want, 0.0);
            }
        }
    }
    // Byte lengths that are not a multiple of 4 (odd element counts of 1- and 2-byte types).
    let label = "odd byte lengths";
    for dtype in [DType::F16, DType::BF16, DType::F8E4M3] {
        let Some((g, w)) = c.weight(label, &[3, 7], dtype, None) else {
            return c.done();
        };
        c.check(
            label,
            be.cast(&g, DType::F32),
            c.cpu.cast(&w, DType::F64),
            0.0,
        );
    }
    c.done()
}

/// `linear` with every weight dtype, with and without bias, on awkward sizes.
pub fn linear<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "linear", 6);
    let sizes = [
        (vec![1usize, 1], 1usize, 1usize),
        (vec![3], 5, 7),
        (vec![2, 19], 37, 29),
        (vec![67], 129, 65),
        (vec![1, 131], 64, 97),
    ];
    for (dtype, scale) in WEIGHT_DTYPES {
        for (i, (lead, k, n)) in sizes.iter().enumerate() {
            for with_bias in [false, true] {
                let label = case(format_args!(
                    "x {lead:?}x{k}, w {dtype} [{n}, {k}] scale={scale:?} bias={with_bias}"
                ));
                let mut xs = lead.clone();
                xs.push(*k);
                let Some((gx, wx)) = c.rand(&label, &xs, -1.0, 1.0) else {
                    return c.done();
                };
                let Some((gw, ww)) = c.weight(&label, &[*n, *k], dtype, scale) else {
                    return c.done();
                };
                let bias = if with_bias {
                    // Biases in the weight dtype half of the time, f32 activations otherwise.
                    if i % 2 == 0 {
                        c.weight(&label, &[*n], dtype, None)
                    } else {
                        c.rand(&label, &[*n], -1.0, 1.0)
                    }
                } else {
                    None
                };
                let rel = if dtype == DType::F32 {
                    tol.rel
                } else {
                    tol.weight_rel
                };
                let got = be.linear(&gx, &gw, bias.as_ref().map(|b| &b.0));
                let want = c.cpu.linear(&wx, &ww, bias.as_ref().map(|b| &b.1));
                // Packed weights: judged on the size of the terms (see the module docs).
                let terms = (dtype != DType::F32)
                    .then(|| abs_linear(c.cpu, &wx, &ww, bias.as_ref().map(|b| &b.1)));
                match &terms {
                    Some(t) => c.check_on_terms(&label, got, want, t.as_deref(), rel),
                    None => c.check(&label, got, want, rel),
                }
                // The same layer with an activation (a backend may fuse it into the GEMM).
                let act = if i % 2 == 0 {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                };
                let label = case(format_args!("{label}, then {act:?}"));
                let got = be.linear_act(&gx, &gw, bias.as_ref().map(|b| &b.0), act);
                let want = c
                    .cpu
                    .linear(&wx, &ww, bias.as_ref().map(|b| &b.1))
                    .and_then(|y| c.cpu.activation(&y, act));
                // GELU and SiLU have slopes of at most 1.13: the terms' scale carries over
                // (the bound has a margin of 5 over bf16's rounding).
                match &terms {
                    Some(t) => c.check_on_terms(&label, got, want, t.as_deref(), rel),
                    None => c.check(&label, got, want, rel),
                }
            }
        }
    }
    c.done()
}

/// `|x| |W|^T + |b|` on the CPU in f64: the sizes of the terms each output of `linear` sums.
fn abs_linear(
    cpu: Cpu,
    x: &Tensor<Cpu>,
    w: &Tensor<Cpu>,
    bias: Option<&Tensor<Cpu>>,
) -> Result<Vec<f64>> {
    let abs = |t: &Tensor<Cpu>| -> Result<Tensor<Cpu>> {
        let v: Vec<f64> = cpu.download_f64(t)?.iter().map(|v| v.abs()).collect();
        cpu.upload(HostData::F64(&v), t.shape(), DType::F64)
    };
    let b = bias.map(abs).transpose()?;
    cpu.download_f64(&cpu.linear(&abs(x)?, &abs(w)?, b.as_ref())?)
}

/// Batched matmul: shared and batched `b`, with and without `transpose_b`.
pub fn matmul<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "matmul", 7);
    let cases: [(&[usize], usize, usize, usize, bool); 6] = [
        (&[], 1, 1, 1, false),
        (&[], 7, 13, 5, false),
        (&[3], 17, 31, 19, false),
        (&[2, 3], 33, 9, 65, true),
        (&[], 70, 67, 71, true),
        (&[5], 1, 40, 3, false),
    ];
    for (bi, &(batch, m, k, n, shared)) in cases.iter().enumerate() {
        for transpose_b in [false, true] {
            let label = case(format_args!(
                "batch {batch:?} m={m} k={k} n={n} shared_b={shared} transpose_b={transpose_b}"
            ));
            let mut a_shape = batch.to_vec();
            a_shape.extend([m, k]);
            let mut b_shape = if shared { vec![] } else { batch.to_vec() };
            b_shape.extend(if transpose_b { [n, k] } else { [k, n] });
            let Some((ga, wa)) = c.rand(&label, &a_shape, -1.0, 1.0) else {
                return c.done();
            };
            // A bf16 right operand in one case: `b` may be a stored weight.
            let pair = if bi == 4 && transpose_b {
                c.weight(&label, &b_shape, DType::BF16, None)
            } else {
                c.rand(&label, &b_shape, -1.0, 1.0)
            };
            let Some((gb, wb)) = pair else {
                return c.done();
            };
            let got = be.matmul(&ga, &gb, transpose_b);
            let want = c.cpu.matmul(&wa, &wb, transpose_b);
            c.check(&label, got, want, tol.rel);
        }
    }
    c.done()
}

/// Layer norm and RMS norm, with and without affine parameters.
pub fn norms<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "norms", 8);
    for shape in [vec![1usize, 1], vec![3, 7], vec![2, 5, 129], vec![11, 1031]] {
        let ch = shape[shape.len() - 1];
        let label = case(format_args!("{shape:?}"));
        let Some((gx, wx)) = c.rand(&label, &shape, -2.0, 3.0) else {
            return c.done();
        };
        let Some((gw, ww)) = c.rand(&label, &[ch], 0.5, 1.5) else {
            return c.done();
        };
        let Some((gb, wb)) = c.weight(&label, &[ch], DType::BF16, None) else {
            return c.done();
        };
        for (affine, eps) in [(false, 1e-6), (true, 1e-5)] {
            let l = format!("{label} layer_norm affine={affine}");
            let got = be.layer_norm(&gx, affine.then_some(&gw), affine.then_some(&gb), eps);
            let want = c
                .cpu
                .layer_norm(&wx, affine.then_some(&ww), affine.then_some(&wb), eps);
            c.check(&l, got, want, tol.rel);
            let l = format!("{label} rms_norm scale={affine}");
            let got = be.rms_norm(&gx, affine.then_some(&gw), eps);
            let want = c.cpu.rms_norm(&wx, affine.then_some(&ww), eps);
            c.check(&l, got, want, tol.rel);
        }
    }
    c.done()
}

/// adaLN modulation and the gated residual, per-batch and shared vectors.
pub fn modulation<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "modulation", 9);
    for (b, l, ch) in [(1usize, 1usize, 1usize), (2, 7, 13), (3, 37, 65)] {
        for shared in [false, true] {
            let label = case(format_args!("[{b}, {l}, {ch}] shared={shared}"));
            let vs: Vec<usize> = if shared { vec![ch] } else { vec![b, ch] };
            let Some((gx, wx)) = c.rand(&label, &[b, l, ch], -2.0, 2.0) else {
                return c.done();
            };
            let Some((gy, wy)) = c.rand(&label, &[b, l, ch], -2.0, 2.0) else {
                return c.done();
            };
            let Some((gs, ws)) = c.rand(&label, &vs, -1.0, 1.0) else {
                return c.done();
            };
            let Some((gh, wh)) = c.rand(&label, &vs, -1.0, 1.0) else {
                return c.done();
            };
            c.check(
                &format!("{label} modulate"),
                be.modulate(&gx, &gh, &gs),
                c.cpu.modulate(&wx, &wh, &ws),
                tol.rel,
            );
            c.check(
                &format!("{label} gated_add"),
                be.gated_add(&gx, &gy, &gs),
                c.cpu.gated_add(&wx, &wy, &ws),
                tol.rel,
            );
            c.check(
                &format!("{label} layer_norm_modulate"),
                be.layer_norm_modulate(&gx, &gh, &gs, 1e-6),
                c.cpu.layer_norm_modulate(&wx, &wh, &ws, 1e-6),
                tol.rel,
            );
            // A per-batch shift with a shared scale (or the other way round).
            let other: Vec<usize> = if shared { vec![b, ch] } else { vec![ch] };
            let Some((go, wo)) = c.rand(&label, &other, -1.0, 1.0) else {
                return c.done();
            };
            c.check(
                &format!("{label} layer_norm_modulate mixed"),
                be.layer_norm_modulate(&gx, &go, &gs, 1e-6),
                c.cpu.layer_norm_modulate(&wx, &wo, &ws, 1e-6),
                tol.rel,
            );
        }
    }
    c.done()
}

/// Every pointwise activation on a wide range (including large |x| for the sigmoid tails).
pub fn activations<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "activations", 10);
    let mut v = c.rng.values(4093, -8.0, 8.0);
    v.extend([0.0, -0.0, 40.0, -40.0, 1e-3, -1e-3, 90.0, -90.0]);
    let n = v.len();
    let Some((g, w)) = c.pair("values", &v, &[n]) else {
        return c.done();
    };
    for act in [
        Activation::Silu,
        Activation::GeluTanh,
        Activation::GeluErf,
        Activation::QuickGelu,
        Activation::Relu,
    ] {
        let label = case(format_args!("{act:?} n={n}"));
        c.check(
            &label,
            be.activation(&g, act),
            c.cpu.activation(&w, act),
            tol.rel,
        );
    }
    c.done()
}

/// Broadcast binary ops and the host-scalar affine map.
pub fn elementwise<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "elementwise", 11);
    for (a_shape, b_shape) in [
        (vec![7usize], vec![7usize]),
        (vec![3, 5, 13], vec![13]),
        (vec![3, 5, 13], vec![5, 13]),
        (vec![2, 1031], vec![2, 1031]),
    ] {
        let label = case(format_args!("{a_shape:?} op {b_shape:?}"));
        let Some((ga, wa)) = c.rand(&label, &a_shape, -2.0, 2.0) else {
            return c.done();
        };
        let Some((gb, wb)) = c.rand(&label, &b_shape, -2.0, 2.0) else {
            return c.done();
        };
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
            c.check(
                &format!("{label} {op:?}"),
                be.binary(&ga, &gb, op),
                c.cpu.binary(&wa, &wb, op),
                tol.rel,
            );
        }
        c.check(
            &format!("{label} affine"),
            be.affine(&ga, 0.731, -0.25),
            c.cpu.affine(&wa, 0.731, -0.25),
            tol.rel,
        );
    }
    // A bf16 second operand (a stored bias added to activations).
    let Some((ga, wa)) = c.rand("bf16 operand", &[5, 19], -2.0, 2.0) else {
        return c.done();
    };
    let Some((gb, wb)) = c.weight("bf16 operand", &[19], DType::BF16, None) else {
        return c.done();
    };
    c.check(
        "bf16 operand Add",
        be.binary(&ga, &gb, BinaryOp::Add),
        c.cpu.binary(&wa, &wb, BinaryOp::Add),
        tol.weight_rel,
    );
    c.done()
}

/// Softmax over the last dim, including rows with `-inf` entries.
pub fn softmax<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "softmax", 12);
    for shape in [vec![1usize], vec![3, 7], vec![5, 257], vec![2, 2, 1499]] {
        let label = case(format_args!("{shape:?}"));
        let Some((g, w)) = c.rand(&label, &shape, -10.0, 10.0) else {
            return c.done();
        };
        c.check(&label, be.softmax(&g), c.cpu.softmax(&w), tol.rel);
    }
    let mut v = c.rng.values(3 * 11, -4.0, 4.0);
    v[0] = f64::NEG_INFINITY;
    v[13] = f64::NEG_INFINITY;
    v[14] = f64::NEG_INFINITY;
    if let Some((g, w)) = c.pair("masked", &v, &[3, 11]) {
        c.check("masked", be.softmax(&g), c.cpu.softmax(&w), tol.rel);
    }
    c.done()
}

/// Rotary embedding with per-batch and shared tables.
pub fn rope<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "rope", 13);
    for (b, l, h, d, shared) in [
        (1usize, 1usize, 1usize, 2usize, true),
        (2, 7, 3, 10, false),
        (1, 33, 5, 64, true),
    ] {
        let label = case(format_args!("[{b}, {l}, {h}, {d}] shared_table={shared}"));
        let Some((gx, wx)) = c.rand(&label, &[b, l, h, d], -2.0, 2.0) else {
            return c.done();
        };
        let tb = if shared { 1 } else { b };
        let mut tab = Vec::with_capacity(tb * l * d);
        for _ in 0..tb * l * d / 2 {
            let th = c.rng.uniform(-3.2, 3.2);
            tab.push(f64::from(th.cos() as f32));
            tab.push(f64::from(th.sin() as f32));
        }
        let Some((gt, wt)) = c.pair(&label, &tab, &[tb, l, d / 2, 2]) else {
            return c.done();
        };
        c.check(&label, be.rope(&gx, &gt), c.cpu.rope(&wx, &wt), tol.rel);
    }
    c.done()
}

/// Multi-head attention: Lq != Lk, long key sequences (several tiles), scale, bias and masks.
pub fn attention<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "attention", 14);
    for (b, lq, lk, h, d, bias_kind, scale) in [
        (1usize, 1usize, 1usize, 1usize, 1usize, 0u8, None),
        (2, 7, 5, 3, 8, 0, None),
        (1, 13, 67, 2, 16, 1, Some(0.3)),
        (1, 37, 37, 3, 24, 2, None),
        (2, 5, 301, 2, 64, 3, None),
        (1, 65, 129, 1, 128, 0, None),
        // Flux's head dim over many keys: 600 keys of 128 values is 2 x 76,800 products per
        // query row (software rasterisers cap the loop iterations of one invocation).
        (1, 70, 600, 2, 128, 0, None),
    ] {
        let label = case(format_args!(
            "b={b} lq={lq} lk={lk} h={h} d={d} bias={bias_kind} scale={scale:?}"
        ));
        let Some((gq, wq)) = c.rand(&label, &[b, lq, h, d], -1.5, 1.5) else {
            return c.done();
        };
        let Some((gk, wk)) = c.rand(&label, &[b, lk, h, d], -1.5, 1.5) else {
            return c.done();
        };
        let Some((gv, wv)) = c.rand(&label, &[b, lk, h, d], -1.0, 1.0) else {
            return c.done();
        };
        // 1: per-head position bias shared over the batch; 2: causal mask; 3: padding mask.
        let bias = match bias_kind {
            1 => c.rand(&label, &[1, h, lq, lk], -1.0, 1.0),
            2 => {
                let v: Vec<f64> = (0..lq * lk)
                    .map(|i| {
                        if i % lk > i / lk {
                            f64::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                c.pair(&label, &v, &[1, 1, lq, lk])
            }
            3 => {
                let v: Vec<f64> = (0..b * lq * lk)
                    .map(|i| {
                        let (bi, j) = (i / (lq * lk), i % lk);
                        if j >= lk - 40 * (bi + 1) {
                            f64::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                c.pair(&label, &v, &[b, 1, lq, lk])
            }
            _ => None,
        };
        let got = be.attention(&gq, &gk, &gv, bias.as_ref().map(|p| &p.0), scale);
        let want = c
            .cpu
            .attention(&wq, &wk, &wv, bias.as_ref().map(|p| &p.1), scale);
        c.check(&label, got, want, tol.rel);
    }
    c.done()
}

/// Layout ops: concat, narrow, permute (copies, so exact).
pub fn layout<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "layout", 15);
    let shapes = [vec![3usize, 5, 7], vec![2, 1, 9, 4]];
    for s in &shapes {
        for dim in 0..s.len() {
            let label = case(format_args!("{s:?} dim={dim}"));
            let Some((ga, wa)) = c.rand(&label, s, -1.0, 1.0) else {
                return c.done();
            };
            let mut s2 = s.clone();
            s2[dim] += 2;
            let Some((gb, wb)) = c.rand(&label, &s2, -1.0, 1.0) else {
                return c.done();
            };
            c.check(
                &format!("{label} concat"),
                be.concat(&[&ga, &gb, &ga], dim),
                c.cpu.concat(&[&wa, &wb, &wa], dim),
                0.0,
            );
            let len = s2[dim] - 1;
            c.check(
                &format!("{label} narrow"),
                be.narrow(&gb, dim, 1, len),
                c.cpu.narrow(&wb, dim, 1, len),
                0.0,
            );
        }
    }
    for (s, perm) in [
        (vec![7usize], vec![0usize]),
        (vec![3, 5], vec![1, 0]),
        (vec![2, 3, 5, 7], vec![0, 2, 1, 3]),
        (vec![2, 3, 5, 7], vec![3, 1, 0, 2]),
        (vec![2, 3, 4, 5, 3], vec![4, 0, 3, 1, 2]),
    ] {
        let label = case(format_args!("permute {s:?} {perm:?}"));
        let Some((g, w)) = c.rand(&label, &s, -1.0, 1.0) else {
            return c.done();
        };
        c.check(&label, be.permute(&g, &perm), c.cpu.permute(&w, &perm), 0.0);
    }
    c.done()
}

/// 2-D convolution: kernel sizes, strides, asymmetric padding, bias, packed weights.
pub fn conv2d<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "conv2d", 16);
    let cases = [
        // n, c, h, w, o, kh, kw, stride, padding, weight dtype, bias
        (
            1usize,
            1usize,
            1usize,
            1usize,
            1usize,
            1usize,
            1usize,
            1usize,
            [0usize; 4],
            DType::F32,
            false,
        ),
        (2, 3, 7, 9, 5, 3, 3, 1, [1; 4], DType::F32, true),
        (1, 5, 11, 13, 7, 1, 1, 1, [0; 4], DType::F32, true),
        (1, 4, 13, 11, 6, 3, 3, 2, [0, 1, 0, 1], DType::F32, true),
        (2, 3, 9, 10, 4, 3, 3, 1, [1; 4], DType::BF16, true),
        (1, 6, 8, 7, 3, 3, 3, 1, [1; 4], DType::F16, false),
        (1, 2, 6, 5, 3, 2, 3, 1, [2, 0, 1, 0], DType::F32, false),
        (1, 17, 15, 13, 19, 3, 3, 1, [1; 4], DType::F32, true),
    ];
    for (n, ch, h, w, o, kh, kw, stride, padding, wd, with_bias) in cases {
        let params = Conv2dParams { stride, padding };
        let label = case(format_args!(
            "x [{n}, {ch}, {h}, {w}] w {wd} [{o}, {ch}, {kh}, {kw}] stride={stride} pad={padding:?} bias={with_bias}"
        ));
        let Some((gx, wx)) = c.rand(&label, &[n, ch, h, w], -1.0, 1.0) else {
            return c.done();
        };
        let Some((gw, ww)) = c.weight(&label, &[o, ch, kh, kw], wd, None) else {
            return c.done();
        };
        let bias = if with_bias {
            c.rand(&label, &[o], -0.5, 0.5)
        } else {
            None
        };
        let rel = if wd == DType::F32 {
            tol.rel
        } else {
            tol.weight_rel
        };
        let got = be.conv2d(&gx, &gw, bias.as_ref().map(|b| &b.0), params);
        let want = c.cpu.conv2d(&wx, &ww, bias.as_ref().map(|b| &b.1), params);
        c.check(&label, got, want, rel);
    }
    c.done()
}

/// Group norm with and without affine parameters and the fused swish.
pub fn group_norm<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "group_norm", 17);
    for (shape, groups) in [
        // One group of 3 elements (a group of one has zero variance: ill-conditioned in f32).
        (vec![1usize, 1, 1, 3], 1usize),
        (vec![2, 6, 5, 7], 3),
        (vec![1, 12, 9, 11], 4),
        (vec![2, 8, 33], 2),
    ] {
        let ch = shape[1];
        for (affine, swish) in [(false, false), (true, false), (true, true)] {
            let label = case(format_args!(
                "{shape:?} groups={groups} affine={affine} swish={swish}"
            ));
            let Some((gx, wx)) = c.rand(&label, &shape, -2.0, 3.0) else {
                return c.done();
            };
            let Some((gw, ww)) = c.rand(&label, &[ch], 0.5, 1.5) else {
                return c.done();
            };
            let Some((gb, wb)) = c.rand(&label, &[ch], -0.5, 0.5) else {
                return c.done();
            };
            let got = be.group_norm(
                &gx,
                groups,
                1e-6,
                affine.then_some(&gw),
                affine.then_some(&gb),
                swish,
            );
            let want = c.cpu.group_norm(
                &wx,
                groups,
                1e-6,
                affine.then_some(&ww),
                affine.then_some(&wb),
                swish,
            );
            c.check(&label, got, want, tol.rel);
            // Statistics given by the caller (as a tiled image uses them): the moments of the
            // backend must match, and normalising with shifted statistics must too.
            let label = case(format_args!("{label} with_stats"));
            let moments = (
                be.group_moments(&gx, groups),
                c.cpu.group_moments(&wx, groups),
            );
            let (Ok(m), Ok(mw)) = moments else {
                c.fail(&label, "group_moments failed".into());
                continue;
            };
            let close = |a: &[f64], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= tol.rel * (1.0 + y.abs()))
            };
            if m.count != mw.count || !close(&m.mean, &mw.mean) || !close(&m.m2, &mw.m2) {
                c.fail(&label, format!("group_moments {m:?}, expected {mw:?}"));
            }
            let (mean, rstd) = mw.mean_rstd(1e-6);
            let mean: Vec<f64> = mean.iter().map(|v| v + 0.25).collect();
            let rstd: Vec<f64> = rstd.iter().map(|v| v * 0.8).collect();
            let got = be.group_norm_with_stats(
                &gx,
                groups,
                &mean,
                &rstd,
                affine.then_some(&gw),
                affine.then_some(&gb),
                swish,
            );
            let want = c.cpu.group_norm_with_stats(
                &wx,
                groups,
                &mean,
                &rstd,
                affine.then_some(&ww),
                affine.then_some(&wb),
                swish,
            );
            c.check(&label, got, want, tol.rel);
        }
    }
    c.done()
}

/// Image ops: nearest upsampling, pixel attention, channel slices, crops.
pub fn image_ops<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "image_ops", 18);
    for shape in [[1usize, 1, 1, 1], [2, 3, 5, 7], [1, 5, 13, 11]] {
        let label = case(format_args!("{shape:?}"));
        let Some((g, w)) = c.rand(&label, &shape, -1.0, 1.0) else {
            return c.done();
        };
        c.check(
            &format!("{label} upsample"),
            be.upsample_nearest2x(&g),
            c.cpu.upsample_nearest2x(&w),
            0.0,
        );
        let [_, ch, h, wd] = shape;
        c.check(
            &format!("{label} narrow_channels"),
            be.narrow_channels(&g, ch / 2, ch - ch / 2),
            c.cpu.narrow_channels(&w, ch / 2, ch - ch / 2),
            0.0,
        );
        c.check(
            &format!("{label} crop2d"),
            be.crop2d(&g, h / 3, wd / 2, h - h / 3, wd - wd / 2),
            c.cpu.crop2d(&w, h / 3, wd / 2, h - h / 3, wd - wd / 2),
            0.0,
        );
        let Some((gk, wk)) = c.rand(&label, &shape, -1.0, 1.0) else {
            return c.done();
        };
        let Some((gv, wv)) = c.rand(&label, &shape, -1.0, 1.0) else {
            return c.done();
        };
        let scale = 1.0 / (ch as f64).sqrt();
        c.check(
            &format!("{label} attention_nchw"),
            be.attention_nchw(&g, &gk, &gv, scale),
            c.cpu.attention_nchw(&w, &wk, &wv, scale),
            tol.rel,
        );
    }
    c.done()
}

/// Bad shapes give errors (never panics or garbage) wherever the reference rejects them.
pub fn bad_input<B: Backend>(be: &B, tol: Tolerances) -> Vec<Failure> {
    let mut c = Ctx::new(be, tol, "bad_input", 19);
    let (Some((a, _)), Some((b, _)), Some((v5, _))) = (
        c.rand("operands", &[3, 4], -1.0, 1.0),
        c.rand("operands", &[5, 4], -1.0, 1.0),
        c.rand("operands", &[5], -1.0, 1.0),
    ) else {
        return c.done();
    };
    let mut expect_err = |what: &str, r: Result<Tensor<B>>| {
        if r.is_ok() {
            c.fail(what, "accepted".into());
        }
    };
    expect_err(
        "lincomb shape mismatch",
        be.lincomb(&[(1.0, &a), (1.0, &b)]),
    );
    expect_err("matmul inner dim", be.matmul(&a, &b, false));
    expect_err("linear weight shape", be.linear(&a, &v5, None));
    expect_err(
        "layer_norm weight length",
        be.layer_norm(&a, Some(&v5), None, 1e-5),
    );
    expect_err("binary broadcast", be.binary(&a, &v5, BinaryOp::Add));
    expect_err("narrow out of range", be.narrow(&a, 1, 2, 3));
    expect_err("permute not a permutation", be.permute(&a, &[0, 0]));
    expect_err("concat mismatch", be.concat(&[&a, &v5], 0));
    expect_err(
        "gather id out of range",
        be.gather_rows(&b, &[5], DType::F32),
    );
    expect_err(
        "conv2d rank",
        be.conv2d(&a, &b, None, Conv2dParams::same(0)),
    );
    expect_err(
        "group_norm groups",
        be.group_norm(&a, 3, 1e-5, None, None, false),
    );
    expect_err(
        "upload length",
        be.upload(HostData::F32(&[1.0]), &[2], DType::F32),
    );
    expect_err(
        "upload_f32_vec length",
        be.upload_f32_vec(vec![1.0; 3], &[2], DType::F32),
    );
    expect_err(
        "upload_f64_vec length",
        be.upload_f64_vec(vec![1.0; 3], &[2, 2], DType::F32),
    );
    expect_err(
        "upload_f32_vec dtype",
        be.upload_f32_vec(vec![1.0; 2], &[2], DType::F8E4M3),
    );
    let mut t = a;
    if be.write(&mut t, HostData::F32(&[1.0, 2.0])).is_ok() {
        c.fail("write length", "accepted".into());
    }
    c.done()
}

/// The CPU backend in f32 against its own f64 path.
#[cfg(test)]
mod cpu_f32 {
    crate::conformance_tests!(Some(crate::Cpu), super::Tolerances::F32);
}
