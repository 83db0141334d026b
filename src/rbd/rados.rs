//! librados connections (`rados_t`) and pools (`rados_ioctx_t`): the handles every RBD call
//! goes through, for the rbd bdev and `blockctl image`/`pool` alike.

use std::collections::BTreeMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use super::error::{check, RbdError, RbdResult};
use super::ffi::{self, rados_ioctx_t, rados_t, Api};

/// How to connect to a cluster, as the `rbd` tool does.
///
/// Unset fields fall back to Ceph's defaults: the configuration file search (`$CEPH_CONF`,
/// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`), `CEPH_ARGS`, user `admin` and
/// the keyring search (`/etc/ceph/ceph.client.admin.keyring`, ...).
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// What the connection is called in messages (a registered cluster's name, or the
    /// configuration file); "ceph" when empty.
    pub label: String,
    /// Cluster name (`--cluster`): selects `/etc/ceph/$cluster.conf` and
    /// `$cluster.client.$id.keyring` in the default searches; "ceph" when unset.
    pub cluster: Option<String>,
    /// Cephx user without `client.` (default `admin`).
    pub user_id: Option<String>,
    /// Configuration file instead of the default search.
    pub config_file: Option<PathBuf>,
    /// Keyring file instead of the default search.
    pub key_file: Option<PathBuf>,
    /// Extra configuration options (`mon_host`, `key`, `rbd_cache` ...), set last.
    pub config: BTreeMap<String, String>,
}

impl ConnectOptions {
    fn user(&self) -> &str {
        self.user_id.as_deref().unwrap_or("admin")
    }

    fn label(&self) -> String {
        if !self.label.is_empty() {
            self.label.clone()
        } else if let Some(f) = &self.config_file {
            f.display().to_string()
        } else if let Some(c) = &self.cluster {
            c.clone()
        } else {
            "ceph".into()
        }
    }
}

pub(crate) fn cstr(s: &str, what: &str) -> RbdResult<CString> {
    CString::new(s).map_err(|_| RbdError::invalid(format!("{what} contains a NUL byte")))
}

fn path_cstr(p: &std::path::Path, what: &str) -> RbdResult<CString> {
    cstr(
        p.to_str()
            .ok_or_else(|| RbdError::invalid(format!("{what} is not UTF-8")))?,
        what,
    )
}

/// A connected cluster handle. librados handles are thread-safe; dropping the last `Arc`
/// shuts the connection down (after every pool and image holding it is gone).
pub struct Rados {
    api: &'static Api,
    h: rados_t,
    label: String,
    user: String,
}

// SAFETY: librados cluster handles may be used from any thread concurrently.
unsafe impl Send for Rados {}
// SAFETY: as for Send; the other fields are immutable after `connect`.
unsafe impl Sync for Rados {}

impl Rados {
    /// Connects. Blocks until the monitors answer (bounded by `client_mount_timeout`).
    pub fn connect(opts: &ConnectOptions) -> RbdResult<Arc<Rados>> {
        let api = ffi::api().map_err(RbdError::not_installed)?;
        let label = opts.label();
        let user = opts.user().to_string();
        let what = format!("cluster {label} as client.{user}");
        let name = cstr(&format!("client.{user}"), "user_id")?;
        let cluster = cstr(opts.cluster.as_deref().unwrap_or("ceph"), "cluster name")?;
        let mut h: rados_t = ptr::null_mut();
        // SAFETY: valid out-pointer and C strings.
        let rc = unsafe { (api.rados_create2)(&mut h, cluster.as_ptr(), name.as_ptr(), 0) };
        check(rc as i64, "creating a handle for", &what)?;
        // From here on `r` owns the handle and shuts it down on error.
        let r = Rados {
            api,
            h,
            label,
            user,
        };
        let rc = match &opts.config_file {
            Some(f) => {
                let p = path_cstr(f, "config_file")?;
                // SAFETY: live handle, C string.
                unsafe { (api.rados_conf_read_file)(h, p.as_ptr()) }
            }
            // A missing default file is not an error here (mon_host may come from
            // `config`); connecting reports what is missing.
            None => {
                // SAFETY: live handle; NULL searches the default locations. Its result is
                // ignored on purpose (see above).
                let _ = unsafe { (api.rados_conf_read_file)(h, ptr::null()) };
                0
            }
        };
        check(rc as i64, "reading the configuration of", &what).map_err(|e| {
            if e.errno == libc::ENOENT {
                RbdError::new(
                    e.errno,
                    format!(
                        "configuration file {} of cluster {} not found",
                        opts.config_file
                            .as_deref()
                            .unwrap_or_else(|| "".as_ref())
                            .display(),
                        r.label
                    ),
                )
            } else {
                e
            }
        })?;
        // SAFETY: NULL means CEPH_ARGS.
        let rc = unsafe { (api.rados_conf_parse_env)(h, ptr::null()) };
        check(rc as i64, "parsing CEPH_ARGS for", &what)?;
        if let Some(k) = &opts.key_file {
            r.conf_set(
                "keyring",
                &path_cstr(k, "key_file")?.into_string().unwrap_or_default(),
            )?;
        }
        for (k, v) in &opts.config {
            r.conf_set(k, v)?;
        }
        // A write blockd acknowledges must survive blockd's own crash: the guest lives on
        // and reconnects to the next instance, whose predecessor's RADOS client is then
        // blocklisted (a restart's takeover). librbd's default cache policy, `writearound`
        // (and `writeback`), acknowledges a write while it is still only in this process on
        // its way to the OSDs, so a kill then loses a write the guest saw complete. Without
        // the cache librbd completes a write once the OSDs have it; reads were not cached
        // under `writearound` either, and the guest keeps its own page cache. `config` may
        // turn the cache back on (`rbd_cache`, `rbd_cache_policy`).
        if !opts.config.contains_key("rbd_cache_policy") && !opts.config.contains_key("rbd_cache") {
            r.conf_set("rbd_cache", "false")?;
        }
        // librbd's cache starts write-through until an image sees its first flush, to
        // protect guests too old to send flushes; without the cache it is moot, and with a
        // cache turned on in `config` blockd's frontends already protect those guests (a
        // virtio-blk driver without VIRTIO_BLK_F_FLUSH gets a write-through device, SCSI
        // initiators are told WCE=1 and send SYNCHRONIZE CACHE, NBD clients get
        // NBD_FLAG_SEND_FLUSH). The rbd tool turns it off too; `config` may turn it back on.
        if !opts
            .config
            .contains_key("rbd_cache_writethrough_until_flush")
        {
            r.conf_set("rbd_cache_writethrough_until_flush", "false")?;
        }
        // A dead or unreachable cluster must not block an RPC for librados' 300 s default.
        if !opts.config.contains_key("client_mount_timeout") {
            r.conf_set("client_mount_timeout", "30")?;
        }
        // SAFETY: live, configured handle.
        let rc = unsafe { (api.rados_connect)(h) };
        check(rc as i64, "connecting to", &what)?;
        Ok(Arc::new(r))
    }

