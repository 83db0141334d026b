//! The engine takes every chain with a memory table at least as new as the one the
//! frontend had set when the driver published the chain, even when the table changes in
//! the middle of a poll pass (vhost-user.rst "VHOST_USER_ADD_MEM_REG" answered with
//! REPLY_ACK, then a request into the new region: libblkio's `map_mem_region` before the
//! first I/O).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::vhost::device::GuestMem;

const QSIZE: u16 = 16;
/// The buffer region the frontend adds while a pass is under way.
const BUF_GPA: u64 = 0x10_0000;
/// Packed descriptor flags (virtio 1.2 §2.8.1).
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// A device that only records whether each chain's buffers translated with the table it
/// was parsed against; its `poll_io` (which the engine calls between loading the table
/// and popping) runs `during_pass` once.
struct Probe {
    during_pass: Option<Box<dyn FnOnce()>>,
    mapped: Rc<RefCell<Vec<bool>>>,
}

#[derive(Default)]
struct ProbeReq {
    mapped: bool,
}

impl QueueDevice for Probe {
    type Request = ProbeReq;

    fn parse_ring(&mut self, req: &mut ProbeReq, vring: &Vring, head: u16) -> Parsed {
        let mut descs = Vec::new();
        req.mapped = vring.read_chain(head, 4, &mut descs).is_ok()
            && descs
                .iter()
                .all(|d| vring.map().host_range(d.addr, u64::from(d.len)).is_some());
        Parsed::Valid
    }

    fn parse_chain(
        &mut self,
        req: &mut ProbeReq,
        mut chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Parsed {
        let descs: Vec<_> = chain.by_ref().collect();
        let mem = chain.memory();
        req.mapped = descs
            .iter()
            .all(|d| GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize));
        Parsed::Valid
    }

    fn start(&mut self, _tag: u32, req: &mut ProbeReq) -> u32 {
        self.mapped.borrow_mut().push(req.mapped);
        0
    }

    fn on_io_done(_req: &mut ProbeReq, _res: IoResult) {}

    fn finish(&mut self, _req: &mut ProbeReq, _out: GuestWriter<'_>) -> u32 {
        0
    }

    fn poll_io(&mut self, _done: &mut dyn FnMut(u64, IoResult)) {
        if let Some(f) = self.during_pass.take() {
            f();
        }
    }

    fn kick(&mut self) {}

    fn arm(&mut self) -> bool {
        false
    }

    fn completion_fds(&self, _out: &mut Vec<RawFd>) {}

    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    fn awaits_helper_threads(&self) -> bool {
        false
    }
}

/// An anonymous region of `len` bytes at `gpa`.
fn region(gpa: u64, len: usize) -> Arc<GuestRegionMmap> {
    let m = MmapRegion::<()>::new(len).unwrap();
    Arc::new(GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap())
}

/// Writes `bytes` at `gpa` of `mem`, through its host mapping.
fn poke(mem: &GuestMem, gpa: u64, bytes: &[u8]) {
    let m = mem.memory();
    let p = m.get_host_address(GuestAddress(gpa)).unwrap();
    // SAFETY: the tests write inside their mapped ring regions.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
}

/// Rings at `desc`, `avail` and `used` in the memory of `regions`; while the engine's
/// first pass runs, the frontend adds the region at [`BUF_GPA`] and the driver publishes
/// one chain reading 512 bytes there. Returns whether the device could translate it, and
/// whether the rings had the pre-translated view.
fn publish_during_a_pass(
    regions: Vec<Arc<GuestRegionMmap>>,
    rings: [u64; 3],
    packed: bool,
) -> (bool, bool) {
    let shared = GuestMem::new(GuestMemoryMmap::from_arc_regions(regions).unwrap());
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(rings[0]))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(rings[1]))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(rings[2])).unwrap();
    if packed {
        // A fresh packed ring: index 0, wrap counter 1.
        q.set_next_avail(0x8000);
    }
    q.set_ready(true);
    let (stopped, _rx) = mpsc::channel();
    let setup = QueueSetup {
        index: 0,
        queue: q,
        mem: shared.clone(),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: None,
        stopped,
        coalescing: Default::default(),
        inflight: None,
        stats: Default::default(),
        log: Default::default(),
        packed,
    };
    let mapped = Rc::new(RefCell::new(Vec::new()));
    let frontend = shared.clone();
    let during_pass = Box::new(move || {
        // The session adds the region and answers; the driver then uses it at once.
        let added = frontend
            .memory()
            .insert_region(region(BUF_GPA, 0x1000))
            .unwrap();
        frontend.replace(added).unwrap();
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&BUF_GPA.to_le_bytes());
        desc[8..12].copy_from_slice(&512u32.to_le_bytes());
        if packed {
            // Buffer id 0; the flags that make it available last (§2.8.21.1).
            poke(&frontend, rings[0], &desc[..14]);
            poke(&frontend, rings[0] + 14, &F_AVAIL.to_le_bytes());
        } else {
            poke(&frontend, rings[0], &desc);
            poke(&frontend, rings[1] + 4, &0u16.to_le_bytes());
            poke(&frontend, rings[1] + 2, &1u16.to_le_bytes());
        }
    });
    let mut e = Engine::with_device(
        setup,
        Probe {
            during_pass: Some(during_pass),
            mapped: mapped.clone(),
        },
    );
    let view = {
        e.poll();
        e.vring().has_view()
    };
    // The chain went back to the driver.
    let m = shared.memory();
    if packed {
        let flags = m.read_obj::<u16>(GuestAddress(rings[0] + 14)).unwrap();
        assert_eq!(flags, F_AVAIL | F_USED);
    } else {
        let used_idx = m
            .read_obj::<u16>(GuestAddress(rings[2]).unchecked_add(2))
            .unwrap();
        assert_eq!(used_idx, 1);
    }
    let seen = mapped.borrow().clone();
    assert_eq!(seen.len(), 1, "one chain taken");
    (seen[0], view)
}

#[test]
fn a_chain_published_after_a_mid_pass_table_swap_is_translated_with_the_new_table() {
    let (mapped, view) =
        publish_during_a_pass(vec![region(0, 0x1_0000)], [0, 0x1000, 0x2000], false);
    assert!(view, "rings inside one region take the pre-translated path");
    assert!(
        mapped,
        "the chain was parsed with the table from before the swap"
    );
}

#[test]
fn the_slow_path_also_takes_the_new_table() {
    // Two separate mappings with the descriptor table across their boundary: no ring
    // view, virtio-queue's pop.
    let regions = vec![region(0, 0x1000), region(0x1000, 0x1000)];
    let (mapped, view) = publish_during_a_pass(regions, [0x1000 - 0x80, 0x1100, 0x1200], false);
    assert!(!view, "a descriptor table across regions has no view");
    assert!(
        mapped,
        "the chain was parsed with the table from before the swap"
    );
}

#[test]
fn a_packed_ring_also_takes_the_new_table() {
    let (mapped, view) =
        publish_during_a_pass(vec![region(0, 0x1_0000)], [0, 0x1000, 0x1004], true);
    assert!(view, "a packed ring inside one region has its view");
    assert!(
        mapped,
        "the chain was parsed with the table from before the swap"
    );
}
