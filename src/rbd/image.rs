//! Images (`rbd_image_t`): management calls (blocking, control thread only) and the raw
//! asynchronous I/O entry points used by the rbd bdev.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::Arc;

use super::error::{check, RbdError, RbdResult};
use super::ffi::{self, rbd_completion_t, rbd_image_t, Api};
use super::rados::{c_buf_to_string, cstr, IoCtx};

/// Feature bits and their names (`rbd/features.h`).
pub const FEATURES: &[(u64, &str)] = &[
    (1 << 0, "layering"),
    (1 << 1, "striping"),
    (1 << 2, "exclusive-lock"),
    (1 << 3, "object-map"),
    (1 << 4, "fast-diff"),
    (1 << 5, "deep-flatten"),
    (1 << 6, "journaling"),
    (1 << 7, "data-pool"),
    (1 << 8, "operations"),
    (1 << 9, "migrating"),
    (1 << 10, "non-primary"),
    (1 << 11, "dirty-cache"),
];

/// Operation feature bits (`RBD_OPERATION_FEATURE_*`), as `rbd info` names them.
pub const OP_FEATURES: &[(u64, &str)] = &[
    (1 << 0, "clone-parent"),
    (1 << 1, "clone-child"),
    (1 << 2, "group"),
    (1 << 3, "snap-trash"),
];

/// Image flags (`RBD_FLAG_*`), as `rbd info` names them.
pub const FLAGS: &[(u64, &str)] = &[
    (1 << 0, "object map invalid"),
    (1 << 1, "fast diff invalid"),
];

/// Names of the bits of `bits` in `table`.
pub fn bit_names(table: &[(u64, &'static str)], bits: u64) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// The feature bits of comma-separated names (`layering,exclusive-lock`) or a number.
pub fn parse_features(s: &str) -> RbdResult<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let mut bits = 0;
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match FEATURES.iter().find(|(_, n)| *n == name) {
            Some((b, _)) => bits |= b,
            None => {
                return Err(RbdError::invalid(format!(
                    "unknown image feature {name:?} (known: {})",
                    FEATURES.iter().map(|f| f.1).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    }
    Ok(bits)
}

/// A timestamp as `rbd` prints it (`ctime(3)` in local time, without the newline).
pub fn ctime(ts: &libc::timespec) -> String {
    let mut buf = [0 as c_char; 64];
    // SAFETY: ctime_r writes at most 26 bytes into the 64-byte buffer.
    let p = unsafe { libc::ctime_r(&ts.tv_sec, buf.as_mut_ptr()) };
    if p.is_null() {
        return ts.tv_sec.to_string();
    }
    c_buf_to_string(&buf).trim_end().to_string()
}

/// Names of the feature bits set in `features`.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    bit_names(FEATURES, features)
}

/// What `rbd info` reports; [`ImageInfo::to_json`] has `rbd info --format json`'s keys.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: i32,
    pub block_name_prefix: String,
    pub features: Vec<&'static str>,
    pub op_features: Vec<&'static str>,
    pub flags: Vec<&'static str>,
    pub snapshot_count: usize,
    /// `pool/image@snap` of the parent of a clone.
    pub parent: Option<String>,
    pub create_timestamp: String,
    pub access_timestamp: String,
    pub modify_timestamp: String,
}

impl ImageInfo {
    /// `rbd info --format json`'s object (format is always 2: blockd makes no format 1
    /// images and librbd 16 no longer opens them for writing).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "id": self.id,
            "size": self.size,
            "objects": self.num_objs,
            "order": self.order,
            "object_size": self.obj_size,
            "snapshot_count": self.snapshot_count,
            "block_name_prefix": self.block_name_prefix,
            "format": 2,
            "features": self.features,
            "op_features": self.op_features,
            "flags": self.flags,
            "create_timestamp": self.create_timestamp,
            "access_timestamp": self.access_timestamp,
            "modify_timestamp": self.modify_timestamp,
        });
        if let Some(p) = &self.parent {
            v["parent"] = serde_json::json!(p);
        }
        v
    }
}

/// One snapshot.
#[derive(Clone, Debug)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub protected: bool,
    /// When it was taken, as `rbd snap ls` prints it.
    pub timestamp: String,
}

