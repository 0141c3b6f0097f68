//! The 32-bit Mersenne Twister (MT19937), the engine behind PyTorch's CPU generator.

use std::mem::MaybeUninit;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The output transformation of one state word.
#[allow(clippy::inline_always)] // must be inlined into the vector-compiled loop
#[inline(always)]
fn temper(mut y: u32) -> u32 {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c_5680;
    y ^= (y << 15) & 0xefc6_0000;
    y ^ (y >> 18)
}

/// One word of the recurrence: the new value of `s[i]` from `s[i]`, `s[i + 1]` and `s[i + M]`
/// (indices modulo `N`, with the words before `i` already regenerated).
#[inline]
fn recur(cur: u32, next: u32, far: u32) -> u32 {
    let y = (cur & UPPER_MASK) | (next & LOWER_MASK);
    // `MATRIX_A` where the low bit of `y` is set, without a branch.
    let mag = (y & 1).wrapping_neg() & MATRIX_A;
    far ^ (y >> 1) ^ mag
}

/// Regenerates the whole state (the same words as the reference's one-by-one loop, which
/// `tests::reference_twist` keeps).
///
/// Word `i` reads words `i`, `i + 1` and `i + M` (modulo `N`), the last one already regenerated
/// once `i + M` wraps, at least `N - M = 227` words back. A run of up to 227 consecutive words
/// is therefore independent and the vector versions regenerate 16 or 8 at a time.
fn twist(s: &mut [u32; N]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            #[allow(unsafe_code)]
            unsafe {
                x86::twist_avx512(s);
            }
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            #[allow(unsafe_code)]
            unsafe {
                x86::twist_avx2(s);
            }
            return;
        }
    }
    twist_words(s, 0, N);
}

/// Regenerates words `from .. to` one at a time (the scalar remainder of the vector loops).
fn twist_words(s: &mut [u32; N], from: usize, to: usize) {
    for i in from..to {
        s[i] = recur(s[i], s[(i + 1) % N], s[(i + M) % N]);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{LOWER_MASK, M, MATRIX_A, N, UPPER_MASK, twist_words};
    #[allow(
        clippy::wildcard_imports,
        reason = "the kernel is written in intrinsics; their names say what they are"
    )]
    use std::arch::x86_64::*;

    /// Vector steps of `lanes` words over `from ..`, as far as every load stays inside the
    /// state and, before the far index wraps, reads only old words; returns where they stopped.
    fn vector_end(from: usize, to: usize, lanes: usize) -> usize {
        // Loads reach word `i + lanes` (the next words), so stop one short of `to` at the end.
        let limit = if to == N { N - 1 } else { to };
        from + (limit - from) / lanes * lanes
    }

    /// The twist in 512-bit registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn twist_avx512(s: &mut [u32; N]) {
        let upper = _mm512_set1_epi32(UPPER_MASK as i32);
        let lower = _mm512_set1_epi32(LOWER_MASK as i32);
        let matrix = _mm512_set1_epi32(MATRIX_A as i32);
        let one = _mm512_set1_epi32(1);
        let p = s.as_mut_ptr();
        for (from, to, far_offset) in [(0, N - M, M), (N - M, N, 0)] {
            let end = vector_end(from, to, 16);
            let mut i = from;
            while i < end {
                let far = if far_offset == M { i + M } else { i + M - N };
                // SAFETY: `i + 16 < N` words from `i + 1` and `far + 16 <= N` (vector_end), all
                // inside the state; unaligned loads and stores.
                unsafe {
                    let cur = _mm512_loadu_si512(p.add(i).cast());
                    let next = _mm512_loadu_si512(p.add(i + 1).cast());
                    let far = _mm512_loadu_si512(p.add(far).cast());
                    let y = _mm512_or_si512(
                        _mm512_and_si512(cur, upper),
                        _mm512_and_si512(next, lower),
                    );
                    let mag = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(y, one), matrix);
                    let out =
                        _mm512_xor_si512(_mm512_xor_si512(far, _mm512_srli_epi32::<1>(y)), mag);
                    _mm512_storeu_si512(p.add(i).cast(), out);
                }
                i += 16;
            }
            twist_words(s, end, to);
        }
    }

    /// The twist in 256-bit registers.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn twist_avx2(s: &mut [u32; N]) {
        let upper = _mm256_set1_epi32(UPPER_MASK as i32);
        let lower = _mm256_set1_epi32(LOWER_MASK as i32);
        let matrix = _mm256_set1_epi32(MATRIX_A as i32);
        let one = _mm256_set1_epi32(1);
        let p = s.as_mut_ptr();
        for (from, to, far_offset) in [(0, N - M, M), (N - M, N, 0)] {
            let end = vector_end(from, to, 8);
            let mut i = from;
            while i < end {
                let far = if far_offset == M { i + M } else { i + M - N };
                // SAFETY: as in `twist_avx512`, with 8 words per step.
                unsafe {
                    let cur = _mm256_loadu_si256(p.add(i).cast());
                    let next = _mm256_loadu_si256(p.add(i + 1).cast());
                    let far = _mm256_loadu_si256(p.add(far).cast());
                    let y = _mm256_or_si256(
                        _mm256_and_si256(cur, upper),
                        _mm256_and_si256(next, lower),
                    );
                    let odd = _mm256_cmpeq_epi32(_mm256_and_si256(y, one), one);
                    let mag = _mm256_and_si256(odd, matrix);
                    let out =
                        _mm256_xor_si256(_mm256_xor_si256(far, _mm256_srli_epi32::<1>(y)), mag);
                    _mm256_storeu_si256(p.add(i).cast(), out);
                }
                i += 8;
            }
            twist_words(s, end, to);
        }
    }
}

