//! Boots the test guest (tests/guest: Debian kernel + busybox initramfs) in QEMU against
//! vhost-user sockets and collects what the guest reported.
//!
//! QEMU is the vhost-user *client* (vhost-user.rst, "Introduction"): the backend must be
//! listening on every socket before [`Guest::boot`]. The guest's `/init`
//! (tests/guest/init.sh) runs the scenario given as `blockd.scenario=`, prints
//! `BLOCKD-RESULT key=value` lines and a final `BLOCKD-DONE ok|fail reason` on the serial
//! console, and powers off. QEMU runs under a hard deadline; the serial log is read after
//! QEMU exited. [`Guest::spawn`] returns while the guest runs, for scenarios in which the
//! host acts (resize, hot-plug): the guest prints `BLOCKD-WAIT <what>` and polls for the
//! change, the test waits for that line ([`RunningGuest::wait_for`]), acts, and finishes. Include with `#[path = "common/guest.rs"] mod guest;`.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Repository root (the guest image cache lives in `<repo>/.cache/guest`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bootable guest: uncompressed ELF kernel (PVH entry) and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (first use) or finds (cached) the guest image with tests/guest/build-guest.sh.
/// The script itself takes a flock, so parallel test binaries share one build.
pub fn image() -> Result<&'static GuestImage> {
    static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_image().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("guest image: {e}"))
}

fn build_image() -> Result<GuestImage> {
    let root = repo_root();
    let script = root.join("tests/guest/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(root.join(".cache/guest"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("{} printed no {name} line", script.display()))
    };
    Ok(GuestImage {
        kernel: field("KERNEL=")?,
        initrd: field("INITRD=")?,
    })
}

/// Which QEMU vhost-user device a disk is attached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// `vhost-user-blk-pci`: the guest sees `/dev/vdX`.
    VhostUserBlk,
    /// `vhost-user-scsi-pci`: the guest sees `/dev/sdX`.
    VhostUserScsi,
}

/// One disk: a vhost-user socket the backend listens on.
#[derive(Debug, Clone)]
pub struct Disk {
    pub kind: DiskKind,
    pub socket: PathBuf,
    /// Virtqueues requested by QEMU; QEMU refuses to start if the backend offers fewer.
    pub num_queues: u16,
    /// QEMU reconnects to the socket this long after the backend went away (`-chardev
    /// socket,reconnect-ms=N`); the backend must then be listening when QEMU starts.
    pub reconnect_ms: Option<u32>,
    /// QEMU offers packed virtqueues (`packed=on`, virtio 1.2 §2.8); they are used when
    /// the backend offers them too.
    pub packed: bool,
}

impl Disk {
    /// A vhost-user-blk disk.
    pub fn blk(socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        Self {
            kind: DiskKind::VhostUserBlk,
            socket: socket.into(),
            num_queues,
            reconnect_ms: None,
            packed: false,
        }
    }

    /// A vhost-user-scsi disk.
    pub fn scsi(socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        Self {
            kind: DiskKind::VhostUserScsi,
            socket: socket.into(),
            num_queues,
            reconnect_ms: None,
            packed: false,
        }
    }

    /// QEMU offers packed virtqueues (`packed=on`).
    pub fn packed(mut self) -> Self {
        self.packed = true;
        self
    }

    /// QEMU reconnects `ms` after the backend went away (a backend restart).
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }
}

/// What to boot: scenario, disks, vCPUs, and the hard deadline.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    pub scenario: String,
    /// `blockd.arg=KEY=VALUE` words on the kernel command line.
    pub args: Vec<(String, String)>,
    pub disks: Vec<Disk>,
    pub smp: u32,
    pub mem_mib: u32,
    /// Guest RAM from this file (`memory-backend-file`, e.g. a plain file or one on
    /// hugetlbfs) instead of a memfd.
    pub mem_path: Option<PathBuf>,
    /// QEMU is killed after this long (a boot takes 2.5–4 s under TCG on an idle host).
    pub timeout: Duration,
    /// Where the serial log and QEMU's stderr go.
    pub workdir: PathBuf,
    /// QEMU binary (env `BLOCKD_QEMU` overrides the default `qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// More QEMU arguments, after the disks (e.g. a QEMU-internal control disk).
    pub qemu_args: Vec<String>,
}

