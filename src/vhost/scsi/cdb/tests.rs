//! Per-command tests of the SCSI emulation against a malloc bdev, with exact sense bytes.

use std::sync::Arc;

use super::*;
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::{Bdev, BdevRegistry};

const BLOCKS: u64 = 2048;

fn bdev(bs: u32) -> Arc<Bdev> {
    let r = BdevRegistry::default();
    malloc::create(
        &r,
        MallocOpts {
            name: Some("Malloc0".into()),
            uuid: Some(uuid::Uuid::parse_str("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9").unwrap()),
            num_blocks: BLOCKS,
            block_size: bs,
        },
    )
    .unwrap()
}

fn cdb(bytes: &[u8]) -> [u8; 32] {
    let mut c = [0u8; 32];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

fn data(a: Action) -> Vec<u8> {
    match a {
        Action::Data(d) => d,
        other => panic!("expected data, got {other:?}"),
    }
}

fn check(a: Action) -> [u8; 18] {
    match a {
        Action::Check(s) => s.fixed(),
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

const ILLEGAL_OPCODE: [u8; 18] = [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0];
const LBA_RANGE: [u8; 18] = [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0];
const BAD_FIELD: [u8; 18] = [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0];

#[test]
fn unknown_opcodes_are_illegal_requests() {
    let b = bdev(512);
    for opc in [0x04u8, 0x15, 0x55, 0xC0, 0xFF, 0x7F, 0x89] {
        assert_eq!(
            check(decode(&cdb(&[opc]), &b)),
            ILLEGAL_OPCODE,
            "opcode {opc:#x}"
        );
    }
    assert_eq!(check(decode(&[], &b)), ILLEGAL_OPCODE);
    // A CDB area shorter than the command.
    assert_eq!(check(decode(&[0x88, 0, 0], &b)), BAD_FIELD);
}

#[test]
fn test_unit_ready_start_stop() {
    let b = bdev(512);
    assert_eq!(decode(&cdb(&[0x00]), &b), Action::Good);
    assert_eq!(decode(&cdb(&[0x1B, 0, 0, 0, 1]), &b), Action::Good);
}

#[test]
fn standard_inquiry() {
    let b = bdev(512);
    let d = data(decode(&cdb(&[0x12, 0, 0, 0, 96]), &b));
    assert_eq!(d.len(), 36);
    assert_eq!(d[0], 0x00);
    assert_eq!(d[2], 0x06);
    assert_eq!(d[4] as usize, 36 - 5);
    assert_eq!(&d[8..16], b"BLOCKD  ");
    assert_eq!(&d[16..32], b"Malloc disk     ");
    // Truncated to the allocation length.
    assert_eq!(data(decode(&cdb(&[0x12, 0, 0, 0, 5]), &b)).len(), 5);
    // Page code without EVPD, CMDDT.
    assert_eq!(check(decode(&cdb(&[0x12, 0, 0x80, 0, 96]), &b)), BAD_FIELD);
    assert_eq!(check(decode(&cdb(&[0x12, 2, 0, 0, 96]), &b)), BAD_FIELD);
}

#[test]
fn vpd_pages() {
    let b = bdev(4096);
    let d = data(decode(&cdb(&[0x12, 1, 0x00, 0, 255]), &b));
    assert_eq!(d, vec![0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let d = data(decode(&cdb(&[0x12, 1, 0x80, 0, 255]), &b));
    assert_eq!(&d[4..], b"0a1b2c3d4e5f60718293a4b5c6d7e8f9");
    let d = data(decode(&cdb(&[0x12, 1, 0x83, 0, 255]), &b));
    assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 16]);
    assert_eq!(
        &d[8..24],
        &[
            0x6a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7,
            0xe8, 0xf9
        ]
    );
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
    let d = data(decode(&cdb(&[0x12, 1, 0xB0, 0, 255]), &b));
    assert_eq!(d.len(), 64);
    assert_eq!(
        u32::from_be_bytes(d[8..12].try_into().unwrap()),
        (32 << 20) / 4096
    );
    assert_eq!(u32::from_be_bytes(d[20..24].try_into().unwrap()), 1 << 22);
    assert_eq!(u32::from_be_bytes(d[24..28].try_into().unwrap()), 256);
    let d = data(decode(&cdb(&[0x12, 1, 0xB1, 0, 255]), &b));
    assert_eq!(&d[4..6], &[0, 1]);
    let d = data(decode(&cdb(&[0x12, 1, 0xB2, 0, 255]), &b));
    assert_eq!(d, vec![0, 0xB2, 0, 4, 0, 0xE0, 0x02, 0]);
    assert_eq!(check(decode(&cdb(&[0x12, 1, 0x81, 0, 255]), &b)), BAD_FIELD);
}

#[test]
fn read_capacity() {
    let b = bdev(4096);
    let d = data(decode(&cdb(&[0x25]), &b));
    assert_eq!(d, [0, 0, 0x07, 0xFF, 0, 0, 0x10, 0].to_vec());
    let d = data(decode(
        &cdb(&[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]),
        &b,
    ));
    assert_eq!(d.len(), 32);
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 4096);
    assert_eq!(d[14], 0x80, "LBPME");
    // Other service actions of SERVICE ACTION IN(16).
    assert_eq!(check(decode(&cdb(&[0x9E, 0x11]), &b)), BAD_FIELD);
}

#[test]
fn read_write_decoding_and_ranges() {
    let b = bdev(512);
    assert_eq!(
        decode(&cdb(&[0x28, 0, 0, 0, 0, 8, 0, 0, 4]), &b),
        Action::Read {
            offset: 8 * 512,
            len: 4 * 512
        }
    );
    assert_eq!(
        decode(&cdb(&[0x2A, 0x08, 0, 0, 0, 1, 0, 0, 1]), &b),
        Action::Write {
            offset: 512,
            len: 512,
            fua: true
        }
    );
    assert_eq!(
        decode(
            &cdb(&[0x88, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xFF, 0, 0, 0, 1]),
            &b
        ),
        Action::Read {
            offset: 2047 * 512,
            len: 512
        }
    );
    assert_eq!(
        decode(&cdb(&[0xAA, 0, 0, 0, 0, 2, 0, 0, 0, 3]), &b),
        Action::Write {
            offset: 1024,
            len: 1536,
            fua: false
        }
    );
    // READ(6): 21-bit LBA, length 0 means 256 blocks.
    assert_eq!(
        decode(&cdb(&[0x08, 0x00, 0x01, 0x00, 0]), &b),
        Action::Read {
            offset: 256 * 512,
            len: 256 * 512
        }
    );
    // Zero-length READ(10): nothing to do.
    assert_eq!(
        decode(&cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0]), &b),
        Action::Good
    );
    // Past the end, overflow of LBA + length.
    assert_eq!(
        check(decode(&cdb(&[0x28, 0, 0, 0, 0x07, 0xFF, 0, 0, 2]), &b)),
        LBA_RANGE
    );
    assert_eq!(
        check(decode(
            &cdb(&[0x88, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 2]),
            &b
        )),
        LBA_RANGE
    );
    // RDPROTECT set.
    assert_eq!(
        check(decode(&cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1]), &b)),
        BAD_FIELD
    );
}

