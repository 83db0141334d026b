//! vhost-user-blk controllers: the virtio-blk device model (virtio 1.2 §5.2) over a bdev.
//!
//! Split as firecracker's block device: [`request`] parses descriptor chains, [`queue`] is
//! the device's part of a request queue (start a request on the bdev channel, write its
//! status) on the shared virtqueue engine ([`crate::vhost::engine`]), [`config`] the
//! configuration space, and [`rpc`] the SPDK-compatible methods.

pub mod config;
pub mod queue;
pub mod request;
pub mod rpc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use crate::bdev::Bdev;
use crate::reactor::{Poller, ReactorCtx};
use crate::vhost::device::{QueueSetup, VirtioDevice};
use crate::vhost::packed_ring::VIRTIO_F_RING_PACKED;
use crate::vhost::ConfigNotifier;
use config::BlkGeometry;
use request::RequestLimits;

/// Number of queues a blk controller offers (the frontend's `num-queues` may be lower).
pub const NUM_QUEUES: usize = 16;

/// What every queue of one controller shares.
pub struct BlkShared {
    pub bdev: Arc<Bdev>,
    pub readonly: bool,
    /// The GET_ID answer: the bdev name (or uuid when the name is long), 20 bytes.
    pub id: Vec<u8>,
    limits: RequestLimits,
    writeback: AtomicBool,
}

impl BlkShared {
    /// The request limits as of now (the capacity follows bdev resizes).
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            capacity_sectors: self.bdev.size() / 512,
            ..self.limits
        }
    }

    /// The cache mode the driver chose (CONFIG_WCE): false = write-through.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }
}

/// A virtio-blk device over a bdev.
pub struct BlkDevice {
    ctrlr: String,
    shared: Arc<BlkShared>,
    /// The bdev resize subscription that announces new capacities to the guest.
    resize_watch: u64,
    /// SPDK's `packed_ring`: VIRTIO_F_RING_PACKED is offered (virtio 1.2 §2.8).
    packed_ring: bool,
    /// SPDK's `packed_ring_recovery`: in-flight recovery on packed rings, saved for
    /// `save_config`. blockd tracks every request queue in flight, packed or split,
    /// whenever the frontend shares the region ([`crate::vhost::inflight`]): the flag
    /// changes nothing.
    packed_ring_recovery: bool,
}

/// The GET_ID string (virtio 1.2 §5.2.6): the bdev name, or its uuid when the name does
/// not fit the 20 bytes.
fn device_id(bdev: &Bdev) -> Vec<u8> {
    if bdev.name().len() <= request::ID_BYTES {
        request::id_bytes(bdev.name()).to_vec()
    } else {
        request::id_bytes(&bdev.uuid().simple().to_string()).to_vec()
    }
}

impl BlkDevice {
    /// A device for controller `ctrlr` over `bdev` (which the caller has claimed). A resize
    /// of the bdev reaches the guest through `notifier` (virtio 1.2 §5.2.2: the device
    /// notifies a capacity change with a configuration change notification).
    pub fn new(ctrlr: &str, bdev: Arc<Bdev>, readonly: bool, notifier: ConfigNotifier) -> Self {
        let readonly = readonly || bdev.backend().read_only();
        let unmap = bdev.backend().io_types().unmap;
        let limits = RequestLimits {
            capacity_sectors: bdev.size() / 512,
            seg_max: config::SEG_MAX,
            size_max: config::SIZE_MAX,
            max_sectors: config::MAX_REQUEST_BYTES / 512,
            max_discard_seg: if unmap && !readonly {
                config::MAX_DISCARD_SEG
            } else {
                0
            },
            max_discard_sectors: config::MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: if readonly {
                0
            } else {
                config::MAX_WRITE_ZEROES_SEG
            },
            max_write_zeroes_sectors: config::MAX_WRITE_ZEROES_SECTORS,
            read_only: readonly,
        };
        let name = ctrlr.to_string();
        let resize_watch = bdev.subscribe_resize(Box::new(move |blocks| {
            let sent = notifier.notify();
            tracing::info!(ctrlr = %name, blocks, notified = sent, "bdev resized");
        }));
        BlkDevice {
            ctrlr: ctrlr.to_string(),
            resize_watch,
            packed_ring: false,
            packed_ring_recovery: false,
            shared: Arc::new(BlkShared {
                id: device_id(&bdev),
                bdev,
                readonly,
                limits,
                writeback: AtomicBool::new(true),
            }),
        }
    }

    /// The same device offering packed virtqueues (`packed_ring`), and asking for their
    /// in-flight recovery (`packed_ring_recovery`), as SPDK's RPC parameters.
    pub fn with_packed_ring(mut self, packed_ring: bool, recovery: bool) -> Self {
        self.packed_ring = packed_ring;
        self.packed_ring_recovery = recovery;
        self
    }

    fn geometry(&self) -> BlkGeometry {
        let b = &self.shared.bdev;
        let t = b.backend().io_types();
        BlkGeometry {
            capacity_bytes: b.size(),
            block_size: b.block_size(),
            num_queues: NUM_QUEUES as u16,
            readonly: self.shared.readonly,
            discard: t.unmap,
            write_zeroes: true,
            writeback: self.shared.writeback(),
        }
    }
}

