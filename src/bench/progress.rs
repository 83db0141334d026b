//! `--progress-file`: each queue's completed requests, published in a shared file mapping
//! while the benchmark runs, so that a harness can count the requests of a window inside a
//! run (bench/harness.py divides the kicks and interrupts it counts by them) without adding
//! a syscall to the client's I/O path: one relaxed store per batch of completions.

use std::fs::OpenOptions;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context, Result};

/// A `MAP_SHARED` mapping of the file: queue `i`'s count is the native-endian u64 at byte
/// `8 * i`.
pub struct Progress {
    base: NonNull<AtomicU64>,
    queues: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU64`s, and it stays mapped until the
// `Progress` is dropped, after every borrow of a slot has ended.
unsafe impl Send for Progress {}
// SAFETY: as above; atomics may be shared between threads.
unsafe impl Sync for Progress {}

impl Progress {
    /// Creates (or truncates) `path` with one zeroed u64 per queue and maps it.
    pub fn create(path: &Path, queues: usize) -> Result<Self> {
        if queues == 0 {
            bail!("--progress-file needs at least one queue");
        }
        let bytes = queues * std::mem::size_of::<u64>();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("--progress-file {}", path.display()))?;
        f.set_len(bytes as u64)
            .with_context(|| format!("--progress-file {}", path.display()))?;
        // SAFETY: a fresh shared mapping of `bytes` bytes of an open file we just sized to
        // that length; the kernel chooses the (page-aligned) address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mapping --progress-file {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        // The mapping keeps the file's pages; the descriptor may close now.
        let base = NonNull::new(p.cast::<AtomicU64>()).context("mmap returned null")?;
        Ok(Progress { base, queues })
    }

    /// Queue `i`'s counter (`i` below the number of queues).
    pub fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.queues, "progress slot {i} of {}", self.queues);
        // SAFETY: in bounds of the mapping (checked above), page-aligned base so every u64
        // is aligned, and the mapping lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(i) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, of this length; no slot borrow outlives
        // `self`.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.queues * std::mem::size_of::<u64>(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// What a harness reads from the file is what the queues stored, at queue i's offset.
    #[test]
    fn slots_are_the_files_u64s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress");
        std::fs::write(&path, [0xffu8; 64]).unwrap(); // truncated by create
        let p = Progress::create(&path, 3).unwrap();
        p.slot(0).store(7, Ordering::Relaxed);
        p.slot(2).store(u64::MAX - 1, Ordering::Relaxed);
        let bytes = std::fs::read(&path).unwrap();
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![7, 0, u64::MAX - 1]);
        assert!(Progress::create(&path, 0).is_err());
    }
}
