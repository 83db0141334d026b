//! The crypto bdev (SPDK's `bdev_crypto`): AES-XTS-256 over any bdev, keys by reference.
//!
//! `bdev_crypto_create {base_bdev_name, name, key_name}` claims the base bdev and presents
//! its plaintext. The key is a keyring key ([`crate::keyring`]) of 64 bytes (two AES-256
//! keys, as dm-crypt's `aes-xts-plain64` with a 512-bit key), raw or as 128 hex digits: the
//! saved configuration names it, never its bytes (SPDK puts the key into the RPC and its
//! saved config: spdk#1232).
//!
//! The layout is dm-crypt's `aes-xts-plain64` with a data unit of one logical block: block
//! `lba` is encrypted with the tweak `lba` as a little-endian 128-bit number (IEEE 1619
//! XTS; `plain64` is the low 64 bits, zero-extended). SPDK's `SIMPLE_LBA` tweak mode is the
//! same. A disk written through a crypto bdev of block size 512 is therefore readable by
//! `cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512` with the same key
//! file (and the other way round).
//!
//! Data path ([`channel`]): when the base lends its memory (zero-copy access, SPDK's
//! `spdk_bdev_zcopy_start`: malloc), a read decrypts from the base's memory into the
//! caller's buffers and a write encrypts the caller's buffers into the base's memory, each
//! one pass over the data. Otherwise reads go straight into the caller's buffers and are
//! decrypted in place when the base completes them; writes are encrypted from the caller's
//! buffers into a bounce buffer per request, which is then written. Either way the guest's
//! buffers are never modified by a write and are read once, and the base receives the same
//! bytes.
//! Flush and unmap pass through. Blocks unmapped on the base read back as the decryption
//! of whatever the base returns (zeroes, usually): garbage, as with dm-crypt's
//! `allow_discards`; the guest discarded them, so it has no expectation. Write-zeroes is
//! not offered: zeroes have to be encrypted to read back as zeroes, which is a write of the
//! whole range (the guest's own write is as good), and passing it down would leave
//! plaintext-recognizable zero blocks on the base.
//!
//! QoS limits and statistics apply to the crypto bdev (what the frontend sees) and, through
//! its channel, to the base as well: a zero-copy access counts in the base's
//! `bdev_get_iostat` as the read or write it is, and one the base's QoS does not admit at
//! once takes the copy path and waits in the base's throttle queue.
//!
//! Having no header on the base, the bdev cannot tell a wrong key from the data; instead it
//! records a key check value ([`key_check_of`]) that `save_config` writes as the
//! `key_check` parameter (a blockd extension). A replay whose key under that name is a
//! different key fails with `EKEYREJECTED`, naming the bdev and the key, and creates
//! nothing, as LUKS refuses a key that does not match its master-key digest (LUKS1 on-disk
//! format, `mk-digest`) instead of serving garbage.

mod channel;
pub mod rpc;
#[cfg(test)]
mod tests;
mod xts;

use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::Aes256;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{Bdev, BdevBackend, BdevParams, BdevRegistry, IoChannel, IoTypes};
use crate::error::Error;
use crate::keyring::{Key, Keyring};

/// `product_name` of crypto bdevs (SPDK's).
pub const PRODUCT_NAME: &str = "crypto";

/// Bytes of an AES-XTS-256 key: two AES-256 keys.
pub const XTS_KEY_LEN: usize = 64;

/// Bytes of the key check value (written as twice as many hex digits).
pub const KEY_CHECK_LEN: usize = 16;

/// What the key check value authenticates: says what it is for, so that the value is of no
/// use for anything else.
const KEY_CHECK_LABEL: &[u8] = b"blockd bdev_crypto key check v1: AES_XTS SIMPLE_LBA";

/// What `bdev_crypto_create` needs.
#[derive(Clone, Debug)]
pub struct CryptoOpts {
    pub base_bdev_name: String,
    pub name: String,
    pub key_name: String,
    /// The key check value the key must have ([`key_check_of`], hex), from a saved config.
    pub key_check: Option<String>,
    pub uuid: Option<Uuid>,
}

