//! The ring plumbing every virtqueue poller shares, whatever its device: the split
//! virtqueue (virtio 1.2 §2.7) with the guest memory it lives in, the kick and call
//! eventfds of vhost-user (vhost-user.rst "Ring states"), notification suppression around
//! the reactor's sleeps, and the answer to GET_VRING_BASE when the poller goes away.
//!
//! The device engines (blk, scsi) keep only what is theirs: slots, parsing, bdev channels.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Sender;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vhost::device::{GuestMem, QueueSetup};

/// At most this many chains are popped per poll, so that one busy queue does not starve
/// the other pollers of its reactor.
pub const POP_BUDGET: usize = 128;

/// One virtqueue as a poller sees it. Dropping it sends the ring's next available index
/// on the `stopped` channel (the value GET_VRING_BASE returns to the frontend).
pub struct Vring {
    index: u16,
    queue: Queue,
    mem: GuestMem,
    kick: EventFd,
    call: Option<EventFd>,
    stopped: Sender<u16>,
    /// The frontend asked for the ring back (GET_VRING_BASE): the poller pops no more chains.
    stopping: bool,
}

impl Vring {
    /// Takes over the ring the frontend has set up.
    pub fn new(setup: QueueSetup) -> Self {
        Vring {
            index: setup.index,
            queue: setup.queue,
            mem: setup.mem,
            kick: setup.kick,
            call: setup.call,
            stopped: setup.stopped,
            stopping: false,
        }
    }

    /// The queue's index within its device (for log context).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue size (how many requests can be in flight at most).
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Stops taking chains: the frontend wants the ring back (GET_VRING_BASE); the
    /// poller finishes what it took, then is dropped.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// True once [`Vring::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// The guest memory, swapped by the frontend when it adds or removes regions.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The next available chain, read from `mem` (the memory the caller keeps mapped for
    /// as long as it uses the chain's buffers).
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        self.queue.pop_descriptor_chain(mem)
    }

    /// The next available chain and a free slot tag for it, taken from `free` only when a
    /// chain is there: the engines serve at most as many chains as they have slots.
    pub fn pop_for_slot<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        free: &mut Vec<u32>,
    ) -> Option<(u32, DescriptorChain<&'m GuestMemoryMmap>)> {
        let &tag = free.last()?;
        let chain = self.pop(mem)?;
        free.pop();
        Some((tag, chain))
    }

    /// Returns chain `head` to the driver with `len` bytes written (§2.7.8); a failure
    /// (the frontend broke the ring) is logged as "cannot return `what`".
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32, what: &str) {
        if let Err(e) = self.queue.add_used(mem, head, len) {
            tracing::warn!(queue = self.index, "cannot return {what}: {e}");
        }
    }

    /// Raises the guest interrupt after a batch of used chains if the driver wants one
    /// (§2.7.10 with EVENT_IDX, §2.7.7 without); when unsure, it does.
    pub fn notify_guest(&mut self, mem: &GuestMemoryMmap) {
        match self.queue.needs_notification(mem) {
            Ok(true) | Err(_) => {
                if let Some(call) = &self.call {
                    let _ = call.write(1);
                }
            }
            Ok(false) => {}
        }
    }

    /// Asks the driver for kicks before the reactor sleeps; true when chains arrived since
    /// the last pop (with EVENT_IDX, avail_event is set to our position first, §2.7.10),
    /// so the poller must not sleep. A stopping ring is not armed: it takes no more chains.
    pub fn arm(&mut self) -> bool {
        if self.stopping {
            return false;
        }
        let mem = self.mem.memory();
        self.queue.enable_notification(&*mem).unwrap_or(true)
    }

    /// Stops the driver's kicks while the poller runs, and drains the kick eventfd.
    pub fn disarm(&mut self) {
        let mem = self.mem.memory();
        let _ = self.queue.disable_notification(&*mem);
        let _ = self.kick.read();
    }

    /// The kick eventfd, which wakes the reactor when the driver makes chains available.
    pub fn wake_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The underlying queue (tests look at its indexes).
    #[cfg(test)]
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}

impl Drop for Vring {
    fn drop(&mut self) {
        let _ = self.stopped.send(self.queue.next_avail());
    }
}
