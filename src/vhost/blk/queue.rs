//! One virtio-blk virtqueue served on a reactor: pops requests, submits them to the bdev
//! channel with the guest's buffers (zero-copy), completes them into the used ring.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

use super::request::{BlkRequest, RequestKind};
use super::BlkShared;
use crate::bdev::{BdevChannel, Errno, IoOp, IoResult, IoVecs};
use crate::reactor::Poller;
use crate::vhost::device::QueueSetup;
use crate::vhost::vring::{Vring, POP_BUDGET};

/// An in-flight request.
struct Slot {
    req: BlkRequest,
    /// The generation of the guest memory the request points into (see
    /// [`BlkQueue::mem_gen`]), which stays mapped until the request completes even if the
    /// frontend removes the region meanwhile; `None` when the request holds no memory.
    mem_gen: Option<u32>,
    /// Bdev operations still outstanding (a discard of several segments issues several).
    pending: u32,
    status: u8,
    /// Write-through mode (CONFIG_WCE writeback=0): flush after the write completes.
    flush_after: bool,
}

/// The poller of one virtio-blk queue.
pub struct BlkQueue {
    /// First field: dropped (answering GET_VRING_BASE) before the bdev channel closes.
    vring: Vring,
    chan: BdevChannel,
    shared: Arc<BlkShared>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Scratch lists reused by every poll (no allocation on the hot path).
    done: Vec<u32>,
    reflush: Vec<u32>,
    /// The guest memory new requests point into, its generation (bumped whenever the
    /// frontend swaps the memory table) and how many in-flight requests use it. Holding
    /// one reference per generation instead of one per request keeps reference-count
    /// atomics off the per-request path.
    mem_cur: Arc<GuestMemoryMmap>,
    mem_gen: u32,
    mem_refs: usize,
    /// Older generations still used by in-flight requests: (generation, memory, requests).
    mem_retired: Vec<(u32, Arc<GuestMemoryMmap>, usize)>,
}

impl BlkQueue {
    /// Builds the poller; opens the bdev channel on the calling (reactor) thread.
    pub fn new(setup: QueueSetup, shared: Arc<BlkShared>) -> std::io::Result<Self> {
        let chan = shared.bdev.open_channel()?;
        let vring = Vring::new(setup);
        let n = vring.size().max(1) as usize;
        let slots = (0..n)
            .map(|_| Slot {
                req: BlkRequest::default(),
                mem_gen: None,
                pending: 0,
                status: 0,
                flush_after: false,
            })
            .collect();
        let mem_cur = vring.mem().memory().into_inner();
        Ok(BlkQueue {
            vring,
            mem_cur,
            mem_gen: 0,
            mem_refs: 0,
            mem_retired: Vec::new(),
            chan,
            shared,
            slots,
            free: (0..n as u32).rev().collect(),
            in_flight: 0,
            done: Vec::with_capacity(n),
            reflush: Vec::new(),
        })
    }

    /// Applies a bdev completion to its request; true when the request is complete.
    fn on_bdev_done(slot: &mut Slot, res: IoResult) -> bool {
        if let Err(e) = res {
            if slot.status == VIRTIO_BLK_S_OK as u8 {
                slot.status = status_of(e);
            }
        }
        slot.pending = slot.pending.saturating_sub(1);
        slot.pending == 0
    }

    /// Writes the status, returns the descriptor chain to the guest, frees the slot.
    fn complete(&mut self, tag: u32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        let used_len = if slot.status == VIRTIO_BLK_S_OK as u8 {
            slot.req.used_len()
        } else {
            1
        };
        // The status address was validated at parse time; a failure here means the
        // frontend removed the memory meanwhile: nothing more can be reported.
        match self.vring.map().host_range(slot.req.status_addr.0, 1) {
            // SAFETY: one byte of mapped guest memory (the map is of `mem`).
            Some(p) => unsafe { std::ptr::write_volatile(p, slot.status) },
            None => {
                let _ = mem.write_obj(slot.status, slot.req.status_addr);
            }
        }
        self.vring
            .add_used(mem, slot.req.head_index, used_len, "a request to the guest");
        if let Some(gen) = slot.mem_gen.take() {
            self.release_mem(gen);
        }
        self.free.push(tag);
        self.in_flight -= 1;
    }