pub(crate) use xts::Cipher;

/// The XTS cipher of `key`: 64 raw bytes, or 128 hex digits (a trailing newline allowed).
/// The two halves must differ (IEEE 1619-2007 §5.1 weak keys; the kernel's
/// `xts_verify_key` refuses them too). Errors name the key, never its bytes.
pub(crate) fn cipher_of(key: &Key) -> crate::error::Result<Cipher> {
    let bytes = xts_key_of(key)?;
    let (k1, k2) = bytes.split_at(XTS_KEY_LEN / 2);
    let c1 = Aes256::new_from_slice(k1).map_err(|_| Error::invalid("bad AES key length"))?;
    let c2 = Aes256::new_from_slice(k2).map_err(|_| Error::invalid("bad AES key length"))?;
    Ok(Cipher::new(c1, c2))
}

/// The key check value of `key` (as hex): the first [`KEY_CHECK_LEN`] bytes of
/// HMAC-SHA256 (RFC 2104) keyed with the 64 decoded key bytes over a fixed label. A raw key
/// and its hex form have the same value. It reveals nothing of the key but whether a
/// guessed key is right, one HMAC per guess of a 512-bit key (LUKS keeps a digest of its
/// master key for the same purpose); it is not the ciphertext of anything the bdev stores.
pub(crate) fn key_check_of(key: &Key) -> crate::error::Result<String> {
    let bytes = xts_key_of(key)?;
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&bytes[..])
        .map_err(|_| Error::invalid("bad HMAC key length"))?;
    mac.update(KEY_CHECK_LABEL);
    let tag = mac.finalize().into_bytes();
    Ok(tag[..KEY_CHECK_LEN]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks the form of a `key_check` parameter: [`KEY_CHECK_LEN`] bytes in hex.
fn valid_key_check(v: &str) -> bool {
    v.len() == 2 * KEY_CHECK_LEN && v.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The 64 bytes of XTS key `key` (see [`cipher_of`]), zeroed when dropped.
fn xts_key_of(key: &Key) -> crate::error::Result<Zeroizing<[u8; XTS_KEY_LEN]>> {
    let what = format!("key {} ({})", key.name(), key.path().display());
    let raw = key.bytes();
    let mut bytes = Zeroizing::new([0u8; XTS_KEY_LEN]);
    if raw.len() == XTS_KEY_LEN {
        bytes.copy_from_slice(raw);
    } else {
        let hex = raw.strip_suffix(b"\n").unwrap_or(raw);
        if hex.len() != 2 * XTS_KEY_LEN {
            return Err(Error::invalid(format!(
                "{what}: an AES-XTS-256 key is {XTS_KEY_LEN} bytes or {} hex digits, \
                 the file holds {} bytes",
                2 * XTS_KEY_LEN,
                raw.len()
            )));
        }
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => bytes[i] = (h * 16 + l) as u8,
                _ => {
                    return Err(Error::invalid(format!(
                        "{what}: not {XTS_KEY_LEN} raw bytes and not hex digits"
                    )))
                }
            }
        }
    }
    let (k1, k2) = bytes.split_at(XTS_KEY_LEN / 2);
    if k1 == k2 {
        return Err(Error::invalid(format!(
            "{what}: the two halves of an XTS key must differ"
        )));
    }
    Ok(bytes)
}

/// The crypto backend.
struct CryptoBackend {
    base: Arc<Bdev>,
    /// Held so that `keyring_get_keys` counts this user, and a removed key stays loaded.
    key: Arc<Key>,
    cipher: Arc<Cipher>,
    /// The key's check value ([`key_check_of`]): saved with the config.
    key_check: String,
    /// Our claim on the base.
    owner: String,
}

