//! Errors of the local pool, each with the errno a daemon answers it with.

use std::path::Path;

/// Why a local pool operation failed; messages name the pool, image or snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such pool, image or snapshot.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A pool, image or snapshot of that name exists.
    #[error("{0} already exists")]
    Exists(String),
    /// A name that cannot become a file name (see [`super::check_name`]).
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    /// The operation conflicts with the state (snapshots left, protected, served ...).
    #[error("{0}")]
    Busy(String),
    /// A request that makes no sense (shrink without allow_shrink, clone of an unprotected
    /// snapshot ...).
    #[error("{0}")]
    Invalid(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A metadata file that does not parse.
    #[error("corrupt metadata {path}: {why}")]
    Corrupt { path: String, why: String },
}

impl Error {
    /// The errno this error maps to (`ENOENT`, `EEXIST`, `EINVAL`, `EBUSY`, the I/O errno).
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::InvalidName { .. } | Error::Invalid(_) => libc::EINVAL,
            Error::Busy(_) => libc::EBUSY,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } => libc::EUCLEAN,
        }
    }

    /// An I/O error with what was being done to which path.
    pub fn io(what: &str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            context: format!("{what} {}", path.display()),
            source,
        }
    }
}

/// Result of local pool operations.
pub type Result<T> = std::result::Result<T, Error>;
