//! The crypto bdev's I/O channel: a channel of the base bdev.
//!
//! When the base lends its memory ([`BdevChannel::zcopy_start`]: malloc), a read decrypts
//! straight from the base's memory into the caller's buffers and a write encrypts the
//! caller's buffers straight into the base's memory: one pass over the data, no copy.
//! Otherwise (files, RBD, the local pool, or the base's QoS holding I/O back) a read goes
//! into the caller's buffers and is decrypted in place on completion, and a write is
//! encrypted into a per-request bounce buffer that is then written. Both paths store the
//! same bytes.

use std::alloc::Layout;
use std::os::fd::RawFd;
use std::sync::Arc;

use super::Cipher;
use crate::bdev::{BdevChannel, Errno, IoChannel, IoOp, IoResult, IoVecs};

/// Free bounce buffers kept per channel for reuse (more are allocated while more writes
/// are in flight, and freed when they complete).
const POOL_MAX: usize = 32;

/// An aligned heap buffer for one write's ciphertext, with the iovec that describes it
/// (boxed: its address is handed to the base and must not move while the write runs).
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
    iov: Box<libc::iovec>,
}

impl Bounce {
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(64)).ok()?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(Bounce {
            ptr,
            layout,
            iov: Box::new(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: 0,
            }),
        })
    }

    /// The first `len` bytes (`len <= capacity`).
    fn slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` is an allocation of `layout.size() >= len` bytes owned by `self`,
        // borrowed mutably for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated by `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// What a request in the base is waiting for.
enum Pending {
    /// Decrypt these buffers (the caller's) once the base has filled them.
    Read { lba: u64, iovs: IoVecs },
    /// Give the bounce buffer back.
    Write(Bounce),
    /// Nothing to do (flush, unmap).
    Plain,
}

/// See the module doc.
pub(super) struct CryptoChannel {
    base: BdevChannel,
    cipher: Arc<Cipher>,
    block_size: usize,
    align: usize,
    /// Requests in the base, indexed by the tag given to the base: (caller's tag, state).
    slots: Vec<Option<(u64, Pending)>>,
    free: Vec<usize>,
    /// Completions decided at submission (zero-copy accesses, no memory for a bounce
    /// buffer, unsupported).
    ready: Vec<(u64, IoResult)>,
    pool: Vec<Bounce>,
    /// One block, for blocks that straddle two iovecs.
    scratch: Vec<u8>,
}

impl CryptoChannel {
    pub(super) fn new(
        base: BdevChannel,
        cipher: Arc<Cipher>,
        block_size: usize,
        align: usize,
    ) -> Self {
        CryptoChannel {
            base,
            cipher,
            block_size,
            align,
            slots: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            pool: Vec::new(),
            scratch: vec![0; block_size],
        }
    }

    fn slot(&mut self, tag: u64, p: Pending) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some((tag, p));
                i as u64
            }
            None => {
                self.slots.push(Some((tag, p)));
                (self.slots.len() - 1) as u64
            }
        }
    }

    /// A bounce buffer of at least `len` bytes.
    fn bounce(&mut self, len: usize) -> Option<Bounce> {
        match self.pool.iter().position(|b| b.layout.size() >= len) {
            Some(i) => Some(self.pool.swap_remove(i)),
            None => Bounce::new(len, self.align),
        }
    }
}

