//! Random offsets in which every block comes once per pass: fio's default for random
//! patterns (its "random map"; fio(1) `norandommap` turns it off).
//!
//! Why it matters: with offsets drawn independently, a QD32 writer soon writes a block
//! whose previous write is still in flight. librbd's write-around cache (the default once
//! an image has seen a flush) holds such a write back until the earlier one completes at
//! the OSD, which under load is hundreds of milliseconds away, so the queue fills with
//! blocked writes. fio's rbd engine, with its random map, never overlaps, and
//! `fio --norandommap` on the same image loses write IOPS and its tail latency grows
//! (bench/README.md, "What is measured"). Comparing targets with fio needs fio's offsets.
//!
//! The order is a keyed bijection of `[0, 2^k)` (`2^k` the smallest power of two ≥ the
//! block count) walked with a counter, skipping values past the end ("cycle walking"): no
//! memory per block, a few multiplications per offset, a new key per pass.

/// Block numbers in `[0, blocks)`, each once per pass, in a seeded random order.
pub struct RandomMap {
    blocks: u64,
    /// `2^k - 1`: the bijection works on `k` bits.
    mask: u64,
    /// Half of `k` (at least 1): the xorshift that mixes the high bits into the low ones.
    shift: u32,
    counter: u64,
    key: u64,
}

/// splitmix64's finaliser: derives independent keys from a seed.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RandomMap {
    /// A map over `blocks` blocks (at least 1) whose first pass is keyed by `seed`.
    pub fn new(blocks: u64, seed: u64) -> Self {
        let blocks = blocks.max(1);
        let bits = (u64::BITS - (blocks - 1).leading_zeros()).max(1);
        RandomMap {
            blocks,
            mask: u64::MAX >> (u64::BITS - bits),
            shift: (bits / 2).max(1),
            counter: 0,
            key: mix64(seed),
        }
    }

    /// The next block; a pass ends after every block has come once, and the next one
    /// takes a new order.
    #[inline]
    pub fn next_block(&mut self) -> u64 {
        loop {
            if self.counter > self.mask {
                self.counter = 0;
                self.key = mix64(self.key);
            }
            let b = self.permute(self.counter);
            self.counter += 1;
            if b < self.blocks {
                return b;
            }
        }
    }

    /// A bijection of `[0, 2^k)`: each step (xor with a constant, xor with a right shift
    /// of itself, multiplication by an odd number, all modulo `2^k`) is one.
    #[inline]
    fn permute(&self, x: u64) -> u64 {
        let (m, s) = (self.mask, self.shift);
        let mut x = (x ^ self.key) & m;
        x ^= x >> s;
        x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93) & m; // odd
        x ^= x >> s;
        x = (x ^ (self.key >> 17)) & m;
        x = x.wrapping_mul(0xA076_1D64_78BD_642F) & m; // odd
        x ^ (x >> s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pass: every block exactly once.
    fn pass(map: &mut RandomMap, blocks: u64) -> Vec<u64> {
        let order: Vec<u64> = (0..blocks).map(|_| map.next_block()).collect();
        let mut seen = vec![false; blocks as usize];
        for &b in &order {
            assert!(b < blocks, "block {b} past the end ({blocks} blocks)");
            assert!(!seen[b as usize], "block {b} twice in one pass of {blocks}");
            seen[b as usize] = true;
        }
        order
    }

    #[test]
    fn every_block_once_per_pass() {
        for blocks in [1, 2, 3, 5, 64, 1000, 4096, 65_537] {
            let mut map = RandomMap::new(blocks, 7);
            let first = pass(&mut map, blocks);
            let second = pass(&mut map, blocks);
            if blocks >= 64 {
                assert_ne!(
                    first, second,
                    "a new pass takes a new order ({blocks} blocks)"
                );
            }
        }
    }

    #[test]
    fn the_order_is_scattered_and_seeded() {
        let blocks = 65_536;
        let order = pass(&mut RandomMap::new(blocks, 1), blocks);
        // Neighbours in time are rarely neighbours on the device, and the order is
        // neither the identity nor a rotation of it.
        let adjacent = order
            .windows(2)
            .filter(|w| w[0].abs_diff(w[1]) <= 1)
            .count();
        assert!(adjacent < 64, "{adjacent} adjacent steps of {blocks}");
        let rising = order.windows(2).filter(|w| w[1] > w[0]).count() as f64;
        assert!(
            (rising / blocks as f64 - 0.5).abs() < 0.02,
            "rising steps: {rising}"
        );
        // Each quarter of the pass touches every quarter of the device about equally.
        for part in order.chunks(blocks as usize / 4) {
            let mut hits = [0usize; 4];
            for &b in part {
                hits[(b * 4 / blocks) as usize] += 1;
            }
            for h in hits {
                assert!((3800..4400).contains(&h), "uneven spread {hits:?}");
            }
        }
        let other = pass(&mut RandomMap::new(blocks, 2), blocks);
        assert_ne!(order, other, "the seed changes the order");
        assert_eq!(order, pass(&mut RandomMap::new(blocks, 1), blocks));
    }
}