#[test]
fn transfer_limit() {
    let r = BdevRegistry::default();
    let big = malloc::create(
        &r,
        MallocOpts {
            name: Some("Big".into()),
            uuid: None,
            num_blocks: 1 << 20,
            block_size: 512,
        },
    )
    .unwrap();
    let max = (MAX_TRANSFER_BYTES / 512) as u32;
    let ok = decode(
        &cdb(&[
            0xA8,
            0,
            0,
            0,
            0,
            0,
            (max >> 24) as u8,
            (max >> 16) as u8,
            (max >> 8) as u8,
            max as u8,
        ]),
        &big,
    );
    assert_eq!(
        ok,
        Action::Read {
            offset: 0,
            len: MAX_TRANSFER_BYTES
        }
    );
    let m = max + 1;
    let too = decode(
        &cdb(&[
            0xA8,
            0,
            0,
            0,
            0,
            0,
            (m >> 24) as u8,
            (m >> 16) as u8,
            (m >> 8) as u8,
            m as u8,
        ]),
        &big,
    );
    assert_eq!(check(too), BAD_FIELD);
}

#[test]
fn sync_cache_verify() {
    let b = bdev(512);
    assert_eq!(decode(&cdb(&[0x35]), &b), Action::Flush);
    assert_eq!(decode(&cdb(&[0x91]), &b), Action::Flush);
    assert_eq!(
        check(decode(&cdb(&[0x35, 0, 0, 0, 0x10, 0, 0, 0, 1]), &b)),
        LBA_RANGE
    );
    assert_eq!(
        decode(&cdb(&[0x2F, 0, 0, 0, 0, 0, 0, 0, 8]), &b),
        Action::Good
    );
    assert_eq!(
        check(decode(&cdb(&[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 8]), &b)),
        BAD_FIELD
    );
    assert_eq!(
        check(decode(
            &cdb(&[0x8F, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0, 0, 0, 1]),
            &b
        )),
        LBA_RANGE
    );
}

