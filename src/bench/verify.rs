//! The `--verify` data pattern: every 8-byte word is a hash of its byte offset on the device
//! and a seed, so a block written to or read from the wrong place, stale data or a foreign
//! pattern is detected, and the first bad offset can be reported.

/// The pattern word at device byte offset `pos`.
fn word(pos: u64, seed: u64) -> u64 {
    let x = (pos ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// Fills `buf`, which will be written at device byte `offset`.
pub fn fill(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(offset + 8 * i as u64, seed).to_le_bytes());
    }
}

/// Checks `buf`, read from device byte `offset`; returns the device offset of the first bad
/// word with the expected and found values.
pub fn check(buf: &[u8], offset: u64, seed: u64) -> Result<(), (u64, u64, u64)> {
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let pos = offset + 8 * i as u64;
        let want = word(pos, seed);
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let got = u64::from_le_bytes(b);
        if got != want {
            return Err((pos, want, got));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_corruption_misplacement_and_wrong_seed() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 8192, 7);
        assert_eq!(check(&buf, 8192, 7), Ok(()));
        assert!(check(&buf, 4096, 7).is_err());
        assert!(check(&buf, 8192, 8).is_err());
        buf[1000] ^= 1;
        assert_eq!(check(&buf, 8192, 7).unwrap_err().0, 8192 + 1000 / 8 * 8);
    }
}
