//! The root of the local pools, and pools (directories of images).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::lock::{FileLock, Mode};
use super::meta::{self, ImageMeta};
use super::{check_name, DEFAULT_ROOT, ROOT_ENV};

/// Name of the marker file of a pool directory.
const POOL_MARKER: &str = ".pool.json";

/// Contents of the pool marker.
#[derive(Serialize, Deserialize)]
struct PoolMeta {
    version: u32,
    name: String,
    created: String,
}

/// The directory that holds the local pools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRoot {
    dir: PathBuf,
}

impl PoolRoot {
    /// The root at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PoolRoot { dir: dir.into() }
    }

    /// `dir` if given, else `$BLOCKD_POOL_DIR` if set and not empty, else [`DEFAULT_ROOT`].
    pub fn resolve(dir: Option<&Path>) -> Self {
        if let Some(d) = dir {
            return Self::new(d);
        }
        match std::env::var_os(ROOT_ENV) {
            Some(d) if !d.is_empty() => Self::new(d),
            _ => Self::new(DEFAULT_ROOT),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the root lock; a shared lock on a root that does not exist yet is no lock
    /// (there is nothing to read), an exclusive one creates the root.
    pub(crate) fn lock(&self, mode: Mode) -> Result<Option<FileLock>> {
        if mode == Mode::Shared && !self.dir.is_dir() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io("creating pool root", &self.dir, e))?;
        FileLock::acquire(&self.dir.join(".lock"), mode).map(Some)
    }

    /// Takes the root lock shared, waiting at most `timeout` (a daemon must not hang behind
    /// a long `blockctl` copy): [`Error::Busy`] after that.
    pub(crate) fn lock_shared_timeout(&self, timeout: Duration) -> Result<Option<FileLock>> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        let path = self.dir.join(".lock");
        let deadline = Instant::now() + timeout;
        loop {
            if !path.exists() {
                return self.lock(Mode::Shared);
            }
            if let Some(l) = FileLock::try_acquire(&path, Mode::Shared)? {
                return Ok(Some(l));
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "local pools in {} are locked by another blockctl",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn pool_unlocked(&self, name: &str) -> Result<Pool> {
        check_name(name)?;
        let dir = self.dir.join(name);
        if !dir.join(POOL_MARKER).is_file() {
            return Err(Error::NotFound(format!(
                "local pool {name} (in {})",
                self.dir.display()
            )));
        }
        Ok(Pool {
            root: self.clone(),
            name: name.to_string(),
            dir,
        })
    }

    /// The existing pool `name`.
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let _l = self.lock(Mode::Shared)?;
        self.pool_unlocked(name)
    }

    /// Creates the pool `name`.
    pub fn create_pool(&self, name: &str) -> Result<Pool> {
        check_name(name)?;
        let _l = self.lock(Mode::Exclusive)?;
        let dir = self.dir.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if dir.join(POOL_MARKER).is_file() {
                    return Err(Error::Exists(format!("local pool {name}")));
                }
                // A directory left by a crash (or made by hand): adopt it if empty.
                let empty = std::fs::read_dir(&dir)
                    .map_err(|e| Error::io("reading", &dir, e))?
                    .next()
                    .is_none();
                if !empty {
                    return Err(Error::Exists(format!(
                        "{} (a non-empty directory that is not a pool)",
                        dir.display()
                    )));
                }
            }
            Err(e) => return Err(Error::io("creating pool", &dir, e)),
        }
        let m = PoolMeta {
            version: meta::VERSION,
            name: name.to_string(),
            created: meta::now_rfc3339(),
        };
        let data = serde_json::to_vec_pretty(&m).map_err(|e| Error::Corrupt {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
        meta::write_atomic(&dir.join(POOL_MARKER), &data)?;
        meta::sync_dir(&self.dir)?;
        self.pool_unlocked(name)
    }

    /// Names of the pools, sorted (none when the root does not exist).
    pub fn list_pools(&self) -> Result<Vec<String>> {
        let _l = self.lock(Mode::Shared)?;
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("reading", &self.dir, e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("reading", &self.dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_ok() && ent.path().join(POOL_MARKER).is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes the pool `name` with all its images; refused while one of its images is
    /// served, or while clones in other pools depend on its snapshots.
    pub fn remove_pool(&self, name: &str) -> Result<()> {
        let _l = self.lock(Mode::Exclusive)?;
        let pool = self.pool_unlocked(name)?;
        let images = pool.list_unlocked()?;
        for img in &images {
            pool.check_not_in_use(img, "deleting its pool")?;
            let m = pool.load(img)?;
            for s in &m.snapshots {
                if let Some(c) = s.children.iter().find(|c| c.pool != name) {
                    return Err(Error::Busy(format!(
                        "snapshot {name}/{img}@{} has the clone {}/{} in another pool: flatten it first",
                        s.name, c.pool, c.image
                    )));
                }
            }
        }
        // Clones here of snapshots in other pools: unregister them from their parents.
        for img in &images {
            let m = pool.load(img)?;
            if let Some(p) = m.parent.filter(|p| p.pool != name) {
                pool.unlink_parent(img, &p)?;
            }
        }
        std::fs::remove_dir_all(&pool.dir).map_err(|e| Error::io("removing", &pool.dir, e))?;
        meta::sync_dir(&self.dir)
    }
}

/// A local pool: a directory of images.
#[derive(Clone, Debug)]
pub struct Pool {
    pub(crate) root: PoolRoot,
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
}

impl Pool {
    /// Name of the pool.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root the pool is in.
    pub fn root(&self) -> &PoolRoot {
        &self.root
    }

    pub(crate) fn meta_path(&self, image: &str) -> PathBuf {
        self.dir.join(format!("{image}.json"))
    }

    /// The data file of `image` (no check that the image exists).
    pub fn data_path(&self, image: &str) -> PathBuf {
        self.dir.join(format!("{image}.img"))
    }

    pub(crate) fn snap_dir(&self, image: &str) -> PathBuf {
        self.dir.join(format!("{image}.snaps"))
    }

    pub(crate) fn snap_path(&self, image: &str, snap: &str) -> PathBuf {
        self.snap_dir(image).join(format!("{snap}.img"))
    }

    /// Loads the metadata of `image` (NotFound names pool and image).
    pub(crate) fn load(&self, image: &str) -> Result<ImageMeta> {
        check_name(image)?;
        let path = self.meta_path(image);
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "image {}/{image} (local)",
                self.name
            )));
        }
        ImageMeta::load(&path)
    }

    pub(crate) fn store(&self, meta: &ImageMeta) -> Result<()> {
        meta.store(&self.meta_path(&meta.name))
    }

    /// The image names, sorted, without taking the lock.
    pub(crate) fn list_unlocked(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io("reading", &self.dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("reading", &self.dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(img) = name.strip_suffix(".json") {
                if check_name(img).is_ok() {
                    out.push(img.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether a bdev serves `image`: holds the use lock of its data file, or waits for its
    /// write role (a shared lock on the hand-over file, see [`super::handover`]). The
    /// hand-over file is tested while the data file's exclusive lock is held, so that no
    /// bdev takes or gives up the role between the two tests.
    pub fn in_use(&self, image: &str) -> Result<bool> {
        let path = self.data_path(image);
        if !path.exists() {
            return Ok(false);
        }
        let Some(_data) = FileLock::try_acquire(&path, Mode::Exclusive)? else {
            return Ok(true);
        };
        match FileLock::try_acquire(&super::handover_path(&path), Mode::Exclusive) {
            Ok(l) => Ok(l.is_none()),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn check_not_in_use(&self, image: &str, what: &str) -> Result<()> {
        if self.in_use(image)? {
            return Err(Error::Busy(format!(
                "image {}/{image} is served by a blockd bdev (bdev_local_create): \
                 delete the bdev before {what}",
                self.name
            )));
        }
        Ok(())
    }

    /// The pool `name` of the same root (this pool when it is the same name); no lock.
    pub(crate) fn sibling(&self, name: &str) -> Result<Pool> {
        if name == self.name {
            return Ok(self.clone());
        }
        self.root.pool_unlocked(name)
    }
}
