//! The virtio-scsi configuration space (virtio 1.2 §5.6.4) and feature bits (§5.6.3).

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};

use super::request::{CDB_SIZE, EVENT_LEN, SENSE_SIZE};
use super::{MAX_TARGETS, NUM_REQUEST_QUEUES};

/// Virtqueue size accepted at most (QEMU's `virtqueue_size` ≤ 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Data segments per command (`seg_max`): QEMU's default `virtqueue_size` 128 minus 2.
pub const SEG_MAX: u32 = 126;
/// Largest transfer in 512-byte sectors (`max_sectors`, as QEMU's vhost-scsi: 0xFFFF).
pub const MAX_SECTORS: u32 = 0xFFFF;
/// Commands per LUN the driver may queue (`cmd_per_lun`).
pub const CMD_PER_LUN: u32 = 128;
/// Bytes of `struct virtio_scsi_config`.
pub const CONFIG_LEN: usize = 36;

/// Feature bits offered: VERSION_1, INDIRECT_DESC, EVENT_IDX, HOTPLUG (targets come and go
/// with TRANSPORT_RESET events, §5.6.6.3.1), CHANGE and vhost-user PROTOCOL_FEATURES.
/// CHANGE (the device may report parameter changes, §5.6.6.3.3; blockd never does) is
/// offered as SPDK does because QEMU's vhost-user-scsi passes its own `param_change`
/// feature through to SET_FEATURES without checking it against what the backend offered:
/// refusing it would fail the feature negotiation of every Linux guest. INOUT
/// (bidirectional commands) and T10_PI are not offered.
pub fn features() -> u64 {
    (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_SCSI_F_HOTPLUG)
        | (1 << VIRTIO_SCSI_F_CHANGE)
        | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Dirty logging for live migration (vhost-user.rst "Migration").
        | vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// `struct virtio_scsi_config`, little-endian (§5.6.4). `num_queues` counts request
/// queues only; one LUN (0) per target, targets 0..MAX_TARGETS-1, channel 0.
pub fn config_space() -> Vec<u8> {
    let mut c = Vec::with_capacity(CONFIG_LEN);
    c.extend_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes()); // num_queues
    c.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
    c.extend_from_slice(&MAX_SECTORS.to_le_bytes()); // max_sectors
    c.extend_from_slice(&CMD_PER_LUN.to_le_bytes()); // cmd_per_lun
    c.extend_from_slice(&(EVENT_LEN as u32).to_le_bytes()); // event_info_size
    c.extend_from_slice(&(SENSE_SIZE as u32).to_le_bytes()); // sense_size
    c.extend_from_slice(&(CDB_SIZE as u32).to_le_bytes()); // cdb_size
    c.extend_from_slice(&0u16.to_le_bytes()); // max_channel
    c.extend_from_slice(&((MAX_TARGETS - 1) as u16).to_le_bytes()); // max_target
    c.extend_from_slice(&0u32.to_le_bytes()); // max_lun
    c
}

/// Offsets of the two fields a driver may write (§5.6.4: `sense_size`, `cdb_size`).
pub const SENSE_SIZE_OFFSET: u32 = 20;
pub const CDB_SIZE_OFFSET: u32 = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let c = config_space();
        assert_eq!(c.len(), CONFIG_LEN);
        let le32 = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(le32(0), NUM_REQUEST_QUEUES as u32);
        assert_eq!(le32(16), 16);
        assert_eq!(le32(SENSE_SIZE_OFFSET as usize), 96);
        assert_eq!(le32(CDB_SIZE_OFFSET as usize), 32);
        assert_eq!(u16::from_le_bytes([c[30], c[31]]), 7);
        assert!(features() & (1 << VIRTIO_SCSI_F_HOTPLUG) != 0);
        assert!(features() & (1 << VIRTIO_SCSI_F_CHANGE) != 0);
    }
}
