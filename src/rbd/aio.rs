//! Asynchronous I/O on an open image, the rbd bdev's data path: librbd runs each request
//! on its own threads and calls back on one of them when it completes.

use std::ffi::{c_int, c_void};
use std::ptr;

use super::ffi::{rbd_completion_t, Api};
use super::image::Image;

/// Called on a librbd thread when an aio finishes: `(completion, arg)`.
pub type AioCallback = unsafe extern "C" fn(rbd_completion_t, *mut c_void);

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

impl Image {
    /// Creates a completion that calls `cb(completion, arg)` on a librbd thread.
    ///
    /// # Safety
    /// `arg` must stay valid until `cb` runs; `cb` must release the completion
    /// (`rbd_aio_release` through [`Image::api`]).
    pub unsafe fn aio_completion(
        &self,
        arg: *mut c_void,
        cb: AioCallback,
    ) -> Result<rbd_completion_t, i32> {
        let mut c: rbd_completion_t = ptr::null_mut();
        // SAFETY: out-pointer; the caller keeps `arg` valid until `cb` runs.
        let rc = unsafe { (self.api.rbd_aio_create_completion)(arg, Some(cb), &mut c) };
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
        // SAFETY: live image and completion; the caller keeps the buffers `op` points to
        // valid until the completion fires.
        let rc = unsafe {
            match op {
                AioOp::Readv { iov, cnt, off } => (a.rbd_aio_readv)(self.h, iov, cnt, off, c),
                AioOp::Writev { iov, cnt, off } => (a.rbd_aio_writev)(self.h, iov, cnt, off, c),
                AioOp::Flush => (a.rbd_aio_flush)(self.h, c),
                AioOp::Discard { off, len } => (a.rbd_aio_discard)(self.h, off, len, c),
                AioOp::WriteZeroes { off, len } => {
                    (a.rbd_aio_write_zeroes)(self.h, off, len as usize, c, 0, 0)
                }
            }
        };
        if rc < 0 {
            Err(-rc)
        } else {
            Ok(())
        }
    }
}