#[test]
fn write_same() {
    let b = bdev(512);
    assert_eq!(
        decode(&cdb(&[0x41, 0x08, 0, 0, 0, 4, 0, 0, 8]), &b),
        Action::WriteSame {
            offset: 2048,
            len: 4096,
            unmap: true,
            ndob: false
        }
    );
    assert_eq!(
        decode(&cdb(&[0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), &b),
        Action::WriteSame {
            offset: 0,
            len: 512,
            unmap: false,
            ndob: true
        }
    );
    // WSNZ: 0 blocks refused; out of range; ANCHOR; LBDATA.
    assert_eq!(
        check(decode(&cdb(&[0x41, 0x08, 0, 0, 0, 0, 0, 0, 0]), &b)),
        BAD_FIELD
    );
    assert_eq!(
        check(decode(&cdb(&[0x41, 0, 0, 0, 0x07, 0xFF, 0, 0, 2]), &b)),
        LBA_RANGE
    );
    assert_eq!(
        check(decode(&cdb(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1]), &b)),
        BAD_FIELD
    );
    assert_eq!(
        check(decode(&cdb(&[0x41, 0x02, 0, 0, 0, 0, 0, 0, 1]), &b)),
        BAD_FIELD
    );
    assert!(check_write_same_block(&[0; 512]).is_ok());
    let mut blk = [0u8; 512];
    blk[511] = 1;
    assert_eq!(check_write_same_block(&blk).unwrap_err().fixed(), BAD_FIELD);
}

