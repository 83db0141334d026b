//! SCSI CDB decoding and emulation (SPC-4, SBC-3) as blockd's vhost-user-scsi LUN does it,
//! on arbitrary CDBs and UNMAP parameter lists: no panic, and every I/O it decides on lies
//! inside the bdev and within the transfer limit.
#![no_main]

use std::sync::{Arc, OnceLock};

use blockd::bdev::malloc::{self, MallocOpts};
use blockd::bdev::null::{self, NullOpts};
use blockd::bdev::{Bdev, BdevRegistry};
use blockd::vhost::scsi::cdb::{self, Action, MAX_TRANSFER_BYTES, MAX_UNMAP_BLOCKS};
use libfuzzer_sys::fuzz_target;

/// A small malloc bdev (512-byte blocks) and a huge null one (4 KiB blocks, byte size near
/// the top of u64 arithmetic).
fn bdevs() -> &'static [Arc<Bdev>; 2] {
    static B: OnceLock<[Arc<Bdev>; 2]> = OnceLock::new();
    B.get_or_init(|| {
        let r = BdevRegistry::default();
        let m = malloc::create(
            &r,
            MallocOpts {
                name: Some("Malloc0".into()),
                uuid: None,
                num_blocks: 2048,
                block_size: 512,
            },
        )
        .expect("malloc bdev");
        let n = null::create(
            &r,
            NullOpts {
                name: "Null0".into(),
                uuid: None,
                num_blocks: u64::MAX / 4096,
                block_size: 4096,
            },
        )
        .expect("null bdev");
        [m, n]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let bdev = &bdevs()[usize::from(sel & 1)];
    let mut c = [0u8; 32];
    let n = rest.len().min(32);
    c[..n].copy_from_slice(&rest[..n]);
    let params = &rest[n..];
    let size = bdev.num_blocks() * u64::from(bdev.block_size());
    let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
    match cdb::decode(&c, bdev) {
        Action::Read { offset, len } | Action::Write { offset, len, .. } => {
            assert!(inside(offset, len), "{offset}+{len} beyond {size}");
            assert!(len <= MAX_TRANSFER_BYTES);
        }
        Action::WriteSame { offset, len, .. } => assert!(inside(offset, len)),
        Action::Unmap { param_len } => {
            let mut out = Vec::new();
            let list = &params[..param_len.min(params.len())];
            if cdb::parse_unmap(list, bdev, &mut out).is_ok() {
                let bs = u64::from(bdev.block_size());
                let mut total = 0u64;
                for &(offset, len) in &out {
                    assert!(inside(offset, len));
                    total += len / bs;
                }
                assert!(total <= MAX_UNMAP_BLOCKS);
            }
        }
        Action::Data(d) => assert!(d.len() <= 0x1_0000 + 8),
        Action::Good | Action::Check(_) | Action::Flush => {}
    }
});
