//! The subset of the librados/librbd C API blockd uses, loaded at run time with `dlopen`.
//!
//! Loading at run time keeps `cargo build` and the daemon working on machines without Ceph:
//! only creating an rbd bdev or running `blockctl image`/`pool` needs `librbd.so.1` and
//! `librados.so.2` (Debian/Ubuntu: `apt install librbd1`). Signatures follow
//! `rados/librados.h` and `rbd/librbd.h` of Ceph 16 (Pacific); every function used here
//! exists since Ceph 14 (Nautilus), which added `rbd_aio_readv`/`rbd_aio_writev`.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`: a cluster handle.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context bound to one pool.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_image_options_t`.
pub type rbd_image_options_t = *mut c_void;
/// `rbd_completion_t`: one asynchronous operation.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: called on a librbd thread when an aio completes.
pub type rbd_callback_t = Option<unsafe extern "C" fn(rbd_completion_t, *mut c_void)>;
/// `rbd_update_callback_t`: called on a librbd thread when the image header changes.
pub type rbd_update_callback_t = Option<unsafe extern "C" fn(*mut c_void)>;

/// `RBD_MAX_BLOCK_NAME_SIZE`.
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
/// `RBD_MAX_IMAGE_NAME_SIZE`.
pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;

/// `RBD_IMAGE_OPTION_FORMAT`.
pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
/// `RBD_IMAGE_OPTION_FEATURES`.
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
/// `RBD_IMAGE_OPTION_ORDER`.
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;

/// `rbd_image_info_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

/// `rbd_image_spec_t` (from `rbd_list2`).
#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t` (from `rbd_snap_list`).
#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_linked_image_spec_t` (from `rbd_get_parent`).
#[repr(C)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_snap_spec_t` (from `rbd_get_parent`).
#[repr(C)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

/// `rbd_image_watcher_t` (from `rbd_watchers_list`).
#[repr(C)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

/// Callback of `rbd_diff_iterate2`: `(offset, length, exists, arg)`; non-zero stops.
pub type rbd_diff_cb = Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>;

macro_rules! api {
    ($( $lib:ident fn $name:ident ( $($arg:ty),* ) -> $ret:ty ;)*) => {
        /// Function pointers resolved from librados/librbd.
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        impl Api {
            /// Resolves every symbol; fails naming the first one missing.
            ///
            /// # Safety
            /// `rados` and `rbd` must be live `dlopen` handles of the libraries.
            unsafe fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let h = if stringify!($lib) == "rados" { rados } else { rbd };
                        let sym = concat!(stringify!($name), "\0");
                        // SAFETY: `h` is a live dlopen handle (the caller's contract) and
                        // `sym` a NUL-terminated name.
                        let p = unsafe { libc::dlsym(h, sym.as_ptr() as *const c_char) };
                        if p.is_null() {
                            return Err(format!(
                                "lib{} has no symbol {} (Ceph 14 or newer is needed)",
                                stringify!($lib), stringify!($name)
                            ));
                        }
                        // SAFETY: `p` is the non-NULL address of the C function of that
                        // name, whose signature the table declares as in the library's header.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(p)
                        }
                    }, )*
                })
            }
        }
    };
}

