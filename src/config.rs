//! Saved configurations (`rpc.py save_config`, `framework_get_config`) replayed by
//! `blockd --json`. (being written)
