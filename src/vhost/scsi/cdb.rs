//! SCSI command emulation for a direct-access block device (SPC-4, SBC-3) over a bdev,
//! LUN 0 of each target.
//!
//! [`decode`] turns a CDB into an [`Action`]: commands answered from metadata (INQUIRY,
//! READ CAPACITY, MODE SENSE, REPORT LUNS, ...) are computed here; the data-path commands
//! (READ, WRITE, SYNCHRONIZE CACHE, UNMAP, WRITE SAME) come back as byte ranges for the
//! queue engine to submit to the bdev channel with the guest's buffers. Everything in the
//! CDB is untrusted: every field is range-checked and every error is a fixed-format sense
//! ([`super::sense`]).
//!
//! WRITE SAME without the UNMAP bit is executed as a bdev write-zeroes when the data block
//! is all zeroes (or NDOB is set); a non-zero pattern is refused with INVALID FIELD IN CDB
//! (no initiator blockd targets writes patterns: Linux only uses WRITE SAME to zero or
//! unmap).

use super::sense::{self, Sense};
use crate::bdev::Bdev;

/// Largest READ/WRITE transfer, bytes (reported in the Block Limits VPD page).
pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;
/// MAXIMUM UNMAP LBA COUNT and MAXIMUM WRITE SAME LENGTH, in logical blocks.
pub const MAX_UNMAP_BLOCKS: u64 = 1 << 22;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: usize = 256;
/// Longest UNMAP parameter list accepted: header plus the maximum number of descriptors.
pub const MAX_UNMAP_PARAM_LEN: usize = 8 + 16 * MAX_UNMAP_DESCRIPTORS;
/// VENDOR IDENTIFICATION of standard INQUIRY data (8 bytes, ASCII, space padded).
pub const VENDOR_ID: &[u8; 8] = b"BLOCKD  ";

/// Operation codes (SPC-4 / SBC-3).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); service action 0x10 is READ CAPACITY(16).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
}

/// READ CAPACITY(16) service action of SERVICE ACTION IN(16).
const SAI_READ_CAPACITY_16: u8 = 0x10;

/// What a command needs done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// GOOD without data.
    Good,
    /// GOOD with these bytes as data-in (the engine truncates them to the buffer).
    Data(Vec<u8>),
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// Read `len` bytes at byte `offset` into the data-in buffer.
    Read { offset: u64, len: u64 },
    /// Write `len` bytes of the data-out buffer at `offset`; `fua`: durable before GOOD.
    Write { offset: u64, len: u64, fua: bool },
    /// Make completed writes durable (SYNCHRONIZE CACHE).
    Flush,
    /// UNMAP: the parameter list of `param_len` bytes is in the data-out buffer; parse it
    /// with [`parse_unmap`].
    Unmap { param_len: usize },
    /// WRITE SAME over `[offset, offset + len)`: deallocate (`unmap`) or zero. Unless
    /// `ndob`, the first block of the data-out buffer is the pattern and must be all zeroes
    /// (see [`check_write_same_block`]).
    WriteSame {
        offset: u64,
        len: u64,
        unmap: bool,
        ndob: bool,
    },
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

/// CDB length by group code (SPC-4 §4.2.5.1); `None` for vendor-specific/reserved groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Checks `[lba, lba + blocks)` against the capacity and returns the byte range.
fn lba_range(bdev: &Bdev, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
    let bs = u64::from(bdev.block_size());
    match lba.checked_add(blocks) {
        Some(end) if end <= bdev.num_blocks() => Ok((lba * bs, blocks * bs)),
        _ => Err(sense::LBA_OUT_OF_RANGE),
    }
}

/// Decodes and (for metadata commands) executes a CDB addressed to LUN 0 of a target
/// backed by `bdev`. `cdb` is the whole CDB area of the request (the driver's `cdb_size`
/// bytes); bytes past the command's own length are ignored.
pub fn decode(cdb: &[u8], bdev: &Bdev) -> Action {
    match decode_inner(cdb, bdev) {
        Ok(a) => a,
        Err(s) => Action::Check(s),
    }
}

