//! Snapshots of an image: listing, creating, removing, rolling back to, protecting
//! (required before cloning) and unprotecting them. Blocking, like the rest of [`Image`]'s
//! management calls.

use std::ffi::{c_char, c_int, CStr};
use std::ptr;
use std::time::SystemTime;

use super::error::{check, RbdResult};
use super::ffi::{self, rbd_image_t};
use super::image::{system_time, Image};
use super::rados::cstr;

/// One snapshot.
#[derive(Clone, Debug)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub protected: bool,
    /// When it was taken; `None` when librbd could not tell.
    pub timestamp: Option<SystemTime>,
}

type SnapFn = unsafe extern "C" fn(rbd_image_t, *const c_char) -> c_int;

impl Image {
    /// Snapshots, in creation order.
    pub fn snap_list(&self) -> RbdResult<Vec<SnapInfo>> {
        let mut max: c_int = 16;
        loop {
            let mut v: Vec<ffi::rbd_snap_info_t> = (0..max.max(1) as usize + 1)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: array of `max` entries (+1 for the terminator); -ERANGE updates max.
            let rc = unsafe { (self.api.rbd_snap_list)(self.h, v.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue;
            }
            let n = check(rc as i64, "listing snapshots of", &self.what)? as usize;
            let mut out = Vec::with_capacity(n);
            for s in &v[..n] {
                // SAFETY: librbd filled `n` entries with C strings.
                let name = unsafe { CStr::from_ptr(s.name) }
                    .to_string_lossy()
                    .into_owned();
                out.push(SnapInfo {
                    id: s.id,
                    size: s.size,
                    protected: false,
                    name,
                    timestamp: None,
                });
            }
            // SAFETY: frees the names rbd_snap_list allocated.
            unsafe { (self.api.rbd_snap_list_end)(v.as_mut_ptr()) };
            for s in &mut out {
                s.protected = self.snap_is_protected(&s.name)?;
                // SAFETY: all-zero is a valid timespec.
                let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
                // SAFETY: live image, out-pointer.
                if unsafe { (self.api.rbd_snap_get_timestamp)(self.h, s.id, &mut ts) } == 0 {
                    s.timestamp = Some(system_time(&ts));
                }
            }
            return Ok(out);
        }
    }

    /// Whether a snapshot is protected.
    pub fn snap_is_protected(&self, snap: &str) -> RbdResult<bool> {
        let s = cstr(snap, "snapshot name")?;
        let mut p: c_int = 0;
        // SAFETY: live image, C string, out-pointer.
        let rc = unsafe { (self.api.rbd_snap_is_protected)(self.h, s.as_ptr(), &mut p) };
        check(
            rc as i64,
            "checking",
            &format!("snapshot {}/{}@{}", self.ioctx.pool(), self.name, snap),
        )?;
        Ok(p != 0)
    }

    /// Creates a snapshot.
    pub fn snap_create(&self, snap: &str) -> RbdResult<()> {
        self.with_snap("creating", snap, self.api.rbd_snap_create)
    }

    /// Removes a snapshot (must be unprotected).
    pub fn snap_remove(&self, snap: &str) -> RbdResult<()> {
        self.with_snap("removing", snap, self.api.rbd_snap_remove)
    }

    /// Rolls the image back to a snapshot.
    pub fn snap_rollback(&self, snap: &str) -> RbdResult<()> {
        self.with_snap("rolling back to", snap, self.api.rbd_snap_rollback)
    }

    /// Protects a snapshot (required before cloning it).
    pub fn snap_protect(&self, snap: &str) -> RbdResult<()> {
        self.with_snap("protecting", snap, self.api.rbd_snap_protect)
    }

    /// Unprotects a snapshot (fails while clones exist).
    pub fn snap_unprotect(&self, snap: &str) -> RbdResult<()> {
        self.with_snap("unprotecting", snap, self.api.rbd_snap_unprotect)
    }

    fn with_snap(&self, op: &str, snap: &str, f: SnapFn) -> RbdResult<()> {
        let s = cstr(snap, "snapshot name")?;
        // SAFETY: live image, C string.
        let rc = unsafe { f(self.h, s.as_ptr()) } as i64;
        let what = format!("snapshot {}/{}@{}", self.ioctx.pool(), self.name, snap);
        check(rc, op, &what).map(|_| ())
    }
}
