//! Brownian-tree noise for the SDE samplers, as ComfyUI's `BrownianTreeNoiseSampler` draws it
//! from torchsde's `BrownianTree` (a `BrownianInterval` on the dyadic "halfway" tree).
//!
//! The Brownian motion `W` lives on `[sigma_min, sigma_max]`. Its increment over the whole
//! interval is `sqrt(t1 - t0) * N(0, 1)`; every node of the dyadic tree splits its increment
//! between its two halves by a Brownian bridge whose normal draw is seeded from the node's
//! position (numpy `SeedSequence` of the entropy and the node's spawn key and depth, then a
//! torch CPU `randn`). Query times are quantised to 6 decimals (torchsde's `tol = 1e-6`), and a
//! query interval is the sum of the tree nodes that tile it, so the path depends only on the
//! seed, not on the order of the queries: asking twice gives the same tensor, and increments
//! over adjacent intervals add up.

use super::NoiseSource;
use super::seed_sequence::SeedSequence;
use super::torch::{HostNoise, TorchGenerator, box_muller_blocks_f32, box_muller_blocks_f64};
use crate::{Result, SamplerError};
use flux_kernels::{Backend, DType, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// torchsde's entropy pool size for the Brownian tree.
const POOL_SIZE: usize = 24;
/// How many node increments are kept (values never depend on it, only speed does).
const CACHE_CAPACITY: usize = 64;
/// Spawn keys are `2^depth`-sized integers; deeper trees mean a degenerate interval.
const MAX_DEPTH: u32 = 120;

/// Rounds to 6 decimals exactly as Python's `round(x, 6)` (correctly rounded, ties to even).
fn quantise(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(x)
}

#[derive(Clone, Debug)]
struct Node {
    start: f64,
    end: f64,
    parent: Option<usize>,
    is_left: bool,
    /// Set once the node is split: (midway, left child, right child, seed of the bridge draw).
    split: Option<Split>,
    spawn_key: u128,
    depth: u32,
}

#[derive(Clone, Copy, Debug)]
struct Split {
    midway: f64,
    left: usize,
    right: usize,
    seed: u32,
}

/// The element type a tree computes in. For f32 trees every operation is done natively in
/// f32, which is exactly torchsde's float32 arithmetic (each step rounds once).
trait Real:
    Copy
    + Send
    + Sync
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// Rounds an f64 to this type.
    fn from_f64(x: f64) -> Self;
    /// Square root (correctly rounded).
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// `torch.randn(numel, generator=torch.manual_seed(seed))` in this type.
    fn randn(seed: u32, numel: usize) -> Vec<Self>;
    /// Fills `out` with `generator`'s next uniforms of this type and returns it initialised.
    fn uniforms<'a>(
        generator: &mut TorchGenerator,
        out: &'a mut [MaybeUninit<Self>],
    ) -> &'a mut [Self];
    /// Converts whole blocks of 16 uniforms to normals in place, as a large `randn` does.
    fn box_muller_blocks(chunk: &mut [Self]);
    /// One piece of a Brownian bridge with coefficients `(l, 1 / h, s)` (see
    /// [`Tree::bridge`]): `left = l w (1 / h) + s z` overwrites `z`, `right = w - left`.
    fn bridge_halves(
        z: &mut [Self],
        right: &mut [MaybeUninit<Self>],
        w: &[Self],
        c: (Self, Self, Self),
    );
    /// `out[i] = out[i] + v[i]`.
    fn add_assign(out: &mut [Self], v: &[Self]);
    /// Wraps host values.
    fn host(v: Vec<Self>) -> HostNoise;
}

/// [`Real`] for one float type. The elementwise kernels are compiled for AVX-512 and AVX2 too
/// (the same IEEE operations in the same order: Rust never fuses a multiply and an add, so the
/// values do not depend on the instruction set).
macro_rules! impl_real {
    ($t:ident, $randn:ident, $uniforms:ident, $box_muller:ident, $host:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;

            fn from_f64(x: f64) -> Self {
                x as $t
            }

            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }

            fn abs(self) -> Self {
                $t::abs(self)
            }

            fn randn(seed: u32, numel: usize) -> Vec<Self> {
                TorchGenerator::new(u64::from(seed)).$randn(numel)
            }

            fn uniforms<'a>(
                generator: &mut TorchGenerator,
                out: &'a mut [MaybeUninit<Self>],
            ) -> &'a mut [Self] {
                generator.$uniforms(out)
            }

            fn box_muller_blocks(chunk: &mut [Self]) {
                $box_muller(chunk);
            }

            fn bridge_halves(z: &mut [$t], right: &mut [MaybeUninit<$t>], w: &[$t], c: ($t, $t, $t)) {
                #[allow(clippy::inline_always)] // compiled once per instruction set below
                #[inline(always)]
                fn body(z: &mut [$t], right: &mut [MaybeUninit<$t>], w: &[$t], c: ($t, $t, $t)) {
                    let (ld, hr, sd) = c;
                    for ((z, r), &wi) in z.iter_mut().zip(right.iter_mut()).zip(w) {
                        let left = ld * wi * hr + sd * *z;
                        *z = left;
                        r.write(wi - left);
                    }
                }
                flux_kernels::simd_dispatch!(body, body_avx512, body_avx2, (z: &mut [$t], right: &mut [MaybeUninit<$t>], w: &[$t], c: ($t, $t, $t)) -> ());
            }

            fn add_assign(out: &mut [$t], v: &[$t]) {
                #[allow(clippy::inline_always)] // compiled once per instruction set below
                #[inline(always)]
                fn body(out: &mut [$t], v: &[$t]) {
                    for (o, &x) in out.iter_mut().zip(v) {
                        *o += x;
                    }
                }
                flux_kernels::simd_dispatch!(body, body_avx512, body_avx2, (out: &mut [$t], v: &[$t]) -> ());
            }

            fn host(v: Vec<Self>) -> HostNoise {
                HostNoise::$host(v)
            }
        }
    };
}

impl_real!(
    f64,
    randn_f64,
    fill_uniforms_f64,
    box_muller_blocks_f64,
    F64
);
impl_real!(
    f32,
    randn_f32,
    fill_uniforms_f32,
    box_muller_blocks_f32,
    F32
);

/// `randn` converts its uniforms in independent blocks of this many.
const BLOCK: usize = 16;

/// Below this many elements the tree's elementwise passes stay on the calling thread.
const PAR_ELEMENTS: usize = 1 << 15;
/// Elements per parallel task of a pass: small enough that the several operations a fused
/// pass makes over one piece stay in the core's cache.
const PIECE: usize = 1 << 12;

/// `v[i] = f(v[i])`, on the rayon pool for large tensors (each element is computed on its own,
/// so the split does not change any value).
fn map_in_place<T: Real>(v: &mut [T], f: impl Fn(T) -> T + Sync) {
    if v.len() >= PAR_ELEMENTS {
        v.par_iter_mut().for_each(|x| *x = f(*x));
    } else {
        for x in v.iter_mut() {
            *x = f(*x);
        }
    }
}

/// A vector of `n` elements written piece by piece by `f(offset, piece)` (on the rayon pool
/// for large vectors), without zeroing it first. `f` must write every element of its piece
/// (through `MaybeUninit::write`) and compute each from its own index only.
fn filled<T: Real>(n: usize, f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let spare = &mut v.spare_capacity_mut()[..n];
    if n >= PAR_ELEMENTS {
        spare
            .par_chunks_mut(PIECE)
            .enumerate()
            .for_each(|(k, piece)| f(k * PIECE, piece));
    } else {
        f(0, spare);
    }
    // SAFETY: the capacity is at least `n`, and `f` wrote each of the first `n` elements.
    #[allow(unsafe_code)]
    unsafe {
        v.set_len(n);
    }
    v
}