impl GuestOpts {
    /// Defaults: 1 vCPU, 512 MiB, 60 s deadline (generous: the host's cores are shared).
    pub fn new(scenario: &str, workdir: impl Into<PathBuf>) -> Self {
        Self {
            scenario: scenario.to_string(),
            args: Vec::new(),
            disks: Vec::new(),
            smp: 1,
            mem_mib: 512,
            mem_path: None,
            timeout: Duration::from_secs(60),
            workdir: workdir.into(),
            qemu: std::env::var_os("BLOCKD_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            qemu_args: Vec::new(),
        }
    }

    /// Appends `args` to QEMU's command line.
    pub fn qemu_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Guest RAM from a file at `path` (shared, so the backend can map it).
    pub fn mem_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.mem_path = Some(path.into());
        self
    }

    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    pub fn arg(mut self, key: &str, value: &str) -> Self {
        self.args.push((key.to_string(), value.to_string()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn console_path(&self) -> PathBuf {
        self.workdir.join(format!("console-{}.log", self.scenario))
    }

    fn stderr_path(&self) -> PathBuf {
        self.workdir.join(format!("qemu-{}.stderr", self.scenario))
    }
}

/// The guest's verdict: `BLOCKD-DONE ok` or `BLOCKD-DONE fail <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Ok,
    Fail(String),
}

/// Everything one boot produced.
#[derive(Debug)]
pub struct GuestRun {
    /// QEMU's argv (argv[0] first).
    pub argv: Vec<String>,
    /// `argv` as one shell-quoted line, ready to paste.
    pub command_line: String,
    /// None if QEMU was killed at the deadline.
    pub exit: Option<ExitStatus>,
    pub elapsed: Duration,
    pub console: String,
    pub qemu_stderr: String,
    /// `BLOCKD-RESULT` keys and values (a repeated key keeps the last value).
    pub results: BTreeMap<String, String>,
    pub done: Option<Done>,
}

impl GuestRun {
    /// The value the guest reported for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// The value for `key`; panics with the whole console log if missing.
    pub fn require(&self, key: &str) -> &str {
        match self.get(key) {
            Some(v) => v,
            None => panic!("guest reported no {key}\n{}", self.diagnostics()),
        }
    }

    /// `key` parsed as an integer; panics with the console log if missing or malformed.
    pub fn require_u64(&self, key: &str) -> u64 {
        let v = self.require(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number\n{}", self.diagnostics()))
    }

    /// The region `<disk>.region.<tag>=OFFSET+LENGTH` the guest wrote with `tag`.
    pub fn region(&self, disk: &str, tag: &str) -> (u64, u64) {
        let key = format!("{disk}.region.{tag}");
        let v = self.require(&key);
        let parsed = v
            .split_once('+')
            .and_then(|(o, l)| Some((o.parse().ok()?, l.parse().ok()?)));
        parsed.unwrap_or_else(|| panic!("{key}={v} is not OFFSET+LENGTH"))
    }

    /// Panics (with the console log, QEMU's stderr and the command line) unless QEMU exited
    /// by itself and the guest said `BLOCKD-DONE ok`.
    pub fn assert_ok(&self) {
        if self.exit.is_none() || self.done != Some(Done::Ok) {
            panic!("guest run failed: {:?}\n{}", self.done, self.diagnostics());
        }
    }

    /// Command line, exit, timing, console and stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "qemu: {}\nexit: {:?} after {:.1?}\n--- console ---\n{}\n--- qemu stderr ---\n{}",
            self.command_line, self.exit, self.elapsed, self.console, self.qemu_stderr
        )
    }
}

/// Runs QEMU with the test guest.
pub struct Guest;

impl Guest {
    /// QEMU's argv for `opts`: TCG (KVM is unavailable on the test machines), q35 with a
    /// shared memfd memory backend (a vhost-user backend must map guest RAM:
    /// `share=on`), one chardev + vhost-user device per disk, direct kernel boot.
    pub fn argv(opts: &GuestOpts, image: &GuestImage) -> Vec<String> {
        let mem = format!("{}M", opts.mem_mib);
        let mut a: Vec<String> = vec![
            opts.qemu.display().to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-accel".into(),
            "tcg".into(),
            "-smp".into(),
            opts.smp.to_string(),
            "-m".into(),
            mem.clone(),
            "-object".into(),
            match &opts.mem_path {
                None => format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                Some(p) => format!(
                    "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                    p.display()
                ),
            },
        ];
        for (i, d) in opts.disks.iter().enumerate() {
            // The two devices spell the queue-count property differently (QEMU 10).
            let (dev, queues) = match d.kind {
                DiskKind::VhostUserBlk => ("vhost-user-blk-pci", "num-queues"),
                DiskKind::VhostUserScsi => ("vhost-user-scsi-pci", "num_queues"),
            };
            a.push("-chardev".into());
            let reconnect = d
                .reconnect_ms
                .map(|ms| format!(",reconnect-ms={ms}"))
                .unwrap_or_default();
            a.push(format!(
                "socket,id=char{i},path={}{reconnect}",
                d.socket.display()
            ));
            a.push("-device".into());
            let packed = if d.packed { ",packed=on" } else { "" };
            a.push(format!(
                "{dev},id=disk{i},chardev=char{i},{queues}={}{packed}",
                d.num_queues
            ));
        }
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 blockd.scenario={}",
            opts.scenario
        );
        for (k, v) in &opts.args {
            append.push_str(&format!(" blockd.arg={k}={v}"));
        }
        a.extend(opts.qemu_args.iter().cloned());
        a.extend([
            "-kernel".into(),
            image.kernel.display().to_string(),
            "-initrd".into(),
            image.initrd.display().to_string(),
            "-append".into(),
            append,
            "-serial".into(),
            format!("file:{}", opts.console_path().display()),
            "-no-reboot".into(),
        ]);
        a
    }