    fn conf_set(&self, key: &str, value: &str) -> RbdResult<()> {
        let k = cstr(key, "config key")?;
        let v = cstr(value, "config value")?;
        // SAFETY: live handle, C strings.
        let rc = unsafe { (self.api.rados_conf_set)(self.h, k.as_ptr(), v.as_ptr()) };
        if rc < 0 {
            return Err(RbdError::new(
                -rc,
                format!(
                    "invalid configuration option {key}={value} for cluster {}: {}",
                    self.label,
                    super::error::strerror(-rc)
                ),
            ));
        }
        Ok(())
    }

    /// The value of configuration option `key` as this connection uses it.
    pub fn conf_get(&self, key: &str) -> RbdResult<String> {
        let k = cstr(key, "config key")?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: live handle, C string, and a buffer of the length passed.
        let rc = unsafe {
            (self.api.rados_conf_get)(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        check(
            rc as i64,
            "reading",
            &format!("configuration option {key} of cluster {}", self.label),
        )?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// What this connection is called in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The cephx user (without `client.`).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> RbdResult<String> {
        let mut buf = vec![0 as c_char; 64];
        // SAFETY: live handle, buffer of the given length.
        let rc = unsafe { (self.api.rados_cluster_fsid)(self.h, buf.as_mut_ptr(), buf.len()) };
        check(
            rc as i64,
            "getting the fsid of",
            &format!("cluster {}", self.label),
        )?;
        Ok(c_buf_to_string(&buf))
    }

    /// This connection's client address as the OSDs see it (`rados_getaddrs`), e.g.
    /// `127.0.0.1:0/3521787523`: unique per connection (the nonce), the address lock
    /// owners are reported under and blocklists take.
    pub fn addrs(&self) -> RbdResult<String> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: live, connected handle; out-pointer librados fills with a strdup'ed string.
        let rc = unsafe { (self.api.rados_getaddrs)(self.h, &mut p) };
        check(
            rc as i64,
            "getting the client address of",
            &format!("cluster {}", self.label),
        )?;
        if p.is_null() {
            return Err(RbdError::new(
                libc::EIO,
                "rados_getaddrs returned no address",
            ));
        }
        // SAFETY: a NUL-terminated string librados allocated with strdup; freed once, here.
        let s = unsafe {
            let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            s
        };
        Ok(s)
    }

    /// Blocklists client address `addr` (`ceph osd blocklist add ADDR EXPIRE`): the OSDs
    /// refuse its requests and drop its watches, so its exclusive locks can be broken at
    /// once. Needs the monitor capability `osd blocklist` (`profile rbd` has it).
    pub fn blocklist_add(&self, addr: &str, expire: Duration) -> RbdResult<()> {
        self.mon_command(&serde_json::json!({
            "prefix": "osd blocklist",
            "blocklistop": "add",
            "addr": addr,
            "expire": expire.as_secs_f64(),
        }))
        .map(|_| ())
    }

    /// Creates a replicated pool with the cluster's defaults.
    pub fn pool_create(&self, pool: &str) -> RbdResult<()> {
        let p = cstr(pool, "pool name")?;
        // SAFETY: live handle, C string.
        let rc = unsafe { (self.api.rados_pool_create)(self.h, p.as_ptr()) };
        check(rc as i64, "creating", &format!("pool {pool}"))?;
        Ok(())
    }

    /// Deletes a pool and everything in it (needs `mon allow pool delete`).
    pub fn pool_delete(&self, pool: &str) -> RbdResult<()> {
        let p = cstr(pool, "pool name")?;
        // SAFETY: live handle, C string.
        let rc = unsafe { (self.api.rados_pool_delete)(self.h, p.as_ptr()) };
        check(rc as i64, "deleting", &format!("pool {pool}"))?;
        Ok(())
    }

    /// Names of all pools.
    pub fn pool_list(&self) -> RbdResult<Vec<String>> {
        let mut len = 4096usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: buffer of `len` bytes; returns the needed length when too small.
            let rc =
                unsafe { (self.api.rados_pool_list)(self.h, buf.as_mut_ptr() as *mut c_char, len) };
            let need = check(
                rc as i64,
                "listing pools of",
                &format!("cluster {}", self.label),
            )? as usize;
            if need > len {
                len = need;
                continue;
            }
            // NUL-separated names, ended by an empty one.
            return Ok(buf[..need]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }

    /// Sends a monitor command (`{"prefix": "osd pool ls", "format": "json"}`) and
    /// returns its output buffer; errors carry the monitor's status text.
    pub fn mon_command(&self, cmd: &serde_json::Value) -> RbdResult<Vec<u8>> {
        let c = cstr(&cmd.to_string(), "monitor command")?;
        let mut cmds = [c.as_ptr()];
        let (mut out, mut outlen) = (ptr::null_mut(), 0usize);
        let (mut st, mut stlen) = (ptr::null_mut(), 0usize);
        // SAFETY: one C string command, no input, out-pointers librados fills with buffers
        // we free with rados_buffer_free.
        let rc = unsafe {
            (self.api.rados_mon_command)(
                self.h,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut outlen,
                &mut st,
                &mut stlen,
            )
        };
        let take = |p: *mut c_char, n: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            // SAFETY: librados returned `n` bytes at `p`; freed right after copying.
            let v = unsafe { std::slice::from_raw_parts(p as *const u8, n) }.to_vec();
            // SAFETY: a buffer librados allocated, freed once, not used after.
            unsafe { (self.api.rados_buffer_free)(p) };
            v
        };
        let out = take(out, outlen);
        let status = String::from_utf8_lossy(&take(st, stlen)).into_owned();
        if rc < 0 {
            let prefix = cmd["prefix"].as_str().unwrap_or("monitor command");
            let mut e = RbdError::from_rc(
                rc as i64,
                "running",
                &format!("{prefix:?} on cluster {}", self.label),
            );
            if !status.is_empty() {
                e.message = format!("{}: {status}", e.message);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// An I/O context on `pool`.
    pub fn ioctx(self: &Arc<Self>, pool: &str) -> RbdResult<Arc<IoCtx>> {
        let p = cstr(pool, "pool name")?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: live handle, C string, out-pointer.
        let rc = unsafe { (self.api.rados_ioctx_create)(self.h, p.as_ptr(), &mut io) };
        check(rc as i64, "opening", &format!("pool {pool}"))?;
        Ok(Arc::new(IoCtx {
            rados: self.clone(),
            h: io,
            pool: pool.to_string(),
        }))
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the handle is live and no ioctx/image refers to it (they hold an Arc).
        unsafe { (self.api.rados_shutdown)(self.h) };
    }
}

/// An I/O context bound to one pool.
pub struct IoCtx {
    rados: Arc<Rados>,
    h: rados_ioctx_t,
    pool: String,
}

// SAFETY: rados_ioctx_t may be shared between threads for the calls made here.
unsafe impl Send for IoCtx {}
// SAFETY: as for Send; none of the calls made here changes the ioctx's state (no
// snapshot context or locator key is ever set on it).
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// The pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The cluster.
    pub fn rados(&self) -> &Arc<Rados> {
        &self.rados
    }

    pub(crate) fn raw(&self) -> rados_ioctx_t {
        self.h
    }

    pub(crate) fn api(&self) -> &'static Api {
        self.rados.api
    }

    /// `rbd pool init`: tags the pool for rbd and creates its directory objects.
    pub fn rbd_pool_init(&self) -> RbdResult<()> {
        // SAFETY: live ioctx.
        let rc = unsafe { (self.api().rbd_pool_init)(self.h, false) };
        check(rc as i64, "initializing", &format!("pool {}", self.pool))?;
        Ok(())
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: live ioctx; images opened on it copied what they need.
        unsafe { (self.api().rados_ioctx_destroy)(self.h) };
    }
}

/// A NUL-terminated C buffer as a String.
pub(crate) fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl std::fmt::Debug for Rados {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rados(cluster {} as client.{})", self.label, self.user)
    }
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoCtx(pool {} of {:?})", self.pool, self.rados)
    }
}