api! {
    rados fn rados_create2(*mut rados_t, *const c_char, *const c_char, u64) -> c_int;
    rados fn rados_conf_read_file(rados_t, *const c_char) -> c_int;
    rados fn rados_conf_parse_env(rados_t, *const c_char) -> c_int;
    rados fn rados_conf_set(rados_t, *const c_char, *const c_char) -> c_int;
    rados fn rados_conf_get(rados_t, *const c_char, *mut c_char, usize) -> c_int;
    rados fn rados_connect(rados_t) -> c_int;
    rados fn rados_shutdown(rados_t) -> ();
    rados fn rados_cluster_fsid(rados_t, *mut c_char, usize) -> c_int;
    rados fn rados_ioctx_create(rados_t, *const c_char, *mut rados_ioctx_t) -> c_int;
    rados fn rados_ioctx_destroy(rados_ioctx_t) -> ();
    rados fn rados_pool_create(rados_t, *const c_char) -> c_int;
    rados fn rados_pool_list(rados_t, *mut c_char, usize) -> c_int;
    rados fn rados_pool_delete(rados_t, *const c_char) -> c_int;
    rados fn rados_mon_command(rados_t, *mut *const c_char, usize, *const c_char, usize, *mut *mut c_char, *mut usize, *mut *mut c_char, *mut usize) -> c_int;
    rados fn rados_buffer_free(*mut c_char) -> ();
    rados fn rados_getaddrs(rados_t, *mut *mut c_char) -> c_int;
    rbd fn rbd_version(*mut c_int, *mut c_int, *mut c_int) -> ();
    rbd fn rbd_pool_init(rados_ioctx_t, bool) -> c_int;
    rbd fn rbd_image_options_create(*mut rbd_image_options_t) -> ();
    rbd fn rbd_image_options_destroy(rbd_image_options_t) -> ();
    rbd fn rbd_image_options_set_uint64(rbd_image_options_t, c_int, u64) -> c_int;
    rbd fn rbd_create4(rados_ioctx_t, *const c_char, u64, rbd_image_options_t) -> c_int;
    rbd fn rbd_clone3(rados_ioctx_t, *const c_char, *const c_char, rados_ioctx_t, *const c_char, rbd_image_options_t) -> c_int;
    rbd fn rbd_remove(rados_ioctx_t, *const c_char) -> c_int;
    rbd fn rbd_list2(rados_ioctx_t, *mut rbd_image_spec_t, *mut usize) -> c_int;
    rbd fn rbd_image_spec_list_cleanup(*mut rbd_image_spec_t, usize) -> ();
    rbd fn rbd_open(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_open_read_only(rados_ioctx_t, *const c_char, *mut rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_close(rbd_image_t) -> c_int;
    rbd fn rbd_get_op_features(rbd_image_t, *mut u64) -> c_int;
    rbd fn rbd_get_flags(rbd_image_t, *mut u64) -> c_int;
    rbd fn rbd_get_create_timestamp(rbd_image_t, *mut libc::timespec) -> c_int;
    rbd fn rbd_get_access_timestamp(rbd_image_t, *mut libc::timespec) -> c_int;
    rbd fn rbd_get_modify_timestamp(rbd_image_t, *mut libc::timespec) -> c_int;
    rbd fn rbd_snap_get_timestamp(rbd_image_t, u64, *mut libc::timespec) -> c_int;
    rbd fn rbd_flatten(rbd_image_t) -> c_int;
    rbd fn rbd_lock_release(rbd_image_t) -> c_int;
    rbd fn rbd_lock_get_owners(rbd_image_t, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd fn rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    rbd fn rbd_lock_break(rbd_image_t, c_int, *const c_char) -> c_int;
    rbd fn rbd_diff_iterate2(rbd_image_t, *const c_char, u64, u64, u8, u8, rbd_diff_cb, *mut c_void) -> c_int;
    rbd fn rbd_watchers_list(rbd_image_t, *mut rbd_image_watcher_t, *mut usize) -> c_int;
    rbd fn rbd_watchers_list_cleanup(*mut rbd_image_watcher_t, usize) -> ();
    rbd fn rbd_stat(rbd_image_t, *mut rbd_image_info_t, usize) -> c_int;
    rbd fn rbd_get_size(rbd_image_t, *mut u64) -> c_int;
    rbd fn rbd_get_features(rbd_image_t, *mut u64) -> c_int;
    rbd fn rbd_get_id(rbd_image_t, *mut c_char, usize) -> c_int;
    rbd fn rbd_get_block_name_prefix(rbd_image_t, *mut c_char, usize) -> c_int;
    rbd fn rbd_get_parent(rbd_image_t, *mut rbd_linked_image_spec_t, *mut rbd_snap_spec_t) -> c_int;
    rbd fn rbd_linked_image_spec_cleanup(*mut rbd_linked_image_spec_t) -> ();
    rbd fn rbd_snap_spec_cleanup(*mut rbd_snap_spec_t) -> ();
    rbd fn rbd_resize(rbd_image_t, u64) -> c_int;
    rbd fn rbd_snap_list(rbd_image_t, *mut rbd_snap_info_t, *mut c_int) -> c_int;
    rbd fn rbd_snap_list_end(*mut rbd_snap_info_t) -> ();
    rbd fn rbd_snap_create(rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_snap_remove(rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_snap_rollback(rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_snap_protect(rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_snap_unprotect(rbd_image_t, *const c_char) -> c_int;
    rbd fn rbd_snap_is_protected(rbd_image_t, *const c_char, *mut c_int) -> c_int;
    rbd fn rbd_read(rbd_image_t, u64, usize, *mut c_char) -> isize;
    rbd fn rbd_write(rbd_image_t, u64, usize, *const c_char) -> isize;
    rbd fn rbd_flush(rbd_image_t) -> c_int;
    rbd fn rbd_invalidate_cache(rbd_image_t) -> c_int;
    rbd fn rbd_aio_create_completion(*mut c_void, rbd_callback_t, *mut rbd_completion_t) -> c_int;
    rbd fn rbd_aio_get_return_value(rbd_completion_t) -> isize;
    rbd fn rbd_aio_release(rbd_completion_t) -> ();
    rbd fn rbd_aio_readv(rbd_image_t, *const libc::iovec, c_int, u64, rbd_completion_t) -> c_int;
    rbd fn rbd_aio_writev(rbd_image_t, *const libc::iovec, c_int, u64, rbd_completion_t) -> c_int;
    rbd fn rbd_aio_flush(rbd_image_t, rbd_completion_t) -> c_int;
    rbd fn rbd_aio_discard(rbd_image_t, u64, u64, rbd_completion_t) -> c_int;
    rbd fn rbd_aio_write_zeroes(rbd_image_t, u64, usize, rbd_completion_t, c_int, c_int) -> c_int;
    rbd fn rbd_update_watch(rbd_image_t, *mut u64, rbd_update_callback_t, *mut c_void) -> c_int;
    rbd fn rbd_update_unwatch(rbd_image_t, u64) -> c_int;
}

// SAFETY: the table only holds function pointers into libraries that stay loaded forever.
unsafe impl Send for Api {}
// SAFETY: as for Send: the pointers never change after `resolve`.
unsafe impl Sync for Api {}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated thread-local string.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn load() -> Result<Api, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handles are never closed, so the
    // resolved pointers stay valid for the life of the process.
    unsafe {
        let rados = libc::dlopen(
            c"librados.so.2".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL,
        );
        if rados.is_null() {
            return Err(format!(
                "librados is not installed: apt install librados2 ({})",
                dlerror()
            ));
        }
        let rbd = libc::dlopen(c"librbd.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if rbd.is_null() {
            return Err(format!(
                "librbd is not installed: apt install librbd1 ({})",
                dlerror()
            ));
        }
        Api::resolve(rados, rbd)
    }
}

/// The loaded API, or why it cannot be loaded ("librbd is not installed: apt install
/// librbd1 ..."). Loads the libraries on first use.
pub fn api() -> Result<&'static Api, &'static str> {
    API.get_or_init(load).as_ref().map_err(|e| e.as_str())
}

/// librbd's version `(major, minor, extra)`, when it is installed.
pub fn rbd_version() -> Option<(i32, i32, i32)> {
    let a = api().ok()?;
    let (mut x, mut y, mut z) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints.
    unsafe { (a.rbd_version)(&mut x, &mut y, &mut z) };
    Some((x, y, z))
}

/// `rbd_encryption_format_t` of Ceph 16 (Pacific): `RBD_ENCRYPTION_FORMAT_LUKS1`.
pub const RBD_ENCRYPTION_FORMAT_LUKS1: c_int = 0;
/// `RBD_ENCRYPTION_FORMAT_LUKS2`.
pub const RBD_ENCRYPTION_FORMAT_LUKS2: c_int = 1;
/// `rbd_encryption_algorithm_t`: `RBD_ENCRYPTION_ALGORITHM_AES256` (what `rbd encryption
/// format` uses by default).
pub const RBD_ENCRYPTION_ALGORITHM_AES256: c_int = 1;

/// `rbd_encryption_luks1_format_options_t` and `rbd_encryption_luks2_format_options_t`
/// (the same layout in Ceph 16): the cipher for `format` (ignored by `load`) and the
/// passphrase, not NUL-terminated.
#[repr(C)]
pub struct rbd_encryption_luks_format_options_t {
    pub alg: c_int,
    pub passphrase: *const c_char,
    pub passphrase_size: usize,
}

/// `rbd_encryption_format`/`rbd_encryption_load(image, format, opts, opts_size)`.
pub type rbd_encryption_fn = unsafe extern "C" fn(rbd_image_t, c_int, *mut c_void, usize) -> c_int;

/// librbd's LUKS calls (Ceph 16 and newer): resolved apart from [`Api`] so that older
/// librbds still serve unencrypted images.
pub struct EncryptionApi {
    pub rbd_encryption_format: rbd_encryption_fn,
    pub rbd_encryption_load: rbd_encryption_fn,
}

static ENCRYPTION_API: OnceLock<Result<EncryptionApi, String>> = OnceLock::new();

/// The LUKS calls, or why they are missing (librbd older than Ceph 16).
pub fn encryption_api() -> Result<&'static EncryptionApi, &'static str> {
    ENCRYPTION_API
        .get_or_init(|| {
            api().map_err(str::to_string)?;
            let sym = |name: &CStr| {
                // SAFETY: librbd was loaded RTLD_GLOBAL by `api()` and is never unloaded;
                // `name` is NUL-terminated.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                if p.is_null() {
                    return Err(format!(
                        "librbd has no {} (LUKS encryption needs Ceph 16 or newer)",
                        name.to_string_lossy()
                    ));
                }
                // SAFETY: the non-NULL address of the C function of that name, whose
                // signature (Ceph 16 rbd/librbd.h) `rbd_encryption_fn` declares.
                Ok(unsafe { std::mem::transmute::<*mut c_void, rbd_encryption_fn>(p) })
            };
            Ok(EncryptionApi {
                rbd_encryption_format: sym(c"rbd_encryption_format")?,
                rbd_encryption_load: sym(c"rbd_encryption_load")?,
            })
        })
        .as_ref()
        .map_err(|e| e.as_str())
}
