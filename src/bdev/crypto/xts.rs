//! AES-256-XTS (IEEE 1619-2007) of whole data units, shaped for AES-NI and VAES: runs of
//! up to 4 KiB (across unit boundaries) are XORed with their tweaks, run through the AES
//! in one call, and XORed again; the `aes` crate picks its backend at run time (VAES-512
//! with AVX-512: 64 blocks in flight; VAES-256: 30; AES-NI: 8), and a run's last blocks
//! short of that width are padded into one more full-width pass rather than encrypted one
//! at a time (the `xts-mode` crate does a single block at a time, several times slower).
//! The units' first tweaks are computed in batches the same way.
//! Data units are logical blocks, multiples of 16 bytes, so no ciphertext stealing.
//! The tests check it against `xts-mode`; tests/crypto.rs against OpenSSL's XTS.

use aes::cipher::array::ArraySize;
use aes::cipher::consts::U16;
use aes::cipher::{
    Array, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser,
};
use aes::{Aes256, Block};

/// Units whose first tweaks are encrypted in one call (the widest backend's width).
const TWEAK_BATCH: usize = 64;

/// AES blocks whose tweaks are computed ahead and encrypted in one call (4 KiB).
const RUN: usize = 256;

/// The two AES-256 keys of an XTS key: data (`k1`) and tweak (`k2`).
pub(crate) struct Cipher {
    k1: Aes256,
    k2: Aes256,
}

/// `x * α` in GF(2^128), XTS's little-endian convention (IEEE 1619 §5.2).
#[inline]
fn mul_alpha(x: u128) -> u128 {
    (x << 1) ^ ((x >> 127) * 0x87)
}

/// `x * α⁴`: the 4 bits shifted out (x¹²⁸ to x¹³¹) come back times x¹²⁸ ≡ x⁷+x²+x+1
/// (0x87), carry-less (IEEE 1619 §5.2).
#[inline]
fn mul_alpha4(x: u128) -> u128 {
    const REDUCE: [u128; 16] = {
        let mut r = [0u128; 16];
        let mut c = 0;
        while c < 16 {
            let mut i = 0;
            while i < 4 {
                if c >> i & 1 == 1 {
                    r[c] ^= 0x87 << i;
                }
                i += 1;
            }
            c += 1;
        }
        r
    };
    (x << 4) ^ REDUCE[(x >> 124) as usize]
}

/// Fills `out` (whole 16-byte blocks) with `t`, `t·α`, `t·α²`, ... as little-endian
/// bytes, as four interleaved chains stepping by α⁴ (one chain of `mul_alpha` is a serial
/// dependency), and returns the tweak after the last.
#[inline]
fn tweak_run(out: &mut [u8], t: u128) -> u128 {
    let mut c = [t, mul_alpha(t), mul_alpha(mul_alpha(t)), 0];
    c[3] = mul_alpha(c[2]);
    for group in out.chunks_mut(64) {
        for (x, t) in group.chunks_exact_mut(16).zip(c) {
            x.copy_from_slice(&t.to_le_bytes());
        }
        c = c.map(mul_alpha4);
    }
    match out.last_chunk::<16>() {
        Some(last) => mul_alpha(u128::from_le_bytes(*last)),
        None => t,
    }
}

/// `data ^= tweaks`, byte by byte over equal lengths: a loop the compiler vectorizes.
#[inline(always)]
fn xor_into(data: &mut [u8], tweaks: &[u8]) {
    for (d, t) in data.iter_mut().zip(tweaks) {
        *d ^= *t;
    }
}

/// `data = src ^ tweaks`, over equal lengths.
#[inline(always)]
fn xor_from(data: &mut [u8], src: &[u8], tweaks: &[u8]) {
    for ((d, s), t) in data.iter_mut().zip(src).zip(tweaks) {
        *d = *s ^ *t;
    }
}

/// One run through an AES backend: `data = AES(src ^ tweaks) ^ tweaks` (`src`: `data`
/// itself when `None`; no tweaks when `tweaks` is empty). `data` is whole blocks. As a
/// closure of the `aes` crate it runs inside the backend's `#[target_feature]` function,
/// so the XORs are compiled for the same vector width.
struct Run<'a> {
    src: Option<&'a [u8]>,
    data: &'a mut [u8],
    tweaks: &'a [u8],
}

impl BlockSizeUser for Run<'_> {
    type BlockSize = U16;
}

impl Run<'_> {
    /// Applies the backend: `par` to each full-width group of `P` blocks, `one` to a
    /// single block.
    #[inline(always)]
    fn apply<P: ArraySize>(self, par: impl Fn(&mut Array<Block, P>), one: impl Fn(&mut Block)) {
        let Run { src, data, tweaks } = self;
        match src {
            Some(src) => xor_from(data, src, tweaks),
            None => xor_into(data, tweaks),
        }
        let (blocks, _) = Block::slice_as_chunks_mut(data);
        let (groups, tail) = Array::<Block, P>::slice_as_chunks_mut(blocks);
        for g in groups {
            par(g);
        }
        // A lone block costs about as much as 8 in the pipeline (AES latency against
        // throughput): pad a longer tail to one more full-width group.
        if tail.len() * 8 >= P::USIZE {
            let mut pad = Array::<Block, P>::default();
            pad[..tail.len()].copy_from_slice(tail);
            par(&mut pad);
            tail.copy_from_slice(&pad[..tail.len()]);
        } else {
            tail.iter_mut().for_each(one);
        }
        xor_into(data, tweaks);
    }
}

