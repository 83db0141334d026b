//! vhost-user-scsi controllers: the virtio-scsi device model (virtio 1.2 §5.6) with up to
//! [`MAX_TARGETS`] targets, each a bdev exposed as LUN 0 (as SPDK's vhost-scsi).
//!
//! Queue 0 is the control queue (task management, async notifications), queue 1 the event
//! queue (hot-plug events), queues 2.. the request queues. [`request`] parses descriptor
//! chains, [`cdb`] emulates the SCSI commands (SPC-4/SBC-3) with [`sense`] data, [`queue`]
//! runs the three kinds of queues on the reactors, [`config`] is the configuration space
//! and [`rpc`] the SPDK-compatible methods.
//!
//! Targets are added and removed at any time: the table is shared with the request queues,
//! which notice a new generation and open or retire their bdev channels; a connected
//! driver is told with a TRANSPORT_RESET event, reason RESCAN or REMOVED (§5.6.6.3.1).

pub mod cdb;
pub mod config;
pub mod queue;
pub mod request;
pub mod rpc;
pub mod sense;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN, VIRTIO_SCSI_T_TRANSPORT_RESET,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bdev::Bdev;
use crate::reactor::{Poller, ReactorCtx};
use crate::sync::lock;
use crate::vhost::device::{QueueSetup, VirtioDevice};
use request::{Event, LunAddr};

/// Targets per controller (SPDK's `SPDK_VHOST_SCSI_CTRLR_MAX_DEVS`).
pub const MAX_TARGETS: usize = 8;
/// Request queues offered (the frontend's `num_queues` may be lower).
pub const NUM_REQUEST_QUEUES: usize = 16;
/// Control + event + request queues.
pub const NUM_QUEUES: usize = 2 + NUM_REQUEST_QUEUES;
/// Events kept while the driver has no event buffer posted; beyond, EVENTS_MISSED is set.
const MAX_PENDING_EVENTS: usize = 64;

/// One target: a bdev as LUN 0.
pub struct ScsiTarget {
    /// Target number (0..MAX_TARGETS).
    pub id: u8,
    pub bdev: Arc<Bdev>,
    claim: String,
    /// Commands in flight on this target over all queues (task management waits for it).
    pub in_flight: AtomicUsize,
}

/// Events for the driver and whether one was dropped.
#[derive(Default)]
pub(crate) struct EventQueueState {
    pub(crate) pending: VecDeque<Event>,
    pub(crate) missed: bool,
    /// An event queue poller runs (a driver is connected and set the queue up).
    pub(crate) running: bool,
}

/// What the RPC thread and the queues of one controller share.
pub struct ScsiShared {
    ctrlr: String,
    targets: Mutex<[Option<Arc<ScsiTarget>>; MAX_TARGETS]>,
    /// Bumped on every target table change; queues resync when it moves.
    generation: AtomicU64,
    pub(crate) events: Mutex<EventQueueState>,
    /// Wakes the event queue poller when an event is queued.
    pub(crate) event_wake: EventFd,
    closed: AtomicBool,
}

impl ScsiShared {
    /// The current table generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A copy of the target table.
    pub fn targets(&self) -> [Option<Arc<ScsiTarget>>; MAX_TARGETS] {
        lock(&self.targets).clone()
    }

    /// The target `id`, if present.
    pub fn target(&self, id: u8) -> Option<Arc<ScsiTarget>> {
        lock(&self.targets).get(id as usize).cloned().flatten()
    }

    /// Queues a TRANSPORT_RESET event for `target` if a driver listens.
    fn notify(&self, target: u8, reason: u32) {
        let mut ev = lock(&self.events);
        if !ev.running {
            return;
        }
        if ev.pending.len() >= MAX_PENDING_EVENTS {
            ev.missed = true;
        } else {
            ev.pending.push_back(Event {
                event: VIRTIO_SCSI_T_TRANSPORT_RESET,
                lun: LunAddr::encode(target, 0),
                reason,
            });
        }
        drop(ev);
        // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
        let _ = self.event_wake.write(1);
    }
}

/// Why a target could not be added or removed; maps to SPDK's errno.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("target number {0} is out of range (0..{MAX_TARGETS})")]
    OutOfRange(i64),
    #[error("target {0} already exists")]
    Exists(u8),
    #[error("all {MAX_TARGETS} targets are in use")]
    Full,
    #[error("target {0} does not exist")]
    NoTarget(u8),
    #[error("bdev {bdev} is already claimed by {holder}")]
    Claimed { bdev: String, holder: String },
    /// The controller runs and the bdev refused to start I/O ([`Bdev::activate`]).
    #[error("{0}")]
    NotActivated(crate::error::Error),
}