fn decode_inner(cdb: &[u8], bdev: &Bdev) -> Result<Action, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(sense::INVALID_OPCODE);
    };
    let len = cdb_len(opcode).ok_or(sense::INVALID_OPCODE)?;
    if cdb.len() < len {
        return Err(sense::INVALID_FIELD_IN_CDB);
    }
    let c = &cdb[..len];
    let bs = u64::from(bdev.block_size());
    match opcode {
        op::TEST_UNIT_READY | op::START_STOP_UNIT => Ok(Action::Good),
        op::REQUEST_SENSE => {
            // DESC=1 asks for descriptor format, which blockd does not produce.
            if c[1] & 0x01 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let alloc = c[4] as usize;
            let mut d = sense::NO_SENSE.fixed().to_vec();
            d.truncate(alloc);
            Ok(Action::Data(d))
        }
        op::INQUIRY => inquiry(c, bdev),
        op::READ_CAPACITY_10 => {
            let last = bdev.num_blocks().saturating_sub(1).min(0xFFFF_FFFF) as u32;
            let mut d = Vec::with_capacity(8);
            d.extend_from_slice(&last.to_be_bytes());
            d.extend_from_slice(&bdev.block_size().to_be_bytes());
            Ok(Action::Data(d))
        }
        op::SERVICE_ACTION_IN_16 if c[1] & 0x1f == SAI_READ_CAPACITY_16 => {
            let alloc = be32(c, 10) as usize;
            let mut d = vec![0u8; 32];
            d[0..8].copy_from_slice(&bdev.num_blocks().saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&bdev.block_size().to_be_bytes());
            if bdev.backend().io_types().unmap {
                d[14] = 0x80; // LBPME
            }
            d.truncate(alloc);
            Ok(Action::Data(d))
        }
        op::SERVICE_ACTION_IN_16 => Err(sense::INVALID_FIELD_IN_CDB),
        op::READ_6 | op::WRITE_6 => {
            let lba = (u64::from(c[1] & 0x1f) << 16) | be16(c, 2);
            // SBC-3 §5.15: a TRANSFER LENGTH of 0 means 256 blocks in the 6-byte CDBs.
            let blocks = if c[4] == 0 { 256 } else { u64::from(c[4]) };
            rw(bdev, opcode == op::WRITE_6, lba, blocks, false)
        }
        op::READ_10 | op::WRITE_10 | op::READ_12 | op::WRITE_12 | op::READ_16 | op::WRITE_16 => {
            // RDPROTECT/WRPROTECT: no protection information on blockd LUNs.
            if c[1] & 0xe0 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let fua = c[1] & 0x08 != 0;
            let (lba, blocks) = match opcode {
                op::READ_10 | op::WRITE_10 => (be32(c, 2), be16(c, 7)),
                op::READ_12 | op::WRITE_12 => (be32(c, 2), be32(c, 6)),
                _ => (be64(c, 2), be32(c, 10)),
            };
            let write = matches!(opcode, op::WRITE_10 | op::WRITE_12 | op::WRITE_16);
            rw(bdev, write, lba, blocks, fua)
        }
        op::VERIFY_10 | op::VERIFY_16 => {
            // BYTCHK != 0 asks to compare with data-out: not supported.
            if c[1] & 0x06 != 0 || c[1] & 0xe0 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let (lba, blocks) = if opcode == op::VERIFY_10 {
                (be32(c, 2), be16(c, 7))
            } else {
                (be64(c, 2), be32(c, 10))
            };
            lba_range(bdev, lba, blocks)?;
            Ok(Action::Good)
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = if opcode == op::SYNCHRONIZE_CACHE_10 {
                (be32(c, 2), be16(c, 7))
            } else {
                (be64(c, 2), be32(c, 10))
            };
            lba_range(bdev, lba, blocks)?;
            Ok(Action::Flush)
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            // WRPROTECT, ANCHOR, PBDATA/LBDATA (obsolete) are not supported.
            if c[1] & 0xe0 != 0 || c[1] & 0x10 != 0 || c[1] & 0x06 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let unmap = c[1] & 0x08 != 0;
            let ndob = opcode == op::WRITE_SAME_16 && c[1] & 0x01 != 0;
            let (lba, blocks) = if opcode == op::WRITE_SAME_10 {
                (be32(c, 2), be16(c, 7))
            } else {
                (be64(c, 2), be32(c, 10))
            };
            // WSNZ=1 in the Block Limits page: 0 blocks is refused, not "to the end".
            if blocks == 0 || blocks > MAX_UNMAP_BLOCKS {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            if unmap && !bdev.backend().io_types().unmap {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let (offset, len) = lba_range(bdev, lba, blocks)?;
            writable(bdev)?;
            Ok(Action::WriteSame {
                offset,
                len,
                unmap,
                ndob,
            })
        }
        op::UNMAP => {
            if !bdev.backend().io_types().unmap {
                return Err(sense::INVALID_OPCODE);
            }
            // ANCHOR is not supported (ANC_SUP=0).
            if c[1] & 0x01 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let param_len = be16(c, 7) as usize;
            if param_len > MAX_UNMAP_PARAM_LEN {
                return Err(sense::PARAM_LIST_LENGTH_ERROR);
            }
            writable(bdev)?;
            Ok(Action::Unmap { param_len })
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode_sense(c, bdev),
        op::REPORT_LUNS => {
            let select = c[2];
            if select > 0x02 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            let alloc = be32(c, 6) as usize;
            // SPC-4 §6.33: an allocation length below 16 is an error.
            if alloc < 16 {
                return Err(sense::INVALID_FIELD_IN_CDB);
            }
            // One LUN (0); select 0x01 (well-known LUNs only) reports none.
            let luns: usize = if select == 0x01 { 0 } else { 1 };
            let mut d = vec![0u8; 8 + 8 * luns];
            d[0..4].copy_from_slice(&((8 * luns) as u32).to_be_bytes());
            d.truncate(alloc);
            Ok(Action::Data(d))
        }
        _ => {
            let _ = bs;
            Err(sense::INVALID_OPCODE)
        }
    }
}

fn rw(bdev: &Bdev, write: bool, lba: u64, blocks: u64, fua: bool) -> Result<Action, Sense> {
    let (offset, len) = lba_range(bdev, lba, blocks)?;
    if len == 0 {
        return Ok(Action::Good);
    }
    if len > MAX_TRANSFER_BYTES {
        return Err(sense::INVALID_FIELD_IN_CDB);
    }
    if write {
        writable(bdev)?;
    }
    Ok(if write {
        Action::Write { offset, len, fua }
    } else {
        Action::Read { offset, len }
    })
}

/// Refuses commands that would change a read-only bdev (SBC-4 §4.10: DATA PROTECT, WRITE
/// PROTECTED), after the CDB itself was found valid.
fn writable(bdev: &Bdev) -> Result<(), Sense> {
    if bdev.backend().read_only() {
        return Err(sense::WRITE_PROTECTED);
    }
    Ok(())
}

/// The 16-byte NAA IEEE Registered Extended designator (NAA 6) of a LUN, derived from the
/// bdev uuid: the uuid with its top nibble replaced by the NAA value (SPC-4 §7.8.6.6.5).
pub fn naa_id(bdev: &Bdev) -> [u8; 16] {
    let mut id = *bdev.uuid().as_bytes();
    id[0] = 0x60 | (id[0] & 0x0f);
    id
}

/// The unit serial number (VPD 0x80): the bdev uuid, 32 hex digits.
pub fn serial(bdev: &Bdev) -> String {
    bdev.uuid().simple().to_string()
}

fn pad(s: &[u8], n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.iter().copied().take(n).collect();
    v.resize(n, b' ');
    v
}

/// Supported VPD pages, in ascending order (SPC-4 §7.8.14).
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

fn inquiry(c: &[u8], bdev: &Bdev) -> Result<Action, Sense> {
    let evpd = c[1] & 0x01 != 0;
    // CMDDT (obsolete) is refused.
    if c[1] & 0x02 != 0 {
        return Err(sense::INVALID_FIELD_IN_CDB);
    }
    let page = c[2];
    let alloc = be16(c, 3) as usize;
    let mut d = if !evpd {
        if page != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB);
        }
        let mut d = vec![0u8; 36];
        d[0] = 0x00; // peripheral qualifier 0, direct-access block device
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (36 - 5) as u8;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(VENDOR_ID);
        d[16..32].copy_from_slice(&pad(bdev.backend().product_name().as_bytes(), 16));
        d[32..36].copy_from_slice(b"0001");
        d
    } else {
        vpd_page(page, bdev)?
    };
    d.truncate(alloc);
    Ok(Action::Data(d))
}

