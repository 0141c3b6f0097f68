//! A small deterministic byte mutator in the manner of libFuzzer's: each call applies one to
//! four edits (bit flips, special bytes, inserted, deleted, repeated or spliced ranges, numbers
//! written over the bytes), drawn from a seeded SplitMix64 stream, so a run is reproducible from
//! its seed alone.

/// Values that often sit at the edge of a parser's cases.
const SPECIAL_BYTES: [u8; 12] = [
    0x00, 0x01, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'[', b'-', b'9', b'.',
];

/// Texts and encodings of numbers that often break a parser: limits, overflows, odd forms.
const SPECIAL_TOKENS: [&[u8]; 16] = [
    b"0",
    b"-1",
    b"1e309",
    b"-0.0",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9007199254740993",
    b"NaN",
    b"null",
    b"\"\"",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\xf0\x9f\x98\x80",
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    &[0, 0, 0, 0, 0, 0, 0, 0],
];

/// A seeded source of mutations.
#[derive(Clone, Debug)]
pub struct Mutator {
    state: u64,
}

impl Mutator {
    /// A mutator whose whole sequence of edits follows from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random range `start..end` of a buffer of `len` bytes, at most `max` long.
    fn range(&mut self, len: usize, max: usize) -> (usize, usize) {
        let start = self.below(len);
        let end = start + 1 + self.below(max.min(len - start));
        (start, end)
    }

    /// `input` with one to four random edits; `others` are inputs to splice pieces from.
    pub fn mutate(&mut self, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(4) {
            self.edit(&mut out, others);
        }
        out
    }

    fn edit(&mut self, out: &mut Vec<u8>, others: &[Vec<u8>]) {
        let len = out.len();
        match self.below(9) {
            0 if len > 0 => {
                let i = self.below(len);
                out[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.below(len);
                out[i] = *self.pick(&SPECIAL_BYTES);
            }
            2 if len > 0 => {
                let (start, end) = self.range(len, 64);
                out.drain(start..end);
            }
            3 if len > 0 => {
                // Repeat a range somewhere else (grows length fields' targets, nests brackets).
                let (start, end) = self.range(len, 64);
                let piece = out[start..end].to_vec();
                let at = self.below(len + 1);
                out.splice(at..at, piece);
            }
            4 if len > 0 => out.truncate(self.below(len)),
            5 if !others.is_empty() => {
                let other = self.pick(others);
                if !other.is_empty() {
                    let (start, end) = self.range(other.len(), 256);
                    let piece = other[start..end].to_vec();
                    let at = self.below(len + 1);
                    let replace = at + self.below((len - at).min(piece.len()) + 1);
                    out.splice(at..replace, piece);
                }
            }
            6 => {
                let token = self.pick(&SPECIAL_TOKENS).to_vec();
                let at = self.below(len + 1);
                let replace = at + self.below((len - at).min(token.len()) + 1);
                out.splice(at..replace, token);
            }
            7 if len >= 8 => {
                // A little-endian length or offset field set to an edge value.
                let at = self.below(len - 7);
                let v: u64 = match self.below(4) {
                    0 => u64::MAX,
                    1 => u64::from(u32::MAX),
                    2 => 1 << self.below(64),
                    _ => self.next_u64(),
                };
                out[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let at = self.below(len + 1);
                let n = 1 + self.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| self.next_u64() as u8).collect();
                out.splice(at..at, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let others = vec![b"other input".to_vec()];
        let mut a = Mutator::new(7);
        let mut b = Mutator::new(7);
        let mut c = Mutator::new(8);
        let (mut same, mut differ) = (0, 0);
        for _ in 0..200 {
            let x = a.mutate(b"{\"prompt\": \"a cat\"}", &others);
            assert_eq!(x, b.mutate(b"{\"prompt\": \"a cat\"}", &others));
            if x == c.mutate(b"{\"prompt\": \"a cat\"}", &others) {
                same += 1;
            } else {
                differ += 1;
            }
        }
        assert!(differ > same, "seeds 7 and 8 agree on {same} of 200");
    }

    #[test]
    fn mutations_change_the_input_and_handle_empty_ones() {
        let mut m = Mutator::new(1);
        let seed = b"0123456789abcdef".to_vec();
        let changed = (0..500)
            .filter(|_| m.mutate(&seed, std::slice::from_ref(&seed)) != seed)
            .count();
        assert!(
            changed > 450,
            "only {changed} of 500 mutations changed the input"
        );
        // An empty input grows or stays empty; it never panics.
        let grown = (0..200).filter(|_| !m.mutate(&[], &[]).is_empty()).count();
        assert!(grown > 0);
    }
}
