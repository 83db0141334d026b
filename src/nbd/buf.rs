//! Data buffers of one NBD connection: aligned (O_DIRECT backends want 512 or 4096) and
//! recycled through a small per-connection pool so the steady state allocates nothing.

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// A zero-initialized heap buffer with a fixed alignment.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(AlignedBuf { ptr, layout })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Raw pointer to the start (stable for the buffer's life, for iovecs).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The first `len` bytes (clamped to the capacity).
    pub fn slice(&self, len: usize) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.capacity())) }
    }

    /// The first `len` bytes, mutable (clamped to the capacity).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: ptr is valid for `capacity` initialized bytes, uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.capacity())) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Free buffers kept for reuse (bounded in count and bytes).
pub struct BufPool {
    align: usize,
    free: Vec<AlignedBuf>,
    kept_bytes: usize,
}

/// Buffers smaller than this are rounded up, so small requests share buffers.
const MIN_BUF: usize = 64 * 1024;
/// At most this many bytes of free buffers are kept per connection.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;
/// At most this many free buffers are kept per connection.
const MAX_KEPT: usize = 256;

impl BufPool {
    /// A pool of buffers aligned to `align`.
    pub fn new(align: usize) -> Self {
        BufPool {
            align: align.max(8).next_power_of_two(),
            free: Vec::new(),
            kept_bytes: 0,
        }
    }

    /// A buffer of at least `len` bytes; `None` when memory is exhausted.
    pub fn get(&mut self, len: usize) -> Option<AlignedBuf> {
        if let Some(i) = self.free.iter().rposition(|b| b.capacity() >= len) {
            let b = self.free.swap_remove(i);
            self.kept_bytes -= b.capacity();
            return Some(b);
        }
        AlignedBuf::new(len.max(MIN_BUF).next_power_of_two(), self.align)
    }

    /// Returns a buffer for reuse (or frees it when the pool is full).
    pub fn put(&mut self, b: AlignedBuf) {
        if self.free.len() < MAX_KEPT && self.kept_bytes + b.capacity() <= MAX_KEPT_BYTES {
            self.kept_bytes += b.capacity();
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_aligns() {
        let mut p = BufPool::new(4096);
        let mut b = p.get(100).unwrap();
        assert_eq!(b.as_mut_ptr() as usize % 4096, 0);
        assert!(b.capacity() >= MIN_BUF);
        b.slice_mut(3).copy_from_slice(b"abc");
        let addr = b.as_mut_ptr();
        p.put(b);
        let mut again = p.get(4096).unwrap();
        assert_eq!(again.as_mut_ptr(), addr);
        assert_eq!(again.slice(3), b"abc");
        let big = p.get(1 << 22).unwrap();
        assert!(big.capacity() >= 1 << 22);
    }
}