/// Encrypts or decrypts, in place, the blocks described by `iovs` (block `first_lba`
/// first): in the iovec's memory, all the whole blocks of an iovec in one call, and
/// through `scratch` for a block that straddles iovecs.
///
/// # Safety
/// `iovs` must describe valid, writable memory that nobody else accesses meanwhile.
pub(super) unsafe fn crypt_iovs(
    cipher: &Cipher,
    iovs: IoVecs,
    bs: usize,
    first_lba: u64,
    scratch: &mut [u8],
    encrypt: bool,
) {
    // SAFETY: the caller's promise (`# Safety`).
    let v = unsafe { iovs.as_slice() };
    let (mut i, mut off) = (0usize, 0usize);
    let end = first_lba + iovs.total_len() / bs as u64;
    let mut lba = first_lba;
    while lba < end {
        while i < v.len() && off == v[i].iov_len {
            i += 1;
            off = 0;
        }
        if i >= v.len() {
            return;
        }
        let whole = ((v[i].iov_len - off) / bs).min((end - lba) as usize);
        if whole > 0 {
            // Every whole block in this iovec at once.
            // SAFETY: `[off, off + whole * bs)` is inside iovec `i`, valid and ours
            // (`# Safety`).
            let run = unsafe {
                std::slice::from_raw_parts_mut(v[i].iov_base.cast::<u8>().add(off), whole * bs)
            };
            cipher.crypt_units(run, bs, lba, encrypt);
            off += whole * bs;
            lba += whole as u64;
        } else {
            // Gather, transform, scatter back.
            let at = (i, off);
            // SAFETY: the iovecs are valid and ours (`# Safety`), apart from `scratch`.
            let (next, got) = unsafe { gather(v, at, &mut scratch[..bs]) };
            if got < bs {
                return;
            }
            (i, off) = next;
            cipher.crypt_units(&mut scratch[..bs], bs, lba, encrypt);
            // SAFETY: the same ranges as the gather above (the caller's promise).
            unsafe { scatter(v, at, &scratch[..bs]) };
            lba += 1;
        }
    }
}

/// Encrypts the blocks described by `iovs` (block `first_lba` first) into `out`
/// (`out.len() == iovs.total_len()`), reading the caller's memory once: the whole blocks of
/// an iovec straight from it, a block that straddles iovecs gathered into `scratch` (one
/// block) first. `out` only ever receives ciphertext: it may be the base's own memory.
///
/// # Safety
/// `iovs` must describe valid, readable memory that does not overlap `out`.
unsafe fn encrypt_into(
    cipher: &Cipher,
    iovs: IoVecs,
    bs: usize,
    first_lba: u64,
    out: &mut [u8],
    scratch: &mut [u8],
) {
    // `out[..pos]` is encrypted, `scratch[..part]` holds the start of the block at `pos`.
    let (mut pos, mut part, mut lba) = (0usize, 0usize, first_lba);
    // SAFETY: the caller's promise (`# Safety`).
    for v in unsafe { iovs.as_slice() } {
        let n = v.iov_len.min(out.len() - pos - part);
        if n == 0 {
            continue;
        }
        // SAFETY: `iov_base` is valid for reading `iov_len >= n` bytes and is not `out`.
        let mut src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), n) };
        if part > 0 {
            let k = (bs - part).min(src.len());
            scratch[part..part + k].copy_from_slice(&src[..k]);
            part += k;
            src = &src[k..];
            if part < bs {
                continue;
            }
            cipher.crypt_units_from(&scratch[..bs], &mut out[pos..pos + bs], bs, lba, true);
            lba += 1;
            pos += bs;
        }
        let whole = src.len() / bs * bs;
        cipher.crypt_units_from(&src[..whole], &mut out[pos..pos + whole], bs, lba, true);
        lba += (whole / bs) as u64;
        pos += whole;
        let rest = &src[whole..];
        scratch[..rest.len()].copy_from_slice(rest);
        part = rest.len();
    }
}

/// Decrypts `src` (whole blocks, block `first_lba` first) into the buffers described by
/// `iovs` (`iovs.total_len() == src.len()`), out of place: the whole blocks of an iovec
/// straight into it, a block that straddles iovecs through `scratch` (one block).
///
/// # Safety
/// `iovs` must describe valid, writable memory that nobody else accesses meanwhile and
/// that does not overlap `src`.
unsafe fn decrypt_from(
    cipher: &Cipher,
    src: &[u8],
    iovs: IoVecs,
    bs: usize,
    first_lba: u64,
    scratch: &mut [u8],
) {
    // SAFETY: the caller's promise (`# Safety`).
    let v = unsafe { iovs.as_slice() };
    let (mut i, mut off, mut pos, mut lba) = (0usize, 0usize, 0usize, first_lba);
    while src.len() - pos >= bs {
        while i < v.len() && off == v[i].iov_len {
            i += 1;
            off = 0;
        }
        if i >= v.len() {
            return;
        }
        let whole = ((v[i].iov_len - off) / bs).min((src.len() - pos) / bs);
        if whole > 0 {
            // SAFETY: `[off, off + whole * bs)` is inside iovec `i`, valid, ours, and apart
            // from `src` (`# Safety`); the slice lives for this call only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(v[i].iov_base.cast::<u8>().add(off), whole * bs)
            };
            cipher.crypt_units_from(&src[pos..pos + whole * bs], dst, bs, lba, false);
            off += whole * bs;
            pos += whole * bs;
            lba += whole as u64;
            continue;
        }
        cipher.crypt_units_from(&src[pos..pos + bs], &mut scratch[..bs], bs, lba, false);
        // SAFETY: the iovecs are valid, writable and ours (`# Safety`).
        (i, off) = unsafe { scatter(v, (i, off), &scratch[..bs]) };
        pos += bs;
        lba += 1;
    }
}