    /// Boots the guest, waits for QEMU to exit (killing it at `opts.timeout`), and parses
    /// the serial log. Errors only if QEMU cannot be started or the logs cannot be read;
    /// the guest's verdict is in [`GuestRun::done`] (see [`GuestRun::assert_ok`]).
    ///
    /// A guest that printed nothing at all by the deadline never reached its init: the
    /// emulated boot stalled on the starved host (seen once in CI, with qemu-storage-daemon
    /// as the target, while a second TCG guest ran beside it). That is no verdict on the
    /// device, so such a guest is booted once more, saying so on stderr; a device that
    /// hangs the boot hangs the second one too, and the test fails.
    pub fn boot(opts: &GuestOpts) -> Result<GuestRun> {
        let run = Self::spawn(opts)?.finish(opts.timeout)?;
        if run.exit.is_none() && run.console.trim().is_empty() {
            eprintln!(
                "guest printed nothing in {:?}: booting it once more\n{}",
                opts.timeout, run.qemu_stderr
            );
            return Self::spawn(opts)?.finish(opts.timeout);
        }
        Ok(run)
    }

    /// [`Guest::spawn`], then [`RunningGuest::wait_for`] the guest's first `marker`; returns
    /// the guest and the rest of the marker's line. A guest that printed nothing at all by
    /// then never reached its init (the emulated boot stalled on the starved host, as in
    /// [`Guest::boot`]): it is killed and booted once more, saying so on stderr.
    pub fn spawn_until(
        opts: &GuestOpts,
        marker: &str,
        timeout: Duration,
    ) -> Result<(RunningGuest, String)> {
        let mut g = Self::spawn(opts)?;
        match g.wait_for(marker, timeout) {
            Ok(rest) => Ok((g, rest)),
            Err(e) if g.printed_nothing() => {
                eprintln!("guest printed nothing in {timeout:?}: booting it once more ({e:#})");
                drop(g);
                let mut g = Self::spawn(opts)?;
                let rest = g.wait_for(marker, timeout)?;
                Ok((g, rest))
            }
            Err(e) => Err(e),
        }
    }

