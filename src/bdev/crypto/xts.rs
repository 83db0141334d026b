//! AES-256-XTS (IEEE 1619-2007) of whole data units, shaped for AES-NI and VAES: runs of
//! up to 4 KiB (across unit boundaries) are XORed with their tweaks, run through the AES
//! in one call, and XORed again; the `aes` crate picks its backend at run time (VAES-512
//! with AVX-512: 64 blocks in flight; VAES-256: 30; AES-NI: 8), and a run's last blocks
//! short of that width are padded into one more full-width pass rather than encrypted one
//! at a time (the `xts-mode` crate does a single block at a time, several times slower).
//! The units' first tweaks are computed in batches the same way. Where the CPU has AVX2 or
//! AVX-512 ([`whiten`]) the tweaks are generated in vector registers in the same pass that
//! XORs them into the data; elsewhere in scalar chains ([`tweak_run`]), then XORed.
//! Data units are logical blocks, multiples of 16 bytes, so no ciphertext stealing.
//! The tests check it against `xts-mode`; tests/crypto.rs against OpenSSL's XTS.

use aes::cipher::array::ArraySize;
use aes::cipher::consts::U16;
use aes::cipher::{
    Array, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser,
};
use aes::{Aes256, Block};

mod whiten;
use whiten::Kernel;

/// Units whose first tweaks are encrypted in one call (the widest backend's width).
const TWEAK_BATCH: usize = 64;

/// AES blocks whose tweaks are computed ahead and encrypted in one call (4 KiB).
const RUN: usize = 256;

/// The two AES-256 keys of an XTS key: data (`k1`) and tweak (`k2`), and the vector
/// kernel for the whitening (`None`: the scalar tweaks and XOR loops).
pub(crate) struct Cipher {
    k1: Aes256,
    k2: Aes256,
    kernel: Option<Kernel>,
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

/// What a [`Run`] XORs into its data before the AES.
enum Pre<'a> {
    /// Nothing (done already, or no whitening).
    Done,
    /// `data ^= tweaks`.
    InPlace,
    /// `data = src ^ tweaks`.
    From(&'a [u8]),
}

/// One run through an AES backend: `data = AES(pre(data)) ^ post` (`post` empty: no
/// post-whitening). `data` is whole blocks. As a closure of the `aes` crate it runs inside
/// the backend's `#[target_feature]` function, so the XORs are compiled for the same vector
/// width.
struct Run<'a> {
    pre: Pre<'a>,
    data: &'a mut [u8],
    tweaks: &'a [u8],
    post: bool,
}

impl BlockSizeUser for Run<'_> {
    type BlockSize = U16;
}

impl Run<'_> {
    /// Applies the backend: `par` to each full-width group of `P` blocks, `one` to a
    /// single block.
    #[inline(always)]
    fn apply<P: ArraySize>(self, par: impl Fn(&mut Array<Block, P>), one: impl Fn(&mut Block)) {
        let Run {
            pre,
            data,
            tweaks,
            post,
        } = self;
        match pre {
            Pre::Done => {}
            Pre::InPlace => xor_into(data, tweaks),
            Pre::From(src) => xor_from(data, src, tweaks),
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
        if post {
            xor_into(data, tweaks);
        }
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
        Cipher {
            k1,
            k2,
            kernel: Kernel::detect(),
        }
    }

    /// A cipher whitening with `kernel` (`None`: the scalar fallback) whatever the CPU's
    /// widest.
    #[cfg(test)]
    fn with_kernel(k1: Aes256, k2: Aes256, kernel: Option<Kernel>) -> Self {
        Cipher { k1, k2, kernel }
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
        let data_ptr = data.as_ptr();
        for (i, run) in data[..whole].chunks_mut(16 * RUN).enumerate() {
            if let Some(s) = src {
                let next = ((i + 1) * 16 * RUN).min(whole);
                prefetch(s.as_ptr().wrapping_add(next), whole - next, false);
                prefetch(data_ptr.wrapping_add(next), whole - next, true);
            }
            let src = src.map(|s| &s[i * 16 * RUN..][..run.len()]);
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
                            pre: Pre::Done,
                            data: &mut firsts[..16 * n],
                            tweaks: &[],
                            post: false,
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
                t = match self.kernel {
                    Some(v) => v.whiten(
                        t,
                        src.map(|s| &s[k..k + m]),
                        &mut run[k..k + m],
                        &mut ts[k..k + m],
                    ),
                    None => tweak_run(&mut ts[k..k + m], t),
                };
                k += m;
                left -= m;
            }
            let r = Run {
                pre: match (self.kernel, src) {
                    (Some(_), _) => Pre::Done,
                    (None, Some(src)) => Pre::From(src),
                    (None, None) => Pre::InPlace,
                },
                data: &mut *run,
                tweaks: &*ts,
                post: self.kernel.is_none(),
            };
            if encrypt {
                self.k1.encrypt_with_backend(r);
            } else {
                self.k1.decrypt_with_backend(r);
            }
            if let Some(v) = self.kernel {
                v.unwhiten(run, ts);
            }
        }
    }
}