impl TargetError {
    /// The errno SPDK answers with (`vhost_scsi.c`).
    pub fn errno(&self) -> i32 {
        match self {
            TargetError::OutOfRange(_) => libc::EINVAL,
            TargetError::Exists(_) => libc::EEXIST,
            TargetError::Full => libc::ENOSPC,
            TargetError::NoTarget(_) => libc::ENODEV,
            TargetError::Claimed { .. } => libc::EBUSY,
            TargetError::NotActivated(e) => e.errno,
        }
    }
}

/// A virtio-scsi device.
pub struct ScsiDevice {
    shared: Arc<ScsiShared>,
    /// Whether a frontend runs the device ([`VirtioDevice::activate`]); held while targets
    /// are added or removed, so that a target added to a running device is activated and
    /// one removed from it deactivated, each exactly once.
    active: Mutex<bool>,
    /// VIRTIO_F_RING_PACKED is offered (`packed_ring`, a blockd extension: SPDK's
    /// vhost-scsi has no packed rings).
    packed_ring: bool,
}

/// How a scsi controller names itself when it claims a target's bdev.
pub fn claim_name(ctrlr: &str, target: u8) -> String {
    format!("vhost scsi controller {ctrlr} target {target}")
}

impl ScsiDevice {
    /// A device without targets for controller `ctrlr`.
    pub fn new(ctrlr: &str) -> std::io::Result<Self> {
        Ok(ScsiDevice {
            shared: Arc::new(ScsiShared {
                ctrlr: ctrlr.to_string(),
                targets: Mutex::new(Default::default()),
                generation: AtomicU64::new(0),
                events: Mutex::new(EventQueueState::default()),
                event_wake: EventFd::new(EFD_NONBLOCK)?,
                closed: AtomicBool::new(false),
            }),
            active: Mutex::new(false),
            packed_ring: false,
        })
    }

    /// The same device offering packed virtqueues (virtio 1.2 §2.8).
    pub fn with_packed_ring(mut self, packed_ring: bool) -> Self {
        self.packed_ring = packed_ring;
        self
    }

    /// The shared state (for the queues).
    pub fn shared(&self) -> &Arc<ScsiShared> {
        &self.shared
    }

    /// Adds `bdev` as target `num` (-1: the first free one), claiming it; a connected
    /// driver gets a RESCAN event. Returns the target number.
    pub fn add_target(&self, num: i64, bdev: Arc<Bdev>) -> Result<u8, TargetError> {
        let active = lock(&self.active);
        let mut t = lock(&self.shared.targets);
        let id = if num < 0 {
            t.iter()
                .position(Option::is_none)
                .ok_or(TargetError::Full)? as u8
        } else if num >= MAX_TARGETS as i64 {
            return Err(TargetError::OutOfRange(num));
        } else {
            num as u8
        };
        if t[id as usize].is_some() {
            return Err(TargetError::Exists(id));
        }
        let claim = claim_name(&self.shared.ctrlr, id);
        bdev.claim(&claim).map_err(|holder| TargetError::Claimed {
            bdev: bdev.name().to_string(),
            holder,
        })?;
        // Under the table lock (the queues wait for it only to resync): activation is a
        // local call (a flock, a cache drop), and a target appears activated or not at all.
        if *active {
            if let Err(e) = bdev.activate() {
                bdev.release(&claim);
                return Err(TargetError::NotActivated(e));
            }
        }
        t[id as usize] = Some(Arc::new(ScsiTarget {
            id,
            bdev,
            claim,
            in_flight: AtomicUsize::new(0),
        }));
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        drop(t);
        self.shared.notify(id, VIRTIO_SCSI_EVT_RESET_RESCAN);
        tracing::info!(ctrlr = %self.shared.ctrlr, target = id, "scsi target added");
        Ok(id)
    }

