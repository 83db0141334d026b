//! Errors of librados/librbd calls: the errno plus a message naming what failed.

/// A failed librados/librbd operation.
///
/// `errno` is positive (`libc::ENOENT`); `message` names the object: "image testpool/nosuch
/// not found", "permission denied connecting to cluster ceph as client.admin".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RbdError {
    pub errno: i32,
    pub message: String,
}

/// `ELIBACC`: "Can not access a needed shared library", for a missing librbd.
pub const ENOLIB: i32 = libc::ELIBACC;

impl RbdError {
    /// An error with a message of the caller's choosing.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        RbdError {
            errno,
            message: message.into(),
        }
    }

    /// librbd/librados are not loadable.
    pub fn not_installed(why: &str) -> Self {
        Self::new(ENOLIB, why)
    }

    /// Invalid argument given by the caller (bad spec, bad size).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }

    /// From a negative return code of a C call: `op` is what was attempted ("opening",
    /// "creating"), `what` the object ("image testpool/foo", "pool rbd").
    pub fn from_rc(rc: i64, op: &str, what: &str) -> Self {
        let errno = i32::try_from(-rc).unwrap_or(libc::EIO).max(1);
        let message = match errno {
            libc::ENOENT => format!("{what} not found"),
            libc::EEXIST => format!("{what} already exists"),
            libc::EACCES | libc::EPERM => format!("permission denied {op} {what}"),
            _ => format!("{op} {what} failed: {}", strerror(errno)),
        };
        RbdError { errno, message }
    }
}

/// `strerror(errno)` without std's " (os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Result of this module's operations.
pub type RbdResult<T> = Result<T, RbdError>;

/// Turns a C return code into a result (`rc < 0` is `-errno`).
pub(crate) fn check(rc: i64, op: &str, what: &str) -> RbdResult<i64> {
    if rc < 0 {
        Err(RbdError::from_rc(rc, op, what))
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_object() {
        let e = RbdError::from_rc(-2, "opening", "image testpool/nosuch");
        assert_eq!(e.errno, libc::ENOENT);
        assert_eq!(e.message, "image testpool/nosuch not found");
        let e = RbdError::from_rc(-13, "connecting to", "cluster ceph as client.admin");
        assert_eq!(e.errno, libc::EACCES);
        assert_eq!(
            e.message,
            "permission denied connecting to cluster ceph as client.admin"
        );
        let e = RbdError::from_rc(-5, "reading", "image p/i");
        assert_eq!(e.message, "reading image p/i failed: Input/output error");
    }
}
