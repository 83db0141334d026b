//! Keyring commands, as rpc.py: `blockctl keyring_file_add_key NAME PATH`.

use serde_json::{json, Value};

use super::{Ctx, Run};

/// keyring methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum KeyringCmd {
    /// Add a key from a file (regular file, mode 0600, owned by blockd's user); the daemon
    /// keeps the bytes, RPCs and saved configs carry only the name and path.
    KeyringFileAddKey {
        /// Name of the key.
        name: String,
        /// Absolute path of the key file, as the daemon sees it.
        path: String,
    },
    /// Remove a key (bdevs that use it keep it until they are deleted).
    KeyringFileRemoveKey {
        /// Name of the key.
        name: String,
    },
    /// List the keys: name, path, removed, refcnt (never the key).
    KeyringGetKeys,
}

impl Run for KeyringCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            KeyringCmd::KeyringFileAddKey { name, path } => {
                // A relative path means the caller's directory, not the daemon's.
                let path = std::path::absolute(&path).map_or(path, |p| p.display().to_string());
                ctx.call_print(
                    "keyring_file_add_key",
                    Some(json!({"name": name, "path": path})),
                )
            }
            KeyringCmd::KeyringFileRemoveKey { name } => {
                ctx.call_print("keyring_file_remove_key", Some(json!({ "name": name })))
            }
            KeyringCmd::KeyringGetKeys => ctx.call_print("keyring_get_keys", None::<Value>),
        }
    }
}
