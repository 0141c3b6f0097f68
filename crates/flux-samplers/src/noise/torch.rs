//! A generator that reproduces PyTorch's CPU `torch.randn` bit for bit.
//!
//! PyTorch's CPU generator is MT19937 seeded from the low 32 bits of the seed. `randn` has two
//! paths: tensors of at least 16 elements are filled with uniforms first and converted in
//! blocks of 16 by Box-Muller (single precision through the AVX2 kernel, whose polynomial
//! `log`/`sincos` live in `super::cephes`); smaller tensors draw each element from a
//! double-precision Box-Muller that caches its second value in the generator.
//!
//! The double-precision paths use the platform's `ln`, `ln_1p`, `cos` and `sin`; with glibc
//! (Linux) these are the functions PyTorch calls, so the f64 output is bit-exact there.

use super::cephes;
use super::mt19937::Mt19937;
use crate::{Result, SamplerError};
use flux_kernels::{DType, HostData};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// PyTorch's CPU generator (`torch.Generator().manual_seed(seed)`).
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// The second value of the last scalar Box-Muller pair, as PyTorch caches it.
    next_normal: Option<f64>,
}

/// Host noise values in the dtype they were generated in.
#[derive(Clone, Debug, PartialEq)]
pub enum HostNoise {
    /// Double precision values.
    F64(Vec<f64>),
    /// Single precision values.
    F32(Vec<f32>),
}