    /// Removes target `num` and releases its bdev; a connected driver gets a REMOVED event.
    /// Commands in flight on it finish normally (the queues keep its channel until then);
    /// new commands get BAD_TARGET.
    pub fn remove_target(&self, num: i64) -> Result<(), TargetError> {
        if !(0..MAX_TARGETS as i64).contains(&num) {
            return Err(TargetError::OutOfRange(num));
        }
        let id = num as u8;
        let active = lock(&self.active);
        let mut t = lock(&self.shared.targets);
        let Some(target) = t[id as usize].take() else {
            return Err(TargetError::NoTarget(id));
        };
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        drop(t);
        if *active {
            // Commands in flight on it still finish; what completed is made durable.
            if let Err(e) = target.bdev.deactivate() {
                tracing::error!(ctrlr = %self.shared.ctrlr, target = id, "{e}");
            }
        }
        drop(active);
        target.bdev.release(&target.claim);
        self.shared.notify(id, VIRTIO_SCSI_EVT_RESET_REMOVED);
        tracing::info!(ctrlr = %self.shared.ctrlr, target = id, "scsi target removed");
        Ok(())
    }

    /// Number of targets.
    pub fn target_count(&self) -> usize {
        lock(&self.shared.targets).iter().flatten().count()
    }
}

impl VirtioDevice for ScsiDevice {
    fn features(&self) -> u64 {
        let packed = u64::from(self.packed_ring) << crate::vhost::packed_ring::VIRTIO_F_RING_PACKED;
        config::features() | packed
    }

