//! vhost-user-blk (virtio 1.2 §5.2). (being written)

pub mod request;
pub mod rpc;
