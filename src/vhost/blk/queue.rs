//! The virtio-blk device part of a request queue (virtio 1.2 §5.2.6) on the shared
//! [`Engine`]: parsed requests go to the bdev channel with the guest's buffers
//! (zero-copy), and each completes with its status byte.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::request::{BlkRequest, RequestError, RequestKind, RequestLimits};
use super::BlkShared;
use crate::bdev::{BdevChannel, Errno, IoOp, IoResult, IoVecs};
use crate::vhost::device::QueueSetup;
use crate::vhost::engine::{Engine, GuestWriter, Parsed, QueueDevice};
use crate::vhost::vring::Vring;

/// The poller of one virtio-blk queue.
pub type BlkQueue = Engine<BlkIo>;

impl BlkQueue {
    /// Builds the poller; opens the bdev channel on the calling (reactor) thread.
    pub fn new(setup: QueueSetup, shared: Arc<BlkShared>) -> std::io::Result<Self> {
        let chan = shared.bdev.open_channel()?;
        let limits = shared.limits();
        Ok(Engine::with_device(
            setup,
            BlkIo {
                chan,
                shared,
                limits,
            },
        ))
    }
}

/// One virtio-blk request in a slot.
#[derive(Default)]
pub struct BlkSlot {
    req: BlkRequest,
    /// The status byte to complete with (§5.2.6).
    status: u8,
}

/// A virtio-blk queue's device part: the bdev channel and the controller's settings.
pub struct BlkIo {
    chan: BdevChannel,
    shared: Arc<BlkShared>,
    /// The limits of this poll pass (the capacity follows bdev resizes).
    limits: RequestLimits,
}

impl BlkIo {
    /// The verdict on a parse.
    #[inline]
    fn parsed(slot: &mut BlkSlot, r: Result<(), RequestError>) -> Parsed {
        let Err(e) = r else {
            return Parsed::Valid;
        };
        tracing::debug!("bad virtio-blk request: {e}");
        match e.status_addr {
            Some(addr) => {
                slot.req.status_addr = addr;
                slot.status = e.error.status();
                Parsed::Answer
            }
            None => Parsed::Unusable,
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

impl QueueDevice for BlkIo {
    type Request = BlkSlot;

    fn refresh(&mut self) {
        self.limits = self.shared.limits();
    }

    #[inline]
    fn parse_ring(&mut self, slot: &mut BlkSlot, vring: &Vring, head: u16) -> Parsed {
        let r = slot.req.parse_ring(vring, head, &self.limits);
        Self::parsed(slot, r)
    }

    fn parse_chain(
        &mut self,
        slot: &mut BlkSlot,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Parsed {
        let r = slot.req.parse_into(chain, &self.limits);
        Self::parsed(slot, r)
    }

    /// Read-only devices never get here with a write: the parser refused it
    /// ([`RequestLimits::read_only`], `VIRTIO_BLK_S_IOERR`).
    #[inline]
    fn start(&mut self, tag: u32, slot: &mut BlkSlot) -> u32 {
        slot.status = VIRTIO_BLK_S_OK as u8;
        let req = &slot.req;
        let offset = req.sector.saturating_mul(512);
        let tag64 = u64::from(tag);
        // The submits below are sound because the iovecs live in `slot.req`, which is not
        // touched until the request completes, and point into guest memory the engine keeps
        // mapped for as long.
        match req.kind {
            // SAFETY: `req.data` and the guest buffers outlive the I/O (see above).
            RequestKind::In => unsafe {
                self.chan.submit(
                    tag64,
                    IoOp::Read {
                        offset,
                        iovs: IoVecs::from_slice(&req.data),
                    },
                );
                1
            },
            // Write-through (CONFIG_WCE writeback=0, §5.2.6.2): durable before completion.
            // SAFETY: `req.data` and the guest buffers outlive the I/O (see above).
            RequestKind::Out => unsafe {
                let op = IoOp::Write {
                    offset,
                    iovs: IoVecs::from_slice(&req.data),
                };
                if self.shared.writeback() {
                    self.chan.submit(tag64, op);
                } else {
                    self.chan.submit_fua(tag64, op);
                }
                1
            },
            // SAFETY: a flush carries no buffers.
            RequestKind::Flush => unsafe {
                self.chan.submit(tag64, IoOp::Flush);
                1
            },
            RequestKind::GetId => {
                // SAFETY: the memory the request was parsed against is mapped during the
                // poll pass.
                unsafe { req.copy_to_data(&self.shared.id) };
                0
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let discard = req.kind == RequestKind::Discard;
                let mut n = 0;
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
                    unsafe { self.chan.submit(tag64, op) };
                    n += 1;
                }
                n
            }
        }
    }

    #[inline]
    fn on_io_done(slot: &mut BlkSlot, res: IoResult) {
        if let Err(e) = res {
            if slot.status == VIRTIO_BLK_S_OK as u8 {
                slot.status = status_of(e);
            }
        }
    }

    #[inline]
    fn finish(&mut self, slot: &mut BlkSlot, out: GuestWriter<'_>) -> u32 {
        // The status address was validated at parse time; a failure here means the
        // frontend removed the memory meanwhile: nothing more can be reported.
        if out.write(slot.req.status_addr.0, &[slot.status]).is_err() {
            return 0;
        }
        if slot.status == VIRTIO_BLK_S_OK as u8 {
            slot.req.used_len()
        } else {
            1
        }
    }

    #[inline]
    fn poll_io(&mut self, done: &mut dyn FnMut(u64, IoResult)) {
        self.chan.poll(done);
    }

    fn kick(&mut self) {
        self.chan.kick();
    }

    fn arm(&mut self) -> bool {
        self.chan.arm()
    }

    fn completion_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.chan.completion_fd());
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.chan.next_deadline()
    }

    fn awaits_helper_threads(&self) -> bool {
        self.chan.awaits_helper_threads()
    }
}

#[cfg(test)]
mod bench;
/// The split-ring test driver (also drives the scsi queues' tests).
#[cfg(test)]
pub(crate) mod driver;
#[cfg(test)]
mod driver_waits_tests;
#[cfg(test)]
mod log_tests;
/// The packed-ring test driver (also drives the scsi queues' tests).
#[cfg(test)]
pub(crate) mod packed_driver;
#[cfg(test)]
mod packed_inflight_tests;