/// Copies `from` into the iovecs `v` from position `at` (iovec, offset) on, as far as they
/// reach (a block that straddles iovecs, out of the one-block scratch); returns the
/// position after it.
///
/// # Safety
/// The iovecs must describe valid memory, writable and unused by anyone else meanwhile,
/// apart from `from`.
unsafe fn scatter(v: &[libc::iovec], at: (usize, usize), from: &[u8]) -> (usize, usize) {
    let (mut i, mut off, mut put) = (at.0, at.1, 0);
    while put < from.len() && i < v.len() {
        let n = (v[i].iov_len - off).min(from.len() - put);
        // SAFETY: `[off, off + n)` is inside iovec `i` (the caller's promise), `[put, put +
        // n)` inside `from`, and the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                from.as_ptr().add(put),
                v[i].iov_base.cast::<u8>().add(off),
                n,
            )
        };
        put += n;
        off += n;
        if off == v[i].iov_len {
            i += 1;
            off = 0;
        }
    }
    (i, off)
}

/// Copies from the iovecs `v`, from position `at` (iovec, offset) on, into `to` as far as
/// they reach (a block that straddles iovecs, into the one-block scratch); returns the
/// position after it and the bytes copied. [`scatter`]'s mirror.
///
/// # Safety
/// The iovecs must describe valid, readable memory apart from `to`.
unsafe fn gather(v: &[libc::iovec], at: (usize, usize), to: &mut [u8]) -> ((usize, usize), usize) {
    let (mut i, mut off, mut got) = (at.0, at.1, 0);
    while got < to.len() && i < v.len() {
        let n = (v[i].iov_len - off).min(to.len() - got);
        // SAFETY: `[off, off + n)` is inside iovec `i` (the caller's promise), `[got, got +
        // n)` inside `to`, and the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v[i].iov_base.cast::<u8>().add(off),
                to.as_mut_ptr().add(got),
                n,
            )
        };
        got += n;
        off += n;
        if off == v[i].iov_len {
            i += 1;
            off = 0;
        }
    }
    ((i, off), got)
}

/// Whether any of `iovs` overlaps the `len` bytes at `p`.
///
/// # Safety
/// As [`IoVecs::as_slice`].
unsafe fn overlaps(iovs: IoVecs, p: *const u8, len: usize) -> bool {
    let (a, b) = (p as usize, p as usize + len);
    // SAFETY: the caller's promise.
    unsafe { iovs.as_slice() }.iter().any(|v| {
        let s = v.iov_base as usize;
        s < b && a < s.saturating_add(v.iov_len) && v.iov_len > 0
    })
}