impl HostNoise {
    /// A view for [`flux_kernels::SamplerOps::upload`].
    pub fn as_host(&self) -> HostData<'_> {
        match self {
            HostNoise::F64(v) => HostData::F64(v),
            HostNoise::F32(v) => HostData::F32(v),
        }
    }

    /// Moves the values into a new tensor of `shape` and `dtype` on `backend` (without a copy
    /// where the backend keeps host vectors).
    pub fn into_tensor<B: flux_kernels::Backend>(
        self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
    ) -> flux_kernels::Result<flux_kernels::Tensor<B>> {
        match self {
            HostNoise::F64(v) => backend.upload_f64_vec(v, shape, dtype),
            HostNoise::F32(v) => backend.upload_f32_vec(v, shape, dtype),
        }
    }

    /// The values widened to f64 (exact).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostNoise::F64(v) => v.clone(),
            HostNoise::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            HostNoise::F64(v) => v.len(),
            HostNoise::F32(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The float uniform of one 32-bit draw (its low 24 bits).
#[inline]
fn uniform_f32_of(r: u32) -> f32 {
    (r & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The double uniform of one 64-bit draw (its low 53 bits).
#[inline]
fn uniform_f64_of(r: u64) -> f64 {
    (r & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Double uniforms drawn per batch of raw engine output (bounds the scratch buffer).
const UNIFORM_BATCH: usize = 1 << 12;

/// Below this many elements PyTorch draws element by element instead of in blocks.
const BLOCK: usize = 16;
const HALF: usize = BLOCK / 2;

impl TorchGenerator {
    /// A generator seeded like `torch.manual_seed(seed)`: only the low 32 bits count.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new((seed & 0xffff_ffff) as u32),
            next_normal: None,
        }
    }

    /// One 32-bit draw.
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One 64-bit draw: the first 32-bit draw is the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.engine.next_u32());
        let lo = u64::from(self.engine.next_u32());
        (hi << 32) | lo
    }

    /// A uniform in [0, 1) with 24 random bits (`uniform_real_distribution<float>`).
    pub fn uniform_f32(&mut self) -> f32 {
        uniform_f32_of(self.next_u32())
    }

    /// A uniform in [0, 1) with 53 random bits (`uniform_real_distribution<double>`).
    pub fn uniform_f64(&mut self) -> f64 {
        uniform_f64_of(self.next_u64())
    }

    /// Fills `out` with successive [`TorchGenerator::uniform_f32`] values and returns it as
    /// initialised floats.
    pub(crate) fn fill_uniforms_f32<'a>(
        &mut self,
        out: &'a mut [MaybeUninit<f32>],
    ) -> &'a mut [f32] {
        self.engine.fill_mapped(out, uniform_f32_of);
        // SAFETY: every element was written just above, and `MaybeUninit<f32>` has the layout
        // of `f32`.
        #[allow(unsafe_code)]
        unsafe {
            &mut *(std::ptr::from_mut::<[MaybeUninit<f32>]>(out) as *mut [f32])
        }
    }

    /// Fills `out` with successive [`TorchGenerator::uniform_f64`] values and returns it as
    /// initialised floats.
    pub(crate) fn fill_uniforms_f64<'a>(
        &mut self,
        out: &'a mut [MaybeUninit<f64>],
    ) -> &'a mut [f64] {
        let mut raw = vec![0u32; 2 * UNIFORM_BATCH.min(out.len())];
        for out in out.chunks_mut(UNIFORM_BATCH) {
            let raw = &mut raw[..2 * out.len()];
            self.engine.fill_u32(raw);
            for (o, p) in out.iter_mut().zip(raw.chunks_exact(2)) {
                o.write(uniform_f64_of((u64::from(p[0]) << 32) | u64::from(p[1])));
            }
        }
        // SAFETY: every element was written just above, and `MaybeUninit<f64>` has the layout
        // of `f64`.
        #[allow(unsafe_code)]
        unsafe {
            &mut *(std::ptr::from_mut::<[MaybeUninit<f64>]>(out) as *mut [f64])
        }
    }

    /// `numel` successive [`TorchGenerator::uniform_f64`] values.
    fn uniforms_f64(&mut self, numel: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(numel);
        self.fill_uniforms_f64(&mut out.spare_capacity_mut()[..numel]);
        // SAFETY: the capacity is `numel` and the call above initialised all `numel` elements.
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(numel);
        }
        out
    }

    /// One standard normal from the scalar path (`normal_distribution<double>`), which
    /// returns `r cos(theta)` and keeps `r sin(theta)` for the next call.
    pub fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, dtype=float64, generator=self)`.
    pub fn randn_f64(&mut self, numel: usize) -> Vec<f64> {
        if numel < BLOCK {
            return (0..numel).map(|_| self.normal_f64()).collect();
        }
        let mut data = self.uniforms_f64(numel);
        convert_blocks(&mut data);
        if !numel.is_multiple_of(BLOCK) {
            // The last 16 positions are redrawn and converted again as one block.
            let tail = &mut data[numel - BLOCK..];
            for v in tail.iter_mut() {
                *v = self.uniform_f64();
            }
            box_muller_f64(tail);
        }
        data
    }

    /// `torch.randn(numel, dtype=float32, generator=self)` on an x86 build with AVX2.
    ///
    /// Large draws are pipelined: this thread draws the uniforms of one chunk (the engine is
    /// sequential) while the rayon pool converts the chunks drawn before it.
    pub fn randn_f32(&mut self, numel: usize) -> Vec<f32> {
        if numel < BLOCK {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        // Every element is written below before the vector takes its length: no zeroing pass.
        let mut data: Vec<f32> = Vec::with_capacity(numel);
        let whole = numel - numel % BLOCK;
        {
            let (blocks, rest) = data.spare_capacity_mut()[..numel].split_at_mut(whole);
            if whole >= 2 * PAR_CHUNK {
                rayon::scope(|scope| {
                    for chunk in blocks.chunks_mut(PAR_CHUNK) {
                        let chunk = self.fill_uniforms_f32(chunk);
                        scope.spawn(move |_| convert_chunk(chunk));
                    }
                });
            } else {
                convert_chunk(self.fill_uniforms_f32(blocks));
            }
            self.fill_uniforms_f32(rest);
        }
        // SAFETY: the capacity is `numel` and all `numel` elements were initialised above.
        #[allow(unsafe_code)]
        unsafe {
            data.set_len(numel);
        }
        if !numel.is_multiple_of(BLOCK) {
            let tail = &mut data[numel - BLOCK..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_f32(tail);
        }
        data
    }

    /// Leaves the generator exactly where [`TorchGenerator::randn`] of `shape` and `dtype`
    /// would leave it, without making the normals. A draw of at least 16 elements consumes
    /// one engine output per f32 element or two per f64 element, plus a redrawn block of 16
    /// when the count is not a multiple of 16, and leaves the cached scalar normal alone; the
    /// engine just moves past those outputs. A smaller draw takes the scalar path, whose
    /// cached normal depends on the values, so it is drawn.
    pub fn skip_randn(&mut self, shape: &[usize], dtype: DType) -> Result<()> {
        let numel = numel_of(shape)?;
        let words_per_value = match dtype {
            DType::F32 => 1,
            DType::F64 => 2,
            other => {
                return Err(SamplerError::Noise(format!(
                    "randn supports f64 and f32, not {other}"
                )));
            }
        };
        if numel < BLOCK {
            self.randn(shape, dtype)?;
            return Ok(());
        }
        let redrawn = if numel.is_multiple_of(BLOCK) {
            0
        } else {
            BLOCK
        };
        let words = numel
            .checked_add(redrawn)
            .and_then(|n| n.checked_mul(words_per_value))
            .ok_or_else(|| SamplerError::Noise(format!("shape {shape:?} has too many elements")))?;
        self.engine.discard(words);
        Ok(())
    }

    /// `torch.randn(shape, dtype=dtype, generator=self)` for F64 or F32.
    pub fn randn(&mut self, shape: &[usize], dtype: DType) -> Result<HostNoise> {
        let numel = numel_of(shape)?;
        match dtype {
            DType::F64 => Ok(HostNoise::F64(self.randn_f64(numel))),
            DType::F32 => Ok(HostNoise::F32(self.randn_f32(numel))),
            other => Err(SamplerError::Noise(format!(
                "randn supports f64 and f32, not {other}"
            ))),
        }
    }
}

/// `torch.randn(shape, dtype=dtype, generator=torch.manual_seed(seed))`, as ComfyUI's
/// `prepare_noise` draws the initial latent noise.
pub fn randn(shape: &[usize], seed: u64, dtype: DType) -> Result<HostNoise> {
    TorchGenerator::new(seed).randn(shape, dtype)
}

/// [`randn`] in double precision.
pub fn randn_f64(shape: &[usize], seed: u64) -> Result<Vec<f64>> {
    Ok(TorchGenerator::new(seed).randn_f64(numel_of(shape)?))
}

/// [`randn`] in single precision.
pub fn randn_f32(shape: &[usize], seed: u64) -> Result<Vec<f32>> {
    Ok(TorchGenerator::new(seed).randn_f32(numel_of(shape)?))
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| SamplerError::Noise(format!("shape {shape:?} has too many elements")))
}

/// Converts whole blocks of 16 uniforms to normals in place, as a large `randn` does: a draw
/// of a multiple of 16 elements is the engine's uniforms in order, converted block by block,
/// so it can be made in pieces (each a multiple of 16 long) that interleave the uniforms of
/// several generators with the conversion. `chunk.len()` must be a multiple of 16 (a partial
/// last block is left as it is).
pub(crate) fn box_muller_blocks_f32(chunk: &mut [f32]) {
    convert_chunk(chunk);
}

/// [`box_muller_blocks_f32`] in double precision.
pub(crate) fn box_muller_blocks_f64(chunk: &mut [f64]) {
    convert_chunk(chunk);
}

/// Uniforms per parallel task when converting large draws (a multiple of [`BLOCK`]).
const PAR_CHUNK: usize = BLOCK * 1024;

/// The block conversion of one element type.
trait BoxMuller: Sized + Send {
    /// Converts 16 uniforms to 16 normals in place.
    fn box_muller(block: &mut [Self]);

    /// Converts a leading part of `chunk` (whole blocks) with an explicitly vectorised kernel
    /// where there is one for the type and CPU; returns how many values it converted.
    fn convert_vectorised(_chunk: &mut [Self]) -> usize {
        0
    }
}

impl BoxMuller for f64 {
    #[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
    #[inline(always)]
    fn box_muller(block: &mut [f64]) {
        box_muller_f64(block);
    }
}

impl BoxMuller for f32 {
    #[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
    #[inline(always)]
    fn box_muller(block: &mut [f32]) {
        box_muller_f32(block);
    }

    fn convert_vectorised(chunk: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            let mut done = 0;
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the function only requires the target features checked above.
                #[allow(unsafe_code)]
                {
                    done = unsafe { super::box_muller_x86::convert_f32_avx512(chunk) };
                }
            }
            // AVX2 converts every block AVX-512 left (a last single block), or all of them.
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the function only requires the target features checked above.
                #[allow(unsafe_code)]
                {
                    done += unsafe { super::box_muller_x86::convert_f32_avx2(&mut chunk[done..]) };
                }
            }
            return done;
        }
        let _ = chunk;
        0
    }
}

/// Converts every whole block of 16 uniforms. Blocks are independent, so large
/// draws are split across the rayon pool; the values do not depend on the split.
fn convert_blocks<T: BoxMuller>(data: &mut [T]) {
    let whole = data.len() - data.len() % BLOCK;
    let data = &mut data[..whole];
    if data.len() >= 2 * PAR_CHUNK {
        data.par_chunks_mut(PAR_CHUNK)
            .for_each(|chunk| convert_chunk(chunk));
    } else {
        convert_chunk(data);
    }
}

/// Converts each block of `chunk` (whose length is a multiple of [`BLOCK`]), compiled with FMA
/// and AVX2 where the CPU has them (the conversion and what it calls are inlined into the loop,
/// so they are compiled with those features too).
fn convert_chunk<T: BoxMuller>(chunk: &mut [T]) {
    let done = T::convert_vectorised(chunk);
    let chunk = &mut chunk[done..];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the function only requires the target features checked just above.
        #[allow(unsafe_code)]
        unsafe {
            convert_chunk_avx512(chunk);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the function only requires the two target features checked just above.
        #[allow(unsafe_code)]
        unsafe {
            convert_chunk_fma(chunk);
        }
        return;
    }
    convert_chunk_portable(chunk);
}

/// The block loop for CPUs with FMA: `mul_add` becomes one instruction instead of a call to
/// the software `fma` (the results are the same: a fused multiply-add rounds once either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn convert_chunk_fma<T: BoxMuller>(chunk: &mut [T]) {
    for block in chunk.chunks_exact_mut(BLOCK) {
        T::box_muller(block);
    }
}

/// The same loop in 512-bit registers: the lanes compute the same IEEE operations as the AVX2
/// kernel, so the values are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn convert_chunk_avx512<T: BoxMuller>(chunk: &mut [T]) {
    for block in chunk.chunks_exact_mut(BLOCK) {
        T::box_muller(block);
    }
}

fn convert_chunk_portable<T: BoxMuller>(chunk: &mut [T]) {
    for block in chunk.chunks_exact_mut(BLOCK) {
        T::box_muller(block);
    }
}

/// Box-Muller over the pairs `(j, j + 8)` of 16 uniforms, in place (double precision).
#[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
#[inline(always)]
fn box_muller_f64(block: &mut [f64]) {
    let (lo, hi) = block.split_at_mut(HALF);
    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
        let radius = (-2.0 * (1.0 - *a).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * *b;
        *a = radius * theta.cos();
        *b = radius * theta.sin();
    }
}

/// The same in single precision, as the AVX2 kernel computes it.
#[allow(clippy::inline_always)] // must be inlined into the FMA-compiled block loop
#[inline(always)]
pub(super) fn box_muller_f32(block: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let (lo, hi) = block.split_at_mut(HALF);
    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
        let radius = (-2.0 * cephes::log(1.0 - *a)).sqrt();
        let (sin, cos) = cephes::sincos(two_pi * *b);
        // The kernel's final `fma(n, std = 1, mean = 0)` turns -0 into +0.
        *a = radius * cos + 0.0;
        *b = radius * sin + 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn skipping_a_draw_leaves_the_generator_where_drawing_does() {
        // Sizes below, at and above a block, with and without a partial last block, and a
        // large one that crosses many engine states; each after a scalar draw has left a
        // cached normal, which a block draw keeps.
        for numel in [1usize, 15, 16, 17, 40, 48, 2 * PAR_CHUNK + 5] {
            for dtype in [DType::F32, DType::F64] {
                let mut drawn = TorchGenerator::new(11);
                drawn.randn_f64(3);
                let mut skipped = drawn.clone();
                drawn.randn(&[numel], dtype).unwrap();
                skipped.skip_randn(&[numel], dtype).unwrap();
                for n in [3usize, 33] {
                    assert_eq!(
                        drawn.randn_f64(n),
                        skipped.randn_f64(n),
                        "{numel} {dtype}, then {n}"
                    );
                }
            }
        }
        let mut g = TorchGenerator::new(1);
        assert!(g.skip_randn(&[4], DType::BF16).is_err());
        assert!(g.skip_randn(&[usize::MAX / 2 + 1], DType::F64).is_err());
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_count() {
        let a = randn_f64(&[40], 5).unwrap();
        let b = randn_f64(&[40], (1u64 << 32) + 5).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn uniforms_use_24_and_53_bits() {
        let mut g = TorchGenerator::new(7);
        let mut e = Mt19937::new(7);
        let r = e.next_u32();
        assert_eq!(g.uniform_f32(), (r & 0xff_ffff) as f32 / 16_777_216.0);
        let hi = u64::from(e.next_u32());
        let lo = u64::from(e.next_u32());
        let want = (((hi << 32) | lo) & ((1 << 53) - 1)) as f64 / 9_007_199_254_740_992.0;
        assert_eq!(g.uniform_f64(), want);
    }

    #[test]
    fn scalar_path_caches_the_sine_value() {
        let mut g = TorchGenerator::new(3);
        let mut u = TorchGenerator::new(3);
        let (u1, u2) = (u.uniform_f64(), u.uniform_f64());
        let r = (-2.0 * (1.0 - u2).ln()).sqrt();
        let t = std::f64::consts::TAU * u1;
        let (a, b) = (g.normal_f64(), g.normal_f64());
        assert!((a - r * t.cos()).abs() < 1e-12);
        assert!((b - r * t.sin()).abs() < 1e-12);
        // The pair used exactly four 32-bit draws.
        assert_eq!(g.next_u32(), u.next_u32());
    }

    #[test]
    fn unsupported_dtype_is_an_error() {
        assert!(randn(&[4], 0, DType::F16).is_err());
        assert!(randn(&[usize::MAX, 2], 0, DType::F32).is_err());
    }

    /// The definition, one value at a time: uniforms for every element, whole blocks converted
    /// by the lane code, then the last 16 positions redrawn and converted when the length is
    /// not a multiple of 16.
    fn randn_f32_by_definition(seed: u64, numel: usize) -> Vec<f32> {
        let mut g = TorchGenerator::new(seed);
        let mut data: Vec<f32> = (0..numel).map(|_| g.uniform_f32()).collect();
        let whole = numel - numel % BLOCK;
        for block in data[..whole].chunks_exact_mut(BLOCK) {
            box_muller_f32(block);
        }
        if whole != numel {
            let tail = &mut data[numel - BLOCK..];
            for v in tail.iter_mut() {
                *v = g.uniform_f32();
            }
            box_muller_f32(tail);
        }
        data
    }

    /// Large draws go through the pipelined, vectorised path; it must give the same bits.
    #[test]
    fn large_draws_match_the_definition() {
        for numel in [
            2 * PAR_CHUNK,
            3 * PAR_CHUNK + 3 * BLOCK + 5,
            5 * PAR_CHUNK + 1,
        ] {
            let got = randn_f32(&[numel], 11).unwrap();
            let want = randn_f32_by_definition(11, numel);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&want), "numel {numel}");
        }
    }

    proptest! {
        #[test]
        fn deterministic_per_seed(seed in any::<u64>(), numel in 0usize..70) {
            prop_assert_eq!(randn_f64(&[numel], seed).unwrap(), randn_f64(&[numel], seed).unwrap());
            let a = randn_f32(&[numel], seed).unwrap();
            let b = randn_f32(&[numel], seed).unwrap();
            prop_assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }

        #[test]
        fn whole_blocks_are_a_prefix_of_longer_draws(seed in any::<u64>(), blocks in 1usize..5, more in 1usize..40) {
            // Uniforms are drawn first and converted block by block, so a multiple of 16
            // values is the start of any longer draw.
            let n = 16 * blocks;
            let short = randn_f32(&[n], seed).unwrap();
            let long = randn_f32(&[n + 16 * more], seed).unwrap();
            prop_assert_eq!(&short[..], &long[..n]);
            let short = randn_f64(&[n], seed).unwrap();
            let long = randn_f64(&[n + 16 * more], seed).unwrap();
            prop_assert_eq!(&short[..], &long[..n]);
        }

        #[test]
        fn f32_block_path_tracks_f64_formula(seed in any::<u64>()) {
            // Same uniforms through libm in double precision: within a few f32 ulp.
            let got = randn_f32(&[32], seed).unwrap();
            let mut g = TorchGenerator::new(seed);
            let mut u: Vec<f64> = (0..32).map(|_| f64::from(g.uniform_f32())).collect();
            for block in u.chunks_exact_mut(16) {
                box_muller_f64(block);
            }
            for (a, b) in got.iter().zip(&u) {
                prop_assert!((f64::from(*a) - b).abs() <= 2e-6 * (1.0 + b.abs()));
            }
        }
    }
}