fn unmap_params(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    for &(lba, n) in descs {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    let dl = (p.len() - 8) as u16;
    p[0..2].copy_from_slice(&(dl + 6).to_be_bytes());
    p[2..4].copy_from_slice(&dl.to_be_bytes());
    p
}

#[test]
fn unmap_cdb_and_parameter_list() {
    let b = bdev(512);
    assert_eq!(
        decode(&cdb(&[0x42, 0, 0, 0, 0, 0, 0, 0, 40]), &b),
        Action::Unmap { param_len: 40 }
    );
    assert_eq!(
        check(decode(&cdb(&[0x42, 1, 0, 0, 0, 0, 0, 0, 40]), &b)),
        BAD_FIELD
    );
    let too_long = (MAX_UNMAP_PARAM_LEN + 1) as u16;
    let c = cdb(&[
        0x42,
        0,
        0,
        0,
        0,
        0,
        0,
        (too_long >> 8) as u8,
        too_long as u8,
    ]);
    assert_eq!(
        check(decode(&c, &b)),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x1A, 0, 0, 0, 0, 0]
    );

    let mut out = Vec::new();
    parse_unmap(&unmap_params(&[(0, 8), (100, 0), (2040, 8)]), &b, &mut out).unwrap();
    assert_eq!(out, vec![(0, 4096), (2040 * 512, 4096)]);
    parse_unmap(&[], &b, &mut out).unwrap();
    assert!(out.is_empty());
    let e = |p: &[u8]| parse_unmap(p, &b, &mut Vec::new()).unwrap_err().fixed();
    // Shorter than the header; descriptor length beyond the list; not a multiple of 16.
    assert_eq!(
        e(&[0, 6, 0]),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x1A, 0, 0, 0, 0, 0]
    );
    let mut p = unmap_params(&[(0, 8)]);
    p[3] = 32;
    assert_eq!(e(&p)[12], 0x1A);
    let mut p = unmap_params(&[(0, 8)]);
    p[3] = 15;
    assert_eq!(e(&p)[12], 0x1A);
    // Out of range, overflowing LBA.
    assert_eq!(e(&unmap_params(&[(2041, 8)])), LBA_RANGE);
    assert_eq!(e(&unmap_params(&[(u64::MAX, 2)])), LBA_RANGE);
    // Too many blocks in total.
    let big = BdevRegistry::default();
    let bb = malloc::create(
        &big,
        MallocOpts {
            name: None,
            uuid: None,
            num_blocks: 1 << 24,
            block_size: 512,
        },
    )
    .unwrap();
    let p = unmap_params(&[(0, 1 << 22), (1 << 22, 1)]);
    assert_eq!(
        parse_unmap(&p, &bb, &mut out).unwrap_err().fixed()[12],
        0x26
    );
}

#[test]
fn mode_sense() {
    let b = bdev(512);
    // MODE SENSE(6), all pages, with block descriptor.
    let d = data(decode(&cdb(&[0x1A, 0, 0x3F, 0, 255]), &b));
    assert_eq!(d.len(), 4 + 8 + 20 + 12);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..12], &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
    assert_eq!(&d[12..15], &[0x08, 0x12, 0x04], "caching page with WCE");
    assert_eq!(&d[32..34], &[0x0A, 0x0A]);
    // Caching page only, DBD.
    let d = data(decode(&cdb(&[0x1A, 0x08, 0x08, 0, 255]), &b));
    assert_eq!(d.len(), 4 + 20);
    // MODE SENSE(10) with LLBAA.
    let d = data(decode(&cdb(&[0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 255]), &b));
    assert_eq!(d.len(), 8 + 16 + 12);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[4], 1);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), BLOCKS);
    // Changeable values: WCE not changeable.
    let d = data(decode(&cdb(&[0x1A, 0x08, 0x48, 0, 255]), &b));
    assert_eq!(d[4 + 2], 0);
    // Saved values, unknown page, bad subpage.
    assert_eq!(check(decode(&cdb(&[0x1A, 0, 0xC8, 0, 255]), &b))[12], 0x39);
    assert_eq!(check(decode(&cdb(&[0x1A, 0, 0x01, 0, 255]), &b)), BAD_FIELD);
    assert_eq!(check(decode(&cdb(&[0x1A, 0, 0x08, 1, 255]), &b)), BAD_FIELD);
    // Allocation length truncates.
    assert_eq!(data(decode(&cdb(&[0x1A, 0, 0x3F, 0, 4]), &b)).len(), 4);
}

