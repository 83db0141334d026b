//! Image operations of a local pool: create, info, resize, rm, snapshots, clones, flatten,
//! du, import and export.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde::Serialize;

use super::copy::{self, CopyMethod, Progress};
use super::error::{Error, Result};
use super::lock::Mode;
use super::meta::{self, ImageMeta, ImageRef, ParentRef, SnapMeta};
use super::{check_name, Pool};

/// What `info` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub pool: String,
    pub name: String,
    pub size: u64,
    pub created: String,
    pub features: Vec<String>,
    pub parent: Option<ParentRef>,
    pub snapshot_count: usize,
    /// The data file.
    pub path: PathBuf,
    /// Bytes allocated to the data file.
    pub used: u64,
    /// Whether a bdev serves it.
    pub in_use: bool,
}

/// One row of `du`: an image or one of its snapshots (`name` is `image@snap`).
#[derive(Clone, Debug, Serialize)]
pub struct DuEntry {
    pub name: String,
    /// Size (bytes).
    pub provisioned_size: u64,
    /// Bytes allocated (`st_blocks`); extents shared by reflinks count in each file.
    pub used_size: u64,
}

/// Where `import` reads from.
pub enum ImportSource<'a> {
    /// A regular file: its holes are skipped (`SEEK_DATA`), a reflink is tried first.
    File(&'a File),
    /// A stream (stdin): read to the end; zero chunks become holes.
    Stream(&'a mut dyn Read),
}

/// Where `export` writes to.
pub enum ExportDest<'a> {
    /// A regular file (truncated by the caller): written sparse.
    File(&'a File),
    /// A stream (stdout to a pipe): every byte, holes as zeros.
    Stream(&'a mut dyn Write),
}

fn not_found_snap(pool: &str, image: &str, snap: &str) -> Error {
    Error::NotFound(format!("snapshot {pool}/{image}@{snap} (local)"))
}

impl Pool {
    /// Creates an empty (all-hole) image of `size` bytes.
    pub fn create_image(&self, name: &str, size: u64) -> Result<ImageMeta> {
        check_name(name)?;
        let _l = self.root.lock(Mode::Exclusive)?;
        self.create_unlocked(name, size, |f| f.set_len(size))
    }

    /// Creates `name` with data produced by `fill` on the opened (empty) data file.
    fn create_unlocked(
        &self,
        name: &str,
        size: u64,
        fill: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<ImageMeta> {
        if self.meta_path(name).exists() {
            return Err(Error::Exists(format!("image {}/{name} (local)", self.name)));
        }
        let data = self.data_path(name);
        // A data file without metadata is the leftover of a crash in create or rm.
        let f = File::create(&data).map_err(|e| Error::io("creating", &data, e))?;
        if let Err(e) = fill(&f).and_then(|_| f.sync_all()) {
            // Cleanup of the failed create; the error returned is the one that matters.
            let _ = std::fs::remove_file(&data);
            return Err(Error::io("writing", &data, e));
        }
        let m = ImageMeta::new(name, size);
        self.store(&m)?;
        Ok(m)
    }

    /// The image names, sorted.
    pub fn list_images(&self) -> Result<Vec<String>> {
        let _l = self.root.lock(Mode::Shared)?;
        self.list_unlocked()
    }

    /// Size, features, parent, snapshots ... of `name`.
    pub fn info(&self, name: &str) -> Result<ImageInfo> {
        let _l = self.root.lock(Mode::Shared)?;
        let m = self.load(name)?;
        let path = self.data_path(name);
        Ok(ImageInfo {
            pool: self.name.clone(),
            name: m.name,
            size: m.size,
            created: m.created,
            features: m.features,
            parent: m.parent,
            snapshot_count: m.snapshots.len(),
            used: copy::allocated(&path)?,
            in_use: self.in_use(name)?,
            path,
        })
    }

    /// The metadata of `name` (snapshots with their ids, sizes, children).
    pub fn image_meta(&self, name: &str) -> Result<ImageMeta> {
        let _l = self.root.lock(Mode::Shared)?;
        self.load(name)
    }

    /// Resizes `name` to `size` bytes. Shrinking needs `allow_shrink` and an image no bdev
    /// serves; growing a served image is allowed (the bdev keeps its size until recreated).
    pub fn resize(&self, name: &str, size: u64, allow_shrink: bool) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(name)?;
        if size < m.size {
            if !allow_shrink {
                return Err(Error::Invalid(format!(
                    "shrinking {}/{name} from {} to {size} bytes loses data",
                    self.name, m.size
                )));
            }
            self.check_not_in_use(name, "shrinking it")?;
        }
        let path = self.data_path(name);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| {
                f.set_len(size)?;
                f.sync_all()
            })
            .map_err(|e| Error::io("resizing", &path, e))?;
        m.size = size;
        self.store(&m)
    }

    /// Removes `name`; refused while it has snapshots or is served.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let m = self.load(name)?;
        if !m.snapshots.is_empty() {
            return Err(Error::Busy(format!(
                "image {}/{name} has {} snapshot(s): remove them first",
                self.name,
                m.snapshots.len()
            )));
        }
        self.check_not_in_use(name, "removing it")?;
        if let Some(p) = &m.parent {
            self.unlink_parent(name, p)?;
        }
        let mp = self.meta_path(name);
        std::fs::remove_file(&mp).map_err(|e| Error::io("removing", &mp, e))?;
        let dp = self.data_path(name);
        for f in [super::handover_path(&dp), dp] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing", &f, e)),
            }
        }
        let sd = self.snap_dir(name);
        if sd.exists() {
            std::fs::remove_dir_all(&sd).map_err(|e| Error::io("removing", &sd, e))?;
        }
        meta::sync_dir(&self.dir)
    }

    /// Takes a snapshot of `image`: a reflink (atomic) or sparse copy (not atomic with
    /// respect to a bdev writing meanwhile) of the data file.
    pub fn snap_create(&self, image: &str, snap: &str) -> Result<CopyMethod> {
        check_name(snap)?;
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(image)?;
        if m.snap(snap).is_some() {
            return Err(Error::Exists(format!(
                "snapshot {}/{image}@{snap} (local)",
                self.name
            )));
        }
        let sd = self.snap_dir(image);
        std::fs::create_dir_all(&sd).map_err(|e| Error::io("creating", &sd, e))?;
        let sp = self.snap_path(image, snap);
        // A file without metadata entry is a leftover of a crash (usually there is none).
        let _ = std::fs::remove_file(&sp);
        let how = copy::clone_file(&self.data_path(image), &sp, &mut |_| {})?;
        std::fs::set_permissions(&sp, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| Error::io("making read-only", &sp, e))?;
        meta::sync_dir(&sd)?;
        let id = m.next_snap_id;
        m.next_snap_id += 1;
        m.snapshots.push(SnapMeta {
            id,
            name: snap.to_string(),
            size: m.size,
            protected: false,
            created: meta::now_rfc3339(),
            children: Vec::new(),
        });
        self.store(&m)?;
        Ok(how)
    }

    /// The snapshots of `image`, oldest first.
    pub fn snap_list(&self, image: &str) -> Result<Vec<SnapMeta>> {
        Ok(self.image_meta(image)?.snapshots)
    }

    /// Removes a snapshot; refused while it is protected.
    pub fn snap_remove(&self, image: &str, snap: &str) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(image)?;
        let s = m
            .snap(snap)
            .ok_or_else(|| not_found_snap(&self.name, image, snap))?;
        if s.protected {
            return Err(Error::Busy(format!(
                "snapshot {}/{image}@{snap} is protected: unprotect it first",
                self.name
            )));
        }
        m.snapshots.retain(|s| s.name != snap);
        self.store(&m)?;
        let sp = self.snap_path(image, snap);
        std::fs::remove_file(&sp).map_err(|e| Error::io("removing", &sp, e))
    }

    /// Replaces the data of `image` by the snapshot's (and its size by the snapshot's);
    /// refused while a bdev serves the image.
    pub fn snap_rollback(&self, image: &str, snap: &str, progress: Progress) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(image)?;
        let size = m
            .snap(snap)
            .ok_or_else(|| not_found_snap(&self.name, image, snap))?
            .size;
        self.check_not_in_use(image, "rolling it back")?;
        let tmp = self
            .dir
            .join(format!(".{image}.img.rollback.{}", std::process::id()));
        // A leftover of a crash, if any (`clone_file` then creates it anew).
        let _ = std::fs::remove_file(&tmp);
        copy::clone_file(&self.snap_path(image, snap), &tmp, progress)?;
        let data = self.data_path(image);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .and_then(|_| std::fs::rename(&tmp, &data))
            .map_err(|e| {
                // Cleanup; the error returned is the one that matters.
                let _ = std::fs::remove_file(&tmp);
                Error::io("replacing", &data, e)
            })?;
        meta::sync_dir(&self.dir)?;
        m.size = size;
        self.store(&m)
    }

    /// Protects or unprotects a snapshot. Only protected snapshots can be cloned; unprotect
    /// is refused while clones of it exist.
    pub fn snap_set_protected(&self, image: &str, snap: &str, protected: bool) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(image)?;
        let pool = self.name.clone();
        let s = m
            .snap_mut(snap)
            .ok_or_else(|| not_found_snap(&pool, image, snap))?;
        if s.protected == protected {
            return Err(Error::Invalid(format!(
                "snapshot {pool}/{image}@{snap} is already {}",
                if protected {
                    "protected"
                } else {
                    "unprotected"
                }
            )));
        }
        if !protected && !s.children.is_empty() {
            let c: Vec<String> = s
                .children
                .iter()
                .map(|c| format!("{}/{}", c.pool, c.image))
                .collect();
            return Err(Error::Busy(format!(
                "snapshot {pool}/{image}@{snap} has clones ({}): flatten or remove them first",
                c.join(", ")
            )));
        }
        s.protected = protected;
        self.store(&m)
    }

    /// Clones the protected snapshot `image@snap` into the new image `child` of `dest` (a
    /// pool of the same root), recording the parent.
    pub fn clone_image(
        &self,
        image: &str,
        snap: &str,
        dest: &Pool,
        child: &str,
        progress: Progress,
    ) -> Result<CopyMethod> {
        check_name(child)?;
        if dest.root != self.root {
            return Err(Error::Invalid(
                "a clone must be in a pool of the same root".into(),
            ));
        }
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut pm = self.load(image)?;
        let s = pm
            .snap(snap)
            .ok_or_else(|| not_found_snap(&self.name, image, snap))?;
        if !s.protected {
            return Err(Error::Invalid(format!(
                "snapshot {}/{image}@{snap} is not protected: protect it before cloning",
                self.name
            )));
        }
        let size = s.size;
        // The destination pool may have been removed since it was opened.
        let dest = self.root.pool_unlocked(&dest.name)?;
        if dest.meta_path(child).exists() {
            return Err(Error::Exists(format!(
                "image {}/{child} (local)",
                dest.name
            )));
        }
        let data = dest.data_path(child);
        // No metadata (checked above): a data file here is a leftover of a crash.
        let _ = std::fs::remove_file(&data);
        let how = copy::clone_file(&self.snap_path(image, snap), &data, progress)?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io("chmod", &data, e))?;
        let mut cm = ImageMeta::new(child, size);
        cm.parent = Some(ParentRef {
            pool: self.name.clone(),
            image: image.to_string(),
            snapshot: snap.to_string(),
        });
        dest.store(&cm)?;
        if let Some(s) = pm.snap_mut(snap) {
            s.children.push(ImageRef {
                pool: dest.name.clone(),
                image: child.to_string(),
            });
        }
        self.store(&pm)?;
        Ok(how)
    }

    /// Detaches the clone `image` from its parent snapshot (its data is already its own).
    pub fn flatten(&self, image: &str) -> Result<()> {
        let _l = self.root.lock(Mode::Exclusive)?;
        let mut m = self.load(image)?;
        let Some(p) = m.parent.take() else {
            return Err(Error::Invalid(format!(
                "image {}/{image} is not a clone",
                self.name
            )));
        };
        self.unlink_parent(image, &p)?;
        self.store(&m)
    }

    /// Removes `image` of this pool from the children of its parent snapshot `p` (which
    /// may be gone). The root lock must be held exclusively.
    pub(crate) fn unlink_parent(&self, image: &str, p: &ParentRef) -> Result<()> {
        let ppool = match self.sibling(&p.pool) {
            Ok(pp) => pp,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut pm = match ppool.load(&p.image) {
            Ok(m) => m,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(s) = pm.snap_mut(&p.snapshot) {
            s.children
                .retain(|c| !(c.pool == self.name && c.image == image));
            ppool.store(&pm)?;
        }
        Ok(())
    }

    /// Allocated bytes of `image` and its snapshots (snapshots first, as `rbd du`).
    pub fn du(&self, image: &str) -> Result<Vec<DuEntry>> {
        let _l = self.root.lock(Mode::Shared)?;
        let m = self.load(image)?;
        let mut out = Vec::new();
        for s in &m.snapshots {
            out.push(DuEntry {
                name: format!("{image}@{}", s.name),
                provisioned_size: s.size,
                used_size: copy::allocated(&self.snap_path(image, &s.name))?,
            });
        }
        out.push(DuEntry {
            name: image.to_string(),
            provisioned_size: m.size,
            used_size: copy::allocated(&self.data_path(image))?,
        });
        Ok(out)
    }

    /// Imports `src` as the new image `name`. The data is written to a hidden file without
    /// holding the lock; the image appears (rename + metadata) only when it is complete.
    pub fn import(&self, name: &str, src: ImportSource, progress: Progress) -> Result<u64> {
        check_name(name)?;
        if self.image_meta(name).is_ok() {
            return Err(Error::Exists(format!("image {}/{name} (local)", self.name)));
        }
        let tmp = self
            .dir
            .join(format!(".{name}.img.import.{}", std::process::id()));
        // A leftover of a crash, if any (the copy below creates it with `create_new`).
        let _ = std::fs::remove_file(&tmp);
        let size = match src {
            ImportSource::File(f) => {
                let len = f.metadata().map_err(|e| Error::io("stat", &tmp, e))?.len();
                let d = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| Error::io("creating", &tmp, e))?;
                let r = match copy::reflink(f, &d) {
                    Ok(true) => {
                        progress(len);
                        Ok(())
                    }
                    Ok(false) => copy::sparse_copy(f, &d, len, progress),
                    Err(e) => Err(e),
                };
                r.and_then(|_| d.sync_all()).map(|_| len)
            }
            ImportSource::Stream(r) => File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .and_then(|d| {
                    let n = copy::import_stream(r, &d, progress)?;
                    d.sync_all()?;
                    Ok(n)
                }),
        };
        let size = match size {
            Ok(s) => s,
            Err(e) => {
                // Cleanup; the error returned is the one that matters.
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io("importing into", &tmp, e));
            }
        };
        let _l = self.root.lock(Mode::Exclusive)?;
        let r = self.create_unlocked(name, size, |_| Ok(())).and_then(|_| {
            let data = self.data_path(name);
            std::fs::rename(&tmp, &data).map_err(|e| Error::io("renaming to", &data, e))
        });
        if let Err(e) = r {
            // Cleanup; the error returned is the one that matters.
            let _ = std::fs::remove_file(&tmp);
            // Undo the metadata written by create_unlocked (the image is not complete).
            if !matches!(e, Error::Exists(_)) {
                // Best effort, as for `tmp`.
                let _ = std::fs::remove_file(self.meta_path(name));
            }
            return Err(e);
        }
        meta::sync_dir(&self.dir)?;
        Ok(size)
    }

    /// Exports `image` (or its snapshot `snap`) to `dest`; returns the bytes exported.
    pub fn export(
        &self,
        image: &str,
        snap: Option<&str>,
        dest: ExportDest,
        progress: Progress,
    ) -> Result<u64> {
        // Open under the lock; the open file stays valid even if the image is removed.
        let (path, size, src) = {
            let _l = self.root.lock(Mode::Shared)?;
            let m = self.load(image)?;
            let (path, size) = match snap {
                None => (self.data_path(image), m.size),
                Some(s) => {
                    let sm = m
                        .snap(s)
                        .ok_or_else(|| not_found_snap(&self.name, image, s))?;
                    (self.snap_path(image, s), sm.size)
                }
            };
            let f = File::open(&path).map_err(|e| Error::io("opening", &path, e))?;
            (path, size, f)
        };
        let r = match dest {
            ExportDest::File(d) => match copy::reflink(&src, d) {
                Ok(true) => d.set_len(size).map(|_| progress(size)),
                Ok(false) => copy::sparse_copy(&src, d, size, progress),
                Err(e) => Err(e),
            }
            .and_then(|_| d.sync_all()),
            ExportDest::Stream(w) => copy::export_stream(&src, size, w, progress),
        };
        r.map_err(|e| Error::io("exporting", &path, e))?;
        Ok(size)
    }
}
