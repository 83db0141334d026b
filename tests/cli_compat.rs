//! blockctl's subcommands take rpc.py's flags: every long option blockctl offers for an
//! SPDK method is one that SPDK's own rpc.py (PyPI `spdk`) offers for it, spelled the same.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

/// Long options (`--foo-bar`) declared in a `--help` text's option lines.
fn declared_options(help: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .collect();
    long_options(&lines.join("\n"))
}

/// Long options (`--foo-bar`) anywhere in a `--help` text.
fn long_options(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

fn help(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run --help");
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// Flags blockd adds to an SPDK method, documented in docs/cli.md as extensions: LUKS on
/// RBD (SPDK's rbd bdev cannot open encrypted images), the crypto bdev's key check value.
const BLOCKD_EXTENSIONS: &[(&str, &str)] = &[
    ("bdev_rbd_create", "--encryption-format"),
    ("bdev_rbd_create", "--key"),
    ("bdev_crypto_create", "--key-check"),
];

#[test]
fn blockctl_flags_are_rpc_py_flags() {
    let rpc = common::spdk_rpc().expect("spdk-rpc is not installed: run scripts/install-deps.sh");
    let top = help(Command::new(common::blockctl_bin()).arg("--help"));
    let methods: Vec<String> = top
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.contains('_') && !w.starts_with('-'))
        .map(str::to_string)
        .collect();
    assert!(methods.len() >= 20, "found only {methods:?}");
    let mut checked = 0;
    for m in &methods {
        let theirs = help(Command::new(&rpc).args([m.as_str(), "--help"]));
        if theirs.contains("invalid choice") {
            continue; // blockd's own method (nbd_server_start, ...): nothing to compare.
        }
        let ours = declared_options(&help(
            Command::new(common::blockctl_bin()).args([m.as_str(), "--help"]),
        ));
        let theirs = long_options(&theirs);
        let extra: Vec<&String> = ours
            .iter()
            .filter(|o| !theirs.contains(*o) && *o != "--help" && *o != "--version")
            .filter(|o| !BLOCKD_EXTENSIONS.contains(&(m.as_str(), o.as_str())))
            .collect();
        assert!(
            extra.is_empty(),
            "{m}: blockctl flags not in rpc.py: {extra:?} (rpc.py has {theirs:?})"
        );
        checked += 1;
    }
    assert!(checked >= 15, "compared only {checked} methods");
}