/// A VPD page with its 4-byte header.
fn vpd_page(page: u8, bdev: &Bdev) -> Result<Vec<u8>, Sense> {
    let mut body = Vec::new();
    match page {
        0x00 => body.extend_from_slice(&VPD_PAGES),
        0x80 => body.extend_from_slice(serial(bdev).as_bytes()),
        0x83 => {
            // NAA designator: binary code set, LU association, type 3 (NAA), 16 bytes.
            body.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            body.extend_from_slice(&naa_id(bdev));
            // T10 vendor ID designator: ASCII, LU association, type 1.
            let t10: Vec<u8> = VENDOR_ID
                .iter()
                .copied()
                .chain(serial(bdev).bytes())
                .collect();
            body.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            body.extend_from_slice(&t10);
        }
        0xB0 => {
            // Block Limits (SBC-3 §6.5.3), page length 0x3C.
            body.resize(0x3C, 0);
            let bs = u64::from(bdev.block_size());
            body[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
            let max_xfer = (MAX_TRANSFER_BYTES / bs) as u32;
            body[4..8].copy_from_slice(&max_xfer.to_be_bytes()); // MAXIMUM TRANSFER LENGTH
            body[8..12].copy_from_slice(&max_xfer.to_be_bytes()); // OPTIMAL TRANSFER LENGTH
            if bdev.backend().io_types().unmap {
                body[16..20].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
                body[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
                body[24..28].copy_from_slice(&1u32.to_be_bytes()); // OPTIMAL UNMAP GRANULARITY
            }
            body[32..40].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes()); // MAX WRITE SAME LENGTH
        }
        0xB1 => {
            // Block Device Characteristics (SBC-3 §6.5.2): non-rotating medium.
            body.resize(0x3C, 0);
            body[0..2].copy_from_slice(&1u16.to_be_bytes());
        }
        0xB2 => {
            // Logical Block Provisioning (SBC-3 §6.5.4).
            body.resize(4, 0);
            if bdev.backend().io_types().unmap {
                body[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                body[2] = 0x02; // thin provisioned
            }
        }
        _ => return Err(sense::INVALID_FIELD_IN_CDB),
    }
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(d)
}

/// Caching mode page (SBC-3 §6.4.5), 20 bytes; `changeable` = the changeable-values mask.
fn caching_page(changeable: bool) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if !changeable {
        p[2] = 0x04; // WCE: the backend may cache writes; SYNCHRONIZE CACHE makes them durable
    }
    p
}

/// Control mode page (SPC-4 §7.5.8), 12 bytes.
fn control_page(changeable: bool) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x0A;
    p[1] = 0x0A;
    if !changeable {
        p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        p[8] = 0xff; // BUSY TIMEOUT PERIOD: unlimited
        p[9] = 0xff;
    }
    p
}