impl SnapInfo {
    /// `rbd snap ls --format json`'s object (`protected` is a string there).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "protected": self.protected.to_string(),
            "timestamp": self.timestamp,
        })
    }
}

/// One client watching an image (`rbd status`).
#[derive(Clone, Debug)]
pub struct Watcher {
    pub address: String,
    pub client: i64,
    pub cookie: u64,
}

/// Options of a new image.
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateOptions {
    /// Object size as a power of two (22 = 4 MiB, the default).
    pub order: Option<u8>,
    /// Feature bits; the cluster's default (`rbd_default_features`) when unset.
    pub features: Option<u64>,
}

struct ImageOptions {
    api: &'static Api,
    h: ffi::rbd_image_options_t,
}

impl ImageOptions {
    fn new(api: &'static Api, o: &CreateOptions, what: &str) -> RbdResult<Self> {
        let mut h = ptr::null_mut();
        // SAFETY: out-pointer.
        unsafe { (api.rbd_image_options_create)(&mut h) };
        let opts = ImageOptions { api, h };
        // SAFETY (both): live options handle.
        check(
            unsafe { (api.rbd_image_options_set_uint64)(h, ffi::RBD_IMAGE_OPTION_FORMAT, 2) }
                as i64,
            "setting options of",
            what,
        )?;
        if let Some(order) = o.order {
            check(
                unsafe {
                    (api.rbd_image_options_set_uint64)(h, ffi::RBD_IMAGE_OPTION_ORDER, order as u64)
                } as i64,
                "setting the order of",
                what,
            )?;
        }
        if let Some(f) = o.features {
            check(
                unsafe { (api.rbd_image_options_set_uint64)(h, ffi::RBD_IMAGE_OPTION_FEATURES, f) }
                    as i64,
                "setting the features of",
                what,
            )?;
        }
        Ok(opts)
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: live options handle.
        unsafe { (self.api.rbd_image_options_destroy)(self.h) };
    }
}

impl IoCtx {
    fn image_what(&self, image: &str) -> String {
        format!("image {}/{}", self.pool(), image)
    }

    /// Creates an image of `size` bytes (format 2).
    pub fn create_image(&self, image: &str, size: u64, o: &CreateOptions) -> RbdResult<()> {
        let what = self.image_what(image);
        let n = cstr(image, "image name")?;
        let opts = ImageOptions::new(self.api(), o, &what)?;
        // SAFETY: live ioctx and options, C string.
        check(
            unsafe { (self.api().rbd_create4)(self.raw(), n.as_ptr(), size, opts.h) } as i64,
            "creating",
            &what,
        )?;
        Ok(())
    }

    /// Removes an image (fails with EBUSY while it has snapshots or watchers).
    pub fn remove_image(&self, image: &str) -> RbdResult<()> {
        let n = cstr(image, "image name")?;
        // SAFETY: live ioctx, C string.
        let rc = unsafe { (self.api().rbd_remove)(self.raw(), n.as_ptr()) } as i64;
        match check(rc, "removing", &self.image_what(image)) {
            Err(e) if e.errno == libc::ENOTEMPTY || e.errno == libc::EBUSY => Err(RbdError::new(
                e.errno,
                format!(
                    "{} has snapshots or is still open somewhere: {}",
                    self.image_what(image),
                    super::error::strerror(e.errno)
                ),
            )),
            r => r.map(|_| ()),
        }
    }