impl BlockCipherEncClosure for Run<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, b: &B) {
        self.apply::<B::ParBlocksSize>(
            |g| b.encrypt_par_blocks(g.into()),
            |x| b.encrypt_block(x.into()),
        )
    }
}

impl BlockCipherDecClosure for Run<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, b: &B) {
        self.apply::<B::ParBlocksSize>(
            |g| b.decrypt_par_blocks(g.into()),
            |x| b.decrypt_block(x.into()),
        )
    }
}

impl Cipher {
    pub(crate) fn new(k1: Aes256, k2: Aes256) -> Self {
        Cipher { k1, k2 }
    }

    /// Encrypts data unit `unit` (tweak: its number, little-endian) in place.
    #[cfg(test)]
    pub(crate) fn encrypt_unit(&self, data: &mut [u8], unit: u64) {
        self.crypt_units(data, data.len(), unit, true)
    }

    /// Decrypts data unit `unit` in place.
    #[cfg(test)]
    pub(crate) fn decrypt_unit(&self, data: &mut [u8], unit: u64) {
        self.crypt_units(data, data.len(), unit, false)
    }

    /// Encrypts or decrypts, in place, the consecutive data units of `unit_len` bytes (a
    /// nonzero multiple of 16) in `data`, the first being unit `first` (its tweak; the
    /// units after it count up, wrapping as dm-crypt's `plain64`). A partial unit at the
    /// end is left alone.
    pub(crate) fn crypt_units(&self, data: &mut [u8], unit_len: usize, first: u64, encrypt: bool) {
        self.crypt(None, data, unit_len, first, encrypt)
    }

    /// Encrypts or decrypts the units of `src` into `dst` (as long as `src`; see
    /// [`Self::crypt_units`]), out of place: the first XOR reads `src`, so neither a write
    /// (the guest's plaintext into the bounce buffer or the base's memory) nor a zero-copy
    /// read (the base's ciphertext into the guest's buffers) needs a copy first.
    pub(crate) fn crypt_units_from(
        &self,
        src: &[u8],
        dst: &mut [u8],
        unit_len: usize,
        first: u64,
        encrypt: bool,
    ) {
        if src.len() != dst.len() {
            debug_assert!(false, "{} bytes into {}", src.len(), dst.len());
            return;
        }
        self.crypt(Some(src), dst, unit_len, first, encrypt)
    }

    fn crypt(
        &self,
        src: Option<&[u8]>,
        data: &mut [u8],
        unit_len: usize,
        first: u64,
        encrypt: bool,
    ) {
        if unit_len == 0 || !unit_len.is_multiple_of(16) {
            debug_assert!(false, "data unit of {unit_len} bytes");
            return;
        }
        let whole = data.len() - data.len() % unit_len;
        // The encrypted first tweaks of the next units, `firsts[next..n]`.
        let mut firsts = [0u8; 16 * TWEAK_BATCH];
        let (mut next, mut n) = (0, 0);
        let mut units_left = whole / unit_len;
        let mut unit = first;
        // The tweak of the next block and the bytes left in its unit.
        let (mut t, mut left) = (0u128, 0);
        let mut tweaks = [0u8; 16 * RUN];
        for (i, run) in data[..whole].chunks_mut(16 * RUN).enumerate() {
            let ts = &mut tweaks[..run.len()];
            let mut k = 0;
            while k < ts.len() {
                if left == 0 {
                    if next == n {
                        n = units_left.min(TWEAK_BATCH);
                        for (j, f) in firsts[..16 * n].chunks_exact_mut(16).enumerate() {
                            f.copy_from_slice(&(unit.wrapping_add(j as u64) as u128).to_le_bytes());
                        }
                        self.k2.encrypt_with_backend(Run {
                            src: None,
                            data: &mut firsts[..16 * n],
                            tweaks: &[],
                        });
                        unit = unit.wrapping_add(n as u64);
                        units_left -= n;
                        next = 0;
                    }
                    let f = &firsts[16 * next..][..16];
                    t = u128::from_le_bytes(f.try_into().unwrap_or_default());
                    next += 1;
                    left = unit_len;
                }
                let m = left.min(ts.len() - k);
                t = tweak_run(&mut ts[k..k + m], t);
                k += m;
                left -= m;
            }
            if let Some(s) = src {
                prefetch(s.get((i + 1) * 16 * RUN..).unwrap_or_default());
            }
            let r = Run {
                src: src.map(|s| &s[i * 16 * RUN..][..run.len()]),
                data: run,
                tweaks: ts,
            };
            if encrypt {
                self.k1.encrypt_with_backend(r);
            } else {
                self.k1.decrypt_with_backend(r);
            }
        }
    }
}