    /// The current guest memory; when the frontend swapped it, the old one is kept (as a
    /// retired generation) until the requests that point into it complete.
    fn refresh_mem(&mut self) -> Arc<GuestMemoryMmap> {
        let guard = self.vring.mem().memory();
        if !std::ptr::eq(&*guard, Arc::as_ptr(&self.mem_cur)) {
            let old = std::mem::replace(&mut self.mem_cur, guard.into_inner());
            if self.mem_refs > 0 {
                self.mem_retired.push((self.mem_gen, old, self.mem_refs));
            }
            self.mem_gen = self.mem_gen.wrapping_add(1);
            self.mem_refs = 0;
        }
        self.mem_cur.clone()
    }

    /// A request of generation `gen` completed.
    fn release_mem(&mut self, gen: u32) {
        if gen == self.mem_gen {
            self.mem_refs -= 1;
            return;
        }
        if let Some(i) = self.mem_retired.iter().position(|r| r.0 == gen) {
            self.mem_retired[i].2 -= 1;
            if self.mem_retired[i].2 == 0 {
                self.mem_retired.swap_remove(i);
            }
        }
    }

    /// Starts a parsed request; returns false when it completed at once.
    fn start(&mut self, tag: u32) -> bool {
        let readonly = self.shared.readonly;
        let writethrough = !self.shared.writeback();
        let id: &[u8] = &self.shared.id;
        let slot = &mut self.slots[tag as usize];
        slot.status = VIRTIO_BLK_S_OK as u8;
        slot.pending = 0;
        slot.flush_after = false;
        let req = &slot.req;
        let offset = req.sector.saturating_mul(512);
        // SAFETY (all submits below): the iovecs live in `slot.req`, which is not touched
        // until the request completes, and point into guest memory kept mapped by
        // the memory generation recorded in `slot.mem_gen` for as long.
        match req.kind {
            RequestKind::In => unsafe {
                self.chan.submit(
                    tag as u64,
                    IoOp::Read {
                        offset,
                        iovs: IoVecs::from_slice(&req.data),
                    },
                );
                slot.pending = 1;
            },
            RequestKind::Out if readonly => slot.status = VIRTIO_BLK_S_IOERR as u8,
            RequestKind::Out => unsafe {
                self.chan.submit(
                    tag as u64,
                    IoOp::Write {
                        offset,
                        iovs: IoVecs::from_slice(&req.data),
                    },
                );
                slot.pending = 1;
                slot.flush_after = writethrough;
            },
            RequestKind::Flush => unsafe {
                self.chan.submit(tag as u64, IoOp::Flush);
                slot.pending = 1;
            },
            RequestKind::GetId => {
                // SAFETY: `mem_cur` (the memory the request was parsed against) is alive.
                unsafe { req.copy_to_data(id) };
            }
            RequestKind::Discard | RequestKind::WriteZeroes if readonly => {
                slot.status = VIRTIO_BLK_S_IOERR as u8
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let discard = req.kind == RequestKind::Discard;
                for seg in &req.segments {
                    let offset = seg.sector.saturating_mul(512);
                    let len = seg.num_sectors as u64 * 512;
                    let op = if discard {
                        IoOp::Unmap { offset, len }
                    } else {
                        IoOp::WriteZeroes {
                            offset,
                            len,
                            may_unmap: seg.unmap,
                        }
                    };
                    // SAFETY: no buffers involved.
                    unsafe { self.chan.submit(tag as u64, op) };
                    slot.pending += 1;
                }
            }
        }
        if slot.pending > 0 {
            slot.mem_gen = Some(self.mem_gen);
            self.mem_refs += 1;
            true
        } else {
            false
        }
    }
}