    /// Starts QEMU and returns at once: the test acts on the host while the guest runs
    /// (the guest announces with `BLOCKD-WAIT <what>` that it waits for the host, see
    /// [`RunningGuest::wait_for`]); [`RunningGuest::finish`] collects the run.
    pub fn spawn(opts: &GuestOpts) -> Result<RunningGuest> {
        let image = image()?;
        std::fs::create_dir_all(&opts.workdir)
            .with_context(|| format!("creating {}", opts.workdir.display()))?;
        let argv = Self::argv(opts, image);
        let command_line = shell_join(&argv);
        let console_path = opts.console_path();
        // QEMU appends to an existing file: start from an empty log.
        File::create(&console_path).context("creating the console log")?;
        let stderr = File::create(opts.stderr_path()).context("creating QEMU stderr log")?;
        let start = Instant::now();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        Ok(RunningGuest {
            argv,
            command_line,
            child: Some(child),
            start,
            console_path,
            stderr_path: opts.stderr_path(),
            seen: 0,
        })
    }
}

/// A guest whose QEMU is running (from [`Guest::spawn`]); QEMU is killed when dropped
/// unfinished.
pub struct RunningGuest {
    argv: Vec<String>,
    command_line: String,
    child: Option<Child>,
    start: Instant,
    console_path: PathBuf,
    stderr_path: PathBuf,
    /// Console bytes already consumed by [`RunningGuest::wait_for`].
    seen: usize,
}

/// How often [`RunningGuest::wait_for`] looks at the growing serial log.
const CONSOLE_POLL: Duration = Duration::from_millis(20);

impl RunningGuest {
    /// Whether the guest has not written a single byte to its console yet.
    pub fn printed_nothing(&self) -> bool {
        std::fs::read(&self.console_path).map_or(true, |l| l.iter().all(u8::is_ascii_whitespace))
    }

    /// The QEMU command line.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Waits until the serial log has a complete line containing `marker` (after what
    /// earlier calls consumed) and returns the rest of that line after the marker. Fails
    /// at `timeout`, when QEMU exits or the guest says `BLOCKD-DONE` first, with the log.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read(&self.console_path).unwrap_or_default();
            let fresh = log.get(self.seen..).unwrap_or_default();
            // Only complete lines: the guest may be in the middle of printing one.
            let complete = fresh.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let mut off = 0;
            for line in fresh[..complete].split_inclusive(|&b| b == b'\n') {
                off += line.len();
                let text = String::from_utf8_lossy(line);
                if let Some(i) = text.find(marker) {
                    self.seen += off;
                    return Ok(text[i + marker.len()..].trim().to_string());
                }
                if text.contains("BLOCKD-DONE ") {
                    bail!(
                        "guest finished before {marker:?}: {}\n{}",
                        text.trim(),
                        self.log_tail()
                    );
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("QEMU exited ({st}) before {marker:?}\n{}", self.log_tail());
            }
            if Instant::now() >= deadline {
                bail!("no {marker:?} within {timeout:?}\n{}", self.log_tail());
            }
            std::thread::sleep(CONSOLE_POLL);
        }
    }

    /// The serial log so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console_path)
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn log_tail(&self) -> String {
        format!(
            "qemu: {}\n--- console ---\n{}\n--- qemu stderr ---\n{}",
            self.command_line,
            read_lossy(&self.console_path),
            read_lossy(&self.stderr_path)
        )
    }

    /// Waits (at most `timeout`) for QEMU to exit, killing it then, and parses the log.
    pub fn finish(mut self, timeout: Duration) -> Result<GuestRun> {
        let mut child = self.child.take().context("guest already finished")?;
        let exit = match wait_deadline(&mut child, timeout) {
            Ok(Some(status)) => Some(status),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                other.context("waiting for QEMU")?;
                None
            }
        };
        let elapsed = self.start.elapsed();
        let console = read_lossy(&self.console_path);
        let qemu_stderr = read_lossy(&self.stderr_path);
        let (results, done) = parse_markers(&console);
        Ok(GuestRun {
            argv: std::mem::take(&mut self.argv),
            command_line: std::mem::take(&mut self.command_line),
            exit,
            elapsed,
            console,
            qemu_stderr,
            results,
            done,
        })
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Waits for `child` until `timeout`: Ok(None) means the deadline passed. Sleeps in
/// poll(2) on a pidfd, which becomes readable when the process exits.
fn wait_deadline(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    // SAFETY: on success `raw` is a fresh fd owned by nobody else.
    let pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as i32) });
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        match &pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
            // Kernels without pidfd (< 5.3): poll the child with a short interval.
            None => std::thread::sleep(Duration::from_millis(ms.min(20) as u64)),
        }
    }
}

