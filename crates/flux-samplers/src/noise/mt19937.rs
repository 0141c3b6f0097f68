//! The 32-bit Mersenne Twister (MT19937), the engine behind PyTorch's CPU generator.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The output transformation of one state word.
#[inline]
fn temper(mut y: u32) -> u32 {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c_5680;
    y ^= (y << 15) & 0xefc6_0000;
    y ^ (y >> 18)
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
        #[inline]
        fn step(s: &mut [u32; N], i: usize, next: usize, far: usize) {
            let y = (s[i] & UPPER_MASK) | (s[next] & LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
            s[i] = s[far] ^ (y >> 1) ^ mag;
        }
        let s = &mut *self.state;
        // The index arithmetic `(i + 1) % N` and `(i + M) % N` split into three ranges, so
        // the loops carry no division.
        for i in 0..N - M {
            step(s, i, i + 1, i + M);
        }
        for i in N - M..N - 1 {
            step(s, i, i + 1, i + M - N);
        }
        step(s, N - 1, 0, M - 1);
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

    /// Fills `out` with the next `out.len()` outputs: the same values as that many calls of
    /// [`Mt19937::next_u32`], tempered a whole state at a time (a loop that vectorises).
    pub fn fill_u32(&mut self, out: &mut [u32]) {
        let mut out = out;
        while !out.is_empty() {
            if self.index >= N {
                self.twist();
            }
            let n = out.len().min(N - self.index);
            let (now, later) = out.split_at_mut(n);
            for (o, &y) in now.iter_mut().zip(&self.state[self.index..self.index + n]) {
                *o = temper(y);
            }
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

    proptest! {
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
        fn different_seeds_differ(seed in any::<u32>()) {
            let mut a = Mt19937::new(seed);
            let mut b = Mt19937::new(seed.wrapping_add(1));
            let va: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
            let vb: Vec<u32> = (0..8).map(|_| b.next_u32()).collect();
            prop_assert_ne!(va, vb);
        }
    }
}