    /// No CONFIG: QEMU's vhost-user-scsi builds the configuration space itself and warns
    /// about a backend offering it (SPDK disables it for vhost-scsi too).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> u16 {
        config::MAX_QUEUE_SIZE
    }

    fn config_space(&self) -> Vec<u8> {
        config::config_space()
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> std::io::Result<()> {
        // §5.6.4: the driver may write sense_size and cdb_size; blockd keeps the defaults
        // (as QEMU's vhost-scsi does), so only rewriting the same value is accepted.
        let same = match (offset, data) {
            (config::SENSE_SIZE_OFFSET, [a, b, c, d]) => {
                u32::from_le_bytes([*a, *b, *c, *d]) == request::SENSE_SIZE as u32
            }
            (config::CDB_SIZE_OFFSET, [a, b, c, d]) => {
                u32::from_le_bytes([*a, *b, *c, *d]) == request::CDB_SIZE as u32
            }
            _ => false,
        };
        if same {
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "controller {}: config write at offset {offset} ({} bytes) is not supported",
                self.shared.ctrlr,
                data.len()
            ),
        ))
    }

    /// Activates every target's bdev; on a failure, those already activated are
    /// deactivated again and the start is refused.
    fn activate(&self) -> std::io::Result<()> {
        let mut active = lock(&self.active);
        let targets = self.shared.targets();
        let targets: Vec<&Arc<ScsiTarget>> = targets.iter().flatten().collect();
        for (i, t) in targets.iter().enumerate() {
            if let Err(e) = t.bdev.activate() {
                for done in &targets[..i] {
                    if let Err(e) = done.bdev.deactivate() {
                        tracing::error!(ctrlr = %self.shared.ctrlr, target = done.id, "{e}");
                    }
                }
                return Err(std::io::Error::other(e));
            }
        }
        *active = true;
        Ok(())
    }

    fn deactivate(&self) {
        let mut active = lock(&self.active);
        *active = false;
        for t in self.shared.targets().iter().flatten() {
            if let Err(e) = t.bdev.deactivate() {
                tracing::error!(ctrlr = %self.shared.ctrlr, target = t.id, "{e}");
            }
        }
    }

    fn start_queue(
        &self,
        _ctx: &mut ReactorCtx,
        setup: QueueSetup,
        _acked_features: u64,
    ) -> std::io::Result<Box<dyn Poller>> {
        Ok(match setup.index {
            0 => Box::new(queue::ControlQueue::new(setup, self.shared.clone())),
            1 => Box::new(queue::EventQueue::new(setup, self.shared.clone())?),
            _ => Box::new(queue::RequestQueue::new(setup, self.shared.clone())),
        })
    }

    fn backend_specific(&self) -> Value {
        let targets: Vec<Value> = self
            .shared
            .targets()
            .iter()
            .flatten()
            .map(|t| {
                json!({"target_name": format!("Target {}", t.id), "id": t.id,
                       "scsi_dev_num": t.id,
                       "luns": [{"id": 0, "bdev_name": t.bdev.name()}]})
            })
            .collect();
        json!({ "scsi": targets })
    }

    fn config_entry(&self, ctrlr: &str, cpumask: &str) -> (&'static str, Value) {
        let mut p = json!({"ctrlr": ctrlr, "cpumask": cpumask});
        if self.packed_ring {
            p["packed_ring"] = json!(true);
        }
        ("vhost_create_scsi_controller", p)
    }

    fn config_entries(&self, ctrlr: &str, cpumask: &str) -> Vec<(&'static str, Value)> {
        let mut v = vec![self.config_entry(ctrlr, cpumask)];
        for t in self.shared.targets().iter().flatten() {
            v.push((
                "vhost_scsi_controller_add_target",
                json!({"ctrlr": ctrlr, "scsi_target_num": t.id, "bdev_name": t.bdev.name()}),
            ));
        }
        v
    }

    fn subsystem(&self) -> &'static str {
        "vhost_scsi"
    }

    fn busy(&self) -> bool {
        self.target_count() > 0
    }

    fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut t = lock(&self.shared.targets);
        for slot in t.iter_mut() {
            if let Some(target) = slot.take() {
                target.bdev.release(&target.claim);
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod activation_tests {
    use std::sync::atomic::AtomicI32;

    use super::*;
    use crate::bdev::{BdevBackend, BdevParams, IoChannel, IoTypes};

    /// Counts activations; refuses them when told.
    #[derive(Default)]
    struct Hooked {
        active: Arc<AtomicI32>,
        refuse: Arc<AtomicBool>,
    }

    impl BdevBackend for Hooked {
        fn product_name(&self) -> &'static str {
            "hooked"
        }
        fn io_types(&self) -> IoTypes {
            IoTypes {
                flush: true,
                unmap: false,
                write_zeroes: false,
                zcopy: false,
            }
        }
        fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
            Err(std::io::Error::from_raw_os_error(libc::ENOTSUP))
        }
        fn config(&self, _: &Bdev) -> Option<(&'static str, Value)> {
            None
        }
        fn activate(&self) -> std::io::Result<()> {
            if self.refuse.load(Ordering::Relaxed) {
                return Err(std::io::Error::other(crate::error::Error::new(
                    libc::EBUSY,
                    "written elsewhere",
                )));
            }
            self.active.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn deactivate(&self) -> std::io::Result<()> {
            self.active.fetch_sub(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn bdev(name: &str) -> (Arc<Bdev>, Arc<AtomicI32>, Arc<AtomicBool>) {
        let h = Hooked::default();
        let (a, r) = (h.active.clone(), h.refuse.clone());
        let params = BdevParams {
            name: name.into(),
            uuid: None,
            block_size: 512,
            num_blocks: 8,
        };
        (Bdev::new(params, Box::new(h)), a, r)
    }

    /// Every target of a running device is active exactly once: those present at start,
    /// those hot-added (refused, claim released, when the bdev refuses), and a removed one
    /// is deactivated; a refusal at start undoes the targets already activated.
    #[test]
    fn targets_are_activated_with_the_device() {
        let dev = ScsiDevice::new("c").unwrap();
        let (b0, a0, _) = bdev("b0");
        let (b1, a1, r1) = bdev("b1");
        dev.add_target(0, b0.clone()).unwrap();
        assert_eq!(
            a0.load(Ordering::Relaxed),
            0,
            "not active before the device"
        );
        dev.add_target(1, b1.clone()).unwrap();
        r1.store(true, Ordering::Relaxed);
        let e = dev.activate().unwrap_err();
        assert!(e.to_string().contains("written elsewhere"), "{e}");
        assert_eq!(a0.load(Ordering::Relaxed), 0, "undone");
        r1.store(false, Ordering::Relaxed);
        dev.activate().unwrap();
        assert_eq!(
            (a0.load(Ordering::Relaxed), a1.load(Ordering::Relaxed)),
            (1, 1)
        );
        // Hot-plug while running.
        dev.remove_target(1).unwrap();
        assert_eq!(a1.load(Ordering::Relaxed), 0);
        let (b2, a2, r2) = bdev("b2");
        r2.store(true, Ordering::Relaxed);
        let e = dev.add_target(2, b2.clone()).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        assert!(b2.claimed_by().is_none(), "claim released");
        r2.store(false, Ordering::Relaxed);
        dev.add_target(2, b2.clone()).unwrap();
        assert_eq!(a2.load(Ordering::Relaxed), 1);
        dev.deactivate();
        assert_eq!(
            (a0.load(Ordering::Relaxed), a2.load(Ordering::Relaxed)),
            (0, 0)
        );
        dev.close();
    }
}