/// Writes `map(temper(w))` for each word `w` of `words` into `out` (same lengths), compiled for
/// the widest vector unit the CPU has.
fn temper_map_into<T, F: Fn(u32) -> T>(out: &mut [MaybeUninit<T>], words: &[u32], map: F) {
    #[allow(clippy::inline_always)] // compiled once per instruction set by the dispatch below
    #[inline(always)]
    fn body<T, F: Fn(u32) -> T>(out: &mut [MaybeUninit<T>], words: &[u32], map: F) {
        for (o, &y) in out.iter_mut().zip(words) {
            o.write(map(temper(y)));
        }
    }
    flux_kernels::simd_dispatch!(body, body_avx512, body_avx2, <T, F: Fn(u32) -> T>,
        (out: &mut [MaybeUninit<T>], words: &[u32], map: F) -> ());
}

/// MT19937 with the standard 32-bit seeding (Matsumoto and Nishimura, 2002).
#[derive(Clone)]
pub struct Mt19937 {
    state: Box<[u32; N]>,
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// An engine seeded with `seed` (`init_genrand`).
    pub fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        // The whole state is regenerated before the first output.
        Self { state, index: N }
    }

    fn twist(&mut self) {
        twist(&mut self.state);
        self.index = 0;
    }

    /// The next 32-bit output (`genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let y = self.state[self.index];
        self.index += 1;
        temper(y)
    }

    /// Moves past the next `count` outputs without tempering them: the state regenerates as
    /// often as drawing them would regenerate it, and nothing else is computed.
    pub fn discard(&mut self, count: usize) {
        let mut count = count;
        while count > 0 {
            if self.index >= N {
                self.twist();
            }
            let k = count.min(N - self.index);
            self.index += k;
            count -= k;
        }
    }

    /// Fills `out` with the next `out.len()` outputs: the same values as that many calls of
    /// [`Mt19937::next_u32`], tempered a whole state at a time (a loop that vectorises).
    pub fn fill_u32(&mut self, out: &mut [u32]) {
        // SAFETY: `MaybeUninit<u32>` has the layout of `u32`, and `fill_mapped` only writes
        // initialised words into it.
        #[allow(unsafe_code)]
        let out = unsafe { &mut *(std::ptr::from_mut::<[u32]>(out) as *mut [MaybeUninit<u32>]) };
        self.fill_mapped(out, |w| w);
    }

    /// Writes `map` of each of the next `out.len()` outputs into `out`, in one pass over each
    /// regenerated state (tempering and `map` in the same vectorised loop), so a caller that
    /// turns the words into something else needs no buffer of raw words.
    pub(crate) fn fill_mapped<T, F: Fn(u32) -> T + Copy>(
        &mut self,
        out: &mut [MaybeUninit<T>],
        map: F,
    ) {
        let mut out = out;
        while !out.is_empty() {
            if self.index >= N {
                self.twist();
            }
            let n = out.len().min(N - self.index);
            let (now, later) = out.split_at_mut(n);
            temper_map_into(now, &self.state[self.index..self.index + n], map);
            self.index += n;
            out = later;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mt19937;
    use proptest::prelude::*;

    /// The C++ standard ([rand.predef]) fixes the 10000th output of a default-constructed
    /// `std::mt19937` (seed 5489) at 4123659995.
    #[test]
    fn ten_thousandth_output_matches_the_cpp_standard() {
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    /// First outputs for seed 5489, from the reference implementation `mt19937ar.c`
    /// (`init_genrand(5489)`), as also produced by numpy's `RandomState(5489)`.
    #[test]
    fn first_outputs_for_the_default_seed() {
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    /// The reference's loop: one word at a time, indices taken modulo N.
    fn reference_twist(s: &mut [u32; super::N]) {
        use super::{LOWER_MASK, M, MATRIX_A, N, UPPER_MASK};
        for i in 0..N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
            s[i] = s[(i + M) % N] ^ (y >> 1) ^ mag;
        }
    }

    proptest! {
        #[test]
        fn discarding_moves_to_the_same_place_as_drawing(
            seed in any::<u32>(),
            before in 0usize..700,
            count in 0usize..3000,
        ) {
            let mut drawn = Mt19937::new(seed);
            let mut discarded = Mt19937::new(seed);
            for _ in 0..before {
                drawn.next_u32();
                discarded.next_u32();
            }
            for _ in 0..count {
                drawn.next_u32();
            }
            discarded.discard(count);
            let next = |e: &mut Mt19937| (0..700).map(|_| e.next_u32()).collect::<Vec<_>>();
            prop_assert_eq!(next(&mut drawn), next(&mut discarded));
        }

        #[test]
        fn vector_twist_matches_the_reference_loop(words in proptest::collection::vec(any::<u32>(), super::N)) {
            let mut a = [0u32; super::N];
            a.copy_from_slice(&words);
            let mut b = a;
            let mut c = a;
            super::twist(&mut a);
            super::twist_words(&mut c, 0, super::N);
            reference_twist(&mut b);
            prop_assert_eq!(&a[..], &b[..]);
            prop_assert_eq!(&c[..], &b[..]);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut d = c;
                d.copy_from_slice(&words);
                // SAFETY: the CPU supports AVX2, checked just above.
                #[allow(unsafe_code)]
                unsafe {
                    super::x86::twist_avx2(&mut d);
                }
                prop_assert_eq!(&d[..], &b[..]);
            }
        }

        #[test]
        fn same_seed_same_stream(seed in any::<u32>(), skip in 0usize..2000) {
            let mut a = Mt19937::new(seed);
            let mut b = Mt19937::new(seed);
            for _ in 0..skip {
                prop_assert_eq!(a.next_u32(), b.next_u32());
            }
            let c = a.clone();
            let mut c = c;
            prop_assert_eq!(a.next_u32(), c.next_u32());
        }

        #[test]
        fn bulk_fill_continues_the_stream(seed in any::<u32>(), skip in 0usize..700, n in 0usize..2000) {
            let mut a = Mt19937::new(seed);
            let mut b = Mt19937::new(seed);
            for _ in 0..skip {
                a.next_u32();
                b.next_u32();
            }
            let mut bulk = vec![0u32; n];
            a.fill_u32(&mut bulk);
            let one_by_one: Vec<u32> = (0..n).map(|_| b.next_u32()).collect();
            prop_assert_eq!(bulk, one_by_one);
            prop_assert_eq!(a.next_u32(), b.next_u32());
        }

        #[test]
        fn mapped_fill_maps_each_output_of_the_stream(seed in any::<u32>(), skip in 0usize..700, n in 0usize..2000) {
            let mut a = Mt19937::new(seed);
            for _ in 0..skip {
                a.next_u32();
            }
            let mut b = a.clone();
            // A map that moves bits around, so a word mapped out of place or not at all shows.
            let map = |w: u32| u64::from(w.rotate_left(7)) << 3 | 5;
            let mut mapped = vec![std::mem::MaybeUninit::<u64>::uninit(); n];
            a.fill_mapped(&mut mapped, map);
            // SAFETY: `fill_mapped` wrote all `n` elements.
            #[allow(unsafe_code)]
            let mapped: Vec<u64> = mapped.iter().map(|v| unsafe { v.assume_init() }).collect();
            let one_by_one: Vec<u64> = (0..n).map(|_| map(b.next_u32())).collect();
            prop_assert_eq!(mapped, one_by_one);
            prop_assert_eq!(a.next_u32(), b.next_u32());
        }

        #[test]
        fn different_seeds_differ(seed in any::<u32>()) {
            let mut a = Mt19937::new(seed);
            let mut b = Mt19937::new(seed.wrapping_add(1));
            let va: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
            let vb: Vec<u32> = (0..8).map(|_| b.next_u32()).collect();
            prop_assert_ne!(va, vb);
        }
    }
}