impl CryptoChannel {
    /// A read or write through memory the base lends: `None` when it lends none (then the
    /// caller submits the read, or encrypts into a bounce buffer and submits the write),
    /// else the request's result. A read decrypts from the lent memory into `iovs`, a
    /// write encrypts `iovs` into it.
    ///
    /// # Safety
    /// The caller's buffers (`iovs`) are valid for reading (a write) or writing (a read)
    /// and unused by anyone else during the call (`IoChannel::submit`'s contract).
    unsafe fn zcopy(&mut self, offset: u64, iovs: IoVecs, write: bool) -> Option<IoResult> {
        let len = iovs.total_len();
        let z = match self.base.zcopy_start(offset, len, !write)? {
            Ok(z) => z,
            Err(e) => return Some(Err(e)),
        };
        let lent = z.lent();
        // SAFETY: the caller's promise, for the iovec array.
        if unsafe { overlaps(iovs, lent.as_ptr(), lent.len()) } {
            drop(z);
            tracing::error!(
                base = self.base.bdev().name(),
                "crypto: a {} buffer overlaps the base's memory",
                if write { "write" } else { "read" }
            );
            return Some(Err(Errno(libc::EFAULT)));
        }
        let lba = offset / self.block_size as u64;
        if write {
            // SAFETY: the base lent `lent.len()` writable bytes, valid while `z` lives
            // (ended below); on this thread this slice is the only reference to them, and
            // it lives for this call only. A request to overlapping blocks on another
            // reactor may hold its own call-scoped slice at the same time: the guest
            // issued both without ordering them, as two DMA transfers to the same blocks,
            // and gets either's bytes (what every backend's copy already does); it never
            // reaches outside the range the base checked. `iovs` do not overlap it
            // (checked above).
            let out = unsafe { std::slice::from_raw_parts_mut(lent.as_ptr(), lent.len()) };
            // SAFETY: `iovs` are readable (`# Safety`) and apart from `out`.
            unsafe {
                encrypt_into(
                    &self.cipher,
                    iovs,
                    self.block_size,
                    lba,
                    out,
                    &mut self.scratch,
                )
            };
        } else {
            // SAFETY: the base lent `lent.len()` readable bytes, valid while `z` lives (it
            // is ended below, after the last use); the slice lives for this call only and,
            // on this thread, no other reference covers those bytes meanwhile. A write to
            // overlapping blocks on another reactor may store into them at the same time,
            // as DMA could: the guest ordered nothing between the two, and reads whatever
            // lands. `iovs` do not overlap it (checked above).
            let src = unsafe { std::slice::from_raw_parts(lent.as_ptr(), lent.len()) };
            // SAFETY: `iovs` are writable and ours (`# Safety`), apart from `src`.
            unsafe {
                decrypt_from(
                    &self.cipher,
                    src,
                    iovs,
                    self.block_size,
                    lba,
                    &mut self.scratch,
                )
            };
        }
        Some(z.end(write))
    }
}

impl IoChannel for CryptoChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        let bs = self.block_size as u64;
        match op {
            IoOp::Read { offset, iovs } => {
                // SAFETY: `submit`'s contract: the buffers are the caller's until reaped.
                if let Some(r) = unsafe { self.zcopy(offset, iovs, false) } {
                    self.ready.push((tag, r));
                    return;
                }
                let idx = self.slot(
                    tag,
                    Pending::Read {
                        lba: offset / bs,
                        iovs,
                    },
                );
                // SAFETY: the caller keeps the buffers valid until `tag` is reaped, which
                // happens only after the base reports `idx`.
                unsafe { self.base.submit(idx, op) };
            }
            IoOp::Write { offset, iovs } => {
                // SAFETY: as for reads.
                if let Some(r) = unsafe { self.zcopy(offset, iovs, true) } {
                    self.ready.push((tag, r));
                    return;
                }
                let len = iovs.total_len() as usize;
                let Some(mut b) = self.bounce(len) else {
                    self.ready.push((tag, Err(Errno(libc::ENOMEM))));
                    return;
                };
                let buf = b.slice(len);
                // SAFETY: the caller's buffers are valid for reading (our contract), and the
                // bounce buffer is ours.
                unsafe {
                    encrypt_into(
                        &self.cipher,
                        iovs,
                        self.block_size,
                        offset / bs,
                        buf,
                        &mut self.scratch,
                    )
                };
                b.iov.iov_len = len;
                // SAFETY: the boxed iovec and the buffer it points to move into the slot
                // with `b` and stay put (heap) until the base reports `idx`.
                let iovs = unsafe { IoVecs::from_slice(std::slice::from_ref(&*b.iov)) };
                let idx = self.slot(tag, Pending::Write(b));
                // SAFETY: as above.
                unsafe { self.base.submit(idx, IoOp::Write { offset, iovs }) };
            }
            IoOp::Flush | IoOp::Unmap { .. } => {
                let idx = self.slot(tag, Pending::Plain);
                // SAFETY: no buffers.
                unsafe { self.base.submit(idx, op) };
            }
            IoOp::WriteZeroes { .. } => self.ready.push((tag, Err(Errno(libc::ENOTSUP)))),
        }
    }

    fn kick(&mut self) {
        self.base.kick();
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let mut n = self.ready.len();
        for (tag, r) in self.ready.drain(..) {
            done(tag, r);
        }
        let CryptoChannel {
            base,
            cipher,
            block_size,
            slots,
            free,
            pool,
            scratch,
            ..
        } = self;
        n += base.poll(&mut |idx, r| {
            let Some((tag, p)) = slots.get_mut(idx as usize).and_then(Option::take) else {
                tracing::error!(idx, "crypto: the base completed an unknown request");
                return;
            };
            free.push(idx as usize);
            match p {
                Pending::Read { lba, iovs } if r.is_ok() => {
                    // SAFETY: the read completed: the caller's buffers hold the ciphertext
                    // and stay valid until we report `tag` just below.
                    unsafe { crypt_iovs(cipher, iovs, *block_size, lba, scratch, false) };
                }
                Pending::Write(b) if pool.len() < POOL_MAX => pool.push(b),
                _ => {}
            }
            done(tag, r);
        });
        n
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.base.completion_fd()
    }

    /// Also true while the base has throttled requests or completions it decided itself
    /// (its `next_deadline`): the reactor only sees this channel, so it must poll.
    fn arm(&mut self) -> bool {
        self.base.arm() || !self.ready.is_empty() || self.base.next_deadline().is_some()
    }

    fn in_flight(&self) -> usize {
        self.base.in_flight() + self.ready.len()
    }

    fn completed_by_helper_threads(&self) -> bool {
        self.base.awaits_helper_threads()
    }
}