/// `(±(tiles[0] + tiles[1] + ...)) / scale` elementwise in one pass, the sum taken left to
/// right as torchsde adds the increments of the intervals tiling a query, then negated (a
/// reversed query) and divided (a normalised draw), each step rounding as the separate tensor
/// operations do.
fn combine<T: Real>(tiles: &[Arc<Vec<T>>], numel: usize, negate: bool, scale: Option<T>) -> Vec<T> {
    // An empty query is a zero increment, still negated and scaled (a signed zero).
    let (first, rest) = tiles
        .split_first()
        .map_or((None, tiles), |(f, r)| (Some(f), r));
    filled(numel, |at, piece| {
        let end = at + piece.len();
        for (i, o) in piece.iter_mut().enumerate() {
            o.write(first.map_or(T::ZERO, |f| f[at + i]));
        }
        // SAFETY: every element of the piece was written just above; `MaybeUninit<T>` has the
        // layout of `T`.
        #[allow(unsafe_code)]
        let piece = unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<T>]>(piece) as *mut [T]) };
        for t in rest {
            T::add_assign(piece, &t[at..end]);
        }
        if negate {
            for o in piece.iter_mut() {
                *o = -*o;
            }
        }
        if let Some(s) = scale {
            for o in piece.iter_mut() {
                *o = *o / s;
            }
        }
    })
}

/// Where a fused query reads an increment: a known tensor, or the left or right half of the
/// pass's `k`-th split.
enum Source<T> {
    Known(Arc<Vec<T>>),
    Left(usize),
    Right(usize),
}

/// A split's bridge in a fused query: where its increment comes from, and
/// `(l, 1 / h, sqrt(l r / h))` (see [`Tree::bridge`]).
struct SplitPlan<T> {
    parent: Source<T>,
    coefficients: (T, T, T),
}

/// What the task of one piece of a fused query needs besides its buffers.
struct FusedPiece<'a, T> {
    /// The piece's first element.
    at: usize,
    plans: &'a [SplitPlan<T>],
    tiles: &'a [Source<T>],
    negate: bool,
    scale: Option<T>,
}

/// The elements `at .. at + len` of `src`, given the piece's left halves `lefts` and finished
/// right halves `rights`.
fn source_piece<'s, T>(
    src: &'s Source<T>,
    at: usize,
    len: usize,
    lefts: &'s [&mut [T]],
    rights: &'s [&[T]],
) -> &'s [T] {
    match src {
        Source::Known(v) => &v[at..at + len],
        Source::Left(j) => &*lefts[*j],
        Source::Right(j) => rights[*j],
    }
}

/// The first `n` elements of the spare capacity of each buffer of `buffers` that is there,
/// cut into pieces of [`PIECE`] and gathered per piece: `result[piece][buffer]`, `None` where
/// the buffer is not.
fn gather_kept_pieces<T>(
    buffers: &mut [Option<Vec<T>>],
    n: usize,
) -> Vec<Vec<Option<&mut [MaybeUninit<T>]>>> {
    let count = n.div_ceil(PIECE);
    let mut gathered: Vec<Vec<Option<&mut [MaybeUninit<T>]>>> = (0..count)
        .map(|_| Vec::with_capacity(buffers.len()))
        .collect();
    for b in buffers {
        match b {
            Some(b) => {
                for (piece, chunk) in b.spare_capacity_mut()[..n].chunks_mut(PIECE).enumerate() {
                    gathered[piece].push(Some(chunk));
                }
            }
            None => gathered.iter_mut().for_each(|g| g.push(None)),
        }
    }
    gathered
}

/// Sets its flag when dropped while its thread panics.
struct FlagOnPanic<'a>(&'a AtomicBool);

impl Drop for FlagOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Locks a mutex whose data stays valid if a holder panicked (a list of free buffers).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the fused pass puts a split's halves that it does not keep: their slots in a
/// piece's scratch (`None`: the half is kept, in a whole buffer).
struct HalfSlots {
    left: Option<usize>,
    right: Option<usize>,
}

/// One piece of a fused query with its uniforms drawn: the kept halves' slices of the piece
/// (the left ones holding the uniforms), the output's, and the scratch with the uniforms of
/// the halves that are not kept.
struct Prepared<'a, T> {
    at: usize,
    zs: Vec<Option<&'a mut [T]>>,
    rights: Vec<Option<&'a mut [MaybeUninit<T>]>>,
    out: &'a mut [MaybeUninit<T>],
    arena: Box<[MaybeUninit<T>]>,
}

/// What every piece of a fused query shares.
struct FusedJob<'a, T> {
    plans: &'a [SplitPlan<T>],
    tiles: &'a [Source<T>],
    layout: &'a [HalfSlots],
    negate: bool,
    scale: Option<T>,
}

impl<T: Real> FusedJob<'_, T> {
    /// Runs one prepared piece ([`FusedPiece::run`]) and hands its scratch back.
    fn run(&self, p: Prepared<'_, T>) -> Box<[MaybeUninit<T>]> {
        let Prepared {
            at,
            zs,
            rights,
            out,
            mut arena,
        } = p;
        let len = out.len();
        {
            let mut scratch: Vec<Option<&mut [MaybeUninit<T>]>> =
                arena.chunks_mut(PIECE).map(Some).collect();
            let mut take = |slot: Option<usize>| {
                slot.and_then(|s| scratch.get_mut(s).and_then(Option::take))
                    .map(|c| &mut c[..len])
            };
            let mut z_all: Vec<&mut [T]> = Vec::with_capacity(zs.len());
            let mut r_all: Vec<&mut [MaybeUninit<T>]> = Vec::with_capacity(rights.len());
            for ((z, r), h) in zs.into_iter().zip(rights).zip(self.layout) {
                let z = match (z, take(h.left)) {
                    (Some(z), _) => z,
                    // SAFETY: `prepare` drew this piece's uniforms into the slot's first `len`
                    // elements; `MaybeUninit<T>` has the layout of `T`.
                    #[allow(unsafe_code)]
                    (None, Some(c)) => unsafe {
                        &mut *(std::ptr::from_mut::<[MaybeUninit<T>]>(c) as *mut [T])
                    },
                    // `layout` gives a slot to every half without a buffer.
                    (None, None) => unreachable!("a left half with neither buffer nor slot"),
                };
                let Some(r) = r.or_else(|| take(h.right)) else {
                    unreachable!("a right half with neither buffer nor slot")
                };
                z_all.push(z);
                r_all.push(r);
            }
            let piece = FusedPiece {
                at,
                plans: self.plans,
                tiles: self.tiles,
                negate: self.negate,
                scale: self.scale,
            };
            piece.run(z_all, r_all, out);
        }
        arena
    }
}

