//! Images (`rbd_image_t`): creating, listing, opening, cloning and removing them on a pool,
//! and an open image's metadata, maintenance and synchronous I/O. These calls block: they
//! belong on a control thread, never on a reactor. Snapshots are in [`super::snapshot`], the
//! asynchronous I/O of the rbd bdev in [`super::aio`].

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::{check, RbdError, RbdResult};
use super::ffi::{self, rbd_image_t, Api};
use super::rados::{c_buf_to_string, cstr, IoCtx};

/// What `rbd info` reports, as librbd gives it (the bits and times as numbers: the CLI
/// names and formats them as `rbd` does).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: i32,
    pub block_name_prefix: String,
    /// Feature bits (`RBD_FEATURE_*`).
    pub features: u64,
    /// Operation feature bits (`RBD_OPERATION_FEATURE_*`).
    pub op_features: u64,
    /// Image flags (`RBD_FLAG_*`).
    pub flags: u64,
    pub snapshot_count: usize,
    /// `pool/image@snap` of the parent of a clone.
    pub parent: Option<String>,
    pub create_timestamp: SystemTime,
    pub access_timestamp: SystemTime,
    pub modify_timestamp: SystemTime,
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
        let set = |option: c_int, value: u64, op: &str| {
            // SAFETY: live options handle (owned by `opts`, dropped after this closure).
            let rc = unsafe { (api.rbd_image_options_set_uint64)(h, option, value) };
            check(rc as i64, op, what)
        };
        set(ffi::RBD_IMAGE_OPTION_FORMAT, 2, "setting options of")?;
        if let Some(order) = o.order {
            set(
                ffi::RBD_IMAGE_OPTION_ORDER,
                order as u64,
                "setting the order of",
            )?;
        }
        if let Some(f) = o.features {
            set(ffi::RBD_IMAGE_OPTION_FEATURES, f, "setting the features of")?;
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
        let rc = unsafe { (self.api().rbd_create4)(self.raw(), n.as_ptr(), size, opts.h) };
        check(rc as i64, "creating", &what)?;
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
                .map(|s| {
                    // SAFETY: librbd filled `max` specs with C strings.
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
        let open = if read_only {
            self.api().rbd_open_read_only
        } else {
            self.api().rbd_open
        };
        let snap_ptr = s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: live ioctx, C strings (or NULL for no snapshot), out-pointer.
        let rc = unsafe { open(self.raw(), n.as_ptr(), &mut h, snap_ptr) };
        check(rc as i64, "opening", &what)?;
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
    pub(super) api: &'static Api,
    pub(super) h: rbd_image_t,
    pub(super) ioctx: Arc<IoCtx>,
    pub(super) name: String,
    pub(super) what: String,
}

// SAFETY: librbd serializes access to an image internally; aio calls may come from any
// thread.
unsafe impl Send for Image {}
// SAFETY: as for Send: every method takes `&self` and librbd locks the image inside.
unsafe impl Sync for Image {}

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

    /// Size in bytes, refreshing the header first when another client changed it.
    pub fn stat(&self) -> RbdResult<ffi::rbd_image_info_t> {
        // SAFETY: all-zero is a valid rbd_image_info_t.
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<ffi::rbd_image_info_t>();
        // SAFETY: live image, struct of the given size.
        let rc = unsafe { (self.api.rbd_stat)(self.h, &mut info, len) };
        check(rc as i64, "getting the size of", &self.what)?;
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
        let rc = unsafe { (self.api.rbd_get_features)(self.h, &mut f) };
        check(rc as i64, "getting the features of", &self.what)?;
        Ok(f)
    }

    /// Everything `rbd info` shows.
    pub fn info(&self) -> RbdResult<ImageInfo> {
        let st = self.stat()?;
        let mut id = vec![0 as c_char; 64];
        // SAFETY: live image, buffer of the given length.
        let rc = unsafe { (self.api.rbd_get_id)(self.h, id.as_mut_ptr(), id.len()) };
        check(rc as i64, "getting the id of", &self.what)?;
        let mut prefix = vec![0 as c_char; 64];
        // SAFETY: live image, buffer of the given length.
        let rc = unsafe {
            (self.api.rbd_get_block_name_prefix)(self.h, prefix.as_mut_ptr(), prefix.len())
        };
        check(rc as i64, "getting the block name prefix of", &self.what)?;
        Ok(ImageInfo {
            name: self.name.clone(),
            id: c_buf_to_string(&id),
            size: st.size,
            obj_size: st.obj_size,
            num_objs: st.num_objs,
            order: st.order,
            block_name_prefix: c_buf_to_string(&prefix),
            features: self.features()?,
            op_features: self.u64_prop("op features", self.api.rbd_get_op_features)?,
            flags: self.u64_prop("flags", self.api.rbd_get_flags)?,
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
        let rc = unsafe { f(self.h, &mut v) };
        check(rc as i64, &format!("getting the {what} of"), &self.what)?;
        Ok(v)
    }

    fn timestamp(&self, what: &str, f: TimeFn) -> RbdResult<SystemTime> {
        // SAFETY: all-zero is a valid timespec.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: live image, out-pointer.
        let rc = unsafe { f(self.h, &mut ts) };
        check(rc as i64, &format!("getting the {what} of"), &self.what)?;
        Ok(system_time(&ts))
    }

    /// Gives up the exclusive lock if this handle owns it (so that another client's writes
    /// need not wait for this one's watch to time out); `false` when it did not own it.
    /// The next write through this handle takes it again.
    pub fn lock_release(&self) -> bool {
        // SAFETY: live image.
        unsafe { (self.api.rbd_lock_release)(self.h) == 0 }
    }

    /// The client addresses owning the image's exclusive lock (`rbd_lock_get_owners`);
    /// empty when nobody holds it.
    pub fn lock_owners(&self) -> RbdResult<Vec<String>> {
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n = owners.len();
        // SAFETY: live image; an array of `n` pointers librbd fills and we release with
        // rbd_lock_get_owners_cleanup.
        let rc = unsafe {
            (self.api.rbd_lock_get_owners)(self.h, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(rc as i64, "getting the lock owners of", &self.what)?;
        let n = n.min(owners.len());
        let list = owners[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: NUL-terminated strings librbd allocated, alive until the cleanup.
            .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the `n` entries librbd filled, released once.
        unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(list)
    }

    /// Breaks the exclusive lock held by `owner` (`rbd_lock_break`; librbd blocklists the
    /// owner first unless `rbd_blocklist_on_break_lock` is off). Only for an owner known to
    /// be dead: a live one loses its writes.
    pub fn lock_break(&self, owner: &str) -> RbdResult<()> {
        let o = cstr(owner, "lock owner")?;
        // SAFETY: live image, C string; 0 is RBD_LOCK_MODE_EXCLUSIVE.
        let rc = unsafe { (self.api.rbd_lock_break)(self.h, 0, o.as_ptr()) };
        check(
            rc as i64,
            &format!("breaking the lock of {owner} on"),
            &self.what,
        )?;
        Ok(())
    }

    /// Copies the parent's data into this clone and detaches it.
    pub fn flatten(&self) -> RbdResult<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.api.rbd_flatten)(self.h) };
        check(rc as i64, "flattening", &self.what)?;
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
        let rc = unsafe { (self.api.rbd_resize)(self.h, size) };
        check(rc as i64, "resizing", &self.what)?;
        Ok(())
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
        let rc = unsafe { (self.api.rbd_flush)(self.h) };
        check(rc as i64, "flushing", &self.what)?;
        Ok(())
    }

    /// Drops what librbd's cache holds of the image (`rbd_invalidate_cache`, flushing
    /// dirty data first): the next reads come from the OSDs. QEMU's rbd driver does it when
    /// a migrated guest's disk is activated on the destination, whose cache may hold data
    /// read before the source's last writes.
    pub fn invalidate_cache(&self) -> RbdResult<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.api.rbd_invalidate_cache)(self.h) };
        check(rc as i64, "invalidating the cache of", &self.what)?;
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
        // SAFETY: live image, out-pointer; the caller keeps `arg` valid while the watch
        // lasts, and librbd calls `cb` with nothing else.
        let rc = unsafe { (self.api.rbd_update_watch)(self.h, &mut handle, Some(cb), arg) };
        check(rc as i64, "watching", &self.what)?;
        Ok(handle)
    }

    /// Removes a watch; when it returns, the callback no longer runs.
    pub fn update_unwatch(&self, handle: u64) -> RbdResult<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.api.rbd_update_unwatch)(self.h, handle) };
        check(rc as i64, "unwatching", &self.what)?;
        Ok(())
    }
}