impl VirtioDevice for BlkDevice {
    fn features(&self) -> u64 {
        let packed = u64::from(self.packed_ring) << VIRTIO_F_RING_PACKED;
        config::features(&self.geometry()) | packed
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
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
        config::config_space(&self.geometry())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable (virtio 1.2 §5.2.5, CONFIG_WCE).
        if offset == config::WRITEBACK_OFFSET && data.len() == 1 {
            self.shared.writeback.store(data[0] != 0, Ordering::Relaxed);
            tracing::info!(ctrlr = %self.ctrlr, writeback = data[0] != 0, "cache mode changed by the driver");
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "config write at offset {offset} ({} bytes) is not allowed",
                data.len()
            ),
        ))
    }

    /// A driver that cannot flush (no VIRTIO_BLK_F_FLUSH) gets a write-through device
    /// (virtio 1.2 §5.2.5.2, §5.2.6.3): every write is made durable before it completes,
    /// so a backend's volatile cache (librbd's) never holds data that driver believes
    /// written. A driver that can flush leaves the mode as it is: frontends send
    /// SET_FEATURES again on reconnection and during live migration, when the guest's
    /// CONFIG_WCE choice must survive; a new driver reads the mode from the config space.
    fn features_acked(&self, features: u64) {
        if features & (1 << VIRTIO_BLK_F_FLUSH) == 0
            && self.shared.writeback.swap(false, Ordering::Relaxed)
        {
            tracing::info!(ctrlr = %self.ctrlr, "the driver cannot flush: write-through");
        }
    }

    fn activate(&self) -> std::io::Result<()> {
        self.shared.bdev.activate().map_err(std::io::Error::other)
    }

    fn deactivate(&self) {
        if let Err(e) = self.shared.bdev.deactivate() {
            tracing::error!(ctrlr = %self.ctrlr, "{e}");
        }
    }

    fn start_queue(
        &self,
        _ctx: &mut ReactorCtx,
        setup: QueueSetup,
        _acked_features: u64,
    ) -> std::io::Result<Box<dyn Poller>> {
        Ok(Box::new(queue::BlkQueue::new(setup, self.shared.clone())?))
    }

    fn backend_specific(&self) -> Value {
        json!({"block": {"readonly": self.shared.readonly, "bdev": self.shared.bdev.name(),
                         "transport": "vhost_user_blk"}})
    }

    fn config_entry(&self, ctrlr: &str, cpumask: &str) -> (&'static str, Value) {
        let mut p = json!({"ctrlr": ctrlr, "dev_name": self.shared.bdev.name(),
                           "cpumask": cpumask, "readonly": self.shared.readonly});
        if self.packed_ring {
            p["packed_ring"] = json!(true);
        }
        if self.packed_ring_recovery {
            p["packed_ring_recovery"] = json!(true);
        }
        ("vhost_create_blk_controller", p)
    }

    fn close(&self) {
        self.shared.bdev.unsubscribe_resize(self.resize_watch);
        self.shared.bdev.release(&self.claim_name());
    }
}

impl BlkDevice {
    /// The owner name used for the bdev claim.
    pub fn claim_name(&self) -> String {
        claim_name(&self.ctrlr)
    }
}

/// How a blk controller names itself when it claims its bdev (shown in errors).
pub fn claim_name(ctrlr: &str) -> String {
    format!("vhost controller {ctrlr}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{self, MallocOpts};
    use crate::bdev::BdevRegistry;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;

    #[test]
    fn a_driver_that_cannot_flush_gets_a_write_through_device() {
        let r = BdevRegistry::default();
        let opts = MallocOpts {
            name: Some("M".into()),
            uuid: None,
            num_blocks: 64,
            block_size: 512,
        };
        let dev = BlkDevice::new(
            "c",
            malloc::create(&r, opts).unwrap(),
            false,
            Default::default(),
        );
        let writeback_field = |d: &BlkDevice| d.config_space()[config::WRITEBACK_OFFSET as usize];
        assert_eq!(writeback_field(&dev), 1);
        // A driver that can flush changes nothing (a repeated SET_FEATURES, as during
        // live migration, must not undo its CONFIG_WCE choice).
        let flush_wce = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        dev.features_acked(flush_wce);
        assert!(dev.shared.writeback());
        dev.write_config(config::WRITEBACK_OFFSET, &[0]).unwrap();
        dev.features_acked(flush_wce);
        assert_eq!(writeback_field(&dev), 0);
        dev.write_config(config::WRITEBACK_OFFSET, &[1]).unwrap();
        // CONFIG_WCE without FLUSH: writeback becomes 0 (virtio 1.2 §5.2.5.2); neither: the
        // same.
        dev.features_acked(1 << VIRTIO_BLK_F_CONFIG_WCE);
        assert!(!dev.shared.writeback());
        assert_eq!(writeback_field(&dev), 0);
        dev.features_acked(0);
        assert!(!dev.shared.writeback());
        // Only the driver's CONFIG_WCE write turns writeback on again.
        dev.features_acked(flush_wce);
        assert!(!dev.shared.writeback());
        dev.write_config(config::WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(writeback_field(&dev), 1);
    }
}
