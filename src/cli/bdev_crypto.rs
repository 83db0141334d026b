//! Crypto bdev commands, as rpc.py: `blockctl bdev_crypto_create BASE NAME -n KEY`.

use serde_json::json;

use super::{params_of, Ctx, Run};

/// crypto bdev methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum BdevCryptoCmd {
    /// Create an AES-XTS-256 crypto bdev over BASE with a keyring key (64 bytes or 128 hex
    /// digits; `keyring_file_add_key` first).
    BdevCryptoCreate {
        /// The bdev to encrypt (claimed by the crypto bdev).
        base_bdev_name: String,
        /// Name of the crypto bdev.
        name: String,
        /// Name of the keyring key (rpc.py's `-n/--key-name`; rpc.py's `-k/--key`, key
        /// material on the command line, is not offered).
        #[arg(short = 'n', long = "key-name")]
        key_name: String,
        /// Accepted for rpc.py compatibility, ignored.
        #[arg(short = 'p', long = "crypto-pmd")]
        crypto_pmd: Option<String>,
        /// Only AES_XTS.
        #[arg(short = 'c', long)]
        cipher: Option<String>,
        /// The key check value the key must have (`driver_specific.crypto.key_check` of
        /// the bdev when it was created): a different key is refused (blockd extension).
        #[arg(long = "key-check")]
        key_check: Option<String>,
    },
    /// Delete a crypto bdev (its base stays, unclaimed).
    BdevCryptoDelete {
        /// Name of the crypto bdev.
        name: String,
    },
}

impl Run for BdevCryptoCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            BdevCryptoCmd::BdevCryptoCreate {
                base_bdev_name,
                name,
                key_name,
                crypto_pmd,
                cipher,
                key_check,
            } => ctx.call_print(
                "bdev_crypto_create",
                params_of(vec![
                    ("base_bdev_name", Some(json!(base_bdev_name))),
                    ("name", Some(json!(name))),
                    ("key_name", Some(json!(key_name))),
                    ("crypto_pmd", crypto_pmd.map(|v| json!(v))),
                    ("cipher", cipher.map(|v| json!(v))),
                    ("key_check", key_check.map(|v| json!(v))),
                ]),
            ),
            BdevCryptoCmd::BdevCryptoDelete { name } => {
                ctx.call_print("bdev_crypto_delete", Some(json!({ "name": name })))
            }
        }
    }
}