fn mode_sense(c: &[u8], bdev: &Bdev) -> Result<Action, Sense> {
    let ten = c[0] == op::MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = c[2] >> 6;
    let page = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = if ten { be16(c, 7) } else { u64::from(c[4]) } as usize;
    if pc == 3 {
        return Err(sense::SAVING_PARAMS_NOT_SUPPORTED);
    }
    let changeable = pc == 1;
    let mut pages = Vec::new();
    match (page, subpage) {
        (0x08, 0) => pages.extend_from_slice(&caching_page(changeable)),
        (0x0A, 0) => pages.extend_from_slice(&control_page(changeable)),
        (0x3F, 0x00) | (0x3F, 0xFF) => {
            pages.extend_from_slice(&caching_page(changeable));
            pages.extend_from_slice(&control_page(changeable));
        }
        _ => return Err(sense::INVALID_FIELD_IN_CDB),
    }
    let mut desc = Vec::new();
    if !dbd {
        if llbaa {
            desc.extend_from_slice(&bdev.num_blocks().to_be_bytes());
            desc.extend_from_slice(&[0u8; 4]);
            desc.extend_from_slice(&bdev.block_size().to_be_bytes());
        } else {
            let n = bdev.num_blocks().min(0xFF_FFFF) as u32;
            desc.extend_from_slice(&n.to_be_bytes());
            desc[0] = 0; // density code
            desc.extend_from_slice(&bdev.block_size().to_be_bytes());
            desc[4] = 0;
        }
    }
    // Device-specific parameter (SBC-4 §6.5.1): DPOFUA (FUA honoured), and WP for a
    // read-only bdev, which makes sd mark the disk read-only.
    let dsp = 0x10 | if bdev.backend().read_only() { 0x80 } else { 0 };
    let mut d = Vec::new();
    if ten {
        let total = 8 + desc.len() + pages.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(u8::from(llbaa && !dbd));
        d.push(0);
        d.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + desc.len() + pages.len();
        d.push((total - 1) as u8);
        d.push(0);
        d.push(dsp);
        d.push(desc.len() as u8);
    }
    d.extend_from_slice(&desc);
    d.extend_from_slice(&pages);
    d.truncate(alloc);
    Ok(Action::Data(d))
}

