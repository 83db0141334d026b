//! Registered cluster connections (`bdev_rbd_register_cluster`), shared by the bdevs that
//! name them with `cluster_name`.
//!
//! Trade-off: one librados connection has one messenger and a bounded set of dispatch
//! threads; SPDK measured that 8 images sharing one connection on 4 cores reach about half
//! the IOPS of one connection per image. Sharing saves monitor sessions, memory and
//! threads (each connection starts ~10 threads). So a registered cluster may open several
//! connections (`connections`, a blockd extension; default 1) and hands them to its bdevs
//! round-robin, while a bdev created without `cluster_name` gets a connection of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cpumask::CpuMask;
use crate::rbd::{ConnectOptions, Rados, RbdError, RbdResult};

/// Parameters of `bdev_rbd_register_cluster`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_param: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Cores librados' threads may run on (they inherit the affinity of the thread that
    /// connects), keeping them off the reactors' cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_mask: Option<String>,
    /// Connections to open and spread the cluster's bdevs over (blockd extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

impl ClusterConfig {
    /// How librados connects.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            label: self.name.clone(),
            cluster: None,
            user_id: self.user_id.clone(),
            config_file: self.config_file.as_ref().map(PathBuf::from),
            key_file: self.key_file.as_ref().map(PathBuf::from),
            config: self.config_param.clone().unwrap_or_default(),
        }
    }

    /// `bdev_rbd_get_clusters_info`'s object: never the `key` of `config_param`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "cluster_name": self.name });
        if let Some(u) = &self.user_id {
            v["user_id"] = json!(u);
        }
        if let Some(p) = &self.config_param {
            let shown: BTreeMap<&String, &String> =
                p.iter().filter(|(k, _)| !is_secret(k)).collect();
            v["config_param"] = json!(shown);
        }
        if let Some(f) = &self.config_file {
            v["config_file"] = json!(f);
        }
        if let Some(f) = &self.key_file {
            v["key_file"] = json!(f);
        }
        if let Some(m) = &self.core_mask {
            v["core_mask"] = json!(m);
        }
        if let Some(n) = self.connections {
            v["connections"] = json!(n);
        }
        v
    }
}

/// Configuration keys holding key material.
pub fn is_secret(key: &str) -> bool {
    matches!(
        key.replace('-', "_").as_str(),
        "key" | "keyfile" | "keyring"
    )
}

struct Entry {
    cfg: ClusterConfig,
    conns: Vec<Arc<Rados>>,
    next: usize,
    users: BTreeSet<String>,
}

/// The registered clusters by name (part of the application's rbd state).
#[derive(Default)]
pub struct Clusters {
    map: Mutex<BTreeMap<String, Entry>>,
}

/// Connects with `opts`, on a thread restricted to `core_mask` when one is given so that
/// librados' own threads inherit that affinity.
pub fn connect_on(opts: &ConnectOptions, core_mask: Option<&str>) -> RbdResult<Arc<Rados>> {
    let Some(mask) = core_mask else {
        return Rados::connect(opts);
    };
    let mask =
        CpuMask::parse(mask).map_err(|e| RbdError::invalid(format!("core_mask {mask:?}: {e}")))?;
    let opts = opts.clone();
    std::thread::spawn(move || {
        // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cores < CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in mask.cores() {
                if c < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c, &mut set);
                }
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                let e = std::io::Error::last_os_error();
                return Err(RbdError::invalid(format!("core_mask {mask}: {e}")));
            }
        }
        Rados::connect(&opts)
    })
    .join()
    .unwrap_or_else(|_| Err(RbdError::new(libc::EIO, "connecting thread panicked")))
}

fn not_registered(name: &str) -> RbdError {
    RbdError::new(libc::ENOENT, format!("cluster {name} is not registered"))
}

