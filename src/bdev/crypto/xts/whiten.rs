//! XTS whitening with vector registers (x86-64): the tweaks of a stretch of blocks are
//! generated several to a register and XORed into the data in the same pass (IEEE 1619
//! §5.3.1 steps 1 and 3: `PP = P ⊕ T`, `C = CC ⊕ T`), the AES in between being the `aes`
//! crate's. Multiplying by αᵏ in GF(2^128) shifts each 128-bit lane left by k bits and
//! folds the k bits shifted out back in times x¹²⁸ ≡ x⁷+x²+x+1 (0x87), as the Linux
//! kernel's aes-xts-avx-x86_64.S does: with VPCLMULQDQ the fold is one carry-less multiply.
//! Both kernels give exactly [`super::tweak_run`]'s tweaks (the tests compare them).

/// The vector kernel a [`super::Cipher`] whitens with: made only by [`Kernel::detect`] and
/// [`Kernel::available`], so holding one means the CPU has its features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kernel(Width);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// Four tweaks per 512-bit register, four registers stepping by α¹⁶ (AVX-512F/BW and
    /// VPCLMULQDQ).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Two tweaks per 256-bit register, four registers stepping by α⁸, the fold by shifts
    /// (AVX2; also what valgrind, which lacks AVX-512, runs).
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The widest kernel this CPU runs, if any.
    pub(crate) fn detect() -> Option<Kernel> {
        Self::available().next()
    }

    /// Every kernel this CPU runs, widest first.
    pub(crate) fn available() -> impl Iterator<Item = Kernel> {
        #[cfg(target_arch = "x86_64")]
        let all = [
            (is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("vpclmulqdq"))
            .then_some(Kernel(Width::Avx512)),
            is_x86_feature_detected!("avx2").then_some(Kernel(Width::Avx2)),
        ];
        #[cfg(not(target_arch = "x86_64"))]
        let all: [Option<Kernel>; 0] = [];
        all.into_iter().flatten()
    }

    /// Pre-whitening of `dst.len()` bytes (whole blocks) inside one data unit: block `i`
    /// gets the tweak `t·αⁱ`, stored into `tweaks` for the post-whitening, and `dst = src ^
    /// tweak` (`src`: `dst` itself when `None`). Returns the tweak after the last block.
    #[inline]
    pub(crate) fn whiten(
        self,
        t: u128,
        src: Option<&[u8]>,
        dst: &mut [u8],
        tweaks: &mut [u8],
    ) -> u128 {
        let n = dst.len() / 16;
        if tweaks.len() < 16 * n || src.is_some_and(|s| s.len() < 16 * n) {
            debug_assert!(false, "whitening {n} blocks short of room");
            return t;
        }
        let d = dst.as_mut_ptr();
        let s = src.map_or(d.cast_const(), <[u8]>::as_ptr);
        match self.0 {
            // SAFETY: the CPU has the features (a `Kernel` is made only where they were
            // detected); `s` and `d` have `16 * n` bytes (checked above; `s` may be `d`,
            // each block being read before it is written) and `tweaks` as many.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { avx512::whiten(t, s, d, tweaks.as_mut_ptr(), n) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { avx2::whiten(t, s, d, tweaks.as_mut_ptr(), n) },
        }
    }

    /// Post-whitening: `data ^= tweaks`, over whole blocks of `data`.
    #[inline]
    pub(crate) fn unwhiten(self, data: &mut [u8], tweaks: &[u8]) {
        let n = data.len() / 16;
        if tweaks.len() < 16 * n {
            debug_assert!(false, "unwhitening {n} blocks with {} bytes", tweaks.len());
            return;
        }
        match self.0 {
            // SAFETY: as in `whiten`: features detected, `16 * n` bytes at both.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { avx512::xor_into(data.as_mut_ptr(), tweaks.as_ptr(), n) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { avx2::xor_into(data.as_mut_ptr(), tweaks.as_ptr(), n) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `x · αᵏ` in each 128-bit lane, `k` (below 57) given per 64-bit half, the same for
    /// both halves of a lane: the bits carried out of the low half go into the high one,
    /// those out of the high half are multiplied by 0x87 into the low one (one
    /// VPCLMULQDQ), the rest is a shift of each half.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    #[inline]
    fn mul_alpha_k(x: __m512i, k: __m512i) -> __m512i {
        let out = _mm512_srlv_epi64(x, _mm512_sub_epi64(_mm512_set1_epi64(64), k));
        let fold = _mm512_clmulepi64_epi128::<0x01>(out, _mm512_set1_epi64(0x87));
        // a ^ b ^ c
        _mm512_ternarylogic_epi64::<0x96>(
            _mm512_sllv_epi64(x, k),
            _mm512_bslli_epi128::<8>(out),
            fold,
        )
    }

    /// See [`super::Kernel::whiten`]: 16 blocks per iteration in four independent chains
    /// (one chain would wait on the multiply's latency), all started from `t` directly.
    ///
    /// # Safety
    /// The CPU has the features; `src`, `dst` (which may be equal) and `tweaks` have
    /// `16 * n` bytes.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    pub(super) unsafe fn whiten(
        t: u128,
        src: *const u8,
        dst: *mut u8,
        tweaks: *mut u8,
        n: usize,
    ) -> u128 {
        let tt = _mm512_broadcast_i32x4(_mm_set_epi64x((t >> 64) as i64, t as i64));
        // Lane j (64-bit halves 2j and 2j + 1) of chain c: t·α^(j + 4c).
        let chain = |c: i64| {
            let k = _mm512_add_epi64(
                _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0),
                _mm512_set1_epi64(4 * c),
            );
            mul_alpha_k(tt, k)
        };
        let mut t = [chain(0), chain(1), chain(2), chain(3)];
        let sixteen = _mm512_set1_epi64(16);
        let mut i = 0;
        while i + 16 <= n {
            for (j, tj) in t.iter_mut().enumerate() {
                // SAFETY: blocks `i..i + 16` are inside the `n` of the caller's promise.
                unsafe { put(*tj, src, dst, tweaks, 16 * (i + 4 * j)) };
                *tj = mul_alpha_k(*tj, sixteen);
            }
            i += 16;
        }
        // Fewer than 16 blocks left: the chains hold their tweaks in order.
        let mut q = 0;
        while i + 4 <= n {
            // SAFETY: blocks `i..i + 4` are inside `n`.
            unsafe { put(t[q], src, dst, tweaks, 16 * i) };
            q += 1;
            i += 4;
        }
        let rest = n - i;
        if rest > 0 {
            let m: __mmask8 = (1 << (2 * rest)) - 1;
            let o = 16 * i;
            // SAFETY: the mask covers blocks `i..n` only; masked-off lanes are not accessed.
            unsafe {
                _mm512_mask_storeu_epi64(tweaks.add(o).cast(), m, t[q]);
                let p = _mm512_maskz_loadu_epi64(m, src.add(o).cast());
                _mm512_mask_storeu_epi64(dst.add(o).cast(), m, _mm512_xor_si512(p, t[q]));
            }
        }
        let mut next = [0u128; 4];
        // SAFETY: `next` is 64 bytes.
        unsafe { _mm512_storeu_si512(next.as_mut_ptr().cast(), t[q]) };
        next[rest]
    }

    /// Four blocks at byte `o`: their tweaks `t` stored for the post-whitening, and
    /// `dst = src ^ t`.
    ///
    /// # Safety
    /// The CPU has the features; `src`, `dst` and `tweaks` have 64 bytes at `o`.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    #[inline]
    unsafe fn put(t: __m512i, src: *const u8, dst: *mut u8, tweaks: *mut u8, o: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            _mm512_storeu_si512(tweaks.add(o).cast(), t);
            let p = _mm512_loadu_si512(src.add(o).cast());
            _mm512_storeu_si512(dst.add(o).cast(), _mm512_xor_si512(p, t));
        }
    }

    /// `data ^= tweaks` over the four blocks at block `j`.
    ///
    /// # Safety
    /// The CPU has the features; both have blocks `j..j + 4`.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    #[inline]
    unsafe fn xor4(data: *mut u8, tweaks: *const u8, j: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            let x = _mm512_loadu_si512(data.add(16 * j).cast());
            let t = _mm512_loadu_si512(tweaks.add(16 * j).cast());
            _mm512_storeu_si512(data.add(16 * j).cast(), _mm512_xor_si512(x, t));
        }
    }

    /// `data ^= tweaks` over `n` blocks.
    ///
    /// # Safety
    /// The CPU has the features; `data` and `tweaks` have `16 * n` bytes.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    pub(super) unsafe fn xor_into(data: *mut u8, tweaks: *const u8, n: usize) {
        let mut i = 0;
        // Four registers per iteration: the loop's own instructions were a third.
        while i + 16 <= n {
            for j in (i..i + 16).step_by(4) {
                // SAFETY: blocks `i..i + 16` are inside `n`.
                unsafe { xor4(data, tweaks, j) };
            }
            i += 16;
        }
        while i + 4 <= n {
            // SAFETY: blocks `i..i + 4` are inside `n`.
            unsafe { xor4(data, tweaks, i) };
            i += 4;
        }
        if i < n {
            let m: __mmask8 = (1 << (2 * (n - i))) - 1;
            // SAFETY: the mask covers blocks `i..n` only.
            unsafe {
                let x = _mm512_maskz_loadu_epi64(m, data.add(16 * i).cast());
                let t = _mm512_maskz_loadu_epi64(m, tweaks.add(16 * i).cast());
                _mm512_mask_storeu_epi64(data.add(16 * i).cast(), m, _mm512_xor_si512(x, t));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `x · αᵏ` in each 128-bit lane for `k` of 1 to 8 (`K`, `64 - K` as `R`: shifts take
    /// constants): the high half's carry `c` (k bits) comes back as `c·0x87 = c ⊕ c<<1 ⊕
    /// c<<2 ⊕ c<<7`, by shifts, as AVX2 has no carry-less multiply of its own.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mul_alpha_k<const K: i32, const R: i32>(x: __m256i) -> __m256i {
        let out = _mm256_srli_epi64::<R>(x);
        let c = _mm256_srli_si256::<8>(out);
        _mm256_xor_si256(
            _mm256_xor_si256(_mm256_slli_epi64::<K>(x), _mm256_slli_si256::<8>(out)),
            times_87(c),
        )
    }

    /// `c · 0x87` for `c` of at most 8 bits per 64-bit half: `c ⊕ c<<1 ⊕ c<<2 ⊕ c<<7`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn times_87(c: __m256i) -> __m256i {
        _mm256_xor_si256(
            _mm256_xor_si256(c, _mm256_slli_epi64::<1>(c)),
            _mm256_xor_si256(_mm256_slli_epi64::<2>(c), _mm256_slli_epi64::<7>(c)),
        )
    }

    /// `x · α⁸` in each 128-bit lane: a byte shift, the byte shifted out (`c`) coming back
    /// as `c·0x87` (two instructions fewer than [`mul_alpha_k`]).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn mul_alpha8(x: __m256i) -> __m256i {
        _mm256_xor_si256(
            _mm256_slli_si256::<1>(x),
            times_87(_mm256_srli_si256::<15>(x)),
        )
    }

    /// See [`super::Kernel::whiten`]: 8 blocks per iteration in four chains.
    ///
    /// # Safety
    /// The CPU has AVX2; `src`, `dst` (which may be equal) and `tweaks` have `16 * n`
    /// bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn whiten(
        t: u128,
        src: *const u8,
        dst: *mut u8,
        tweaks: *mut u8,
        n: usize,
    ) -> u128 {
        let t1 = super::super::mul_alpha(t);
        let t2 = super::super::mul_alpha(t1);
        let lanes = [t, t1, t2, super::super::mul_alpha(t2)];
        // SAFETY: `lanes` is 64 bytes.
        let (t0, t1) = unsafe {
            (
                _mm256_loadu_si256(lanes.as_ptr().cast()),
                _mm256_loadu_si256(lanes.as_ptr().add(2).cast()),
            )
        };
        let mut t = [t0, t1, mul_alpha_k::<4, 60>(t0), mul_alpha_k::<4, 60>(t1)];
        let mut i = 0;
        while i + 8 <= n {
            for (j, tj) in t.iter_mut().enumerate() {
                // SAFETY: blocks `i..i + 8` are inside the `n` of the caller's promise.
                unsafe { put(*tj, src, dst, tweaks, 16 * (i + 2 * j)) };
                *tj = mul_alpha8(*tj);
            }
            i += 8;
        }
        let mut q = 0;
        while i + 2 <= n {
            // SAFETY: blocks `i..i + 2` are inside `n`.
            unsafe { put(t[q], src, dst, tweaks, 16 * i) };
            q += 1;
            i += 2;
        }
        let mut next = [0u128; 2];
        // SAFETY: `next` is 32 bytes.
        unsafe { _mm256_storeu_si256(next.as_mut_ptr().cast(), t[q]) };
        if i < n {
            let o = 16 * i;
            let lo = _mm256_castsi256_si128(t[q]);
            // SAFETY: block `i` is the last inside `n`.
            unsafe {
                _mm_storeu_si128(tweaks.add(o).cast(), lo);
                let p = _mm_loadu_si128(src.add(o).cast());
                _mm_storeu_si128(dst.add(o).cast(), _mm_xor_si128(p, lo));
            }
            return next[1];
        }
        next[0]
    }

    /// Two blocks at byte `o`: their tweaks `t` stored for the post-whitening, and
    /// `dst = src ^ t`.
    ///
    /// # Safety
    /// The CPU has AVX2; `src`, `dst` and `tweaks` have 32 bytes at `o`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn put(t: __m256i, src: *const u8, dst: *mut u8, tweaks: *mut u8, o: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            _mm256_storeu_si256(tweaks.add(o).cast(), t);
            let p = _mm256_loadu_si256(src.add(o).cast());
            _mm256_storeu_si256(dst.add(o).cast(), _mm256_xor_si256(p, t));
        }
    }

    /// `data ^= tweaks` over the two blocks at block `j`.
    ///
    /// # Safety
    /// The CPU has AVX2; both have blocks `j..j + 2`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn xor2(data: *mut u8, tweaks: *const u8, j: usize) {
        // SAFETY: the caller's promise.
        unsafe {
            let x = _mm256_loadu_si256(data.add(16 * j).cast());
            let t = _mm256_loadu_si256(tweaks.add(16 * j).cast());
            _mm256_storeu_si256(data.add(16 * j).cast(), _mm256_xor_si256(x, t));
        }
    }

    /// `data ^= tweaks` over `n` blocks.
    ///
    /// # Safety
    /// The CPU has AVX2; `data` and `tweaks` have `16 * n` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn xor_into(data: *mut u8, tweaks: *const u8, n: usize) {
        let mut i = 0;
        while i + 8 <= n {
            for j in (i..i + 8).step_by(2) {
                // SAFETY: blocks `i..i + 8` are inside `n`.
                unsafe { xor2(data, tweaks, j) };
            }
            i += 8;
        }
        while i + 2 <= n {
            // SAFETY: blocks `i..i + 2` are inside `n`.
            unsafe { xor2(data, tweaks, i) };
            i += 2;
        }
        if i < n {
            // SAFETY: block `i` is the last inside `n`.
            unsafe {
                let x = _mm_loadu_si128(data.add(16 * i).cast());
                let t = _mm_loadu_si128(tweaks.add(16 * i).cast());
                _mm_storeu_si128(data.add(16 * i).cast(), _mm_xor_si128(x, t));
            }
        }
    }
}