/// Parses an UNMAP parameter list (SBC-3 §5.28.2) into byte ranges `(offset, len)`,
/// skipping zero-length descriptors. `params` is what the driver sent (at most the CDB's
/// PARAMETER LIST LENGTH bytes).
pub fn parse_unmap(params: &[u8], bdev: &Bdev, out: &mut Vec<(u64, u64)>) -> Result<(), Sense> {
    out.clear();
    if params.is_empty() {
        return Ok(());
    }
    if params.len() < 8 {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let data_len = be16(params, 0) as usize;
    let desc_len = be16(params, 2) as usize;
    // The lengths in the header must fit the list the driver sent.
    if data_len + 2 > params.len() || desc_len + 8 > params.len() || desc_len > data_len {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    if !desc_len.is_multiple_of(16) {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let count = desc_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS {
        return Err(sense::INVALID_FIELD_IN_PARAM_LIST);
    }
    let mut total = 0u64;
    for i in 0..count {
        let d = &params[8 + i * 16..8 + (i + 1) * 16];
        let lba = be64(d, 0);
        let blocks = be32(d, 8);
        if blocks == 0 {
            continue;
        }
        total = total.saturating_add(blocks);
        if total > MAX_UNMAP_BLOCKS {
            return Err(sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        out.push(lba_range(bdev, lba, blocks)?);
    }
    Ok(())
}

/// Checks the data block of WRITE SAME without NDOB: blockd only writes zeroes.
pub fn check_write_same_block(block: &[u8]) -> Result<(), Sense> {
    if block.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(sense::INVALID_FIELD_IN_CDB)
    }
}

/// The sense for a failed bdev operation of a command: ILLEGAL REQUEST for errors the
/// channel reports for out-of-range (`EINVAL`) or unsupported (`ENOTSUP`) operations,
/// MEDIUM ERROR (unrecovered read error / write error) for backend I/O failures.
pub fn io_error_sense(errno: i32, read: bool) -> Sense {
    match errno {
        libc::EINVAL => sense::LBA_OUT_OF_RANGE,
        libc::ENOTSUP => sense::INVALID_OPCODE,
        _ if read => sense::UNRECOVERED_READ_ERROR,
        _ => sense::WRITE_ERROR,
    }
}

#[cfg(test)]
mod tests;
