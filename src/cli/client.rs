//! A JSON-RPC client for blockd's (and SPDK's) Unix socket, as `rpc.py`'s `JSONRPCClient`:
//! write one request object, read until one complete JSON value decodes.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to {}: {err} (is blockd running?)", path.display())]
    Connect { path: PathBuf, err: io::Error },
    /// Reading or writing the socket failed.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
    /// No complete answer within the timeout.
    #[error("timeout after {timeout:?} waiting for a response from {}", path.display())]
    Timeout { timeout: Duration, path: PathBuf },
    /// The daemon answered something that is not a JSON-RPC response.
    #[error("invalid response from {}: {msg}", path.display())]
    Protocol { path: PathBuf, msg: String },
    /// The daemon answered a JSON-RPC error; displayed as `rpc.py` prints it.
    #[error("{}", rpc_error_text(.method, .params, *.id, *.code, .message))]
    Rpc {
        method: String,
        params: Option<Value>,
        id: u64,
        code: i64,
        message: String,
    },
}

impl ClientError {
    /// The JSON-RPC error code, for an error answered by the daemon.
    pub fn rpc_code(&self) -> Option<i64> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// rpc.py's text for an error response.
fn rpc_error_text(
    method: &str,
    params: &Option<Value>,
    id: u64,
    code: i64,
    message: &str,
) -> String {
    format!(
        "request:\n{}\nGot JSON-RPC error response\nresponse:\n{}",
        pretty(&request_echo(method, params, id)),
        pretty(&json!({"code": code, "message": message}))
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The request as `rpc.py` echoes it in an error: the params plus `method` and `req_id`.
fn request_echo(method: &str, params: &Option<Value>, id: u64) -> Value {
    let mut m = match params {
        Some(Value::Object(o)) => o.clone(),
        Some(other) => {
            let mut m = serde_json::Map::new();
            m.insert("params".into(), other.clone());
            m
        }
        None => serde_json::Map::new(),
    };
    m.insert("method".into(), json!(method));
    m.insert("req_id".into(), json!(id));
    Value::Object(m)
}

/// One connection to the RPC socket; calls on it are sequential.
pub struct RpcClient {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    next_id: u64,
    buf: Vec<u8>,
}

impl RpcClient {
    /// Connects to `path`; every call waits at most `timeout` for its answer.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|err| ClientError::Connect {
            path: path.to_path_buf(),
            err,
        })?;
        Ok(RpcClient {
            stream,
            path: path.to_path_buf(),
            timeout,
            next_id: 0,
            buf: Vec::new(),
        })
    }

    /// Calls `method`; `params` is omitted from the request when `None` (as rpc.py does for
    /// empty params). Returns the `result`, or the `error` as [`ClientError::Rpc`].
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if let Some(p) = &params {
            req["params"] = p.clone();
        }
        self.send_raw(&serde_json::to_vec(&req).unwrap_or_default())?;
        loop {
            let resp = self.read_value()?;
            if resp.get("id") != Some(&json!(id)) {
                // Not ours (e.g. an answer to garbage sent with send_raw): skip it.
                continue;
            }
            if let Some(err) = resp.get("error") {
                return Err(ClientError::Rpc {
                    method: method.to_string(),
                    params,
                    id,
                    code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                });
            }
            return resp
                .get("result")
                .cloned()
                .ok_or_else(|| ClientError::Protocol {
                    path: self.path.clone(),
                    msg: format!("response has neither result nor error: {resp}"),
                });
        }
    }

    /// Writes bytes as they are (tests use it to send split or malformed requests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(|err| ClientError::Io {
            path: self.path.clone(),
            err,
        })
    }

    /// Reads until one complete JSON value decodes and returns it (the next response).
    pub fn read_value(&mut self) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Ok(v);
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        msg: e.to_string(),
                    })
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    timeout: self.timeout,
                    path: self.path.clone(),
                });
            }
            let io_err = |err| ClientError::Io {
                path: self.path.clone(),
                err,
            };
            self.stream.set_read_timeout(Some(left)).map_err(io_err)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        msg: "connection closed before a complete response".into(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout {
                        timeout: self.timeout,
                        path: self.path.clone(),
                    })
                }
                Err(err) => {
                    return Err(ClientError::Io {
                        path: self.path.clone(),
                        err,
                    })
                }
            }
        }
    }

    /// The underlying stream (tests: half-close, raw reads).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}
