//! The guest's verified writers (tests/guest/init.sh `writers`): what their console lines
//! say (issued, acknowledged, failed, mismatched, finished) and whether the image holds
//! the last acknowledged write of every block. Include with
//! `#[path = "common/writers.rs"] mod writers;` after `#[path = "common/guest.rs"] mod guest;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::guest::GuestRun;

/// Where writer areas start on the data disk (init.sh: 1 MiB).
pub const AREA_START: u64 = 1 << 20;

/// What the writers reported so far.
#[derive(Debug, Default)]
pub struct WriterLog {
    /// Last sequence number issued, per writer.
    pub issued: BTreeMap<u32, u64>,
    /// Last sequence number acknowledged, per writer.
    pub acked: BTreeMap<u32, u64>,
    /// Acknowledged writes in all.
    pub acked_total: u64,
    /// The last acknowledged sequence number of each (writer, block).
    pub last_acked: BTreeMap<(u32, u64), u64>,
    /// `E` (write failed) and `M` (read back differs) lines.
    pub errors: Vec<String>,
    pub mismatches: Vec<String>,
    /// Writers that finished (`D`).
    pub done: BTreeMap<u32, u64>,
}

impl WriterLog {
    /// Parses every `BLOCKD-W` line of `console` (kernel messages may share a line).
    pub fn parse(console: &str) -> Self {
        let mut log = WriterLog::default();
        for line in console.lines() {
            let Some(i) = line.find("BLOCKD-W ") else {
                continue;
            };
            let rest = line[i + "BLOCKD-W ".len()..].trim();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok());
            match (f.first().copied(), num(1), num(2), num(3)) {
                (Some("I"), Some(w), Some(seq), Some(_)) => {
                    log.issued.insert(w as u32, seq);
                }
                (Some("A"), Some(w), Some(seq), Some(blk)) => {
                    log.acked.insert(w as u32, seq);
                    log.acked_total += 1;
                    log.last_acked.insert((w as u32, blk), seq);
                }
                (Some("E"), ..) => log.errors.push(rest.to_string()),
                (Some("M"), ..) => log.mismatches.push(rest.to_string()),
                (Some("D"), Some(w), Some(seq), _) => {
                    log.done.insert(w as u32, seq);
                }
                _ => {}
            }
        }
        log
    }

    /// Writes issued and not acknowledged (at most one per writer).
    pub fn outstanding(&self) -> usize {
        self.issued
            .iter()
            .filter(|(w, s)| self.acked.get(w) != Some(s))
            .count()
    }
}

/// The bytes writer `w` writes as sequence `seq` into its block `blk` of `bs` bytes.
pub fn block(w: u32, seq: u64, blk: u64, bs: u64) -> Vec<u8> {
    let line = format!("w{w:02x} s{seq:08x} b{blk:08x}        \n");
    assert_eq!(line.len(), 32);
    line.as_bytes().repeat((bs / 32) as usize)
}

/// Offset of block `blk` of writer `w` on the data disk.
pub fn block_offset(w: u32, blk: u64, bs: u64, blocks: u64) -> u64 {
    AREA_START + (u64::from(w) * blocks + blk) * bs
}

/// Checks that `image` holds the last acknowledged write of every block; returns the
/// blocks that differ, described.
pub fn verify_image(log: &WriterLog, image: &Path, bs: u64, blocks: u64) -> Vec<String> {
    let data = std::fs::read(image).expect("reading the image");
    let mut bad = Vec::new();
    for (&(w, blk), &seq) in &log.last_acked {
        let off = block_offset(w, blk, bs, blocks) as usize;
        let want = block(w, seq, blk, bs);
        let got = data.get(off..off + want.len()).unwrap_or_default();
        if got != want.as_slice() {
            let first = String::from_utf8_lossy(&got[..got.len().min(31)]).into_owned();
            bad.push(format!(
                "writer {w} block {blk} (offset {off}): want seq {seq:#x}, image has {first:?}"
            ));
        }
    }
    bad
}

/// The writers' log in `console`; panics at once when they reported an error or a mismatch
/// (`what` says when).
pub fn checked(console: &str, what: &str) -> WriterLog {
    let log = WriterLog::parse(console);
    if !log.errors.is_empty() || !log.mismatches.is_empty() {
        panic!(
            "{what}: the guest saw I/O errors {:?} and read-back mismatches {:?}\n{console}",
            log.errors, log.mismatches
        );
    }
    log
}

/// Waits (at most `timeout`) until the guest has acknowledged more than `after` writes in
/// all; `console` reads the serial log(s) so far.
pub fn wait_acked(
    console: impl Fn() -> String,
    after: u64,
    timeout: Duration,
    what: &str,
) -> WriterLog {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console();
        let log = checked(&text, what);
        if log.acked_total > after {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no write acknowledged within {timeout:?} (acked {after}, outstanding {})\n{text}",
            log.outstanding(),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checks after the host stopped the writers (`run`: the guest's last QEMU; `log`: the
/// writers' whole log): the guest finished, saw no I/O error, no `not a head`, no
/// mismatch, and all `writers` writers finished with nothing left unacknowledged.
pub fn assert_finished(run: &GuestRun, log: &WriterLog, writers: usize) {
    run.assert_ok();
    let diag = || run.diagnostics();
    assert_eq!(run.require("dmesg.io_errors"), "0", "{}", diag());
    assert_eq!(run.require("dmesg.not_a_head"), "0", "{}", diag());
    assert_eq!(log.errors, Vec::<String>::new(), "write errors\n{}", diag());
    assert_eq!(log.mismatches, Vec::<String>::new(), "read-back mismatches");
    assert_eq!(
        run.require("writers.done"),
        writers.to_string(),
        "hung writers\n{}",
        diag()
    );
    assert_eq!(log.outstanding(), 0, "writes never acknowledged");
    assert_eq!(log.done.len(), writers);
}

/// Panics unless `image` holds the last acknowledged write of every block in `log`.
pub fn assert_image(log: &WriterLog, image: &Path, bs: u64, blocks: u64) {
    let bad = verify_image(log, image, bs, blocks);
    assert!(
        bad.is_empty(),
        "{} of {} blocks lost their last acknowledged write:\n{}",
        bad.len(),
        log.last_acked.len(),
        bad.join("\n")
    );
}