impl<T: Real> FusedPiece<'_, T> {
    /// Converts the splits' uniforms `zs` to normals, overwrites each with the split's left
    /// half and writes its right half into `rights`, parents first, then writes the query's
    /// value into `out`: the operations of [`Tree::bridge`] and [`combine`], element by
    /// element in the same order.
    fn run(
        &self,
        mut zs: Vec<&mut [T]>,
        rights: Vec<&mut [MaybeUninit<T>]>,
        out: &mut [MaybeUninit<T>],
    ) {
        let (at, len) = (self.at, out.len());
        let mut done: Vec<&[T]> = Vec::with_capacity(rights.len());
        for (k, (plan, right)) in self.plans.iter().zip(rights).enumerate() {
            let (before, rest) = zs.split_at_mut(k);
            let z = &mut *rest[0];
            T::box_muller_blocks(z);
            let w: &[T] = match &plan.parent {
                Source::Known(v) => &v[at..at + len],
                Source::Left(j) => &*before[*j],
                Source::Right(j) => done[*j],
            };
            T::bridge_halves(z, right, w, plan.coefficients);
            // SAFETY: the loop above wrote every element (`right`, `z` and `w` are the piece's
            // `len` elements); `MaybeUninit<T>` has the layout of `T`.
            #[allow(unsafe_code)]
            done.push(unsafe { &*(std::ptr::from_mut::<[MaybeUninit<T>]>(right) as *const [T]) });
        }
        let tile = |src| source_piece(src, at, len, &zs, &done);
        // As in `combine`: an empty sum is zero, still negated and scaled.
        let (first, rest) = self
            .tiles
            .split_first()
            .map_or((None, self.tiles), |(f, r)| (Some(f), r));
        match first {
            Some(f) => {
                for (o, &v) in out.iter_mut().zip(tile(f)) {
                    o.write(v);
                }
            }
            None => {
                for o in out.iter_mut() {
                    o.write(T::ZERO);
                }
            }
        }
        // SAFETY: every element of `out` was written just above.
        #[allow(unsafe_code)]
        let out = unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<T>]>(out) as *mut [T]) };
        for t in rest {
            T::add_assign(out, tile(t));
        }
        if self.negate {
            for o in out.iter_mut() {
                *o = -*o;
            }
        }
        if let Some(s) = self.scale {
            for o in out.iter_mut() {
                *o = *o / s;
            }
        }
    }
}

/// One torchsde `BrownianTree` of a fixed shape, computing in `T`.
struct Tree<T> {
    entropy: u64,
    numel: usize,
    /// Node 0 is the whole interval; children are appended as nodes split.
    nodes: Vec<Node>,
    top: Arc<Vec<T>>,
    cache: HashMap<usize, (Arc<Vec<T>>, u64)>,
    tick: u64,
    /// Allocations of evicted increments, reused for the halves of new splits: once the cache
    /// is full a query evicts about as many tensors as it makes, so in the steady state it
    /// touches no fresh memory (each fresh page costs a fault and a zeroing pass).
    spare: Vec<Vec<T>>,
    /// Whether queries take the fused path ([`Tree::fused_query`]) where it applies; the
    /// separate passes stay as its reference (and for sizes it does not cover).
    fused: bool,
    /// The sampler's promise for the draws after the next one (see
    /// [`NoiseSource::promise_below`]), as a quantised time, until the next query takes it.
    promised: Option<f64>,
    /// The promise the last queries were made under: no query reaches above this time, so
    /// nodes above it are neither kept nor cached. Dropped when a query breaks it.
    horizon: Option<f64>,
    /// Scratch of the fused pass for the halves it does not keep, one per piece in flight.
    arenas: Vec<Box<[MaybeUninit<T>]>>,
}

