//! The JSON-RPC Unix socket server. (being written)