/// Asks for the first run of `next` to be brought into the cache while the current run is
/// ciphered: an out-of-place source is the base's memory (malloc: DRAM, read once), whose
/// misses would otherwise stall the first pass over each run.
fn prefetch(next: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in next.chunks(64).take(16 * RUN / 64) {
        // SAFETY: a prefetch hint neither faults nor changes memory; `line` is a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = next;
}

#[cfg(test)]
mod tests {
    use aes::cipher::KeyInit;

    use super::*;

    #[test]
    fn matches_the_xts_mode_crate() {
        let key: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let ours = Cipher::new(
            Aes256::new_from_slice(&key[..32]).unwrap(),
            Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        let theirs = xts_mode::Xts128::new(
            <aes08::Aes256 as aes08::cipher::KeyInit>::new_from_slice(&key[..32]).unwrap(),
            <aes08::Aes256 as aes08::cipher::KeyInit>::new_from_slice(&key[32..]).unwrap(),
        );
        for (len, unit) in [
            (512usize, 0u64),
            (512, 9),
            (48, 3),
            (1200, 2),
            (4144, 7),
            (4096, 1 << 40),
            (65536, u64::MAX),
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut a = plain.clone();
            ours.encrypt_unit(&mut a, unit);
            let mut b = plain.clone();
            theirs.encrypt_sector(&mut b, xts_mode::get_tweak_default(unit as u128));
            assert_eq!(a, b, "len {len} unit {unit}");
            ours.decrypt_unit(&mut a, unit);
            assert_eq!(a, plain);
        }
        // Many units in one call (across tweak batches and the wrap of the unit number)
        // are the units one by one.
        for (len, first) in [(512usize, 5u64), (4096, u64::MAX - 40), (80, 11)] {
            let plain: Vec<u8> = (0..100 * len).map(|i| (i * 13 + 1) as u8).collect();
            let mut all = plain.clone();
            ours.crypt_units(&mut all, len, first, true);
            for (i, u) in plain.chunks(len).enumerate() {
                let mut b = u.to_vec();
                theirs.encrypt_sector(
                    &mut b,
                    xts_mode::get_tweak_default(first.wrapping_add(i as u64) as u128),
                );
                assert_eq!(all[i * len..][..len], b[..], "unit {i} of {len}");
            }
            let mut from = vec![0u8; plain.len()];
            ours.crypt_units_from(&plain, &mut from, len, first, true);
            assert_eq!(from, all, "out of place, {len}");
            let mut back = vec![0u8; plain.len()];
            ours.crypt_units_from(&from, &mut back, len, first, false);
            assert_eq!(back, plain, "out of place decryption, {len}");
            ours.crypt_units(&mut all, len, first, false);
            assert_eq!(all, plain);
        }
    }
}

/// `cargo test --release --lib crypto::xts::cost -- --ignored --nocapture`: the time per
/// byte of [`Cipher`] on 128K requests (compare `openssl speed -evp aes-256-xts -bytes
/// UNIT`); under `valgrind --tool=callgrind`, its instructions (bench/README.md).
#[cfg(test)]
mod cost {
    use aes::cipher::KeyInit;

    use super::*;

    #[test]
    #[ignore]
    fn cost() {
        let key: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(91).wrapping_add(5))
            .collect();
        let c = Cipher::new(
            Aes256::new_from_slice(&key[..32]).unwrap(),
            Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        let reqs: usize = std::env::var("XTS_COST_REQS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let mut buf = vec![0x5au8; 128 << 10];
        for unit in [512usize, 4096] {
            for encrypt in [true, false] {
                let t = std::time::Instant::now();
                for r in 0..reqs {
                    c.crypt_units(&mut buf, unit, (r * 256) as u64, encrypt);
                }
                let bytes = (reqs * buf.len()) as f64;
                let s = t.elapsed().as_secs_f64();
                println!(
                    "unit {unit:4} {}: {:.0} MiB/s ({:.3} ns/byte)",
                    if encrypt { "encrypt" } else { "decrypt" },
                    bytes / s / (1 << 20) as f64,
                    s * 1e9 / bytes
                );
            }
        }
        // The AES alone (ECB over the same bytes): the ceiling of any XTS built on it.
        let k = Aes256::new_from_slice(&key[..32]).unwrap();
        let mut blocks = vec![Block::default(); buf.len() / 16];
        let t = std::time::Instant::now();
        for _ in 0..reqs {
            k.encrypt_blocks(&mut blocks);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "aes crate ECB encrypt: {:.0} MiB/s",
            (reqs * buf.len()) as f64 / s / (1 << 20) as f64
        );
        std::hint::black_box(&blocks);
        std::hint::black_box(&buf);
    }
}