#[test]
fn report_luns_and_request_sense() {
    let b = bdev(512);
    let d = data(decode(&cdb(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64]), &b));
    assert_eq!(d, vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        check(decode(&cdb(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15]), &b)),
        BAD_FIELD
    );
    assert_eq!(
        check(decode(&cdb(&[0xA0, 0, 3, 0, 0, 0, 0, 0, 0, 64]), &b)),
        BAD_FIELD
    );
    let d = data(decode(&cdb(&[0x03, 0, 0, 0, 252]), &b));
    assert_eq!(
        d,
        vec![0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(check(decode(&cdb(&[0x03, 1, 0, 0, 252]), &b)), BAD_FIELD);
}

#[test]
fn io_errors_map_to_sense() {
    assert_eq!(
        io_error_sense(libc::EIO, true).fixed()[2..14],
        [3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0]
    );
    assert_eq!(io_error_sense(libc::EIO, false).fixed()[12], 0x0C);
    assert_eq!(io_error_sense(libc::EINVAL, false).fixed(), LBA_RANGE);
}

/// Random CDBs never panic and always produce a well-formed action.
#[test]
fn random_cdbs_never_panic() {
    let b = bdev(512);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let opcodes = [
        0x00u8, 0x03, 0x08, 0x0A, 0x12, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x5A,
        0x88, 0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA,
    ];
    let mut out = Vec::new();
    for i in 0..200_000 {
        let mut c = [0u8; 32];
        for chunk in c.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        if i % 2 == 0 {
            c[0] = opcodes[(next() % opcodes.len() as u64) as usize];
        }
        let len = (next() % 33) as usize;
        match decode(&c[..len], &b) {
            Action::Read { offset, len } | Action::Write { offset, len, .. } => {
                assert!(offset + len <= b.size() && len <= MAX_TRANSFER_BYTES)
            }
            Action::WriteSame { offset, len, .. } => assert!(offset + len <= b.size()),
            Action::Data(d) => assert!(d.len() <= 65536),
            _ => {}
        }
        let p: Vec<u8> = (0..(next() % 80) as usize).map(|_| next() as u8).collect();
        if parse_unmap(&p, &b, &mut out).is_ok() {
            assert!(out.iter().all(|&(o, l)| o + l <= b.size()));
        }
    }
}

#[test]
fn read_only_lun_is_write_protected() {
    const WRITE_PROTECTED: [u8; 18] = [0x70, 0, 7, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0, 0, 0, 0, 0];
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(BLOCKS * 512).unwrap();
    let r = BdevRegistry::default();
    let ro = crate::bdev::aio::create(
        &r,
        &crate::bdev::aio::AioFiles::default(),
        crate::bdev::aio::AioOpts {
            filename: f.path().into(),
            name: "ro".into(),
            block_size: Some(512),
            readonly: true,
            fallocate: false,
            uuid: None,
        },
    )
    .unwrap();
    // MODE SENSE(6) and (10): WP (bit 7) beside DPOFUA in the device-specific parameter;
    // the read-write malloc LUN has only DPOFUA.
    assert_eq!(
        data(decode(&cdb(&[0x1A, 0x08, 0x08, 0, 255]), &ro))[2],
        0x90
    );
    assert_eq!(
        data(decode(&cdb(&[0x5A, 0x08, 0x08, 0, 0, 0, 0, 0, 255]), &ro))[3],
        0x90
    );
    assert_eq!(
        data(decode(&cdb(&[0x1A, 0x08, 0x08, 0, 255]), &bdev(512)))[2],
        0x10
    );
    // Writes of every size are refused with DATA PROTECT; reads and cache flushes are not.
    for w in [
        &[0x0A, 0, 0, 0, 1, 0][..],
        &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    ] {
        assert_eq!(check(decode(&cdb(w), &ro)), WRITE_PROTECTED, "{w:02x?}");
    }
    assert!(matches!(
        decode(&cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), &ro),
        Action::Read {
            offset: 0,
            len: 512
        }
    ));
    assert!(matches!(
        decode(&cdb(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), &ro),
        Action::Flush
    ));
    // An invalid CDB is still reported as such, not as write-protected.
    assert_eq!(
        check(decode(
            &cdb(&[0x2A, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0]),
            &ro
        )),
        LBA_RANGE
    );
}
