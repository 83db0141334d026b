//! qemu-storage-daemon (QSD) as a vhost-user-blk backend: the reference peer the guest
//! tests compare blockd with. Include with `#[path = "common/qsd.rs"] mod qsd;`.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One QSD export: an image file served as vhost-user-blk.
#[derive(Debug, Clone)]
pub struct Export {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub writable: bool,
    pub num_queues: u16,
    /// More options of the `driver=file` blockdev, comma-separated (e.g. `discard=unmap`,
    /// or `cache.direct=on,locking=off` for two daemons sharing an image in a migration:
    /// QSD locks the files it opens by default).
    pub file_opts: String,
    /// Reads and writes together limited to this many bytes/s (a `throttle` node over the
    /// file): requests wait in QSD.
    pub total_bps: Option<u64>,
}

impl Export {
    /// A writable export of `image` on `socket` with `num_queues` queues and `file_opts`.
    pub fn new(
        image: impl Into<PathBuf>,
        socket: impl Into<PathBuf>,
        num_queues: u16,
        file_opts: &str,
    ) -> Self {
        Self {
            image: image.into(),
            socket: socket.into(),
            writable: true,
            num_queues,
            file_opts: file_opts.to_string(),
            total_bps: None,
        }
    }
}

/// A running qemu-storage-daemon. Each export's socket is bound and listening *before*
/// QSD starts (QSD gets the fd: `addr.type=fd`), so QEMU can connect at once: no wait
/// for readiness. Killed on drop.
pub struct Qsd {
    child: Child,
}

impl Qsd {
    pub fn start(exports: &[Export]) -> Qsd {
        let mut args: Vec<String> = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        for (i, e) in exports.iter().enumerate() {
            let listener = UnixListener::bind(&e.socket).expect("binding vhost-user socket");
            // Park the fd high so the dup2 to 3+i in the child cannot clobber another one.
            // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd or -1.
            let high = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) };
            assert!(high >= 0, "dup of listener failed");
            // SAFETY: `high` is a fresh fd we own.
            fds.push(unsafe { OwnedFd::from_raw_fd(high) });
            let opts = if e.file_opts.is_empty() {
                String::new()
            } else {
                format!(",{}", e.file_opts)
            };
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,filename={},node-name=n{i}{opts}",
                e.image.display()
            ));
            let mut node = format!("n{i}");
            if let Some(bps) = e.total_bps {
                args.push("--object".into());
                args.push(format!("throttle-group,id=tg{i},x-bps-total={bps}"));
                args.push("--blockdev".into());
                args.push(format!(
                    "driver=throttle,node-name=t{i},throttle-group=tg{i},file=n{i}"
                ));
                node = format!("t{i}");
            }
            args.push("--export".into());
            args.push(format!(
                "type=vhost-user-blk,id=e{i},node-name={node},addr.type=fd,addr.str={},writable={},num-queues={}",
                3 + i,
                if e.writable { "on" } else { "off" },
                e.num_queues
            ));
        }
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(&args).stdin(Stdio::null());
        // SAFETY: only dup2 (async-signal-safe) between fork and exec; dup2 clears
        // FD_CLOEXEC on the target, so QSD inherits exactly fds 3..3+n.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting qemu-storage-daemon");
        Qsd { child }
    }

    /// True while QSD has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
