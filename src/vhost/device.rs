//! What a vhost-user controller serves: a virtio device model (blk, later scsi) whose
//! queues run as pollers on the reactors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use serde_json::Value;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::Queue;
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::reactor::{Poller, ReactorCtx};
use crate::vhost::coalescing::Coalescing;
use crate::vhost::dirty_log::RingLog;
use crate::vhost::inflight::QueueInflight;
use crate::vhost::queue_stats::QueueStats;

/// Guest memory as the frontend shared it (memfd, hugetlbfs or plain file regions), swapped
/// atomically when the frontend adds or removes regions, with a generation bumped at every
/// swap: a poller compares one integer per poll pass and loads the table (an `arc_swap`
/// load, two locked instructions) only when it changed.
#[derive(Clone, Debug)]
pub struct GuestMem {
    table: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    generation: Arc<AtomicU64>,
}

impl GuestMem {
    pub fn new(mem: GuestMemoryMmap<()>) -> Self {
        GuestMem {
            table: GuestMemoryAtomic::new(mem),
            generation: Arc::default(),
        }
    }

    /// The current table.
    #[inline]
    pub fn memory(&self) -> GuestMemoryLoadGuard<GuestMemoryMmap<()>> {
        self.table.memory()
    }

    /// The generation, then the current table: the table is at least as new as the
    /// generation says (what [`crate::vhost::vring::Vring::sync_mem`] takes).
    pub fn load(&self) -> (u64, Arc<GuestMemoryMmap<()>>) {
        let generation = self.generation();
        (generation, self.table.memory().into_inner())
    }

    /// Swaps the table; readers that see the new [`GuestMem::generation`] see it too.
    pub fn replace(&self, mem: GuestMemoryMmap<()>) -> Result<(), String> {
        self.table
            .lock()
            .map_err(|e| format!("guest memory table: {e}"))?
            .replace(mem);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes with every [`GuestMem::replace`].
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Everything a queue poller needs, handed over when the frontend has set a ring up
/// (vhost-user: after SET_VRING_KICK with addresses and, with PROTOCOL_FEATURES, enabled).
pub struct QueueSetup {
    /// Queue index within the device.
    pub index: u16,
    /// The split virtqueue (virtio 1.2 §2.7), ready, positioned at the frontend's base.
    pub queue: Queue,
    pub mem: GuestMem,
    /// Guest → device notifications (non-blocking eventfd).
    pub kick: EventFd,
    /// Device → guest interrupts; `None` when the frontend polls.
    pub call: Option<EventFd>,
    /// Receives the ring's next available index once the poller has stopped and finished
    /// every request it took (the answer to GET_VRING_BASE).
    pub stopped: Sender<u16>,
    /// The controller's interrupt coalescing (`vhost_controller_set_coalescing`).
    pub coalescing: Arc<Coalescing>,
    /// The queue's part of the in-flight region (INFLIGHT_SHMFD negotiated and the region
    /// set; QEMU's covers every virtqueue of the device): every queue records the chains it
    /// takes there and resubmits what a previous instance left in flight
    /// ([`crate::vhost::vring::Vring::track_inflight`]; the request queues through
    /// [`crate::vhost::engine::Engine`], the scsi control and event queues directly).
    pub inflight: Option<QueueInflight>,
    /// The queue's counters (`vhost_get_controllers`, metrics), kept by the session
    /// across restarts of the ring.
    pub stats: Arc<QueueStats>,
    /// The session's dirty-page logging, as this ring follows it (live migration).
    pub log: RingLog,
    /// A packed virtqueue (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED acked): `queue` then holds
    /// the descriptor ring, driver and device areas as its three addresses, and the base
    /// with the avail wrap counter in bit 15.
    pub packed: bool,
}

/// A virtio device model served over vhost-user.
pub trait VirtioDevice: Send + Sync {
    /// Device feature bits offered (virtio 1.2 §6 and the device's own section).
    fn features(&self) -> u64;

    /// vhost-user protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

    /// Maximum number of queues the frontend may use.
    fn num_queues(&self) -> usize;

    /// Maximum ring size.
    fn max_queue_size(&self) -> u16;

    /// The device configuration space (virtio 1.2 §4.1.4.3), as of now.
    fn config_space(&self) -> Vec<u8>;

    /// A write of the driver into the configuration space.
    fn write_config(&self, offset: u32, data: &[u8]) -> std::io::Result<()>;

    /// The driver acknowledged `features` (VHOST_USER_SET_FEATURES, sent as it initializes
    /// the device): settings that follow from the negotiation start over here.
    fn features_acked(&self, _features: u64) {}

    /// The frontend starts the device: its first ring is about to run (boot, reconnect,
    /// the end of an incoming migration). The device activates its bdevs
    /// ([`crate::bdev::Bdev::activate`]); an error refuses the ring's start.
    fn activate(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// The frontend stopped every ring and each finished its requests: the device
    /// deactivates its bdevs (durable writes, write role handed over), before the session
    /// answers GET_VRING_BASE. Failures are logged: the rings are stopped regardless.
    fn deactivate(&self) {}

    /// Builds the poller of one queue; runs on the reactor that will poll it.
    fn start_queue(
        &self,
        ctx: &mut ReactorCtx,
        setup: QueueSetup,
        acked_features: u64,
    ) -> std::io::Result<Box<dyn Poller>>;

    /// `backend_specific` of `vhost_get_controllers`.
    fn backend_specific(&self) -> Value;

    /// The RPC (method, params) that recreates the controller named `ctrlr`.
    fn config_entry(&self, ctrlr: &str, cpumask: &str) -> (&'static str, Value);

    /// The controller is being deleted: release what the device holds (bdev claims).
    fn close(&self);

    /// Every RPC (method, params) that recreates the controller, in order (a scsi
    /// controller adds its targets after creating itself).
    fn config_entries(&self, ctrlr: &str, cpumask: &str) -> Vec<(&'static str, Value)> {
        vec![self.config_entry(ctrlr, cpumask)]
    }

    /// The `framework_get_config` subsystem the controller belongs to.
    fn subsystem(&self) -> &'static str {
        "vhost_blk"
    }

    /// True while the controller must not be deleted (SPDK refuses to delete a scsi
    /// controller that still has targets: -EBUSY).
    fn busy(&self) -> bool {
        false
    }

    /// The concrete device, for RPCs specific to one device type.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}