impl<T> std::fmt::Debug for Tree<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The increments are large tensors; the structure is what helps when debugging.
        f.debug_struct("Tree")
            .field("entropy", &self.entropy)
            .field("numel", &self.numel)
            .field("dtype", &std::any::type_name::<T>())
            .field("nodes", &self.nodes.len())
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl<T: Real> Tree<T> {
    fn new(entropy: u64, t0: f64, t1: f64, numel: usize) -> Self {
        let seed = SeedSequence::new(entropy, &[], POOL_SIZE).generate_state(1)[0];
        let scale = T::from_f64((t1 - t0).sqrt());
        let mut top = T::randn(seed, numel);
        map_in_place(&mut top, |z| z * scale);
        Self {
            entropy,
            numel,
            nodes: vec![Node {
                start: quantise(t0),
                end: quantise(t1),
                parent: None,
                is_left: false,
                split: None,
                spawn_key: 0,
                depth: 0,
            }],
            top: Arc::new(top),
            cache: HashMap::new(),
            tick: 0,
            spare: Vec::new(),
            fused: true,
            promised: None,
            horizon: None,
            arenas: Vec::new(),
        }
    }

    fn split_exact(&mut self, id: usize) -> Result<()> {
        let (start, end, parent, is_left) = {
            let n = &self.nodes[id];
            (n.start, n.end, n.parent, n.is_left)
        };
        let (spawn_key, depth) = match parent {
            None => (0, 0),
            Some(p) => {
                let pn = &self.nodes[p];
                (2 * pn.spawn_key + u128::from(!is_left), pn.depth + 1)
            }
        };
        if depth > MAX_DEPTH {
            return Err(SamplerError::Noise(format!(
                "Brownian tree deeper than {MAX_DEPTH} levels at [{start}, {end}]"
            )));
        }
        let midway = quantise(0.5 * (end + start));
        let seed = SeedSequence::new(self.entropy, &[spawn_key, u128::from(depth)], POOL_SIZE)
            .generate_state(1)[0];
        let left = self.nodes.len();
        let child = |start, end, is_left| Node {
            start,
            end,
            parent: Some(id),
            is_left,
            split: None,
            spawn_key: 0,
            depth: 0,
        };
        self.nodes.push(child(start, midway, true));
        self.nodes.push(child(midway, end, false));
        let n = &mut self.nodes[id];
        n.spawn_key = spawn_key;
        n.depth = depth;
        n.split = Some(Split {
            midway,
            left,
            right: left + 1,
            seed,
        });
        Ok(())
    }

    /// Splits at halfway points down to the node that ends or starts at `q`.
    fn split_towards(&mut self, mut id: usize, q: f64) -> Result<()> {
        loop {
            self.split_exact(id)?;
            let Some(s) = self.nodes[id].split else {
                return Ok(());
            };
            if q > s.midway {
                id = s.right;
            } else if q < s.midway {
                id = s.left;
            } else {
                return Ok(());
            }
        }
    }

    /// The tree nodes tiling `[ta, tb]`, left to right.
    fn locate(&mut self, id: usize, ta: f64, tb: f64, out: &mut Vec<usize>) -> Result<()> {
        let (start, end) = (self.nodes[id].start, self.nodes[id].end);
        if ta == start && tb == end {
            out.push(id);
            return Ok(());
        }
        if self.nodes[id].split.is_none() {
            self.split_towards(id, if ta == start { tb } else { ta })?;
        }
        let Some(s) = self.nodes[id].split else {
            return Ok(());
        };
        if tb <= s.midway {
            self.locate(s.left, ta, tb, out)
        } else if ta >= s.midway {
            self.locate(s.right, ta, tb, out)
        } else {
            self.locate(s.left, ta, s.midway, out)?;
            self.locate(s.right, s.midway, tb, out)
        }
    }

    /// The increments of `W` over the nodes `ids`, in order.
    ///
    /// Every node missing from the cache is computed from its parent's increment and the
    /// parent's bridge draw. One draw gives both halves (the left one by the bridge formula,
    /// the right one as the parent's increment minus the left one, exactly as torchsde
    /// computes each of them, so the values do not depend on which half is asked for first);
    /// both are cached, which spares the draw when the next query needs the other half. The
    /// draws are independent of each other (each has its own seeded generator), so several
    /// are made at once on the rayon pool; the bridge arithmetic then runs parents first.
    fn increments(&mut self, ids: &[usize]) -> Vec<Arc<Vec<T>>> {
        let mut have: HashMap<usize, Arc<Vec<T>>> = HashMap::new();
        let mut todo: Vec<usize> = Vec::new();
        for &id in ids {
            self.plan(id, &mut have, &mut todo);
        }
        let splits = self.splits_of(&todo);
        // A few draws in flight per worker keeps both the pool busy and the scratch bounded.
        let batch = 2 * rayon::current_num_threads().max(1);
        for group in splits.chunks(batch) {
            let seeds: Vec<u32> = group
                .iter()
                .map(|&p| self.nodes[p].split.map_or(0, |s| s.seed))
                .collect();
            let numel = self.numel;
            let draws: Vec<Vec<T>> = seeds.par_iter().map(|&s| T::randn(s, numel)).collect();
            for (&p, draw) in group.iter().zip(draws) {
                let Some(split) = self.nodes[p].split else {
                    continue;
                };
                let (left, right) = self.bridge(p, draw, &have);
                for (id, w) in [(split.left, left), (split.right, right)] {
                    let w = Arc::new(w);
                    self.remember(id, Arc::clone(&w));
                    have.insert(id, w);
                }
            }
        }
        ids.iter()
            .map(|id| {
                have.get(id)
                    .map_or_else(|| Arc::clone(&self.top), Arc::clone)
            })
            .collect()
    }

    /// Whether queries take [`Tree::fused_query`]: it needs whole blocks of 16 elements.
    fn fuses(&self) -> bool {
        self.fused && self.numel >= BLOCK && self.numel.is_multiple_of(BLOCK)
    }

    /// The split nodes whose draws the nodes `todo` need, each once, ancestors first (`todo`
    /// lists a node after its ancestors, so its parent's first appearance follows theirs).
    fn splits_of(&self, todo: &[usize]) -> Vec<usize> {
        let mut splits: Vec<usize> = Vec::new();
        for &id in todo {
            if let Some(p) = self.nodes[id].parent
                && !splits.contains(&p)
            {
                splits.push(p);
            }
        }
        splits
    }

    /// The Brownian bridge of split node `p` in this precision: `(l, 1 / h, sqrt(l r / h))`
    /// for its halves of lengths `l` and `r` (`h = l + r`), or `None` if `p` is not split.
    fn bridge_coefficients(&self, p: usize) -> Option<(T, T, T)> {
        let parent = &self.nodes[p];
        let split = parent.split?;
        let h_reciprocal = 1.0 / (parent.end - parent.start);
        let left_diff = split.midway - parent.start;
        let right_diff = parent.end - split.midway;
        let std = (left_diff * right_diff * h_reciprocal).sqrt();
        Some((
            T::from_f64(left_diff),
            T::from_f64(h_reciprocal),
            T::from_f64(std),
        ))
    }

    /// Finds `id`'s increment in the cache, or lists it (after its missing ancestors) in `todo`.
    fn plan(&mut self, id: usize, have: &mut HashMap<usize, Arc<Vec<T>>>, todo: &mut Vec<usize>) {
        if have.contains_key(&id) || todo.contains(&id) {
            return;
        }
        self.tick += 1;
        if let Some((w, used)) = self.cache.get_mut(&id) {
            *used = self.tick;
            have.insert(id, Arc::clone(w));
            return;
        }
        let parent = self.nodes[id].parent;
        match parent {
            Some(p) if self.nodes[p].split.is_some() => {
                self.plan(p, have, todo);
                todo.push(id);
            }
            // The root (or a node that was never split off a parent) is the whole interval.
            _ => {
                have.insert(id, Arc::clone(&self.top));
            }
        }
    }

    /// The increments of split node `p`'s two halves from its increment (in `have`) and its
    /// bridge draw `z` (overwritten in place by the left half):
    /// `left = (l / h) w + sqrt(l r / h) z`, `right = w - left`.
    fn bridge(
        &self,
        p: usize,
        mut z: Vec<T>,
        have: &HashMap<usize, Arc<Vec<T>>>,
    ) -> (Vec<T>, Vec<T>) {
        let w = have.get(&p).unwrap_or(&self.top);
        let Some((ld, hr, sd)) = self.bridge_coefficients(p) else {
            return (w.as_ref().clone(), vec![T::ZERO; self.numel]);
        };
        // One pass: the left half overwrites the draw, the right half (a new vector, written
        // once) is the parent's increment minus it.
        let halves = |z: &mut [T], right: &mut [MaybeUninit<T>], w: &[T]| {
            T::bridge_halves(z, right, w, (ld, hr, sd));
        };
        let n = self.numel;
        // Every increment and draw of a tree has its `numel` elements; the write-once pass
        // below relies on it.
        assert!(
            z.len() == n && w.len() == n,
            "Brownian tree vectors of {} and {} elements for a tree of {n}",
            z.len(),
            w.len()
        );
        let mut right: Vec<T> = Vec::with_capacity(n);
        {
            let spare = &mut right.spare_capacity_mut()[..n];
            if n >= PAR_ELEMENTS {
                z.par_chunks_mut(PIECE)
                    .zip(spare.par_chunks_mut(PIECE))
                    .zip(w.par_chunks(PIECE))
                    .for_each(|((z, r), w)| halves(z, r, w));
            } else {
                halves(&mut z, spare, w);
            }
        }
        // SAFETY: the capacity is `n`, and the pass above wrote each of the `n` elements (`z`,
        // `w` and the spare capacity have `n` elements and are split into the same pieces).
        #[allow(unsafe_code)]
        unsafe {
            right.set_len(n);
        }
        (z, right)
    }

    /// Caches `id`'s increment, evicting the least recently used entry when full.
    fn remember(&mut self, id: usize, w: Arc<Vec<T>>) {
        self.tick += 1;
        if self.cache.len() >= CACHE_CAPACITY
            && let Some(oldest) = self
                .cache
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            self.evict(oldest);
        }
        self.cache.insert(id, (w, self.tick));
    }

    /// Drops `id`'s cached increment, keeping its allocation for the halves of new splits
    /// when nothing else holds it.
    fn evict(&mut self, id: usize) {
        if let Some((w, _)) = self.cache.remove(&id)
            && self.fuses()
            && self.spare.len() < CACHE_CAPACITY
            && let Ok(mut v) = Arc::try_unwrap(w)
        {
            v.clear();
            self.spare.push(v);
        }
    }

    /// The tree nodes tiling `[ta, tb]` for `ta < tb` (clamped to the tree's interval, as
    /// torchsde does; empty when the clamped interval is empty).
    fn tile_ids(&mut self, ta: f64, tb: f64) -> Result<Vec<usize>> {
        let (start, end) = (self.nodes[0].start, self.nodes[0].end);
        let ta = ta.clamp(start, end);
        let tb = tb.clamp(start, end);
        if ta == tb {
            return Ok(Vec::new());
        }
        let (ta, tb) = (quantise(ta), quantise(tb));
        let mut tiles = Vec::new();
        self.locate(0, ta, tb, &mut tiles)?;
        Ok(tiles)
    }

    /// `(W(t1) - W(t0)) / scale` for times in either order (already quantised like float32
    /// queries): the increment over the ordered interval, negated when `t0 > t1`.
    ///
    /// Under a promise (see [`Tree::promise_below`]) the fused pass keeps only the halves no
    /// later query can reach above the promised time, and the cache drops the nodes above it.
    fn signed_query(&mut self, t0: f64, t1: f64, scale: Option<T>) -> Result<Vec<T>> {
        let negate = t0 > t1;
        let ids = if negate {
            self.tile_ids(t1, t0)?
        } else {
            self.tile_ids(t0, t1)?
        };
        // The query a promise was made for may reach above it; later ones break it if they do.
        let (start, end) = (self.nodes[0].start, self.nodes[0].end);
        let top = quantise(t0.max(t1).clamp(start, end));
        let horizon = match self.promised.take() {
            Some(h) => Some(h),
            None => self.horizon.filter(|&h| top <= h),
        };
        self.horizon = horizon;
        let out = if self.fuses() {
            self.fused_query(&ids, negate, scale, horizon)
        } else {
            let tiles = self.increments(&ids);
            combine(&tiles, self.numel, negate, scale)
        };
        if let Some(h) = horizon {
            self.forget_from(h);
        }
        Ok(out)
    }

    /// Records the promise that every query after the next one lies below `t` (a time already
    /// rounded like a float32 query).
    fn promise_below(&mut self, t: f64) {
        let h = quantise(t);
        self.promised = Some(self.promised.map_or(h, |p| p.min(h)));
    }

    /// Drops the cached increments of the nodes that start at or after `h`: no query below `h`
    /// needs them, as a tile or as the parent of one. Their memory is kept for new halves.
    fn forget_from(&mut self, h: f64) {
        let above: Vec<usize> = self
            .cache
            .keys()
            .copied()
            .filter(|&id| self.nodes[id].start >= h)
            .collect();
        for id in above {
            self.evict(id);
        }
    }

    /// [`Tree::increments`] and [`combine`] in one pass over pieces of the elements, for
    /// trees of a multiple of 16 elements.
    ///
    /// The separate passes write each bridge draw, read it back to convert it, read it again
    /// with the parent's increment to make the two halves and finally read every tile again
    /// to add them up: about 100 MiB of memory traffic per query on a Flux latent, which
    /// costs as much as the draws' arithmetic. Here the elements are cut into pieces of
    /// [`PIECE`]: this thread draws a piece's uniforms from every split's generator in turn
    /// (each engine is sequential), and a pool task converts them, runs the bridges parents
    /// first and sums the tiles while the piece is in the core's cache; a few pieces are in
    /// flight at a time, each with its scratch, and while none is free this thread runs a
    /// pending piece itself. A
    /// `randn` of a multiple of 16 elements is its uniforms in order converted in independent
    /// blocks of 16, so drawing it piece by piece gives the same values; every other
    /// operation is elementwise and the same as in the separate passes, so the result is bit
    /// for bit theirs (`fused_and_separate_passes_agree` checks it).
    ///
    /// Both halves of every split are kept for later queries, unless a promise `horizon`
    /// says no later query reaches above it: then only the halves that end at or below it
    /// are written out whole; the others (the nodes on the way down to the query's ends and
    /// the tiles above the horizon, about two thirds of them when a sampler walks down its
    /// schedule) live only in per-piece scratch that stays in the cache.
    fn fused_query(
        &mut self,
        ids: &[usize],
        negate: bool,
        scale: Option<T>,
        horizon: Option<f64>,
    ) -> Vec<T> {
        let mut have: HashMap<usize, Arc<Vec<T>>> = HashMap::new();
        let mut todo: Vec<usize> = Vec::new();
        for &id in ids {
            self.plan(id, &mut have, &mut todo);
        }
        let splits = self.splits_of(&todo);
        let known = |id: usize| {
            have.get(&id)
                .map_or_else(|| Arc::clone(&self.top), Arc::clone)
        };
        if splits.is_empty() {
            let tiles: Vec<_> = ids.iter().map(|&id| known(id)).collect();
            return combine(&tiles, self.numel, negate, scale);
        }
        // Where each split's increment and each tile come from: the cache (or the root), or a
        // half made earlier in this pass (a node in `todo` is a half of a split listed before
        // any split that needs it).
        let position: HashMap<usize, usize> =
            splits.iter().enumerate().map(|(k, &p)| (p, k)).collect();
        let source = |id: usize| -> Source<T> {
            if !have.contains_key(&id)
                && let Some(&k) = self.nodes[id].parent.and_then(|p| position.get(&p))
            {
                return if self.nodes[id].is_left {
                    Source::Left(k)
                } else {
                    Source::Right(k)
                };
            }
            Source::Known(known(id))
        };
        let mut generators = Vec::with_capacity(splits.len());
        let mut plans = Vec::with_capacity(splits.len());
        for &p in &splits {
            let (seed, coefficients) = match (self.nodes[p].split, self.bridge_coefficients(p)) {
                (Some(split), Some(c)) => (split.seed, c),
                // `splits` lists split nodes only.
                _ => (0, (T::ZERO, T::ZERO, T::ZERO)),
            };
            generators.push(TorchGenerator::new(u64::from(seed)));
            plans.push(SplitPlan {
                parent: source(p),
                coefficients,
            });
        }
        let tiles: Vec<Source<T>> = ids.iter().map(|&id| source(id)).collect();

        // Which halves are written out whole (and cached), and the scratch slot of the others.
        let keeps = |id: usize| horizon.is_none_or(|h| self.nodes[id].end <= h);
        let halves: Vec<(usize, usize)> = splits
            .iter()
            .map(|&p| self.nodes[p].split.map_or((0, 0), |s| (s.left, s.right)))
            .collect();
        let mut slots = 0;
        let mut slot = |kept: bool| {
            (!kept).then(|| {
                slots += 1;
                slots - 1
            })
        };
        let layout: Vec<HalfSlots> = halves
            .iter()
            .map(|&(l, r)| HalfSlots {
                left: slot(keeps(l)),
                right: slot(keeps(r)),
            })
            .collect();

        let n = self.numel;
        let mut buffer = |slot: Option<usize>| {
            slot.is_none().then(|| {
                let mut v = self.spare.pop().unwrap_or_default();
                v.reserve(n);
                v
            })
        };
        let mut lefts: Vec<Option<Vec<T>>> = layout.iter().map(|h| buffer(h.left)).collect();
        let mut rights: Vec<Option<Vec<T>>> = layout.iter().map(|h| buffer(h.right)).collect();
        let mut out: Vec<T> = Vec::with_capacity(n);
        // Scratch sizes go up in steps of 16 slots, so that queries of a few more or fewer
        // splits reuse the same allocations.
        let arena_len = slots.next_multiple_of(16) * PIECE;
        let mut arenas = std::mem::take(&mut self.arenas);
        arenas.retain(|a| a.len() >= arena_len);
        {
            let left_pieces = gather_kept_pieces(&mut lefts, n);
            let right_pieces = gather_kept_pieces(&mut rights, n);
            let out_pieces = out.spare_capacity_mut()[..n].chunks_mut(PIECE);
            let pieces = left_pieces
                .into_iter()
                .zip(right_pieces)
                .zip(out_pieces)
                .enumerate();
            let job = FusedJob {
                plans: &plans,
                tiles: &tiles,
                layout: &layout,
                negate,
                scale,
            };
            // Pieces in flight at once, each with its scratch: enough to keep every worker
            // busy while this thread draws the next piece's uniforms (without scratch, as
            // many as there are).
            let in_flight = if arena_len == 0 {
                usize::MAX
            } else {
                2 * rayon::current_num_threads().max(1) + 1
            };
            let mut made = arenas.len();
            let free = Mutex::new(arenas);
            let job = &job;
            let free_ref = &free;
            let failed = AtomicBool::new(false);
            let failed_ref = &failed;
            rayon::scope(|scope| {
                'pieces: for (k, ((ls, rs), o)) in pieces {
                    // A free scratch, a new one while fewer than `in_flight` exist, or else run
                    // a pending piece on this thread until one comes back (none will after a
                    // piece panicked: the scope then passes the panic on).
                    let mut arena = loop {
                        if let Some(a) = lock(free_ref).pop() {
                            break a;
                        }
                        if failed_ref.load(Ordering::Relaxed) {
                            break 'pieces;
                        }
                        if made < in_flight {
                            made += 1;
                            break Box::new_uninit_slice(arena_len);
                        }
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::thread::yield_now();
                        }
                    };
                    // This thread draws the uniforms (each generator is sequential), into the
                    // kept left halves or the piece's scratch.
                    let len = o.len();
                    let zs = ls
                        .into_iter()
                        .zip(generators.iter_mut())
                        .zip(&layout)
                        .map(|((l, g), h)| match (l, h.left) {
                            (Some(l), _) => Some(T::uniforms(g, l)),
                            (None, Some(slot)) => {
                                T::uniforms(g, &mut arena[slot * PIECE..][..len]);
                                None
                            }
                            (None, None) => None,
                        })
                        .collect();
                    let prepared = Prepared {
                        at: k * PIECE,
                        zs,
                        rights: rs,
                        out: o,
                        arena,
                    };
                    scope.spawn(move |_| {
                        let flag = FlagOnPanic(failed_ref);
                        let arena = job.run(prepared);
                        lock(free_ref).push(arena);
                        drop(flag);
                    });
                }
            });
            arenas = free.into_inner().unwrap_or_else(PoisonError::into_inner);
        }
        self.arenas = arenas;
        // SAFETY: every kept buffer has capacity `n`, and each of its pieces was written in
        // full by `FusedPiece::run` (the pieces cover `0..n`).
        #[allow(unsafe_code)]
        unsafe {
            for v in lefts.iter_mut().chain(rights.iter_mut()).flatten() {
                v.set_len(n);
            }
            out.set_len(n);
        }
        for ((&(l, r), left), right) in halves.iter().zip(lefts).zip(rights) {
            for (id, w) in [(l, left), (r, right)] {
                if let Some(w) = w {
                    self.remember(id, Arc::new(w));
                }
            }
        }
        out
    }

    /// The normalised draw `(W(s1) - W(s0)) / sqrt(|s1 - s0|)` in the tree's precision.
    fn draw(&mut self, t0: f64, t1: f64, sigma: f64, sigma_next: f64) -> Result<Vec<T>> {
        let (s0, s1) = (T::from_f64(sigma), T::from_f64(sigma_next));
        let scale = (s1 - s0).abs().sqrt();
        self.signed_query(t0, t1, Some(scale))
    }
}