#[cfg(test)]
mod tests {
    use aes::cipher::KeyInit;
    use aes::Aes256;

    use super::*;

    /// Out-of-place encryption from iovecs split anywhere equals in-place encryption of
    /// the contiguous plaintext, and out-of-place decryption into them gives it back.
    #[test]
    fn out_of_place_crypt_matches_in_place_for_any_split() {
        let c = Cipher::new(
            Aes256::new_from_slice(&[1u8; 32]).unwrap(),
            Aes256::new_from_slice(&[2u8; 32]).unwrap(),
        );
        for bs in [512usize, 4096] {
            let plain: Vec<u8> = (0..8 * bs).map(|i| (i * 31 + 7) as u8).collect();
            let mut expect = plain.clone();
            c.crypt_units(&mut expect, bs, 77, true);
            for cuts in [
                vec![],
                vec![1],
                vec![bs - 1, bs + 1],
                vec![3, 700, 701, 3 * bs, 3 * bs + 16, 7 * bs + 5],
                vec![bs, 2 * bs + 100, 5 * bs],
            ] {
                let mut src = plain.clone();
                let mut bounds = vec![0];
                bounds.extend(cuts.iter().copied());
                bounds.push(src.len());
                let base = src.as_mut_ptr();
                let v: Vec<libc::iovec> = bounds
                    .windows(2)
                    .map(|w| libc::iovec {
                        // SAFETY: `w[0] <= src.len()`: in bounds (or one past the end).
                        iov_base: unsafe { base.add(w[0]) }.cast(),
                        iov_len: w[1] - w[0],
                    })
                    .collect();
                let mut out = vec![0u8; plain.len()];
                let mut scratch = vec![0u8; bs];
                // SAFETY: `v` describes `src`, alive and apart from `out`.
                unsafe { encrypt_into(&c, IoVecs::from_slice(&v), bs, 77, &mut out, &mut scratch) };
                assert!(out == expect, "bs {bs} cuts {cuts:?}");
                assert_eq!(src, plain, "the source must not change");
                // And back, out of place, into the same split.
                // SAFETY: `base` is `src`'s buffer, `src.len()` bytes (through the pointer
                // the iovecs were made from, so they stay valid).
                unsafe { std::ptr::write_bytes(base, 0, src.len()) };
                // SAFETY: `v` describes `src`, alive and apart from `out`.
                unsafe { decrypt_from(&c, &out, IoVecs::from_slice(&v), bs, 77, &mut scratch) };
                assert_eq!(src, plain, "decrypted, bs {bs} cuts {cuts:?}");
            }
        }
    }
}