impl Clusters {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        crate::sync::lock(&self.map)
    }

    /// Each registered cluster's open connections (metrics).
    pub fn connection_counts(&self) -> Vec<(String, usize)> {
        self.lock()
            .iter()
            .map(|(n, e)| (n.clone(), e.conns.len()))
            .collect()
    }

    /// `bdev_rbd_register_cluster`: connects now, so that a wrong configuration fails here
    /// with a message naming the cluster.
    pub fn register(&self, cfg: ClusterConfig) -> crate::error::Result<String> {
        if cfg.name.is_empty() {
            return Err(RbdError::invalid("cluster name must not be empty").into());
        }
        let exists = || {
            RbdError::new(
                libc::EEXIST,
                format!("cluster {} is already registered", cfg.name),
            )
        };
        if self.lock().contains_key(&cfg.name) {
            return Err(exists().into());
        }
        let n = cfg.connections.unwrap_or(1);
        if !(1..=64).contains(&n) {
            return Err(
                RbdError::invalid(format!("connections {n} must be between 1 and 64")).into(),
            );
        }
        let opts = cfg.connect_options();
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(connect_on(&opts, cfg.core_mask.as_deref())?);
        }
        let mut map = self.lock();
        if map.contains_key(&cfg.name) {
            return Err(exists().into());
        }
        let name = cfg.name.clone();
        map.insert(
            name.clone(),
            Entry {
                cfg,
                conns,
                next: 0,
                users: BTreeSet::new(),
            },
        );
        Ok(name)
    }

    /// `bdev_rbd_unregister_cluster`: refused (EBUSY, naming them) while bdevs use it.
    pub fn unregister(&self, name: &str) -> crate::error::Result<()> {
        let mut map = self.lock();
        let e = map.get(name).ok_or_else(|| not_registered(name))?;
        if !e.users.is_empty() {
            let users: Vec<&str> = e.users.iter().map(|s| s.as_str()).collect();
            return Err(RbdError::new(
                libc::EBUSY,
                format!("cluster {name} is used by bdev(s) {}", users.join(", ")),
            )
            .into());
        }
        map.remove(name);
        Ok(())
    }

    /// `bdev_rbd_get_clusters_info`: one cluster's object, or an array of all.
    pub fn info(&self, name: Option<&str>) -> crate::error::Result<Value> {
        let map = self.lock();
        match name {
            Some(n) => Ok(map.get(n).ok_or_else(|| not_registered(n))?.cfg.to_json()),
            None => Ok(Value::Array(
                map.values().map(|e| e.cfg.to_json()).collect(),
            )),
        }
    }

    /// Takes a connection of cluster `name` for bdev `user`.
    pub(super) fn acquire(
        &self,
        name: &str,
        user: &str,
    ) -> crate::error::Result<(Arc<Rados>, ClusterConfig)> {
        let mut map = self.lock();
        let e = map.get_mut(name).ok_or_else(|| not_registered(name))?;
        let conn = e.conns[e.next % e.conns.len()].clone();
        e.next = e.next.wrapping_add(1);
        e.users.insert(user.to_string());
        Ok((conn, e.cfg.clone()))
    }

    /// Bdev `user` no longer uses cluster `name`.
    pub(super) fn release(&self, name: &str, user: &str) {
        if let Some(e) = self.lock().get_mut(name) {
            e.users.remove(user);
        }
    }

    /// Removes every registered cluster (daemon shutdown): `(name, connections)`, so the
    /// caller can shut them down once the images using them are closed.
    pub(super) fn take_all(&self) -> Vec<(String, Vec<Arc<Rados>>)> {
        std::mem::take(&mut *self.lock())
            .into_iter()
            .map(|(name, e)| (name, e.conns))
            .collect()
    }

    /// `framework_get_config` entries that re-register every cluster (before the rbd bdevs
    /// that name them, as SPDK's rbd module writes them). The call carries what was given,
    /// `key` included when it was passed in `config_param`, since a replay cannot connect
    /// without it: protect saved configurations like keyrings.
    pub fn config_entries(&self) -> Vec<(&'static str, Value)> {
        self.lock()
            .values()
            .map(|e| {
                (
                    "bdev_rbd_register_cluster",
                    serde_json::to_value(&e.cfg).unwrap_or(Value::Null),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_hides_keys() {
        let mut p = BTreeMap::new();
        p.insert("key".to_string(), "AQBsecret==".to_string());
        p.insert("mon_host".to_string(), "127.0.0.1".to_string());
        let c = ClusterConfig {
            name: "c".into(),
            config_param: Some(p),
            ..Default::default()
        };
        let s = c.to_json().to_string();
        assert!(!s.contains("AQBsecret"), "{s}");
        assert!(s.contains("mon_host"), "{s}");
    }

    #[test]
    fn unknown_cluster() {
        let c = Clusters::default();
        assert_eq!(
            c.unregister("nosuch-cluster").unwrap_err().errno,
            libc::ENOENT
        );
        assert_eq!(
            c.acquire("nosuch-cluster", "b").unwrap_err().message,
            "cluster nosuch-cluster is not registered"
        );
    }
}
