//! The daemon's bdevs by name.

use std::sync::{Arc, Mutex, MutexGuard};

use super::Bdev;
use crate::error::Error;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A bdev with this name, or whose uuid is this name, exists.
    #[error("bdev {0} already exists: File exists")]
    Exists(String),
    /// No bdev has this name or uuid.
    #[error("bdev {0} not found: No such device")]
    NotFound(String),
    /// The bdev is claimed (by a vhost controller, an NBD export, ...).
    #[error("bdev {bdev} is claimed by {owner}: Device or resource busy")]
    Claimed { bdev: String, owner: String },
}

impl From<RegistryError> for Error {
    /// `EEXIST`, `ENODEV` and `EBUSY`, with messages naming the bdev.
    fn from(e: RegistryError) -> Self {
        let errno = match e {
            RegistryError::Exists(_) => libc::EEXIST,
            RegistryError::NotFound(_) => libc::ENODEV,
            RegistryError::Claimed { .. } => libc::EBUSY,
        };
        Error::new(errno, e.to_string())
    }
}

/// All bdevs, in creation order.
#[derive(Default)]
pub struct BdevRegistry {
    bdevs: Mutex<Vec<Arc<Bdev>>>,
}

fn matches(b: &Bdev, name: &str) -> bool {
    b.name() == name || b.uuid().to_string().eq_ignore_ascii_case(name)
}

impl BdevRegistry {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Bdev>>> {
        crate::sync::lock(&self.bdevs)
    }

    /// Every bdev, in creation order.
    pub fn list(&self) -> Vec<Arc<Bdev>> {
        self.lock().clone()
    }

    /// The bdev named `name` (or whose uuid/alias is `name`).
    pub fn get(&self, name: &str) -> Option<Arc<Bdev>> {
        self.lock().iter().find(|b| matches(b, name)).cloned()
    }

    /// Adds `bdev`, refusing a name or uuid that is already some bdev's name or uuid (SPDK
    /// may answer -12 for a duplicate malloc name; blockd answers -17 "File exists").
    pub fn add(&self, bdev: Arc<Bdev>) -> Result<(), RegistryError> {
        let mut v = self.lock();
        let uuid = bdev.uuid().to_string();
        if let Some(other) = v
            .iter()
            .find(|b| matches(b, bdev.name()) || matches(b, &uuid))
        {
            let what = if matches(other, bdev.name()) {
                bdev.name().to_string()
            } else {
                format!("with uuid {uuid}")
            };
            return Err(RegistryError::Exists(what));
        }
        v.push(bdev);
        Ok(())
    }

    /// The first of `prefix0`, `prefix1`, ... that no bdev uses (default names such as
    /// `Malloc0`).
    pub fn first_free_name(&self, prefix: &str) -> String {
        let v = self.lock();
        (0u64..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| !v.iter().any(|b| matches(b, n)))
            .unwrap_or_else(|| prefix.to_string())
    }

    /// Removes the bdev named `name` and closes its backend, unless it is claimed: then the
    /// error names the claimer.
    pub fn remove(&self, name: &str) -> Result<Arc<Bdev>, RegistryError> {
        self.remove_product(name, None)
    }

    /// [`BdevRegistry::remove`], matching only a bdev of `product` when given (e.g.
    /// "Malloc disk" for `bdev_malloc_delete`, which must not delete an aio bdev).
    pub fn remove_product(
        &self,
        name: &str,
        product: Option<&str>,
    ) -> Result<Arc<Bdev>, RegistryError> {
        let bdev = {
            let mut v = self.lock();
            let pos = v
                .iter()
                .position(|b| {
                    b.name() == name && product.is_none_or(|p| b.backend().product_name() == p)
                })
                .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
            if let Some(owner) = v[pos].claimed_by() {
                return Err(RegistryError::Claimed {
                    bdev: name.to_string(),
                    owner,
                });
            }
            v.remove(pos)
        };
        if let Err(e) = bdev.backend().close() {
            tracing::warn!(bdev = name, "closing the backend failed: {e}");
        }
        tracing::info!(bdev = name, "bdev deleted");
        Ok(bdev)
    }

    /// Closes every backend (flushing what is volatile), at shutdown.
    pub fn close_all(&self) {
        for b in self.list() {
            if let Err(e) = b.backend().close() {
                tracing::warn!(bdev = b.name(), "closing the backend failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::channel::test_support::err;
    use crate::bdev::null::{self, NullOpts};

    fn opts(name: &str) -> NullOpts {
        NullOpts {
            name: name.to_string(),
            uuid: None,
            num_blocks: 16,
            block_size: 512,
        }
    }

    #[test]
    fn duplicates_claims_and_removal() {
        let r = BdevRegistry::default();
        let a = null::create(&r, opts("Null0")).unwrap();
        let e = err(null::create(&r, opts("Null0")));
        assert_eq!(e.errno, libc::EEXIST);
        assert!(e.message.contains("Null0"), "{}", e.message);
        // The uuid is an alias: a bdev may not be named like another's uuid.
        let e = err(null::create(&r, opts(&a.uuid().to_string())));
        assert_eq!(e.errno, libc::EEXIST);
        assert!(Arc::ptr_eq(&r.get(&a.uuid().to_string()).unwrap(), &a));
        assert_eq!(r.first_free_name("Null"), "Null1");

        a.claim("vhost controller vhost.1").unwrap();
        let e = err(r.remove("Null0"));
        assert_eq!(
            e,
            RegistryError::Claimed {
                bdev: "Null0".into(),
                owner: "vhost controller vhost.1".into()
            }
        );
        let domain: Error = e.into();
        assert_eq!(domain.errno, libc::EBUSY);
        assert!(domain.message.contains("vhost.1"), "{}", domain.message);
        assert_eq!(r.list().len(), 1);

        a.release("vhost controller vhost.1");
        // Wrong product: not found.
        assert_eq!(
            err(r.remove_product("Null0", Some("Malloc disk"))),
            RegistryError::NotFound("Null0".into())
        );
        r.remove_product("Null0", Some("Null disk")).unwrap();
        assert!(r.get("Null0").is_none());
        assert!(r.list().is_empty());
        let domain: Error = err(r.remove("Null0")).into();
        assert_eq!(domain.errno, libc::ENODEV);
    }
}
