//! The Ceph cluster of the RBD tests (tests/rbd.rs, tests/guest_rbd.rs).
//!
//! `$CEPH_CONF` when set and present (scripts/test.sh starts one), otherwise
//! `scripts/ceph-cluster.sh start target/ceph-test` once for all test binaries (a file lock
//! serializes the start; the script reuses a running cluster). Stop it with
//! `scripts/ceph-cluster.sh stop target/ceph-test`. Without Ceph binaries [`conf`] is
//! `None` and tests print a SKIP line and pass. Include with
//! `#[path = "common/ceph.rs"] mod ceph;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The pool scripts/ceph-cluster.sh creates.
pub const POOL: &str = "testpool";

/// Ceph daemons, the `rbd` CLI and librbd are installed.
pub fn have_ceph() -> bool {
    Command::new("sh")
        .args([
            "-c",
            "command -v ceph-mon && command -v ceph-osd && command -v rbd",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        && blockd::rbd::ffi::api().is_ok()
}

/// The cluster's ceph.conf (starting the cluster if needed), or `None` when Ceph is not
/// installed. Sets `CEPH_CONF` for this process (and the daemons it starts).
pub fn conf() -> Option<PathBuf> {
    static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
    CONF.get_or_init(|| {
        if let Ok(c) = std::env::var("CEPH_CONF") {
            if Path::new(&c).exists() {
                return Some(PathBuf::from(c));
            }
        }
        if !have_ceph() {
            return None;
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/ceph-test");
        std::fs::create_dir_all(root.join("target")).unwrap();
        // flock(1) serializes concurrent test binaries; the script is idempotent. `-o`: the
        // daemons the script starts must not inherit (and so hold forever) the lock.
        let st = Command::new("flock")
            .arg("-o")
            .arg(root.join("target/ceph-test.lock"))
            .arg(root.join("scripts/ceph-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .env(
                "CEPH_MON_PORT_V2",
                std::env::var("CEPH_MON_PORT_V2").unwrap_or("13300".into()),
            )
            .env(
                "CEPH_MON_PORT_V1",
                std::env::var("CEPH_MON_PORT_V1").unwrap_or("16789".into()),
            )
            .status()
            .expect("running scripts/ceph-cluster.sh");
        assert!(st.success(), "scripts/ceph-cluster.sh start failed");
        let conf = dir.join("ceph.conf");
        // bdevs created without a cluster use the default search, which honours CEPH_CONF.
        std::env::set_var("CEPH_CONF", &conf);
        Some(conf)
    })
    .clone()
}

/// A name no other test (or test process) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `rbd -c CONF args...`; panics with its stderr unless it succeeds.
pub fn rbd_cli(conf: &Path, args: &[&str]) -> Output {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("running rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A test image `POOL/<unique>` on the cluster, removed when dropped (best effort: after a
/// failure a killed client's watch may keep it until it expires).
pub struct RbdImage {
    pub conf: PathBuf,
    pub spec: String,
}

impl RbdImage {
    /// A new image of `mib` MiB named after `prefix`.
    pub fn create(conf: PathBuf, prefix: &str, mib: u64) -> Self {
        let spec = format!("{POOL}/{}", unique(prefix));
        rbd_cli(&conf, &["create", &spec, "--size", &format!("{mib}M")]);
        RbdImage { conf, spec }
    }

    pub fn image_name(&self) -> &str {
        self.spec.split_once('/').unwrap().1
    }

    /// The image's content through librbd (`rbd export`), in a file in `dir`.
    pub fn export(&self, dir: &Path) -> PathBuf {
        let out = dir.join("export.img");
        let _ = std::fs::remove_file(&out);
        rbd_cli(
            &self.conf,
            &["export", "--no-progress", &self.spec, out.to_str().unwrap()],
        );
        out
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        let _ = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(["rm", "--no-progress", &self.spec])
            .output();
    }
}