/// Creates a crypto bdev over `opts.base_bdev_name` and registers it (`bdev_crypto_create`).
pub fn create(
    registry: &BdevRegistry,
    keyring: &Keyring,
    opts: CryptoOpts,
) -> crate::error::Result<Arc<Bdev>> {
    if opts.name.is_empty() {
        return Err(Error::invalid("name must not be empty"));
    }
    if registry.get(&opts.name).is_some() {
        return Err(super::registry::RegistryError::Exists(opts.name).into());
    }
    let ctx = |e: Error| e.context(format_args!("crypto bdev {}", opts.name));
    if let Some(want) = opts.key_check.as_deref().filter(|v| !valid_key_check(v)) {
        return Err(ctx(Error::invalid(format!(
            "key_check {want:?} is not {} hex digits",
            2 * KEY_CHECK_LEN
        ))));
    }
    let key = keyring.get(&opts.key_name).map_err(ctx)?;
    let cipher = Arc::new(cipher_of(&key).map_err(ctx)?);
    let key_check = key_check_of(&key).map_err(ctx)?;
    if let Some(want) = opts.key_check.as_deref() {
        if !want.eq_ignore_ascii_case(&key_check) {
            return Err(ctx(Error::new(
                libc::EKEYREJECTED,
                format!(
                    "key {} ({}) is not the key this bdev was created with (key_check \
                     {want} does not match it): refusing to serve undecryptable data",
                    key.name(),
                    key.path().display()
                ),
            )));
        }
    }
    let base = registry
        .get(&opts.base_bdev_name)
        .ok_or_else(|| super::registry::RegistryError::NotFound(opts.base_bdev_name.clone()))
        .map_err(|e| ctx(e.into()))?;
    let owner = format!("crypto bdev {}", opts.name);
    base.claim(&owner).map_err(|by| {
        ctx(super::registry::RegistryError::Claimed {
            bdev: base.name().to_string(),
            owner: by,
        }
        .into())
    })?;
    let params = BdevParams {
        name: opts.name.clone(),
        uuid: opts.uuid,
        block_size: base.block_size(),
        num_blocks: base.num_blocks(),
    };
    let backend = CryptoBackend {
        base: base.clone(),
        key,
        cipher,
        key_check,
        owner: owner.clone(),
    };
    let bdev = Bdev::new(params, Box::new(backend));
    if let Err(e) = registry.add(bdev.clone()) {
        base.release(&owner);
        return Err(e.into());
    }
    tracing::info!(
        bdev = bdev.name(),
        base = base.name(),
        key = opts.key_name,
        "crypto bdev created"
    );
    Ok(bdev)
}

impl BdevBackend for CryptoBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        let t = self.base.backend().io_types();
        IoTypes {
            flush: t.flush,
            unmap: t.unmap,
            write_zeroes: false,
            zcopy: false,
        }
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        let base = self.base.open_channel()?;
        Ok(Box::new(channel::CryptoChannel::new(
            base,
            self.cipher.clone(),
            self.base.block_size() as usize,
            self.base.backend().buf_align(),
        )))
    }

    fn driver_specific(&self) -> Value {
        json!({"crypto": {"base_bdev_name": self.base.name(), "key_name": self.key.name(),
                          "key_check": self.key_check,
                          "cipher": "AES_XTS", "tweak_mode": "SIMPLE_LBA"}})
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_crypto_create",
            json!({"base_bdev_name": self.base.name(), "name": bdev.name(),
                   "key_name": self.key.name(), "key_check": self.key_check,
                   "uuid": bdev.uuid().to_string()}),
        ))
    }

    fn buf_align(&self) -> usize {
        self.base.backend().buf_align()
    }

    fn read_only(&self) -> bool {
        self.base.backend().read_only()
    }

    fn activate(&self) -> std::io::Result<()> {
        self.base.activate().map_err(std::io::Error::other)
    }

    fn deactivate(&self) -> std::io::Result<()> {
        self.base.deactivate().map_err(std::io::Error::other)
    }

    /// Gives the base back (it stays registered, as SPDK's base bdevs do).
    fn close(&self) -> std::io::Result<()> {
        self.base.release(&self.owner);
        Ok(())
    }
}