/// A librbd time as a `SystemTime`; one beyond what `SystemTime` holds (where it is
/// narrower than a `timespec`) becomes the epoch instead of a panic.
pub(super) fn system_time(ts: &libc::timespec) -> SystemTime {
    let nanos = Duration::from_nanos(ts.tv_nsec.clamp(0, 999_999_999) as u64);
    let t = if ts.tv_sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(ts.tv_sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(ts.tv_sec.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(sec: i64, nsec: i64) -> libc::timespec {
        // SAFETY: all-zero is a valid timespec.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        t.tv_sec = sec as libc::time_t;
        t.tv_nsec = nsec as _;
        t
    }

    #[test]
    fn librbd_times_convert_without_panicking() {
        assert_eq!(
            system_time(&ts(1_700_000_000, 5)),
            UNIX_EPOCH + Duration::new(1_700_000_000, 5)
        );
        assert_eq!(
            system_time(&ts(-2, 500_000_000)),
            UNIX_EPOCH - Duration::from_millis(1_500)
        );
        // The extremes a corrupt header could hold convert without a panic.
        assert!(system_time(&ts(i64::MAX, 999_999_999)) > UNIX_EPOCH);
        assert!(system_time(&ts(i64::MIN, 0)) < UNIX_EPOCH);
        assert_eq!(
            system_time(&ts(0, -1)),
            UNIX_EPOCH,
            "negative nanoseconds clamp to 0"
        );
    }
}