/// A tree of either precision.
#[derive(Debug)]
enum AnyTree {
    F64(Tree<f64>),
    F32(Tree<f32>),
}

impl AnyTree {
    /// [`Tree::promise_below`] for a sigma (rounded to float32 like the query times).
    fn promise_below(&mut self, sigma: f64) {
        let t = f64::from(sigma as f32);
        match self {
            AnyTree::F64(tree) => tree.promise_below(t),
            AnyTree::F32(tree) => tree.promise_below(t),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            AnyTree::F64(_) => DType::F64,
            AnyTree::F32(_) => DType::F32,
        }
    }
}

/// ComfyUI's `BrownianTreeNoiseSampler` (`cpu=True`): for a step from `sigma` to `sigma_next`
/// it returns `(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)`, a standard normal
/// tensor that is consistent across repeated and refined queries.
#[derive(Debug)]
pub struct BrownianTreeNoise {
    seed: u64,
    sigma_min: f64,
    sigma_max: f64,
    tree: Option<(Vec<usize>, AnyTree)>,
    /// A promise for the tree not built yet (see [`NoiseSource::promise_below`]).
    promised: Option<f64>,
}

impl BrownianTreeNoise {
    /// A source over `[sigma_min, sigma_max]` (the sampler's smallest positive and largest
    /// sigma) with entropy `seed`. The tree is built for the shape and dtype of the first draw.
    /// As in torchsde, the interval may be a single point (`sigma_min == sigma_max`: a one-step
    /// schedule, whose step to 0 draws nothing); draws need two different sigmas.
    pub fn new(seed: u64, sigma_min: f64, sigma_max: f64) -> Result<Self> {
        if !(sigma_min.is_finite() && sigma_max.is_finite() && sigma_min <= sigma_max) {
            return Err(SamplerError::Noise(format!(
                "Brownian tree needs finite sigma_min <= sigma_max, got [{sigma_min}, {sigma_max}]"
            )));
        }
        Ok(Self {
            seed,
            sigma_min,
            sigma_max,
            tree: None,
            promised: None,
        })
    }

