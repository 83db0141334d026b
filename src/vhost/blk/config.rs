//! The virtio-blk configuration space (virtio 1.2 §5.2.4) and feature bits (§5.2.3).

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtqueue size the controller accepts at most (QEMU's `queue-size` ≤ 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Data segments per request we accept (`seg_max`): QEMU requires `queue-size - 2` or less
/// for its default queue size of 128.
pub const SEG_MAX: u32 = 126;
/// Largest data segment (`size_max`), bytes. Large: drivers such as
/// libblkio do not split buffers by `size_max` (and libblkio computes `size_max * seg_max`
/// in an i32: keep the product below 2 GiB).
pub const SIZE_MAX: u32 = 16 << 20;
/// Largest request, bytes: bounds the work one guest request can cause.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Discard and write-zeroes limits.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 16;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// Bytes of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` and
/// its padding.
pub const CONFIG_LEN: usize = 60;

/// What the feature set and configuration space depend on.
#[derive(Clone, Copy, Debug)]
pub struct BlkGeometry {
    pub capacity_bytes: u64,
    pub block_size: u32,
    pub num_queues: u16,
    pub readonly: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub writeback: bool,
}

/// Feature bits offered for a device of this geometry.
pub fn features(g: &BlkGeometry) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << VIRTIO_BLK_F_MQ)
        | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        // Dirty logging for live migration (vhost-user.rst "Migration").
        | vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits();
    if g.readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        if g.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if g.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    f
}

/// `struct virtio_blk_config`, little-endian (virtio 1.2 §5.2.4).
pub fn config_space(g: &BlkGeometry) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_LEN];
    let put32 =
        |c: &mut Vec<u8>, off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    c[0..8].copy_from_slice(&(g.capacity_bytes / 512).to_le_bytes()); // capacity
    put32(&mut c, 8, SIZE_MAX); // size_max
    put32(&mut c, 12, SEG_MAX); // seg_max
                                // geometry (16..20) left zero: meaningless for a virtual disk.
    put32(&mut c, 20, g.block_size); // blk_size
                                     // topology: physical_block_exp, alignment_offset, min_io_size (in blocks), opt_io_size
    c[24] = 0;
    c[25] = 0;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    put32(&mut c, 28, 0);
    c[32] = g.writeback as u8; // writeback
    c[34..36].copy_from_slice(&g.num_queues.to_le_bytes()); // num_queues
    let align = g.block_size / 512;
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, MAX_DISCARD_SEG);
    put32(&mut c, 44, align); // discard_sector_alignment
    put32(&mut c, 48, MAX_WRITE_ZEROES_SECTORS);
    put32(&mut c, 52, MAX_WRITE_ZEROES_SEG);
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Offset of `writeback`, the only field a driver may write (with CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let g = BlkGeometry {
            capacity_bytes: 1 << 30,
            block_size: 4096,
            num_queues: 4,
            readonly: false,
            discard: true,
            write_zeroes: true,
            writeback: true,
        };
        let c = config_space(&g);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2097152);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        let f = features(&g);
        assert!(f & (1 << VIRTIO_BLK_F_DISCARD) != 0);
        assert!(f & (1 << VIRTIO_BLK_F_RO) == 0);
        let ro = features(&BlkGeometry {
            readonly: true,
            ..g
        });
        assert!(ro & (1 << VIRTIO_BLK_F_RO) != 0);
        assert!(ro & (1 << VIRTIO_BLK_F_DISCARD) == 0);
        assert!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES) == 0);
    }
}
