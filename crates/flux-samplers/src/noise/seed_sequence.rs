//! numpy's `SeedSequence` entropy mixing (the seed derivation torchsde uses for its Brownian
//! tree), reduced to what that needs: integer entropy, an integer spawn key, `generate_state`.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// The little-endian 32-bit words of a non-negative integer (`[0]` for zero).
fn words(mut n: u128, out: &mut Vec<u32>) {
    if n == 0 {
        out.push(0);
    }
    while n > 0 {
        out.push((n & 0xffff_ffff) as u32);
        n >>= 32;
    }
}

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// The mixed entropy pool of `SeedSequence(entropy, spawn_key=spawn_key, pool_size)`.
#[derive(Clone, Debug)]
pub(crate) struct SeedSequence {
    pool: Vec<u32>,
}

impl SeedSequence {
    pub(crate) fn new(entropy: u64, spawn_key: &[u128], pool_size: usize) -> Self {
        let mut assembled = Vec::new();
        words(u128::from(entropy), &mut assembled);
        if !spawn_key.is_empty() && assembled.len() < pool_size {
            // Entropy is zero-padded to the pool size so that spawn keys cannot collide with it.
            assembled.resize(pool_size, 0);
        }
        for &k in spawn_key {
            words(k, &mut assembled);
        }

        let mut pool = vec![0u32; pool_size];
        let mut hash_const = INIT_A;
        for (i, p) in pool.iter_mut().enumerate() {
            *p = hashmix(assembled.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for src in 0..pool_size {
            for dst in 0..pool_size {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &extra in assembled.iter().skip(pool_size) {
            for dst in 0..pool_size {
                let h = hashmix(extra, &mut hash_const);
                pool[dst] = mix(pool[dst], h);
            }
        }
        Self { pool }
    }

    /// `generate_state(n)` as 32-bit words.
    pub(crate) fn generate_state(&self, n: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        (0..n)
            .map(|i| {
                let mut v = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SeedSequence;

    /// Values printed by numpy 2.x `np.random.SeedSequence(...).generate_state(n)`.
    #[test]
    fn matches_numpy() {
        assert_eq!(
            SeedSequence::new(0, &[], 4).generate_state(4),
            [2_968_811_710, 3_677_149_159, 745_650_761, 2_884_920_346]
        );
        assert_eq!(
            SeedSequence::new(1765, &[], 24).generate_state(3),
            [1_923_253_556, 3_611_208_892, 3_879_375_639]
        );
        assert_eq!(
            SeedSequence::new(1765, &[0, 0], 24).generate_state(2),
            [1_196_971_062, 263_379_270]
        );
        assert_eq!(
            SeedSequence::new((1 << 40) + 3, &[(1 << 33) + 1, 5], 24).generate_state(2),
            [1_720_815_251, 3_702_450_194]
        );
    }
}
