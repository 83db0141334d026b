//! Ceph RBD access shared by the rbd bdev and `blockctl image`/`pool`: run-time loaded
//! librados/librbd bindings ([`ffi`]) and safe owners of their handles ([`Rados`],
//! [`IoCtx`], [`Image`]) whose errors name the cluster, pool and image ([`RbdError`]):
//! connections and pools in [`rados`], images in [`image`], their snapshots in
//! [`snapshot`], asynchronous I/O in [`aio`]. How `blockctl` shows what they return is
//! the CLI's business (`crate::rbdcli::present`).

pub mod aio;
pub mod encryption;
pub mod error;
pub mod ffi;
pub mod image;
pub mod rados;
pub mod snapshot;

pub use aio::{AioCallback, AioOp};
pub use encryption::EncryptionFormat;
pub use error::{RbdError, RbdResult};
pub use image::{CreateOptions, Image, ImageInfo, Watcher};
pub use rados::{ConnectOptions, IoCtx, Rados};
pub use snapshot::SnapInfo;

/// `POOL/IMAGE[@SNAP]` as the `rbd` tool spells it; the pool defaults to `rbd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

impl ImageSpec {
    /// Parses `POOL/IMAGE[@SNAP]` or `IMAGE[@SNAP]`.
    pub fn parse(s: &str) -> RbdResult<Self> {
        let (rest, snap) = match s.split_once('@') {
            Some((r, sn)) if !sn.is_empty() => (r, Some(sn.to_string())),
            Some(_) => return Err(RbdError::invalid(format!("empty snapshot name in {s:?}"))),
            None => (s, None),
        };
        let (pool, image) = match rest.split_once('/') {
            Some((p, i)) => (p, i),
            None => ("rbd", rest),
        };
        if pool.is_empty() || image.is_empty() || image.contains('/') {
            return Err(RbdError::invalid(format!("{s:?} is not POOL/IMAGE[@SNAP]")));
        }
        Ok(ImageSpec {
            pool: pool.into(),
            image: image.into(),
            snap,
        })
    }

    /// Same, requiring a snapshot.
    pub fn parse_snap(s: &str) -> RbdResult<(Self, String)> {
        let spec = Self::parse(s)?;
        match spec.snap.clone() {
            Some(sn) => Ok((spec, sn)),
            None => Err(RbdError::invalid(format!(
                "{s:?} names no snapshot: use POOL/IMAGE@SNAP"
            ))),
        }
    }
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs() {
        let s = ImageSpec::parse("p/i@s").unwrap();
        assert_eq!((s.pool.as_str(), s.image.as_str()), ("p", "i"));
        assert_eq!(s.snap.as_deref(), Some("s"));
        assert_eq!(ImageSpec::parse("i").unwrap().pool, "rbd");
        assert!(ImageSpec::parse("p/").is_err());
        assert!(ImageSpec::parse("/i").is_err());
        assert!(ImageSpec::parse("p/i@").is_err());
        assert!(ImageSpec::parse("p/a/b").is_err());
        assert!(ImageSpec::parse_snap("p/i").is_err());
        assert_eq!(ImageSpec::parse("p/i@s").unwrap().to_string(), "p/i@s");
    }
}
