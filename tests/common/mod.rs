//! A real `blockd` process for integration tests.
//!
//! `Daemon::start()` runs the built binary with a private temporary socket directory and RPC
//! socket, waits (bounded) until the RPC socket accepts, and kills the daemon when dropped.
//! Its log (stderr) goes to a file in the temporary directory: `log()` reads it, and a daemon
//! that dies while starting panics with its log.
#![allow(dead_code)]

pub mod blk_client;
pub mod in_process;
pub mod secrets;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use blockd::cli::client::{ClientError, RpcClient};
use serde_json::Value;

/// How long a daemon may take to open its RPC socket, and to exit after SIGTERM.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the `blockd` binary under test.
pub fn blockd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockd")
}

/// Path of the `blockctl` binary under test.
pub fn blockctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockctl")
}

/// A running blockd; killed (SIGKILL) on drop unless stopped.
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket_dir: PathBuf,
    rpc_socket: PathBuf,
    log_path: PathBuf,
}

/// How a daemon failed to start: its exit status and log.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    pub log: String,
}

impl Daemon {
    /// `blockd -m 0x1` with fresh sockets.
    pub fn start() -> Daemon {
        Self::start_with(&["-m", "0x1"])
    }

    /// blockd with `args` plus `-S <tmp>/sockets -r <tmp>/blockd.sock` (unless `args` sets
    /// them); panics with the log if it does not come up.
    pub fn start_with(args: &[&str]) -> Daemon {
        match Self::try_start(args) {
            Ok(d) => d,
            Err(f) => panic!("blockd {args:?} failed to start ({}):\n{}", f.status, f.log),
        }
    }

    /// Like [`Daemon::start_with`], but returns the exit status and log of a daemon that
    /// exits instead of opening its RPC socket.
    pub fn try_start(args: &[&str]) -> Result<Daemon, StartFailure> {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket_dir = dir.path().join("sockets");
        std::fs::create_dir(&socket_dir).expect("socket dir");
        let rpc_socket = dir.path().join("blockd.sock");
        Self::spawn(dir, socket_dir, rpc_socket, args)
    }

    /// Starts blockd on an RPC socket chosen by the caller (e.g. another daemon's).
    pub fn try_start_at(rpc_socket: &Path, args: &[&str]) -> Result<Daemon, StartFailure> {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket_dir = dir.path().join("sockets");
        std::fs::create_dir(&socket_dir).expect("socket dir");
        Self::spawn(dir, socket_dir, rpc_socket.to_path_buf(), args)
    }

