//! LUKS1/LUKS2 encryption of RBD images through librbd (Ceph 16 `rbd_encryption_format`,
//! `rbd_encryption_load`): the format `rbd encryption format` writes and QEMU's rbd driver
//! opens with `encrypt.format=luks2`. Once loaded, every read and write of the image handle
//! goes through librbd's crypto layer: callers see the plaintext, RADOS holds ciphertext.

use std::ffi::c_char;

use super::error::check;
use super::ffi::{
    encryption_api, rbd_encryption_luks_format_options_t, RBD_ENCRYPTION_ALGORITHM_AES256,
    RBD_ENCRYPTION_FORMAT_LUKS1, RBD_ENCRYPTION_FORMAT_LUKS2,
};
use super::{Image, RbdError, RbdResult};

/// A LUKS version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncryptionFormat {
    Luks1,
    Luks2,
}

impl EncryptionFormat {
    /// `luks1` or `luks2` (`rbd encryption format`'s and QEMU's names).
    pub fn parse(s: &str) -> RbdResult<Self> {
        match s {
            "luks1" => Ok(EncryptionFormat::Luks1),
            "luks2" => Ok(EncryptionFormat::Luks2),
            _ => Err(RbdError::invalid(format!(
                "encryption format {s} is not supported (luks1 or luks2)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionFormat::Luks1 => "luks1",
            EncryptionFormat::Luks2 => "luks2",
        }
    }

    fn raw(self) -> i32 {
        match self {
            EncryptionFormat::Luks1 => RBD_ENCRYPTION_FORMAT_LUKS1,
            EncryptionFormat::Luks2 => RBD_ENCRYPTION_FORMAT_LUKS2,
        }
    }
}

impl Image {
    /// Calls `rbd_encryption_format` or `_load` with `passphrase` (borrowed: the caller
    /// keeps it in locked, zeroed-on-drop memory; librbd copies it).
    fn encryption_call(
        &self,
        format: EncryptionFormat,
        passphrase: &[u8],
        load: bool,
    ) -> RbdResult<()> {
        let api = encryption_api().map_err(RbdError::not_installed)?;
        let mut opts = rbd_encryption_luks_format_options_t {
            alg: RBD_ENCRYPTION_ALGORITHM_AES256,
            passphrase: passphrase.as_ptr().cast::<c_char>(),
            passphrase_size: passphrase.len(),
        };
        let f = if load {
            api.rbd_encryption_load
        } else {
            api.rbd_encryption_format
        };
        // SAFETY: live image; `opts` is the options struct of the size given, pointing to
        // `passphrase`, which outlives the call.
        let rc = unsafe {
            f(
                self.h,
                format.raw(),
                (&mut opts as *mut rbd_encryption_luks_format_options_t).cast(),
                std::mem::size_of::<rbd_encryption_luks_format_options_t>(),
            )
        };
        let op = if load { "loading" } else { "formatting" };
        match check(
            rc as i64,
            &format!("{op} {} encryption of", format.as_str()),
            &self.what,
        ) {
            Err(e) if load && matches!(e.errno, libc::EPERM | libc::EINVAL | libc::ENOENT) => {
                Err(RbdError::new(
                    e.errno,
                    format!(
                        "cannot load {} encryption of {}: wrong passphrase, or not a {} \
                         image ({})",
                        format.as_str(),
                        self.what,
                        format.as_str().to_uppercase(),
                        super::error::strerror(e.errno)
                    ),
                ))
            }
            r => r.map(|_| ()),
        }
    }

    /// Loads the image's LUKS header with `passphrase`: from then on this handle reads and
    /// writes plaintext. A wrong passphrase fails with an error naming the image.
    pub fn encryption_load(&self, format: EncryptionFormat, passphrase: &[u8]) -> RbdResult<()> {
        self.encryption_call(format, passphrase, true)
    }

    /// Writes a LUKS header (AES-256) protected by `passphrase` (`rbd encryption format`).
    pub fn encryption_format(&self, format: EncryptionFormat, passphrase: &[u8]) -> RbdResult<()> {
        self.encryption_call(format, passphrase, false)
    }
}
