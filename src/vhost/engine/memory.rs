//! Keeps guest memory mapped while in-flight requests point into it.
//!
//! The frontend may swap the memory table (vhost-user.rst "VHOST_USER_SET_MEM_TABLE",
//! "VHOST_USER_ADD_MEM_REG"/"REM_MEM_REG") while requests are in the bdevs with iovecs
//! into the old mappings: those must stay mapped until the requests complete. One
//! reference per memory generation, counted by requests, instead of one `Arc` clone per
//! request keeps reference-count atomics off the per-request path.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::vhost::device::GuestMem;

/// The current guest memory and the retired generations in-flight requests still use.
pub struct MemGenerations {
    /// The memory new requests point into (lent out during a poll pass, see
    /// [`MemGenerations::begin_pass`]), its generation and how many in-flight requests use
    /// it.
    cur: Option<Arc<GuestMemoryMmap>>,
    /// The [`GuestMem::generation`] `cur` was loaded at.
    loaded: u64,
    gen: u32,
    refs: usize,
    /// Older generations still used: (generation, memory, requests).
    retired: Vec<(u32, Arc<GuestMemoryMmap>, usize)>,
}

impl MemGenerations {
    /// Starts at the memory `mem` holds now.
    pub fn new(mem: &GuestMem) -> Self {
        let loaded = mem.generation();
        MemGenerations {
            loaded,
            cur: Some(mem.memory().into_inner()),
            gen: 0,
            refs: 0,
            retired: Vec::new(),
        }
    }

    /// The current guest memory for one poll pass, moved out instead of cloned (a pass then
    /// costs no reference-count read-modify-writes); hand it back with
    /// [`MemGenerations::end_pass`]. The table is loaded again only when the frontend
    /// changed it since ([`GuestMem::generation`]).
    #[inline]
    pub fn begin_pass(&mut self, mem: &GuestMem) -> Arc<GuestMemoryMmap> {
        let g = mem.generation();
        if g != self.loaded || self.cur.is_none() {
            self.loaded = g;
            self.reload(mem);
        }
        self.cur.take().unwrap_or_default()
    }

    /// Takes the frontend's current table; the old one is kept (as a retired generation)
    /// until the requests that point into it are released.
    #[cold]
    fn reload(&mut self, mem: &GuestMem) {
        let guard = mem.memory();
        let cur = self
            .cur
            .get_or_insert_with(|| Arc::new(GuestMemoryMmap::new()));
        if !std::ptr::eq(&*guard, Arc::as_ptr(cur)) {
            let old = std::mem::replace(cur, guard.into_inner());
            if self.refs > 0 {
                self.retired.push((self.gen, old, self.refs));
            }
            self.gen = self.gen.wrapping_add(1);
            self.refs = 0;
        }
    }

    /// The [`GuestMem::generation`] the memory of [`MemGenerations::begin_pass`] is at
    /// least as new as.
    #[inline]
    pub fn loaded(&self) -> u64 {
        self.loaded
    }

    /// Gives back the memory of [`MemGenerations::begin_pass`].
    #[inline]
    pub fn end_pass(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.cur = Some(mem);
    }

    /// A request starts pointing into the current memory; returns its generation, to give
    /// back to [`MemGenerations::release`].
    #[inline]
    pub fn hold(&mut self) -> u32 {
        self.refs += 1;
        self.gen
    }

    /// A request of generation `gen` no longer points into guest memory.
    #[inline]
    pub fn release(&mut self, gen: u32) {
        if gen == self.gen {
            self.refs -= 1;
            return;
        }
        if let Some(i) = self.retired.iter().position(|r| r.0 == gen) {
            self.retired[i].2 -= 1;
            if self.retired[i].2 == 0 {
                self.retired.swap_remove(i);
            }
        }
    }

    /// No request points into guest memory any more (the queue is going away): lets go of
    /// every generation.
    pub fn release_all(&mut self) {
        self.cur = Some(Arc::new(GuestMemoryMmap::new()));
        self.refs = 0;
        self.retired.clear();
    }

    /// Retired generations still mapped (tests).
    #[cfg(test)]
    pub fn retired(&self) -> usize {
        self.retired.len()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap()
    }

    /// One poll pass: the memory it works with.
    fn pass(g: &mut MemGenerations, shared: &GuestMem) -> std::sync::Weak<GuestMemoryMmap> {
        let m = g.begin_pass(shared);
        let w = Arc::downgrade(&m);
        g.end_pass(m);
        w
    }

    #[test]
    fn old_memory_lives_until_its_requests_are_released() {
        let shared = GuestMem::new(mem());
        let mut g = MemGenerations::new(&shared);
        let first = pass(&mut g, &shared);
        assert!(
            first.ptr_eq(&pass(&mut g, &shared)),
            "unchanged table, same memory"
        );
        let a = g.hold();
        let b = g.hold();
        // The frontend swaps the table: the next pass sees it, the old memory stays for
        // `a` and `b`.
        shared.replace(mem()).unwrap();
        let second = pass(&mut g, &shared);
        assert!(!first.ptr_eq(&second));
        assert_eq!(g.retired(), 1);
        let c = g.hold();
        g.release(a);
        assert!(first.upgrade().is_some(), "still used by b");
        g.release(b);
        assert_eq!(g.retired(), 0);
        assert!(
            first.upgrade().is_none(),
            "unmapped once its last request is done"
        );
        // A swap with nothing in flight retires nothing.
        g.release(c);
        shared.replace(mem()).unwrap();
        pass(&mut g, &shared);
        assert_eq!(g.retired(), 0);
        assert!(second.upgrade().is_none());
    }
}
