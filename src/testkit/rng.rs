//! A small seeded generator (splitmix64) for drills, the demo and tests:
//! deterministic, so any run replays from its seed.

/// splitmix64 generator.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Fills `buf` with the stream of a generator seeded with `seed`.
    pub fn fill(buf: &mut [u8], seed: u64) {
        let mut g = SplitMix64(seed);
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&g.next_u64().to_le_bytes()[..chunk.len()]);
        }
    }
}