    /// Names of the images in the pool, sorted.
    pub fn list_images(&self) -> RbdResult<Vec<String>> {
        let mut max = 64usize;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = (0..max)
                .map(|_| ffi::rbd_image_spec_t {
                    id: ptr::null_mut(),
                    name: ptr::null_mut(),
                })
                .collect();
            // SAFETY: array of `max` specs; on -ERANGE `max` is updated.
            let rc = unsafe { (self.api().rbd_list2)(self.raw(), specs.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue;
            }
            check(
                rc as i64,
                "listing images of",
                &format!("pool {}", self.pool()),
            )?;
            let mut names: Vec<String> = specs[..max]
                .iter()
                // SAFETY: librbd filled `max` specs with C strings.
                .map(|s| {
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees what rbd_list2 allocated.
            unsafe { (self.api().rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), max) };
            names.sort();
            return Ok(names);
        }
    }

    /// Opens `image` (at `snap`, read-only, when given).
    pub fn open(self: &Arc<Self>, image: &str, snap: Option<&str>) -> RbdResult<Image> {
        self.open_with(image, snap, false)
    }

    /// Opens `image` read-only: no header watch, so it neither shows in `rbd status` nor
    /// delays other clients' exclusive lock.
    pub fn open_read_only(self: &Arc<Self>, image: &str, snap: Option<&str>) -> RbdResult<Image> {
        self.open_with(image, snap, true)
    }

    fn open_with(
        self: &Arc<Self>,
        image: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> RbdResult<Image> {
        let what = match snap {
            Some(s) => format!("snapshot {}/{}@{}", self.pool(), image, s),
            None => self.image_what(image),
        };
        let n = cstr(image, "image name")?;
        let s = snap.map(|s| cstr(s, "snapshot name")).transpose()?;
        let mut h: rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx, C strings, out-pointer.
        check(
            unsafe {
                (if read_only {
                    self.api().rbd_open_read_only
                } else {
                    self.api().rbd_open
                })(
                    self.raw(),
                    n.as_ptr(),
                    &mut h,
                    s.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                )
            } as i64,
            "opening",
            &what,
        )?;
        Ok(Image {
            api: self.api(),
            h,
            ioctx: self.clone(),
            name: image.to_string(),
            what,
        })
    }

    /// Clones `parent@snap` (a protected snapshot, in this pool) into `child_pool/child`.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child_pool: &IoCtx,
        child: &str,
        o: &CreateOptions,
    ) -> RbdResult<()> {
        let what = format!(
            "clone {}/{} of {}/{}@{}",
            child_pool.pool(),
            child,
            self.pool(),
            parent,
            snap
        );
        let p = cstr(parent, "parent image name")?;
        let s = cstr(snap, "snapshot name")?;
        let c = cstr(child, "image name")?;
        let opts = ImageOptions::new(self.api(), o, &what)?;
        // SAFETY: live ioctxs and options, C strings.
        let rc = unsafe {
            (self.api().rbd_clone3)(
                self.raw(),
                p.as_ptr(),
                s.as_ptr(),
                child_pool.raw(),
                c.as_ptr(),
                opts.h,
            )
        } as i64;
        match check(rc, "creating", &what) {
            Err(e) if e.errno == libc::ENOENT => Err(RbdError::new(
                e.errno,
                format!("snapshot {}/{}@{} not found", self.pool(), parent, snap),
            )),
            Err(e) if e.errno == libc::EINVAL => Err(RbdError::new(
                e.errno,
                format!(
                    "cannot create {what}: the snapshot must be protected \
                     (image snap protect) and the parent must have the layering feature"
                ),
            )),
            r => r.map(|_| ()),
        }
    }
}

/// An open image. librbd image handles are thread-safe for I/O; management calls block and
/// belong on a control thread. Dropping closes the image (flushing its cache).
pub struct Image {
    api: &'static Api,
    h: rbd_image_t,
    ioctx: Arc<IoCtx>,
    name: String,
    what: String,
}

// SAFETY: librbd serializes access to an image internally; aio calls may come from any
// thread.
unsafe impl Send for Image {}
unsafe impl Sync for Image {}

/// Called on a librbd thread when an aio finishes: `(arg, return value)`.
pub type AioCallback = unsafe extern "C" fn(rbd_completion_t, *mut c_void);

impl Image {
    /// "image pool/name" (or "snapshot pool/name@snap").
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The pool's I/O context.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.ioctx
    }

