//! virtio-blk request parsing. (being written)
