//! The error of the daemon's domain operations (creating a bdev, a controller, an export):
//! an errno saying what kind of failure it is, and a message naming the object.
//!
//! The domain never speaks JSON-RPC: as SPDK's `create_malloc_disk` returns `-errno` and only
//! `bdev_malloc_rpc.c` calls `spdk_jsonrpc_send_error_response`, each module's `rpc.rs` turns
//! an [`Error`] into the JSON-RPC error its method answers.

/// Who is at fault, which decides how a caller (the RPC layer) reports the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation failed (the object exists, is busy, the file cannot be opened).
    Failed,
    /// An argument the caller chose is outside its domain (an empty name, a block size that
    /// is not a power of two): JSON-RPC's "Invalid params".
    Argument,
    /// The daemon itself could not do it (no thread, no reactor): JSON-RPC's "Internal
    /// error".
    Internal,
}

/// A failed domain operation.
///
/// `errno` is positive (`libc::ENODEV`); `message` names the object ("bdev Malloc0 already
/// exists: File exists").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub errno: i32,
    pub message: String,
    pub fault: Fault,
}

impl Error {
    /// The operation failed with `errno`.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
            fault: Fault::Failed,
        }
    }

    /// An argument is invalid (`EINVAL`, [`Fault::Argument`]).
    pub fn invalid(message: impl Into<String>) -> Self {
        Error {
            fault: Fault::Argument,
            ..Self::new(libc::EINVAL, message)
        }
    }

    /// The daemon could not do it ([`Fault::Internal`]).
    pub fn internal(errno: i32, message: impl Into<String>) -> Self {
        Error {
            fault: Fault::Internal,
            ..Self::new(errno, message)
        }
    }

    /// From a failed system call: its errno (`EIO` when it has none), and `what` was being
    /// done to which object.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        Self::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{what}: {e}"),
        )
    }

    /// The same error with `prefix` (the object it happened to) in front of the message.
    pub fn context(self, prefix: impl std::fmt::Display) -> Self {
        Error {
            message: format!("{prefix}: {}", self.message),
            ..self
        }
    }
}

/// `strerror(errno)` without std's " (os error N)" suffix: the text SPDK puts in its error
/// messages.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Result of a domain operation.
pub type Result<T> = std::result::Result<T, Error>;