fn status_of(e: Errno) -> u8 {
    if e.0 == libc::ENOTSUP || e.0 == libc::EOPNOTSUPP {
        VIRTIO_BLK_S_UNSUPP as u8
    } else {
        VIRTIO_BLK_S_IOERR as u8
    }
}

impl Poller for BlkQueue {
    fn poll(&mut self) -> usize {
        let mem = self.refresh_mem();
        self.vring.sync_mem(&mem);
        let mut work = 0;

        // Completions first: they free slots for new requests.
        let mut done = std::mem::take(&mut self.done);
        let mut reflush = std::mem::take(&mut self.reflush);
        {
            let slots = &mut self.slots;
            self.chan.poll(&mut |tag, res| {
                let Some(slot) = slots.get_mut(tag as usize) else {
                    return;
                };
                if BlkQueue::on_bdev_done(slot, res) {
                    if slot.flush_after && slot.status == VIRTIO_BLK_S_OK as u8 {
                        slot.flush_after = false;
                        reflush.push(tag as u32);
                    } else {
                        done.push(tag as u32);
                    }
                }
            });
        }
        for &tag in &reflush {
            self.slots[tag as usize].pending = 1;
            // SAFETY: a flush carries no buffers.
            unsafe { self.chan.submit(tag as u64, IoOp::Flush) };
        }
        if !reflush.is_empty() {
            self.chan.kick();
        }
        let completed = done.len();
        for &tag in &done {
            self.complete(tag, &mem);
        }
        done.clear();
        reflush.clear();
        self.done = done;
        self.reflush = reflush;
        work += completed;

        if !self.vring.is_stopping() {
            let limits = self.shared.limits();
            let mut popped = 0;
            let fast = self.vring.has_view();
            while popped < POP_BUDGET {
                let parsed = if fast {
                    let Some(&tag) = self.free.last() else {
                        break;
                    };
                    let Some(head) = self.vring.pop_head() else {
                        break;
                    };
                    self.free.pop();
                    let req = &mut self.slots[tag as usize].req;
                    (tag, req.parse_ring(&self.vring, head, &limits))
                } else {
                    let Some((tag, chain)) = self.vring.pop_for_slot(&mem, &mut self.free) else {
                        break;
                    };
                    (tag, self.slots[tag as usize].req.parse_into(chain, &limits))
                };
                let (tag, parsed) = parsed;
                self.in_flight += 1;
                popped += 1;
                let slot = &mut self.slots[tag as usize];
                match parsed {
                    Ok(()) => {
                        if !self.start(tag) {
                            self.complete(tag, &mem);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(queue = self.vring.index(), "bad request: {e}");
                        match e.status_addr {
                            Some(addr) => {
                                slot.req.status_addr = addr;
                                slot.req.head_index = e.head_index;
                                slot.status = e.error.status();
                                self.complete(tag, &mem);
                            }
                            None => {
                                // Nowhere to write a status: hand the chain back unused.
                                self.vring.add_used(&mem, e.head_index, 0, "a chain");
                                self.free.push(tag);
                                self.in_flight -= 1;
                            }
                        }
                    }
                }
            }
            work += popped;
            if popped > 0 {
                self.chan.kick();
            }
        }

        if completed > 0 || work > 0 || self.vring.irq_due() {
            self.vring.notify_guest(&mem);
        }
        work
    }

    fn arm(&mut self) -> bool {
        let completions = self.chan.arm();
        (self.vring.arm() && !self.free.is_empty()) || completions
    }

    fn disarm(&mut self) {
        self.vring.disarm();
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.vring.wake_fd()];
        if let Some(fd) = self.chan.completion_fd() {
            v.push(fd);
        }
        v
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        crate::reactor::min_deadline(self.chan.next_deadline(), self.vring.irq_deadline())
    }

    fn request_stop(&mut self) {
        self.vring.stop();
    }

    fn awaits_helper_threads(&self) -> bool {
        self.chan.awaits_helper_threads()
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping() && self.in_flight == 0
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            tracing::error!(
                queue = self.vring.index(),
                in_flight = self.in_flight,
                "queue dropped with requests in flight"
            );
        }
    }
}