/// Collects `BLOCKD-RESULT key=value` and the `BLOCKD-DONE` verdict. Markers are found
/// anywhere in a line, since kernel messages may share the console.
pub fn parse_markers(console: &str) -> (BTreeMap<String, String>, Option<Done>) {
    let mut results = BTreeMap::new();
    let mut done = None;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(i) = line.find("BLOCKD-RESULT ") {
            if let Some((k, v)) = line[i + "BLOCKD-RESULT ".len()..].split_once('=') {
                results.insert(k.trim().to_string(), v.trim().to_string());
            }
        } else if let Some(i) = line.find("BLOCKD-DONE ") {
            let rest = line[i + "BLOCKD-DONE ".len()..].trim();
            done = Some(match rest.strip_prefix("fail") {
                Some(reason) => Done::Fail(reason.trim().to_string()),
                None if rest == "ok" => Done::Ok,
                None => Done::Fail(format!("unparsable verdict: {rest}")),
            });
        }
    }
    (results, done)
}

/// The guest's deterministic pattern (tests/guest/init.sh `pattern`): sector `lba`
/// (512-byte units, absolute on the disk) holds `printf '%-8.8s %016x%486s\n' TAG LBA ''`.
pub fn pattern(tag: &str, first_lba: u64, sectors: u64) -> Vec<u8> {
    let tag: String = tag.chars().take(8).collect();
    let mut out = Vec::with_capacity(sectors as usize * 512);
    for lba in first_lba..first_lba + sectors {
        out.extend_from_slice(format!("{tag:<8} {lba:016x}{:486}\n", "").as_bytes());
    }
    out
}

/// A sparse image file of `size` bytes in `dir` (the backend's disk).
pub fn sparse_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("creating image");
    p
}

/// Writes the first MiB of `image` with [`pattern`]`("host", ...)`, the data a read-only
/// disk must serve unchanged, and makes the file `size` bytes long (sparse beyond).
/// Returns the bytes written.
pub fn write_host_pattern(image: &Path, size: u64) -> Vec<u8> {
    let host = pattern("host", 0, (1 << 20) / 512);
    std::fs::write(image, &host)
        .and_then(|_| File::options().write(true).open(image))
        .and_then(|f| f.set_len(size))
        .expect("writing the host pattern");
    host
}

/// The hex SHA-256 of `data`, as the guest's `sha256sum` prints it.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    io::Write::write_all(child.stdin.as_mut().expect("sha256sum stdin"), data)
        .expect("feeding sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Reads `len` bytes at `offset` of a host file (the backend's image).
pub fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    Ok(buf)
}

/// Checks on the host that the guest's `tag` region of `disk` landed in `image`.
pub fn assert_region_in_file(run: &GuestRun, disk: &str, tag: &str, image: &Path) {
    let (off, len) = run.region(disk, tag);
    assert_eq!(off % 512, 0, "{disk}.region.{tag} not sector aligned");
    let got = read_at(image, off, len).expect("reading backend image");
    let want = pattern(tag, off / 512, len / 512);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{disk} region {tag} differs in {} at byte {} (sector {}):\n got {:?}\nwant {:?}",
            image.display(),
            off + i as u64,
            (off + i as u64) / 512,
            String::from_utf8_lossy(&got[i / 512 * 512..][..40]),
            String::from_utf8_lossy(&want[i / 512 * 512..][..40]),
        );
    }
}

/// Quotes `argv` for a POSIX shell.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=,./:+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
