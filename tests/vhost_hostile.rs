//! A hostile vhost-user frontend: malformed and out-of-range protocol messages on a
//! controller's socket never take blockd down; the controller serves the next frontend and
//! other controllers keep serving meanwhile (vhost-user.rst message framing).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::blk_client::{pattern, BlkClient};
use common::Daemon;
use serde_json::json;

const VERSION: u32 = 0x1;

/// One vhost-user message: header (request, flags, size) and payload.
fn msg(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn setup(d: &Daemon, name: &str) -> String {
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": format!("M{name}"), "num_blocks": 8192, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": name, "dev_name": format!("M{name}")}),
    );
    d.socket_dir().join(name).to_str().unwrap().to_string()
}

/// The controller answers a real client with correct data.
fn serves(sock: &str, seed: u8) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        // The previous (hostile) frontend may still be being torn down.
        match BlkClient::connect(sock, 1, 1 << 20) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "controller unusable: {e}"),
        }
        std::thread::yield_now();
    };
    pattern(&mut c.buf()[..65536], 4096, seed);
    assert_eq!(c.write(0, 4096, 65536), 0);
    c.buf()[..65536].fill(0);
    assert_eq!(c.read(0, 4096, 65536), 0);
    let mut want = vec![0u8; 65536];
    pattern(&mut want, 4096, seed);
    assert!(c.buf()[..65536] == want[..]);
}

/// Sends `bytes`, then reads whatever comes back until the daemon closes or goes quiet.
fn send(sock: &str, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn hostile_frontends_do_not_hurt_the_daemon() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let victim = setup(&d, "vhost.0");
    let bystander = setup(&d, "vhost.1");

    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"\xff\xff\xff\xff this is not vhost-user at all".to_vec(),
        ),
        ("truncated header", vec![1, 0, 0]),
        ("huge size", {
            let mut m = Vec::new();
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&VERSION.to_le_bytes());
            m.extend_from_slice(&u32::MAX.to_le_bytes());
            m
        }),
        ("unknown request", msg(9999, &[])),
        ("bad version", {
            let mut m = msg(1, &[]);
            m[4] = 0x7;
            m
        }),
        (
            "rings before memory",
            [
                msg(3, &[]),                                             // SET_OWNER
                msg(8, &u32s(&[999, 256])), // SET_VRING_NUM out of range
                msg(8, &u32s(&[0, 0])),     // SET_VRING_NUM 0
                msg(8, &u32s(&[0, 3])),     // not a power of two
                msg(9, &[0u8; 40]),         // SET_VRING_ADDR, no memory
                msg(10, &u32s(&[0, 7])),    // SET_VRING_BASE
                msg(11, &u32s(&[0, 0])),    // GET_VRING_BASE, not running
                msg(24, &u32s(&[1000, 4096, 0])), // GET_CONFIG out of range
                msg(25, &[u32s(&[0, 4, 0]), vec![1, 2, 3, 4]].concat()), // SET_CONFIG bad offset
                msg(18, &u32s(&[77, 1])),   // SET_VRING_ENABLE, unknown ring
                msg(37, &[0u8; 40]),        // REM_MEM_REG unknown
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in hostile {
        send(&victim, &bytes);
        // The daemon is alive, the bystander serves, the victim serves the next frontend.
        assert!(
            d.rpc("spdk_get_version", json!(null)).is_ok(),
            "daemon died after {what}:\n{}",
            d.log()
        );
        serves(&bystander, 1);
        serves(&victim, 2);
    }
}