    fn spawn(
        dir: tempfile::TempDir,
        socket_dir: PathBuf,
        rpc_socket: PathBuf,
        args: &[&str],
    ) -> Result<Daemon, StartFailure> {
        let log_path = dir.path().join("blockd.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(blockd_bin());
        let has = |flags: &[&str]| args.iter().any(|a| flags.contains(a));
        if !has(&["-S", "--socket-dir"]) {
            cmd.arg("-S").arg(&socket_dir);
        }
        if !has(&["-r", "--rpc-socket"]) {
            cmd.arg("-r").arg(&rpc_socket);
        }
        if !has(&["-L", "--log-level"]) {
            cmd.args(["-L", "debug"]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn blockd");
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket_dir,
            rpc_socket,
            log_path,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = d.child_mut().try_wait().expect("try_wait") {
                d.child = None;
                return Err(StartFailure {
                    status,
                    log: d.log(),
                });
            }
            // Ready once it answers (not merely once the file exists: a stale file may), and
            // it is this daemon that answers (not another one on the same socket).
            if let Ok(mut c) = RpcClient::connect(&d.rpc_socket, Duration::from_secs(5)) {
                if peer_pid(c.stream()) == Some(d.pid()) && c.call("spdk_get_version", None).is_ok()
                {
                    return Ok(d);
                }
            }
            if Instant::now() > deadline {
                let log = d.log();
                panic!(
                    "blockd did not open {} within {START_TIMEOUT:?}:\n{log}",
                    d.rpc_socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already stopped")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon stopped").id() as i32
    }

    /// The `-S` directory (vhost-user sockets).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The `-r` socket.
    pub fn rpc_socket(&self) -> &Path {
        &self.rpc_socket
    }

    /// A private temporary directory that lives as long as the daemon (for backing files).
    pub fn tmp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A new connection to the RPC socket.
    pub fn client(&self) -> RpcClient {
        RpcClient::connect(&self.rpc_socket, Duration::from_secs(30)).expect("connect to blockd")
    }

    /// A raw stream to the RPC socket (for framing tests), with a read timeout.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.rpc_socket).expect("connect to blockd");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s
    }

    /// Calls `method` (`params` `Value::Null` = none) on a new connection: the result, or
    /// the JSON-RPC error's (code, message). Panics on transport failures.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let params = (!params.is_null()).then_some(params);
        match self.client().call(method, params) {
            Ok(v) => Ok(v),
            Err(ClientError::Rpc { code, message, .. }) => Err((code, message)),
            Err(e) => panic!("{method}: {e}\nlog:\n{}", self.log()),
        }
    }

    /// Like [`Daemon::rpc`] but panics on an error response, naming it.
    pub fn rpc_ok(&self, method: &str, params: Value) -> Value {
        self.rpc(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params} failed: {e:?}"))
    }

    /// Method names the daemon answers (`rpc_get_methods`).
    pub fn methods(&self) -> Vec<String> {
        serde_json::from_value(self.rpc_ok("rpc_get_methods", Value::Null)).expect("names")
    }

    /// Runs `blockctl -s <rpc socket> args...`.
    pub fn blockctl(&self, args: &[&str]) -> Output {
        Command::new(blockctl_bin())
            .arg("-s")
            .arg(&self.rpc_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run blockctl")
    }

    /// Runs SPDK's own rpc.py (`spdk-rpc -s <rpc socket> args...`, PyPI package `spdk`);
    /// panics when it is not installed (scripts/install-deps.sh installs it).
    #[allow(dead_code)]
    pub fn rpc_py(&self, args: &[&str]) -> Output {
        let rpc = spdk_rpc()
            .expect("spdk-rpc (PyPI package spdk) is not installed: run scripts/install-deps.sh");
        Command::new(rpc)
            .arg("-s")
            .arg(&self.rpc_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run spdk-rpc")
    }

    /// Runs `blockctl bench -s SOCK --json ARGS...` against one of this daemon's
    /// controllers (libblkio, a real vhost-user client) and returns its report; panics
    /// when the run fails.
    #[allow(dead_code)]
    pub fn bench(&self, sock: &str, args: &[&str]) -> Value {
        let mut a = vec!["bench", "-s", sock, "--json"];
        a.extend_from_slice(args);
        let o = self.blockctl(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("bench --json output")
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// Waits (bounded) for the daemon to exit after a signal; returns its status.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                panic!("blockd did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait: the orderly shutdown. Returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(STOP_TIMEOUT)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failing test's daemon log would go with the temporary directory: keep a copy
        // where BLOCKD_TEST_KEEP_LOGS says (docs/testing.md).
        if std::thread::panicking() {
            if let Some(dir) = std::env::var_os("BLOCKD_TEST_KEEP_LOGS") {
                let to = Path::new(&dir).join(format!(
                    "blockd-{}.log",
                    self.child.as_ref().map_or(0, |c| c.id())
                ));
                let _ = std::fs::copy(&self.log_path, to);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub use blockd::unix_socket::peer_pid;

/// SPDK's own rpc.py client (`spdk-rpc` from the PyPI package `spdk`): `$SPDK_RPC`, the
/// project's venv (`.cache/venv`, made by scripts/install-deps.sh), or `spdk-rpc` on PATH.
pub fn spdk_rpc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPDK_RPC") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/spdk-rpc");
    if venv.is_file() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("spdk-rpc"))
        .find(|p| p.is_file())
}

/// `(thread name, scheduling policy)` of every thread of `pid` (sched(7): 0 SCHED_OTHER,
/// 3 SCHED_BATCH), from /proc/PID/task/TID/stat (proc(5), field 41).
pub fn thread_policies(pid: i32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let stat = match std::fs::read_to_string(t.unwrap().path().join("stat")) {
            Ok(s) => s,
            Err(_) => continue, // the thread ended
        };
        let (name, rest) = stat.split_at(stat.rfind(')').expect("stat has (comm)"));
        let name = name[name.find('(').expect("stat has (comm)") + 1..].to_string();
        // Fields after "comm)" start at field 3 (state); policy is field 41.
        let policy = rest[1..]
            .split_whitespace()
            .nth(41 - 3)
            .expect("policy field");
        out.push((name, policy.parse().expect("numeric policy")));
    }
    out
}

/// Sum of `key=N` over the lines of `log` containing `what` (e.g. requests drained, from
/// blockd's log lines).
pub fn logged_sum(log: &str, what: &str, key: &str) -> u64 {
    let pat = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let i = l.find(&pat)? + pat.len();
            let n: String = l[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
            n.parse::<u64>().ok()
        })
        .sum()
}