    /// The source ComfyUI builds for a run over `sigmas`: the interval from the smallest
    /// positive sigma to the largest (`sigmas[sigmas > 0].min()`, `sigmas.max()`); an error
    /// when no sigma is positive, as in the reference.
    pub fn for_schedule(seed: u64, sigmas: &[f64]) -> Result<Self> {
        let sigma_min = sigmas
            .iter()
            .copied()
            .filter(|&s| s > 0.0)
            .fold(f64::INFINITY, f64::min);
        let sigma_max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self::new(seed, sigma_min, sigma_max)
    }

    /// The unnormalised increment `W(t1) - W(t0)` (any order of `t0`, `t1`), with times
    /// quantised like torchsde's float32 queries.
    pub fn increment(
        &mut self,
        shape: &[usize],
        dtype: DType,
        t0: f64,
        t1: f64,
    ) -> Result<Vec<f64>> {
        // Query times are float32, as ComfyUI hands them to the CPU tree.
        let (a, b) = (f64::from(t0 as f32), f64::from(t1 as f32));
        Ok(match self.tree_for(shape, dtype)? {
            AnyTree::F64(t) => t.signed_query(a, b, None)?,
            AnyTree::F32(t) => t
                .signed_query(a, b, None)?
                .into_iter()
                .map(f64::from)
                .collect(),
        })
    }

