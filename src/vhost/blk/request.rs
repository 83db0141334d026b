//! virtio-blk request parsing (placeholder API, being written).

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryMmap};

#[derive(Default, Clone, Copy, Debug)]
pub struct RequestLimits {
    pub seg_max: u32,
    pub size_max: u32,
    pub max_request_bytes: u64,
    pub max_discard_seg: u32,
    pub max_write_zeroes_seg: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RequestKind {
    #[default]
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

#[derive(Default)]
pub struct BlkRequest {
    pub kind: RequestKind,
    pub sector: u64,
    pub data: Vec<libc::iovec>,
    pub segments: Vec<Segment>,
    pub status_addr: GuestAddress,
    pub head_index: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("bad request")]
pub struct ParseError;
impl ParseError {
    pub fn status_addr(&self) -> Option<GuestAddress> {
        None
    }
    pub fn status(&self) -> u8 {
        1
    }
    pub fn head_index(&self) -> u16 {
        0
    }
}

impl BlkRequest {
    pub fn parse_into(
        &mut self,
        _chain: DescriptorChain<&GuestMemoryMmap>,
        _mem: &GuestMemoryMmap,
        _l: &RequestLimits,
    ) -> Result<(), ParseError> {
        Err(ParseError)
    }
    pub fn device_written_len(&self) -> u32 {
        0
    }
    pub fn write_data(&mut self, _b: &[u8]) -> bool {
        false
    }
    pub fn clear_data(&mut self) {}
}