/// Asks for the first run of the `len` bytes at `next` to be brought into the cache while
/// the current run is ciphered (`write`: to be stored into). Out of place, one side is the base's memory
/// (malloc: DRAM, touched once per request): the ciphertext source of a read, the
/// destination of a write, whose misses would otherwise stall the first pass over each run.
fn prefetch(next: *const u8, len: usize, write: bool) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len.min(16 * RUN)).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let p = next.wrapping_add(off).cast();
        // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever
        // the address (here inside the caller's buffer: `off < len`).
        unsafe {
            if write {
                _mm_prefetch::<_MM_HINT_ET0>(p)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (next, len, write);
}

#[cfg(test)]
mod tests {
    use aes::cipher::KeyInit;

    use super::*;

    type Reference = xts_mode::Xts128<aes08::Aes256>;

    /// Ours with every whitening this CPU runs (the scalar fallback first), and the
    /// `xts-mode` crate, under one key.
    fn ciphers() -> (Vec<Cipher>, Reference) {
        let key: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let aes = |k: &[u8]| Aes256::new_from_slice(k).unwrap();
        let ours = std::iter::once(None)
            .chain(Kernel::available().map(Some))
            .map(|v| Cipher::with_kernel(aes(&key[..32]), aes(&key[32..]), v))
            .collect();
        let theirs = xts_mode::Xts128::new(
            <aes08::Aes256 as aes08::cipher::KeyInit>::new_from_slice(&key[..32]).unwrap(),
            <aes08::Aes256 as aes08::cipher::KeyInit>::new_from_slice(&key[32..]).unwrap(),
        );
        (ours, theirs)
    }

    #[test]
    fn matches_the_xts_mode_crate() {
        let (ours, theirs) = ciphers();
        for c in &ours {
            let k = c.kernel;
            // Units shorter than a register of tweaks, odd multiples of 16, 512, 4096,
            // units longer than a 4 KiB run.
            for (len, unit) in [
                (16usize, 1u64),
                (48, 3),
                (80, 1 << 63),
                (512, 0),
                (512, 9),
                (560, 5),
                (528, 6),
                (1200, 2),
                (4096, 1 << 40),
                (4112, 8),
                (4144, 7),
                (65536, u64::MAX),
            ] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut a = plain.clone();
                c.encrypt_unit(&mut a, unit);
                let mut b = plain.clone();
                theirs.encrypt_sector(&mut b, xts_mode::get_tweak_default(unit as u128));
                assert_eq!(a, b, "{k:?}: len {len} unit {unit}");
                c.decrypt_unit(&mut a, unit);
                assert_eq!(a, plain, "{k:?}: len {len} unit {unit}");
            }
            // Many units in one call (units across 4 KiB runs, across batches of first
            // tweaks, across the wrap of the unit number) are the units one by one.
            for (len, first) in [
                (512usize, 5u64),
                (4096, u64::MAX - 40),
                (80, 11),
                (16, 3),
                (560, 1 << 33),
                (4112, 0),
            ] {
                let plain: Vec<u8> = (0..100 * len).map(|i| (i * 13 + 1) as u8).collect();
                let mut all = plain.clone();
                c.crypt_units(&mut all, len, first, true);
                for (i, u) in plain.chunks(len).enumerate() {
                    let mut b = u.to_vec();
                    theirs.encrypt_sector(
                        &mut b,
                        xts_mode::get_tweak_default(first.wrapping_add(i as u64) as u128),
                    );
                    assert_eq!(all[i * len..][..len], b[..], "{k:?}: unit {i} of {len}");
                }
                let mut from = vec![0u8; plain.len()];
                c.crypt_units_from(&plain, &mut from, len, first, true);
                assert_eq!(from, all, "{k:?}: out of place, {len}");
                let mut back = vec![0u8; plain.len()];
                c.crypt_units_from(&from, &mut back, len, first, false);
                assert_eq!(back, plain, "{k:?}: out of place decryption, {len}");
                c.crypt_units(&mut all, len, first, false);
                assert_eq!(all, plain, "{k:?}: decrypt, {len}");
            }
        }
    }

    /// The whitenings agree with one another on what the reference does not reach: a
    /// partial unit at the end is left alone, in place and out of place, and decryption
    /// inverts encryption for every unit length up to 70 blocks.
    #[test]
    fn every_whitening_is_the_scalar_one() {
        let (ours, _) = ciphers();
        let plain: Vec<u8> = (0..70 * 16 * 3 + 32).map(|i| (i * 29 + 7) as u8).collect();
        for blocks in 1..=70 {
            let len = 16 * blocks;
            let first = u64::MAX - 1 - blocks as u64;
            let mut want = plain.clone();
            ours[0].crypt_units(&mut want, len, first, true);
            let whole = plain.len() - plain.len() % len;
            assert_eq!(
                want[whole..],
                plain[whole..],
                "partial unit of {len} touched"
            );
            for c in &ours {
                let k = c.kernel;
                let mut a = plain.clone();
                c.crypt_units(&mut a, len, first, true);
                assert_eq!(a, want, "{k:?}: units of {len}");
                let mut from = vec![0xa5u8; plain.len()];
                c.crypt_units_from(&plain, &mut from, len, first, true);
                assert_eq!(from[..whole], want[..whole], "{k:?}: from, units of {len}");
                assert!(from[whole..].iter().all(|&b| b == 0xa5), "{k:?}: {len}");
                c.crypt_units(&mut a, len, first, false);
                assert_eq!(a, plain, "{k:?}: decrypt, units of {len}");
            }
        }
    }

    /// The vector kernels' tweaks and XORs against [`tweak_run`] for stretches of 0 to 70
    /// blocks (every remainder of the 16- and 8-block iterations), with tweaks whose top
    /// bits are set (the fold by 0x87), in place and out of place.
    #[test]
    fn vector_tweaks_are_the_scalar_chain() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for v in Kernel::available() {
            for n in 0..=70usize {
                for round in 0..8 {
                    let mut t = (u128::from(rnd()) << 64) | u128::from(rnd());
                    if round % 2 == 0 {
                        t |= u128::MAX << 112;
                    }
                    let src: Vec<u8> = (0..16 * n).map(|_| rnd() as u8).collect();
                    let mut want_tweaks = vec![0u8; 16 * n];
                    let want_next = tweak_run(&mut want_tweaks, t);
                    let mut want = src.clone();
                    xor_into(&mut want, &want_tweaks);

                    let mut tweaks = vec![0u8; 16 * n + 16];
                    let mut dst = vec![0x5au8; 16 * n + 16];
                    let next = v.whiten(t, Some(&src), &mut dst[..16 * n], &mut tweaks[..16 * n]);
                    assert_eq!(next, want_next, "{v:?}: {n} blocks");
                    assert_eq!(tweaks[..16 * n], want_tweaks[..], "{v:?}: {n} blocks");
                    assert_eq!(dst[..16 * n], want[..], "{v:?}: {n} blocks");
                    assert!(tweaks[16 * n..].iter().all(|&b| b == 0), "{v:?}: {n}");
                    assert!(dst[16 * n..].iter().all(|&b| b == 0x5a), "{v:?}: {n}");

                    let mut data = src.clone();
                    let next = v.whiten(t, None, &mut data, &mut tweaks[..16 * n]);
                    assert_eq!((next, &data), (want_next, &want), "{v:?}: in place, {n}");
                    v.unwhiten(&mut data, &tweaks[..16 * n]);
                    assert_eq!(data, src, "{v:?}: unwhiten, {n} blocks");
                }
            }
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
        // `XTS_COST_ONLY=512e` (unit, then e or d) runs one case alone: callgrind's
        // instructions per byte of that case.
        let only = std::env::var("XTS_COST_ONLY").ok();
        let mut buf = vec![0x5au8; 128 << 10];
        for unit in [512usize, 4096] {
            for encrypt in [true, false] {
                let case = format!("{unit}{}", if encrypt { 'e' } else { 'd' });
                if only.as_ref().is_some_and(|o| *o != case) {
                    continue;
                }
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
        if only.is_some() {
            return;
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