    /// The normalised draw for a step from `sigma` to `sigma_next`, as host values.
    pub fn draw(
        &mut self,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Vec<f64>> {
        Ok(self.draw_host(shape, dtype, sigma, sigma_next)?.to_f64())
    }

    /// [`BrownianTreeNoise::draw`] in the tree's own precision.
    pub fn draw_host(
        &mut self,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<HostNoise> {
        if sigma == sigma_next || sigma.is_nan() || sigma_next.is_nan() {
            return Err(SamplerError::Noise(format!(
                "Brownian noise needs two different sigmas, got {sigma} -> {sigma_next}"
            )));
        }
        let (a, b) = (f64::from(sigma as f32), f64::from(sigma_next as f32));
        Ok(match self.tree_for(shape, dtype)? {
            AnyTree::F64(t) => Real::host(t.draw(a, b, sigma, sigma_next)?),
            AnyTree::F32(t) => Real::host(t.draw(a, b, sigma, sigma_next)?),
        })
    }

    fn tree_for(&mut self, shape: &[usize], dtype: DType) -> Result<&mut AnyTree> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(SamplerError::Noise(format!(
                "Brownian noise supports f64 and f32, not {dtype}"
            )));
        }
        if let Some((s, t)) = &self.tree
            && (s.as_slice() != shape || t.dtype() != dtype)
        {
            return Err(SamplerError::Noise(format!(
                "Brownian tree was built for {s:?} {}, asked for {shape:?} {dtype}",
                t.dtype()
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| SamplerError::Noise(format!("shape {shape:?} is too large")))?;
        let (seed, lo, hi) = (self.seed, self.sigma_min, self.sigma_max);
        let (_, tree) = self.tree.get_or_insert_with(|| {
            let tree = if dtype == DType::F32 {
                AnyTree::F32(Tree::new(seed, lo, hi, numel))
            } else {
                AnyTree::F64(Tree::new(seed, lo, hi, numel))
            };
            (shape.to_vec(), tree)
        });
        if let Some(t) = self.promised.take() {
            tree.promise_below(t);
        }
        Ok(tree)
    }
}

impl<B: Backend> NoiseSource<B> for BrownianTreeNoise {
    fn sample(
        &mut self,
        backend: &B,
        shape: &[usize],
        dtype: DType,
        sigma: f64,
        sigma_next: f64,
    ) -> Result<Tensor<B>> {
        let values = self.draw_host(shape, dtype, sigma, sigma_next)?;
        Ok(values.into_tensor(backend, shape, dtype)?)
    }

    /// Nothing to do: a query's values depend only on the queried interval (the tree is the
    /// same whatever was asked before; only its cache differs), so an unused draw changes no
    /// later one.
    fn skip(
        &mut self,
        _backend: &B,
        _shape: &[usize],
        _dtype: DType,
        _sigma: f64,
        _sigma_next: f64,
    ) -> Result<()> {
        Ok(())
    }

    /// Under the promise the tree keeps only the nodes that later draws can need: the next
    /// draw writes out whole only the halves below `sigma`, and the cache then drops the nodes
    /// above it. A later draw above it is still answered exactly (the tree is the same), by
    /// drawing again the nodes it needs.
    fn promise_below(&mut self, sigma: f64) {
        if sigma.is_nan() {
            return;
        }
        self.promised = Some(self.promised.map_or(sigma, |p| p.min(sigma)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flux_kernels::{Cpu, SamplerOps};

    const N: usize = 1 << 16;

    #[test]
    fn a_skipped_query_changes_no_later_draw() {
        let cpu = Cpu::new();
        let shape = [2, 16];
        let mut queried = BrownianTreeNoise::new(5, 0.01, 1.0).unwrap();
        let mut skipped = BrownianTreeNoise::new(5, 0.01, 1.0).unwrap();
        queried.draw(&shape, DType::F64, 0.9, 0.6).unwrap();
        NoiseSource::<Cpu>::skip(&mut skipped, &cpu, &shape, DType::F64, 0.9, 0.6).unwrap();
        for (a, b) in [(0.6, 0.3), (0.95, 0.7), (0.3, 0.02)] {
            assert_eq!(
                queried.draw(&shape, DType::F64, a, b).unwrap(),
                skipped.draw(&shape, DType::F64, a, b).unwrap()
            );
        }
    }

    fn mean_var(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        (
            m,
            v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0),
        )
    }

    /// With 2^16 independent N(0, 1) values the sample mean has standard deviation 1/256 and
    /// the sample variance sqrt(2/2^16) = 0.0055: five standard deviations are 0.02 and 0.028.
    #[test]
    fn draws_are_standard_normal() {
        let mut src = BrownianTreeNoise::new(11, 0.0292, 14.6146).unwrap();
        for (s0, s1) in [(14.6146, 4.08), (4.08, 1.61), (1.61, 0.0292), (0.9, 0.85)] {
            let v = src.draw(&[N], DType::F64, s0, s1).unwrap();
            let (m, var) = mean_var(&v);
            assert!(m.abs() < 0.02, "mean {m} for {s0}->{s1}");
            assert!((var - 1.0).abs() < 0.028, "variance {var} for {s0}->{s1}");
        }
    }

    /// Increments over disjoint intervals are independent: their sample correlation is
    /// N(0, 1/2^16) distributed, so 5/256 bounds it.
    #[test]
    fn disjoint_increments_are_uncorrelated() {
        let mut src = BrownianTreeNoise::new(5, 0.01, 1.0).unwrap();
        let a = src.draw(&[N], DType::F64, 1.0, 0.5).unwrap();
        let b = src.draw(&[N], DType::F64, 0.5, 0.2).unwrap();
        let corr = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / N as f64;
        assert!(corr.abs() < 5.0 / 256.0, "correlation {corr}");
    }

    #[test]
    fn repeated_and_reordered_queries_agree() {
        let shape = [2, 16, 3, 5];
        let mut a = BrownianTreeNoise::new(1765, 0.000316, 1.0).unwrap();
        let first = a.draw(&shape, DType::F64, 0.9, 0.4).unwrap();
        let other = a.draw(&shape, DType::F64, 0.4, 0.1).unwrap();
        assert_eq!(a.draw(&shape, DType::F64, 0.9, 0.4).unwrap(), first);
        // A fresh tree queried in another order gives the same path.
        let mut b = BrownianTreeNoise::new(1765, 0.000316, 1.0).unwrap();
        assert_eq!(b.draw(&shape, DType::F64, 0.4, 0.1).unwrap(), other);
        assert_eq!(b.draw(&shape, DType::F64, 0.9, 0.4).unwrap(), first);
        // Another seed gives another path.
        let mut c = BrownianTreeNoise::new(1766, 0.000316, 1.0).unwrap();
        assert_ne!(c.draw(&shape, DType::F64, 0.9, 0.4).unwrap(), first);
    }

    /// Brownian bridge additivity: W(a, c) = W(a, b) + W(b, c), and reversing an interval
    /// negates its increment.
    #[test]
    fn refined_increments_add_up() {
        let shape = [64];
        let mut src = BrownianTreeNoise::new(3, 0.02, 2.0).unwrap();
        let (a, b, c) = (1.7, 0.61, 0.05);
        let whole = src.increment(&shape, DType::F64, a, c).unwrap();
        let left = src.increment(&shape, DType::F64, a, b).unwrap();
        let right = src.increment(&shape, DType::F64, b, c).unwrap();
        for i in 0..shape[0] {
            assert!(
                (whole[i] - (left[i] + right[i])).abs() < 1e-12,
                "element {i}"
            );
        }
        let back = src.increment(&shape, DType::F64, c, a).unwrap();
        for i in 0..shape[0] {
            assert_eq!(back[i], -whole[i]);
        }
    }

    /// The unnormalised increment over [a, b] has variance b - a, also for sub-intervals
    /// produced by bridge sampling.
    #[test]
    fn increments_have_the_interval_as_variance() {
        let mut src = BrownianTreeNoise::new(9, 0.1, 3.0).unwrap();
        for (a, b) in [(0.1, 3.0), (1.0, 1.3), (2.2, 2.21)] {
            let w = src.increment(&[N], DType::F64, a, b).unwrap();
            let (_, var) = mean_var(&w);
            let dt = f64::from(b as f32) - f64::from(a as f32);
            assert!(
                (var / dt - 1.0).abs() < 0.028,
                "variance {var} over [{a}, {b}]"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn increments_add_up_at_any_points(
            seed in 0u64..1000,
            a in 0.05f64..2.0,
            b in 0.05f64..2.0,
            c in 0.05f64..2.0,
        ) {
            let shape = [4];
            let mut src = BrownianTreeNoise::new(seed, 0.05, 2.0).unwrap();
            let whole = src.increment(&shape, DType::F64, a, c).unwrap();
            let left = src.increment(&shape, DType::F64, a, b).unwrap();
            let right = src.increment(&shape, DType::F64, b, c).unwrap();
            for i in 0..shape[0] {
                proptest::prop_assert!((whole[i] - (left[i] + right[i])).abs() < 1e-12);
            }
        }
    }

    /// The queries of `times` on a fresh tree of `numel` elements, with the fused path on or
    /// off, as f64 bit patterns (f32 values widen exactly, signed zeros included).
    fn query_bits<T: Real>(
        fused: bool,
        seed: u64,
        numel: usize,
        times: &[(f64, f64)],
    ) -> Vec<Vec<u64>> {
        let mut tree = Tree::<T>::new(seed, 0.03, 1.0, numel);
        tree.fused = fused;
        times
            .iter()
            .map(|&(s0, s1)| {
                let (a, b) = (f64::from(s0 as f32), f64::from(s1 as f32));
                let v = tree.draw(a, b, s0, s1).unwrap();
                T::host(v).to_f64().iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// The fused pass gives bit for bit the values of the separate passes (which the
        /// reference data checks), over sizes of one to several pieces (the last one partial),
        /// for successive queries that reuse cached nodes and split new ones.
        #[test]
        fn fused_and_separate_passes_agree(
            seed in 0u64..10_000,
            blocks in 1usize..1300,
            times in proptest::collection::vec((0.01f64..1.2, 0.01f64..1.2), 1..5),
            single in proptest::bool::ANY,
        ) {
            let times: Vec<(f64, f64)> =
                times.into_iter().filter(|(a, b)| (a - b).abs() > 1e-4).collect();
            let numel = BLOCK * blocks;
            if single {
                proptest::prop_assert_eq!(
                    query_bits::<f32>(true, seed, numel, &times),
                    query_bits::<f32>(false, seed, numel, &times)
                );
            } else {
                proptest::prop_assert_eq!(
                    query_bits::<f64>(true, seed, numel, &times),
                    query_bits::<f64>(false, seed, numel, &times)
                );
            }
        }
    }

    /// A Flux latent's size (32 pieces) on the sigmas of a 20-step flux-dev schedule, as
    /// dpmpp_2m_sde queries them.
    #[test]
    fn fused_pass_agrees_on_a_flux_latent() {
        let sigmas = [
            1.0, 0.9837, 0.9658, 0.946, 0.9239, 0.8992, 0.8713, 0.8397, 0.8035, 0.7617, 0.7129,
        ];
        let times: Vec<(f64, f64)> = sigmas.windows(2).map(|w| (w[0], w[1])).collect();
        let numel = 16 * 128 * 128;
        assert_eq!(
            query_bits::<f32>(true, 42, numel, &times),
            query_bits::<f32>(false, 42, numel, &times)
        );
    }

    /// The draws of `steps` (each `(sigma, sigma_next, promise)`: the promise, if any, made
    /// just before the draw) on a fresh source, as f64 bit patterns, and the source after them.
    fn promised_bits(
        seed: u64,
        shape: &[usize],
        dtype: DType,
        steps: &[(f64, f64, Option<f64>)],
    ) -> (Vec<Vec<u64>>, BrownianTreeNoise) {
        let mut src = BrownianTreeNoise::new(seed, 0.03, 1.0).unwrap();
        let bits = steps
            .iter()
            .map(|&(s0, s1, promise)| {
                if let Some(p) = promise {
                    NoiseSource::<Cpu>::promise_below(&mut src, p);
                }
                let v = src.draw(shape, dtype, s0, s1).unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            })
            .collect();
        (bits, src)
    }

    /// Whether any node the tree caches starts at or above `h`, and how many it caches.
    fn cached_above(src: &BrownianTreeNoise, h: f64) -> (bool, usize) {
        match &src.tree {
            Some((_, AnyTree::F32(t))) => (
                t.cache.keys().any(|&id| t.nodes[id].start >= h),
                t.cache.len(),
            ),
            Some((_, AnyTree::F64(t))) => (
                t.cache.keys().any(|&id| t.nodes[id].start >= h),
                t.cache.len(),
            ),
            None => (false, 0),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Promises change no value, kept or broken: draws made under any promises equal the
        /// draws of a tree that got none, over sizes of one to several pieces.
        #[test]
        fn promises_change_no_draw(
            seed in 0u64..10_000,
            blocks in 1usize..1300,
            steps in proptest::collection::vec(
                (0.01f64..1.2, 0.01f64..1.2, proptest::option::of(0.0f64..1.2)),
                1..6,
            ),
            single in proptest::bool::ANY,
        ) {
            let steps: Vec<_> =
                steps.into_iter().filter(|(a, b, _)| (a - b).abs() > 1e-4).collect();
            let plain: Vec<_> = steps.iter().map(|&(a, b, _)| (a, b, None)).collect();
            let shape = [BLOCK * blocks];
            let dtype = if single { DType::F32 } else { DType::F64 };
            proptest::prop_assert_eq!(
                promised_bits(seed, &shape, dtype, &steps).0,
                promised_bits(seed, &shape, dtype, &plain).0
            );
        }
    }

    /// The draws of 20-step flux-dev schedules on a Flux latent (32 pieces, several waves),
    /// queried as dpmpp_2m_sde and as dpmpp_sde query them with their promises, equal the
    /// draws without promises; the promised trees cache nothing above the promise.
    #[test]
    fn promised_sampler_queries_agree_on_a_flux_latent() {
        let sigmas = [
            1.0, 0.9837, 0.9658, 0.946, 0.9239, 0.8992, 0.8713, 0.8397, 0.8035, 0.7617, 0.7129,
        ];
        let shape = [1, 16, 128, 128];
        // dpmpp_2m_sde: one draw per step, promised below its lower sigma.
        let multistep: Vec<_> = sigmas
            .windows(2)
            .map(|w| (w[0], w[1], Some(w[1])))
            .collect();
        // dpmpp_sde: a draw to the step's midpoint, then one over the whole step, promised.
        let two_stage: Vec<_> = sigmas
            .windows(2)
            .flat_map(|w| {
                let mid = 0.5 * (w[0] + w[1]);
                [(w[0], mid, None), (w[0], w[1], Some(w[1]))]
            })
            .collect();
        for steps in [multistep, two_stage] {
            let plain: Vec<_> = steps.iter().map(|&(a, b, _)| (a, b, None)).collect();
            let (promised, src) = promised_bits(42, &shape, DType::F32, &steps);
            let (expected, unpromised) = promised_bits(42, &shape, DType::F32, &plain);
            assert_eq!(promised, expected);
            let last = sigmas[sigmas.len() - 1];
            let h = quantise(f64::from(last as f32));
            let (above, kept) = cached_above(&src, h);
            let (_, kept_without) = cached_above(&unpromised, h);
            assert!(!above, "a node above the promise {h} is still cached");
            assert!(
                kept < kept_without,
                "the promise kept {kept} nodes, as many as without it ({kept_without})"
            );
        }
    }

    #[test]
    fn f32_draws_and_backend_upload() {
        let cpu = Cpu::new();
        let mut src = BrownianTreeNoise::new(2, 0.05, 1.0).unwrap();
        let t = NoiseSource::<Cpu>::sample(&mut src, &cpu, &[1, 16, 2, 2], DType::F32, 1.0, 0.5)
            .unwrap();
        assert_eq!(t.dtype(), DType::F32);
        let v = cpu.download_f64(&t).unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(BrownianTreeNoise::new(0, 1.0, 0.5).is_err());
        assert!(BrownianTreeNoise::new(0, f64::NAN, 1.0).is_err());
        // A single point (a one-step schedule) is a valid interval, as in torchsde; it cannot
        // be drawn from.
        let mut point = BrownianTreeNoise::new(0, 0.5, 0.5).unwrap();
        assert!(point.draw(&[4], DType::F64, 0.5, 0.5).is_err());
        let mut src = BrownianTreeNoise::new(0, 0.1, 1.0).unwrap();
        assert!(src.draw(&[4], DType::F64, 0.5, 0.5).is_err());
        src.draw(&[4], DType::F64, 1.0, 0.5).unwrap();
        assert!(src.draw(&[5], DType::F64, 0.5, 0.2).is_err());
        assert!(src.draw(&[4], DType::F32, 0.5, 0.2).is_err());
        assert!(src.draw(&[4], DType::F16, 0.5, 0.2).is_err());
    }
}