    /// The image name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn with_snap(&self, op: &str, snap: &str, f: SnapFn) -> RbdResult<()> {
        let s = cstr(snap, "snapshot name")?;
        // SAFETY: live image, C string.
        let rc = unsafe { f(self.h, s.as_ptr()) } as i64;
        let what = format!("snapshot {}/{}@{}", self.ioctx.pool(), self.name, snap);
        check(rc, op, &what).map(|_| ())
    }

    /// Size in bytes, refreshing the header first when another client changed it.
    pub fn stat(&self) -> RbdResult<ffi::rbd_image_info_t> {
        // SAFETY: all-zero is a valid rbd_image_info_t.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: live image, struct of the given size.
        check(
            unsafe {
                (self.api.rbd_stat)(
                    self.h,
                    &mut info,
                    std::mem::size_of::<ffi::rbd_image_info_t>(),
                )
            } as i64,
            "getting the size of",
            &self.what,
        )?;
        Ok(info)
    }

    /// Current size in bytes (`rbd_stat`, which refreshes a stale header).
    pub fn size(&self) -> RbdResult<u64> {
        Ok(self.stat()?.size)
    }

    /// Feature bits.
    pub fn features(&self) -> RbdResult<u64> {
        let mut f = 0u64;
        // SAFETY: live image, out-pointer.
        check(
            unsafe { (self.api.rbd_get_features)(self.h, &mut f) } as i64,
            "getting the features of",
            &self.what,
        )?;
        Ok(f)
    }

    /// Everything `rbd info` shows.
    pub fn info(&self) -> RbdResult<ImageInfo> {
        let st = self.stat()?;
        let mut id = vec![0 as c_char; 64];
        // SAFETY: live image, buffer of the given length.
        check(
            unsafe { (self.api.rbd_get_id)(self.h, id.as_mut_ptr(), id.len()) } as i64,
            "getting the id of",
            &self.what,
        )?;
        let mut prefix = vec![0 as c_char; 64];
        // SAFETY: as above.
        check(
            unsafe {
                (self.api.rbd_get_block_name_prefix)(self.h, prefix.as_mut_ptr(), prefix.len())
            } as i64,
            "getting the block name prefix of",
            &self.what,
        )?;
        Ok(ImageInfo {
            name: self.name.clone(),
            id: c_buf_to_string(&id),
            size: st.size,
            obj_size: st.obj_size,
            num_objs: st.num_objs,
            order: st.order,
            block_name_prefix: c_buf_to_string(&prefix),
            features: feature_names(self.features()?),
            op_features: bit_names(
                OP_FEATURES,
                self.u64_prop("op features", self.api.rbd_get_op_features)?,
            ),
            flags: bit_names(FLAGS, self.u64_prop("flags", self.api.rbd_get_flags)?),
            snapshot_count: self.snap_list()?.len(),
            parent: self.parent()?,
            create_timestamp: self.timestamp("creation time", self.api.rbd_get_create_timestamp)?,
            access_timestamp: self.timestamp("access time", self.api.rbd_get_access_timestamp)?,
            modify_timestamp: self
                .timestamp("modification time", self.api.rbd_get_modify_timestamp)?,
        })
    }

    fn u64_prop(&self, what: &str, f: U64Fn) -> RbdResult<u64> {
        let mut v = 0u64;
        // SAFETY: live image, out-pointer.
        check(
            unsafe { f(self.h, &mut v) } as i64,
            &format!("getting the {what} of"),
            &self.what,
        )?;
        Ok(v)
    }

    fn timestamp(&self, what: &str, f: TimeFn) -> RbdResult<String> {
        // SAFETY: all-zero is a valid timespec.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: live image, out-pointer.
        check(
            unsafe { f(self.h, &mut ts) } as i64,
            &format!("getting the {what} of"),
            &self.what,
        )?;
        Ok(ctime(&ts))
    }

    /// Gives up the exclusive lock if this handle owns it (so that another client's writes
    /// need not wait for this one's watch to time out); `false` when it did not own it.
    /// The next write through this handle takes it again.
    pub fn lock_release(&self) -> bool {
        // SAFETY: live image.
        unsafe { (self.api.rbd_lock_release)(self.h) == 0 }
    }

    /// Copies the parent's data into this clone and detaches it.
    pub fn flatten(&self) -> RbdResult<()> {
        // SAFETY: live image.
        check(
            unsafe { (self.api.rbd_flatten)(self.h) } as i64,
            "flattening",
            &self.what,
        )?;
        Ok(())
    }

    /// Bytes of the objects that exist (or changed since `from_snap`), counted in whole
    /// objects as `rbd du` counts them (`rbd_diff_iterate2` with `whole_object`).
    pub fn used_bytes(&self, from_snap: Option<&str>) -> RbdResult<u64> {
        unsafe extern "C" fn add(_off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            if exists != 0 {
                // SAFETY: `arg` is the u64 below, alive for the synchronous call.
                unsafe { *(arg as *mut u64) += len as u64 };
            }
            0
        }
        let size = self.size()?;
        let from = from_snap.map(|s| cstr(s, "snapshot name")).transpose()?;
        let mut used = 0u64;
        // SAFETY: live image; the callback only runs during the call.
        let rc = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.h,
                from.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
                0,
                size,
                0,
                1,
                Some(add),
                &mut used as *mut u64 as *mut c_void,
            )
        };
        check(rc as i64, "computing the disk usage of", &self.what)?;
        Ok(used)
    }

    /// The objects that exist (here or, for a clone, in a parent) among those overlapping
    /// `[off, off + len)`, as `(offset, length)` runs clipped to the range and in order
    /// (`rbd_diff_iterate2` from the beginning of time, `include_parent`, `whole_object`).
    /// Blocking (a round trip per object without fast-diff): never on a reactor.
    pub fn allocated_extents(&self, off: u64, len: u64) -> RbdResult<Vec<(u64, u64)>> {
        struct Acc {
            start: u64,
            end: u64,
            runs: Vec<(u64, u64)>,
        }
        unsafe extern "C" fn add(o: u64, l: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the Acc below, alive for the synchronous call.
            let acc = unsafe { &mut *(arg as *mut Acc) };
            let s = o.max(acc.start);
            let e = o.saturating_add(l as u64).min(acc.end);
            if exists == 0 || s >= e {
                return 0;
            }
            match acc.runs.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => acc.runs.push((s, e - s)),
            }
            0
        }
        let mut acc = Acc {
            start: off,
            end: off.saturating_add(len),
            runs: Vec::new(),
        };
        // SAFETY: live image; the callback only runs during the call.
        let rc = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.h,
                ptr::null(),
                off,
                len,
                1,
                1,
                Some(add),
                &mut acc as *mut Acc as *mut c_void,
            )
        };
        check(rc as i64, "listing the allocated objects of", &self.what)?;
        acc.runs.sort_unstable();
        Ok(acc.runs)
    }

    /// Clients watching the image header (every open read-write handle).
    pub fn watchers(&self) -> RbdResult<Vec<Watcher>> {
        let mut max = 16usize;
        loop {
            let mut v: Vec<ffi::rbd_image_watcher_t> = (0..max)
                .map(|_| ffi::rbd_image_watcher_t {
                    addr: ptr::null_mut(),
                    id: 0,
                    cookie: 0,
                })
                .collect();
            // SAFETY: array of `max` entries; -ERANGE updates max.
            let rc = unsafe { (self.api.rbd_watchers_list)(self.h, v.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue;
            }
            check(rc as i64, "listing the watchers of", &self.what)?;
            let out = v[..max]
                .iter()
                .map(|w| Watcher {
                    address: if w.addr.is_null() {
                        String::new()
                    } else {
                        // SAFETY: librbd filled `max` entries with C strings.
                        unsafe { CStr::from_ptr(w.addr) }
                            .to_string_lossy()
                            .into_owned()
                    },
                    client: w.id,
                    cookie: w.cookie,
                })
                .collect();
            // SAFETY: frees what rbd_watchers_list allocated.
            unsafe { (self.api.rbd_watchers_list_cleanup)(v.as_mut_ptr(), max) };
            return Ok(out);
        }
    }

    /// `pool/image@snap` of a clone's parent; `None` for an image without one.
    pub fn parent(&self) -> RbdResult<Option<String>> {
        // SAFETY: zeroed out-structs are valid; librbd fills them on success and we free
        // them with the matching cleanup calls.
        unsafe {
            let mut img: ffi::rbd_linked_image_spec_t = std::mem::zeroed();
            let mut snap: ffi::rbd_snap_spec_t = std::mem::zeroed();
            let rc = (self.api.rbd_get_parent)(self.h, &mut img, &mut snap);
            if rc == -libc::ENOENT {
                return Ok(None);
            }
            check(rc as i64, "getting the parent of", &self.what)?;
            let s = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let r = format!(
                "{}/{}@{}",
                s(img.pool_name),
                s(img.image_name),
                s(snap.name)
            );
            (self.api.rbd_linked_image_spec_cleanup)(&mut img);
            (self.api.rbd_snap_spec_cleanup)(&mut snap);
            Ok(Some(r))
        }
    }

    /// Grows or shrinks the image.
    pub fn resize(&self, size: u64) -> RbdResult<()> {
        // SAFETY: live image.
        check(
            unsafe { (self.api.rbd_resize)(self.h, size) } as i64,
            "resizing",
            &self.what,
        )?;
        Ok(())
    }

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
                    timestamp: String::new(),
                });
            }
            // SAFETY: frees the names rbd_snap_list allocated.
            unsafe { (self.api.rbd_snap_list_end)(v.as_mut_ptr()) };
            for s in &mut out {
                s.protected = self.snap_is_protected(&s.name)?;
                // SAFETY: all-zero is a valid timespec; live image, out-pointer.
                let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
                if unsafe { (self.api.rbd_snap_get_timestamp)(self.h, s.id, &mut ts) } == 0 {
                    s.timestamp = ctime(&ts);
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

    /// Synchronous read of `buf.len()` bytes at `off` (CLI export). Returns bytes read.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> RbdResult<usize> {
        // SAFETY: live image, buffer of the given length.
        let rc =
            unsafe { (self.api.rbd_read)(self.h, off, buf.len(), buf.as_mut_ptr() as *mut c_char) };
        Ok(check(rc as i64, &format!("reading at {off} from"), &self.what)? as usize)
    }

    /// Synchronous write of `buf` at `off` (CLI import).
    pub fn write_at(&self, off: u64, buf: &[u8]) -> RbdResult<()> {
        // SAFETY: live image, buffer of the given length.
        let rc =
            unsafe { (self.api.rbd_write)(self.h, off, buf.len(), buf.as_ptr() as *const c_char) };
        let n = check(rc as i64, &format!("writing at {off} to"), &self.what)? as usize;
        if n != buf.len() {
            return Err(RbdError::new(
                libc::EIO,
                format!(
                    "short write at {off} to {}: {n} of {}",
                    self.what,
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Synchronous flush.
    pub fn flush(&self) -> RbdResult<()> {
        // SAFETY: live image.
        check(
            unsafe { (self.api.rbd_flush)(self.h) } as i64,
            "flushing",
            &self.what,
        )?;
        Ok(())
    }

    /// Registers `cb(arg)` to be called (on a librbd thread) whenever the image header
    /// changes (resize, snapshots, features); returns the watch handle.
    ///
    /// # Safety
    /// `arg` must stay valid until [`Image::update_unwatch`] returns for this handle.
    pub unsafe fn update_watch(
        &self,
        cb: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
    ) -> RbdResult<u64> {
        let mut handle = 0u64;
        check(
            (self.api.rbd_update_watch)(self.h, &mut handle, Some(cb), arg) as i64,
            "watching",
            &self.what,
        )?;
        Ok(handle)
    }

    /// Removes a watch; when it returns, the callback no longer runs.
    pub fn update_unwatch(&self, handle: u64) -> RbdResult<()> {
        // SAFETY: live image.
        check(
            unsafe { (self.api.rbd_update_unwatch)(self.h, handle) } as i64,
            "unwatching",
            &self.what,
        )?;
        Ok(())
    }

    /// Creates a completion that calls `cb(completion, arg)` on a librbd thread.
    ///
    /// # Safety
    /// `arg` must stay valid until `cb` runs; `cb` must release the completion
    /// ([`Image::aio_release`]).
    pub unsafe fn aio_completion(
        &self,
        arg: *mut c_void,
        cb: AioCallback,
    ) -> Result<rbd_completion_t, i32> {
        let mut c: rbd_completion_t = ptr::null_mut();
        let rc = (self.api.rbd_aio_create_completion)(arg, Some(cb), &mut c);
        if rc < 0 {
            Err(-rc)
        } else {
            Ok(c)
        }
    }

    /// The API table, for completion callbacks (`rbd_aio_get_return_value`/`release`).
    pub fn api(&self) -> &'static Api {
        self.api
    }

    /// Starts one aio; `Err(errno)` when librbd refused to start it (the completion was
    /// not consumed and must be released by the caller).
    ///
    /// # Safety
    /// The buffers of `op` must stay valid until the completion fires.
    pub unsafe fn aio_start(&self, op: AioOp, c: rbd_completion_t) -> Result<(), i32> {
        let a = self.api;
        let rc = match op {
            AioOp::Readv { iov, cnt, off } => (a.rbd_aio_readv)(self.h, iov, cnt, off, c),
            AioOp::Writev { iov, cnt, off } => (a.rbd_aio_writev)(self.h, iov, cnt, off, c),
            AioOp::Flush => (a.rbd_aio_flush)(self.h, c),
            AioOp::Discard { off, len } => (a.rbd_aio_discard)(self.h, off, len, c),
            AioOp::WriteZeroes { off, len } => {
                (a.rbd_aio_write_zeroes)(self.h, off, len as usize, c, 0, 0)
            }
        };
        if rc < 0 {
            Err(-rc)
        } else {
            Ok(())
        }
    }
}

/// An asynchronous operation for [`Image::aio_start`].
#[derive(Clone, Copy, Debug)]
pub enum AioOp {
    Readv {
        iov: *const libc::iovec,
        cnt: c_int,
        off: u64,
    },
    Writev {
        iov: *const libc::iovec,
        cnt: c_int,
        off: u64,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
}

type SnapFn = unsafe extern "C" fn(rbd_image_t, *const c_char) -> c_int;
type U64Fn = unsafe extern "C" fn(rbd_image_t, *mut u64) -> c_int;
type TimeFn = unsafe extern "C" fn(rbd_image_t, *mut libc::timespec) -> c_int;

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: live image; no aio is in flight (channels hold an Arc to the image and
        // completion contexts do not reference it).
        let rc = unsafe { (self.api.rbd_close)(self.h) };
        if rc < 0 {
            tracing::warn!("closing {}: {}", self.what, super::error::strerror(-rc));
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({})", self.what)
    }
}
