//! Shared pieces of the fuzz targets: a split virtqueue laid out in guest memory from the
//! fuzz input, so that both ways of reading a chain (virtio-queue's `DescriptorChain` and
//! blockd's pre-translated `RingView`) see the same hostile ring.

pub mod ring;
