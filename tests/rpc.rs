//! The JSON-RPC server, framework methods, `blockd` start/stop and `blockctl`, against the
//! real binaries.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use blockd::cli::client::RpcClient;
use common::Daemon;
use serde_json::{json, Value};

/// Reads one JSON value from a raw stream (the server's replies are not delimited).
fn read_one(s: &mut UnixStream, buf: &mut Vec<u8>) -> Option<Value> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let n = it.byte_offset();
                buf.drain(..n);
                return Some(v);
            }
            Some(Err(e)) if !e.is_eof() => panic!("bad reply: {e}"),
            _ => {}
        }
        let n = s.read(&mut chunk).expect("read reply");
        if n == 0 {
            assert!(
                buf.iter().all(u8::is_ascii_whitespace),
                "connection closed inside a reply"
            );
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn req(id: Value, method: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method}).to_string()
}

#[test]
fn concatenated_requests_in_one_write_are_answered_in_order() {
    let d = Daemon::start();
    let mut s = d.raw();
    let batch = format!(
        "{}{}\n  {}{}",
        req(json!(1), "spdk_get_version"),
        r#"{"jsonrpc":"2.0","method":"spdk_get_version"}"#, // notification: no answer
        req(json!("two"), "rpc_get_methods"),
        req(json!(3), "framework_get_subsystems"),
    );
    s.write_all(batch.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let r1 = read_one(&mut s, &mut buf).unwrap();
    assert_eq!(r1["id"], json!(1));
    assert_eq!(r1["jsonrpc"], "2.0");
    assert!(r1["result"]["version"]
        .as_str()
        .unwrap()
        .starts_with("blockd v"));
    let r2 = read_one(&mut s, &mut buf).unwrap();
    assert_eq!(
        r2["id"],
        json!("two"),
        "the notification must not be answered"
    );
    assert!(r2["result"]
        .as_array()
        .unwrap()
        .contains(&json!("spdk_get_version")));
    let r3 = read_one(&mut s, &mut buf).unwrap();
    assert_eq!(r3["id"], json!(3));
    // SPDK's order: the keyring first (bdevs refer to its keys), then bdev.
    assert_eq!(r3["result"][0]["subsystem"], "keyring");
    assert_eq!(r3["result"][1]["subsystem"], "bdev");
}

#[test]
fn request_split_byte_by_byte() {
    let d = Daemon::start();
    let mut s = d.raw();
    let text = json!({"jsonrpc": "2.0", "id": 77, "method": "framework_get_config",
                      "params": {"name": "bdev"}})
    .to_string();
    for b in text.as_bytes() {
        s.write_all(&[*b]).unwrap();
        s.flush().unwrap();
    }
    let mut buf = Vec::new();
    let r = read_one(&mut s, &mut buf).unwrap();
    assert_eq!(r["id"], 77);
    assert!(r["result"].is_array(), "{r}");
    // The connection stays usable.
    s.write_all(req(json!(78), "spdk_get_version").as_bytes())
        .unwrap();
    assert_eq!(read_one(&mut s, &mut buf).unwrap()["id"], 78);
}

#[test]
fn garbage_is_a_parse_error_and_closes_the_connection() {
    let d = Daemon::start();
    for garbage in ["{\"jsonrpc\": 2.0, oops}", "this is not json", "}"] {
        let mut s = d.raw();
        s.write_all(garbage.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let r = read_one(&mut s, &mut buf).expect("an error reply");
        assert_eq!(r["error"]["code"], -32700, "{garbage}: {r}");
        assert_eq!(r["error"]["message"], "Parse error");
        assert_eq!(r["id"], Value::Null);
        assert!(
            read_one(&mut s, &mut buf).is_none(),
            "connection not closed"
        );
    }
    // The daemon still serves others.
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
}

#[test]
fn oversized_request_is_refused() {
    let d = Daemon::start();
    let mut s = d.raw();
    // An object that never ends: 1 MiB + of a string.
    s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"p":""#)
        .unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut buf = Vec::new();
    let mut sent = 0;
    while sent <= blockd::rpc::server::MAX_REQUEST_BYTES + chunk.len() {
        if s.write_all(&chunk).is_err() {
            break; // closed by the server
        }
        sent += chunk.len();
    }
    let r = read_one(&mut s, &mut buf).expect("an error reply");
    assert_eq!(r["error"]["code"], -32700);
}

#[test]
fn invalid_requests() {
    let d = Daemon::start();
    let mut s = d.raw();
    let mut buf = Vec::new();
    let cases = [
        (
            r#"{"jsonrpc":"1.0","id":5,"method":"spdk_get_version"}"#,
            json!(5),
        ),
        (r#"{"id":6,"method":"spdk_get_version"}"#, json!(6)),
        (r#"{"jsonrpc":"2.0","id":7,"method":42}"#, json!(7)),
        (r#"{"jsonrpc":"2.0","id":8}"#, json!(8)),
        (
            r#"{"jsonrpc":"2.0","id":9,"method":"spdk_get_version","params":"x"}"#,
            json!(9),
        ),
        (
            r#"{"jsonrpc":"2.0","id":{"a":1},"method":"spdk_get_version"}"#,
            Value::Null,
        ),
        (
            r#"[{"jsonrpc":"2.0","id":10,"method":"spdk_get_version"}]"#,
            Value::Null,
        ),
        (r#"42 "#, Value::Null),
    ];
    for (text, id) in cases {
        s.write_all(text.as_bytes()).unwrap();
        let r = read_one(&mut s, &mut buf).expect("a reply");
        assert_eq!(r["error"]["code"], -32600, "{text}: {r}");
        assert_eq!(r["error"]["message"], "Invalid Request");
        assert_eq!(r["id"], id, "{text}");
    }
    // -32600 does not close the connection.
    s.write_all(req(json!(11), "spdk_get_version").as_bytes())
        .unwrap();
    assert_eq!(read_one(&mut s, &mut buf).unwrap()["id"], 11);
}

#[test]
fn unknown_method_echoes_string_and_number_ids() {
    let d = Daemon::start();
    let mut s = d.raw();
    let mut buf = Vec::new();
    for id in [json!("abc"), json!(123456789012u64), json!(-1)] {
        s.write_all(req(id.clone(), "no_such_method").as_bytes())
            .unwrap();
        let r = read_one(&mut s, &mut buf).unwrap();
        assert_eq!(r["id"], id);
        assert_eq!(
            r["error"],
            json!({"code": -32601, "message": "Method not found"})
        );
        assert!(r.get("result").is_none());
    }
}

#[test]
fn notifications_get_no_reply() {
    let d = Daemon::start();
    let mut s = d.raw();
    let mut buf = Vec::new();
    // Successful, failing and unknown notifications: none is answered, so the first reply
    // is the one to the request that follows them.
    s.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version"}"#)
        .unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","method":"spdk_get_version","params":{"x":1}}"#)
        .unwrap();
    s.write_all(br#"{"jsonrpc":"2.0","method":"nope"}"#)
        .unwrap();
    s.write_all(req(json!(1), "spdk_get_version").as_bytes())
        .unwrap();
    let r = read_one(&mut s, &mut buf).unwrap();
    assert_eq!(r["id"], 1, "{r}");
    assert!(r.get("result").is_some());
}

#[test]
fn spdk_get_version_shape_and_params() {
    let d = Daemon::start();
    let v = d.rpc_ok("spdk_get_version", Value::Null);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(v["version"], format!("blockd v{version}"));
    let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(v["fields"]["major"], parts[0]);
    assert_eq!(v["fields"]["minor"], parts[1]);
    assert_eq!(v["fields"]["patch"], parts[2]);
    assert_eq!(v["fields"]["suffix"], "");
    assert!(v["fields"]["commit"].is_string());
    // Empty params are no params; any param is -32602.
    assert!(d.rpc("spdk_get_version", json!({})).is_ok());
    let (code, _) = d.rpc("spdk_get_version", json!({"x": 1})).unwrap_err();
    assert_eq!(code, -32602);
}

#[test]
fn rpc_get_methods_lists_every_method_sorted() {
    let d = Daemon::start();
    let methods = d.methods();
    let expected: Vec<String> = blockd::app::App::methods()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(methods, expected);
    for m in [
        "rpc_get_methods",
        "spdk_get_version",
        "framework_get_reactors",
        "framework_get_subsystems",
        "framework_get_config",
    ] {
        assert!(methods.iter().any(|x| x == m), "{m} missing");
    }
    let mut sorted = methods.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(methods, sorted);
    // rpc.py sends these flags.
    let current = d.rpc_ok(
        "rpc_get_methods",
        json!({"current": true, "include_aliases": false}),
    );
    assert_eq!(current, json!(methods));
    let (code, _) = d.rpc("rpc_get_methods", json!({"bogus": 1})).unwrap_err();
    assert_eq!(code, -32602);
}

/// `--sched`: every thread of the daemon runs under the chosen policy, reactors included
/// (they are created after `main` sets it). Without it, a daemon started under the
/// kernel's default policy is adaptive (normal until rbd queues run deep: `tests/rbd.rs`),
/// and one started under another policy keeps it. `framework_get_scheduler` says which.
#[test]
fn threads_run_under_the_sched_policy() {
    for (args, want, mode) in [
        (&["--sched", "batch"][..], 3, json!({"mode": "batch"})),
        (&["--sched", "normal"][..], 0, json!({"mode": "normal"})),
        (
            &[][..],
            0,
            json!({"mode": "adaptive", "policy": "normal", "rbd_in_flight": 0, "switches": 0}),
        ),
    ] {
        let d = Daemon::start_with(args);
        let threads = common::thread_policies(d.pid());
        assert!(threads.iter().any(|(n, _)| n == "reactor_0"), "{threads:?}");
        assert!(
            threads.iter().all(|(_, p)| *p == want),
            "{args:?}: {threads:?}"
        );
        let s = d.rpc_ok("framework_get_scheduler", Value::Null);
        assert_eq!(s["scheduler_name"], "static", "{s}");
        assert_eq!(s["thread_policy"], mode, "{args:?}");
    }
    // Without --sched, the policy blockd was started with stays (chrt, systemd): started
    // from a SCHED_BATCH thread, its threads are SCHED_BATCH.
    let d = std::thread::spawn(|| {
        let batch = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is this (test-only) thread; `batch` is read only.
        let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &batch) };
        assert_eq!(r, 0);
        Daemon::start()
    })
    .join()
    .unwrap();
    let threads = common::thread_policies(d.pid());
    assert!(
        threads.iter().all(|(_, p)| *p == 3),
        "inherited: {threads:?}"
    );
    let s = d.rpc_ok("framework_get_scheduler", Value::Null);
    assert_eq!(s["thread_policy"], json!({"mode": "inherited"}));
    drop(d);
    let o = std::process::Command::new(common::blockd_bin())
        .args(["--sched", "fifo"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        ["adaptive", "batch", "normal"]
            .iter()
            .all(|m| err.contains(m)),
        "{o:?}"
    );
}

#[test]
fn framework_methods() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    assert!(r["tick_rate"].as_u64().unwrap() > 0);
    let reactors = r["reactors"].as_array().unwrap();
    assert_eq!(reactors.len(), 1);
    assert_eq!(reactors[0]["lcore"], 0);

    let subs = d.rpc_ok("framework_get_subsystems", Value::Null);
    let subs = subs.as_array().unwrap();
    let names: Vec<&str> = subs
        .iter()
        .map(|s| s["subsystem"].as_str().unwrap())
        .collect();
    let bdev = names.iter().position(|n| *n == "bdev").expect("bdev");
    let vhost = names
        .iter()
        .position(|n| *n == "vhost_blk")
        .expect("vhost_blk");
    assert!(bdev < vhost, "dependency order");
    assert_eq!(subs[vhost]["depends_on"], json!(["bdev"]));
    for s in subs {
        let cfg = d.rpc_ok("framework_get_config", json!({"name": s["subsystem"]}));
        assert!(cfg.is_array());
    }
    // SPDK 26 rpc.py sends with_batches.
    assert!(d
        .rpc(
            "framework_get_config",
            json!({"name": "bdev", "with_batches": false})
        )
        .is_ok());
    let (code, msg) = d
        .rpc("framework_get_config", json!({"name": "nope"}))
        .unwrap_err();
    assert_eq!(code, -32602);
    assert!(msg.contains("nope"), "{msg}");
    let (code, _) = d.rpc("framework_get_config", Value::Null).unwrap_err();
    assert_eq!(code, -32602);
}

#[test]
fn a_stuck_connection_does_not_block_others() {
    let d = Daemon::start();
    let mut stuck = d.raw();
    stuck
        .write_all(br#"{"jsonrpc":"2.0","id":1,"meth"#)
        .unwrap();
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
    stuck.write_all(br#"od":"spdk_get_version"}"#).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_one(&mut stuck, &mut buf).unwrap()["id"], 1);
}

#[test]
fn second_daemon_on_the_same_socket_fails_clearly() {
    let d = Daemon::start();
    let f = Daemon::try_start_at(d.rpc_socket(), &["-m", "0x1"])
        .err()
        .expect("second daemon must not start");
    assert_eq!(f.status.code(), Some(1), "{}", f.log);
    assert!(f.log.contains("is in use by another blockd"), "{}", f.log);
    assert!(f.log.contains(&format!("pid {}", d.pid())), "{}", f.log);
    // The first one is untouched.
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
    assert!(d.rpc_socket().exists());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves the file, nobody listens
    assert!(sock.exists());
    assert!(UnixStream::connect(&sock).is_err());
    let d = Daemon::try_start_at(&sock, &["-m", "0x1"]).expect("starts over a stale socket");
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
}

#[test]
fn regular_file_at_the_socket_path_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"data").unwrap();
    let f = Daemon::try_start_at(&path, &[]).err().expect("must refuse");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.log.contains("not a socket"), "{}", f.log);
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[test]
fn bad_start_arguments_exit_1_with_a_message() {
    let f = Daemon::try_start(&["-m", "0xZZ"]).err().expect("bad mask");
    assert_eq!(f.status.code(), Some(1));
    assert!(
        f.log.contains("cpumask") && f.log.contains("0xZZ"),
        "{}",
        f.log
    );

    let f = Daemon::try_start(&["-m", "[4000]"])
        .err()
        .expect("mask above 1024");
    assert_eq!(f.status.code(), Some(1));

    let f = Daemon::try_start(&["-S", "/nonexistent/blockd-test"])
        .err()
        .expect("no dir");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.log.contains("/nonexistent/blockd-test"), "{}", f.log);

    let f = Daemon::try_start_at(std::path::Path::new("/nonexistent/dir/x.sock"), &[])
        .err()
        .expect("no rpc dir");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.log.contains("/nonexistent/dir"), "{}", f.log);

    let f = Daemon::try_start(&["--poll", "sometimes"])
        .err()
        .expect("bad poll");
    assert_eq!(f.status.code(), Some(1));
    let f = Daemon::try_start(&["--socket-mode", "999"])
        .err()
        .expect("bad mode");
    assert_eq!(f.status.code(), Some(1));
}

#[test]
fn sigterm_and_sigint_exit_0_and_remove_the_socket() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = Daemon::start_with(&["-m", "0x1", "--poll", "never"]);
        // An idle open connection must not hold the shutdown.
        let _idle = d.raw();
        let sock = d.rpc_socket().to_path_buf();
        d.signal(sig);
        let st = d.wait(common::STOP_TIMEOUT);
        assert_eq!(st.code(), Some(0), "signal {sig}:\n{}", d.log());
        assert!(!sock.exists(), "RPC socket left behind");
        assert!(d.log().contains("blockd ready"));
    }
}

/// A reactor that sleeps whenever a pass finds no work (`--poll never`; an adaptive reactor
/// does so between batches where waking it is cheap, `Poller::driver_waits`) loses no kick
/// and no interrupt: a client that sleeps on its completion eventfd writes and verifies
/// every block at QD32 and QD1 (the run times out otherwise). `framework_get_reactors`
/// says whether the reactor measured its wake-up: never in this mode.
#[test]
fn a_reactor_that_sleeps_between_batches_loses_no_notification() {
    let d = Daemon::start_with(&["-m", "0x1", "--poll", "never"]);
    verified_io_by_a_sleeping_client(&d);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    assert_eq!(r["reactors"][0]["wake_cost_us"], Value::Null, "{r}");
    assert_eq!(r["reactors"][0]["poll_window_us"], Value::Null, "{r}");
    let c = d.rpc_ok("vhost_get_controllers", json!({"name": "vhost.0"}));
    assert!(c.to_string().contains("interrupts"), "{c}");
    // An adaptive reactor measures it, given a second core for the waker.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let cores = if online.contains(['-', ',']) { 2 } else { 1 };
    let a = Daemon::start_with(&["-m", "0x1"]);
    let r = a.rpc_ok("framework_get_reactors", Value::Null);
    let cost = &r["reactors"][0]["wake_cost_us"];
    assert_eq!(cost.is_number(), cores > 1, "{r}");
    assert!(cost.as_f64().is_none_or(|us| us > 0.0), "{r}");
}

/// Where wake-ups are cheap an adaptive reactor polls for drivers that wait for their
/// interrupts only as long as its poll window (src/reactor/poll_window.rs), then sleeps:
/// a request published while it polls, while it arms the queue or while it sleeps must
/// each be answered. `--wake-cost-us` stands in for a host with cheap wake-ups; at
/// 10 µs the window may grow to 80 µs for the QD1 client, longer than its turn on this
/// kind of host, and to 14 µs for the QD32 one, shorter than its turn, so the reactor
/// both polls through turns and sleeps through them.
#[test]
fn a_reactor_with_a_poll_window_loses_no_notification() {
    let d = Daemon::start_with(&["-m", "0x1", "--wake-cost-us", "10"]);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    assert_eq!(r["reactors"][0]["wake_cost_us"], json!(10.0), "{r}");
    assert_eq!(
        r["reactors"][0]["poll_window_us"],
        json!(0.0),
        "starts closed: {r}"
    );
    verified_io_by_a_sleeping_client(&d);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    let window = r["reactors"][0]["poll_window_us"]
        .as_f64()
        .unwrap_or_else(|| panic!("no poll window: {r}"));
    let max = 10.0 * f64::from(blockd::reactor::poll_window::MAX_WAKES);
    assert!((0.0..=max).contains(&window), "{r}");
    // Dear wake-ups: no window, the reactor polls through the driver's turn.
    let d = Daemon::start_with(&["-m", "0x1", "--wake-cost-us", "40"]);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    assert_eq!(r["reactors"][0]["poll_window_us"], Value::Null, "{r}");
}

/// 4 MiB of verified 4K writes at QD32 and QD1 through vhost-user-blk by a client that
/// sleeps on its completion eventfd, on a malloc bdev behind `vhost.0`.
fn verified_io_by_a_sleeping_client(d: &Daemon) {
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 16384, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "M0"}),
    );
    let sock = d.socket_dir().join("vhost.0").display().to_string();
    for qd in ["32", "1"] {
        let out = Command::new(common::blockctl_bin())
            .args([
                "bench",
                "-s",
                &sock,
                "-w",
                "randwrite",
                "-b",
                "4k",
                "-q",
                qd,
            ])
            .args(["--size", "4M", "--verify", "--no-poll", "--timeout", "20"])
            .output()
            .unwrap();
        assert!(out.status.success(), "QD{qd}: {out:?}\n{}", d.log());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("verify-read"), "QD{qd}: {text}");
    }
}

#[test]
fn json_config_replay_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(
        &empty,
        r#"{"subsystems":[{"subsystem":"vhost_blk","config":[]},{"subsystem":"bdev","config":[]}]}"#,
    )
    .unwrap();
    let d = Daemon::start_with(&["--json", empty.to_str().unwrap()]);
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
    drop(d);

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"no_such_method","params":{}}]}]}"#,
    )
    .unwrap();
    let f = Daemon::try_start(&["--json", bad.to_str().unwrap()])
        .err()
        .expect("must fail");
    assert_eq!(f.status.code(), Some(1));
    for needle in ["bdev", "entry 0", "no_such_method", "Method not found"] {
        assert!(f.log.contains(needle), "{needle} missing:\n{}", f.log);
    }

    // A subsystem blockd does not have is nothing to do while its config is empty, and
    // fails the start, naming subsystem and method, as soon as it holds a real object.
    let unknown = dir.path().join("unknown.json");
    std::fs::write(
        &unknown,
        r#"{"subsystems":[{"subsystem":"iscsi","config":[]}]}"#,
    )
    .unwrap();
    let d = Daemon::start_with(&["--json", unknown.to_str().unwrap()]);
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());
    drop(d);
    std::fs::write(
        &unknown,
        r#"{"subsystems":[{"subsystem":"iscsi","config":[{"method":"iscsi_create_portal_group","params":{"tag":1,"portals":[]}}]}]}"#,
    )
    .unwrap();
    let f = Daemon::try_start(&["--json", unknown.to_str().unwrap()])
        .err()
        .expect("fail");
    for needle in [
        "iscsi",
        "iscsi_create_portal_group",
        "blockd has no such method",
    ] {
        assert!(f.log.contains(needle), "{needle} missing:\n{}", f.log);
    }

    let f = Daemon::try_start(&["--json", "/nonexistent.json"])
        .err()
        .expect("fail");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.log.contains("/nonexistent.json"), "{}", f.log);
}

/// What `save_config` of an SPDK vhost target (v23.x, modules as Debian's and SPDK's CI
/// build them) writes: its own subsystems with their tuning entries, the objects (a malloc
/// and a null bdev, a blk controller, a scsi controller with a target), and
/// `bdev_wait_for_examine` closing the bdev list (SPDK `lib/init/json_config.c`,
/// `bdev_*_write_config_json`, `vhost_*_write_config_json`).
const SPDK_SAVED_CONFIG: &str = r#"{
  "subsystems": [
    {"subsystem": "keyring", "config": []},
    {"subsystem": "iobuf", "config": [
      {"method": "iobuf_set_options", "params": {"small_pool_count": 8192,
        "large_pool_count": 1024, "small_bufsize": 8192, "large_bufsize": 135168}}]},
    {"subsystem": "sock", "config": [
      {"method": "sock_set_default_impl", "params": {"impl_name": "posix"}},
      {"method": "sock_impl_set_options", "params": {"impl_name": "posix",
        "recv_buf_size": 2097152, "send_buf_size": 2097152, "enable_recv_pipe": true,
        "enable_quickack": false, "enable_placement_id": 0, "enable_zerocopy_send_server": true,
        "enable_zerocopy_send_client": false, "zerocopy_threshold": 0, "tls_version": 0,
        "enable_ktls": false}}]},
    {"subsystem": "vmd", "config": []},
    {"subsystem": "accel", "config": [
      {"method": "accel_set_options", "params": {"small_cache_size": 128,
        "large_cache_size": 16, "task_count": 2048, "sequence_count": 2048, "buf_count": 2048}}]},
    {"subsystem": "bdev", "config": [
      {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535,
        "bdev_io_cache_size": 256, "bdev_auto_examine": true}},
      {"method": "bdev_raid_set_options", "params": {"process_window_size_kb": 1024}},
      {"method": "bdev_iscsi_set_options", "params": {"timeout_sec": 30}},
      {"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "none",
        "timeout_us": 0, "timeout_admin_us": 0, "keep_alive_timeout_ms": 10000,
        "transport_retry_count": 4, "bdev_retry_count": 3, "generate_uuids": false}},
      {"method": "bdev_nvme_set_hotplug", "params": {"period_us": 100000, "enable": false}},
      {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 16384,
        "block_size": 512, "physical_block_size": 512,
        "uuid": "9f0a5c1e-6a47-4d0b-8f3e-2c5b7d9e1a44", "optimal_io_boundary": 0,
        "md_size": 0, "md_interleave": false, "dif_type": 0, "dif_is_head_of_md": false}},
      {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 8192,
        "block_size": 512, "physical_block_size": 512, "md_size": 0, "dif_type": 0,
        "dif_is_head_of_md": false, "uuid": "3d2e8b6a-1f4c-4e9a-9b7d-5a6c8e0f2b13"}},
      {"method": "bdev_wait_for_examine"}]},
    {"subsystem": "scsi", "config": null},
    {"subsystem": "vhost_scsi", "config": [
      {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "vhost.scsi0",
        "cpumask": "0x1"}},
      {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "vhost.scsi0",
        "scsi_target_num": 0, "bdev_name": "Null0"}}]},
    {"subsystem": "vhost_blk", "config": [
      {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.1",
        "dev_name": "Malloc0", "cpumask": "0x1", "readonly": false,
        "transport": "vhost_user_blk"}}]}
  ]
}"#;

/// The objects of [`SPDK_SAVED_CONFIG`], checked on a daemon that replayed it.
fn assert_spdk_config_objects(d: &Daemon) {
    let m = d.rpc_ok("bdev_get_bdevs", json!({"name": "Malloc0"}));
    assert_eq!(m[0]["uuid"], "9f0a5c1e-6a47-4d0b-8f3e-2c5b7d9e1a44");
    assert_eq!(m[0]["num_blocks"], 16384);
    let n = d.rpc_ok("bdev_get_bdevs", json!({"name": "Null0"}));
    assert_eq!(n[0]["uuid"], "3d2e8b6a-1f4c-4e9a-9b7d-5a6c8e0f2b13");
    let c = d.rpc_ok("vhost_get_controllers", Value::Null);
    let names: Vec<&str> = c
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ctrlr"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"vhost.1") && names.contains(&"vhost.scsi0"),
        "{c}"
    );
    let scsi = d.rpc_ok("vhost_get_controllers", json!({"name": "vhost.scsi0"}));
    assert_eq!(
        scsi[0]["backend_specific"]["scsi"][0]["luns"][0]["bdev_name"], "Null0",
        "{scsi}"
    );
}

/// A configuration saved by SPDK loads into blockd, through `blockd --json` and through
/// `blockctl load_config`: SPDK's tuning entries are skipped and said so, the objects are
/// recreated with SPDK's names and UUIDs. One real object blockd cannot make fails the
/// load before anything is created. `framework_wait_init` and `bdev_wait_for_examine`
/// answer `true`, also to SPDK's own rpc.py.
#[test]
fn spdk_saved_config_replays() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spdk.json");
    std::fs::write(&file, SPDK_SAVED_CONFIG).unwrap();

    let d = Daemon::start_with(&["--json", file.to_str().unwrap()]);
    assert_spdk_config_objects(&d);
    let log = d.log();
    for method in [
        "iobuf_set_options",
        "sock_impl_set_options",
        "bdev_nvme_set_options",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping SPDK tuning entry") && l.contains(method)),
            "no skip logged for {method}:\n{log}"
        );
    }
    assert_eq!(d.rpc_ok("framework_wait_init", Value::Null), json!(true));
    assert_eq!(d.rpc_ok("bdev_wait_for_examine", Value::Null), json!(true));
    assert!(d.rpc("bdev_wait_for_examine", json!({"x": 1})).is_err());
    drop(d);

    let d = Daemon::start();
    let o = d.blockctl(&["load_config", "-j", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("iobuf_set_options"), "{}", stderr(&o));
    assert_spdk_config_objects(&d);
    for cmd in ["framework_wait_init", "bdev_wait_for_examine"] {
        let o = d.blockctl(&[cmd]);
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
    }
    for cmd in ["framework_wait_init", "bdev_wait_for_examine"] {
        let o = d.rpc_py(&[cmd]);
        assert!(o.status.success(), "rpc.py {cmd}: {}", stderr(&o));
    }
    drop(d);

    // One object blockd cannot recreate: the whole load fails, naming it, and nothing from
    // the configuration (not even the malloc bdev listed before it) exists.
    let mut cfg: Value = serde_json::from_str(SPDK_SAVED_CONFIG).unwrap();
    let bdev = cfg["subsystems"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["subsystem"] == "bdev")
        .unwrap();
    bdev["config"].as_array_mut().unwrap().push(json!({
        "method": "bdev_nvme_attach_controller",
        "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "0000:00:04.0"}
    }));
    std::fs::write(&file, cfg.to_string()).unwrap();
    let f = Daemon::try_start(&["--json", file.to_str().unwrap()])
        .err()
        .expect("an NVMe controller cannot be recreated");
    for needle in ["bdev_nvme_attach_controller", "nothing was created"] {
        assert!(f.log.contains(needle), "{needle} missing:\n{}", f.log);
    }
    assert!(!f.log.contains("malloc bdev created"), "{}", f.log);
    let d = Daemon::start();
    let o = d.blockctl(&["load_config", "-j", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bdev_nvme_attach_controller"),
        "{}",
        stderr(&o)
    );
    assert_eq!(d.rpc_ok("bdev_get_bdevs", Value::Null), json!([]));
}

/// SPDK's log methods change what the daemon logs while it runs: the RPC server's
/// per-request debug line ("RPC request method=...") appears exactly for the calls made
/// while its flag or the DEBUG level is on. Level names, errors and rpc.py as SPDK's.
#[test]
fn log_methods_change_the_filter_at_run_time() {
    let d = Daemon::start_with(&["-L", "warn"]);
    let logged = |method: &str| d.log().contains(&format!("RPC request method={method} "));
    assert_eq!(d.rpc_ok("log_get_level", Value::Null), "WARNING");
    assert_eq!(d.rpc_ok("log_get_print_level", Value::Null), "WARNING");

    d.rpc_ok("spdk_get_version", Value::Null);
    assert!(!logged("spdk_get_version"), "{}", d.log());

    assert_eq!(
        d.rpc_ok("log_set_flag", json!({"flag": "rpc"})),
        json!(true)
    );
    d.rpc_ok("bdev_get_bdevs", Value::Null);
    assert!(logged("bdev_get_bdevs"), "{}", d.log());
    let flags = d.rpc_ok("log_get_flags", Value::Null);
    assert_eq!(flags["rpc"], true);
    assert_eq!(flags["vhost_blk"], false);

    assert_eq!(
        d.rpc_ok("log_clear_flag", json!({"flag": "rpc"})),
        json!(true)
    );
    d.rpc_ok("framework_get_reactors", Value::Null);
    assert!(!logged("framework_get_reactors"), "{}", d.log());

    assert_eq!(
        d.rpc_ok("log_set_print_level", json!({"level": "debug"})),
        json!(true)
    );
    assert_eq!(d.rpc_ok("log_get_level", Value::Null), "DEBUG");
    d.rpc_ok("rpc_get_methods", Value::Null);
    assert!(logged("rpc_get_methods"), "{}", d.log());

    d.rpc_ok("log_set_level", json!({"level": "NOTICE"}));
    assert_eq!(d.rpc_ok("log_get_print_level", Value::Null), "NOTICE");
    d.rpc_ok("framework_get_subsystems", Value::Null);
    assert!(!logged("framework_get_subsystems"), "{}", d.log());

    d.rpc_ok("log_set_flag", json!({"flag": "all"}));
    let flags = d.rpc_ok("log_get_flags", Value::Null);
    assert!(
        flags.as_object().unwrap().values().all(|v| v == true),
        "{flags}"
    );

    for (method, params) in [
        ("log_set_level", json!({"level": "LOUD"})),
        ("log_set_flag", json!({"flag": "nosuch"})),
        ("log_set_flag", json!({})),
        ("log_get_flags", json!({"x": 1})),
    ] {
        let e = d.rpc(method, params.clone()).expect_err(method);
        assert_eq!(e.0, -32602, "{method} {params}: {e:?}");
    }

    let o = d.blockctl(&["log_get_level"]);
    assert_eq!(stdout(&o).trim(), "NOTICE", "{}", stderr(&o));
    assert!(d.rpc_py(&["log_clear_flag", "vhost_blk"]).status.success());
    let o = d.rpc_py(&["log_get_flags"]);
    let flags: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(flags["vhost_blk"], false);
    assert_eq!(flags["vhost_scsi"], true);
    let o = d.rpc_py(&["log_get_print_level"]);
    assert_eq!(stdout(&o).trim(), "\"NOTICE\"");
}

/// `spdk_kill_instance`: the caller gets its `true`, then the daemon stops cleanly (exit 0)
/// on SIGTERM, through blockctl and through SPDK's rpc.py; signals blockd does not handle
/// are refused and change nothing.
#[test]
fn spdk_kill_instance_stops_the_daemon_after_replying() {
    let mut d = Daemon::start();
    for bad in ["SIGHUP", "SIGFOO", "15"] {
        let e = d
            .rpc("spdk_kill_instance", json!({"sig_name": bad}))
            .expect_err(bad);
        assert_eq!(e.0, -32602, "{bad}: {e:?}");
    }
    assert!(d.rpc("spdk_get_version", Value::Null).is_ok());

    // The raw client's SIGTERM (on the daemon above), blockctl's SIGINT, rpc.py's SIGTERM.
    let kills: [fn(&Daemon); 3] = [
        |d| {
            let r = d.rpc_ok("spdk_kill_instance", json!({"sig_name": "SIGTERM"}));
            assert_eq!(r, json!(true));
        },
        |d| {
            let o = d.blockctl(&["spdk_kill_instance", "SIGINT"]);
            assert!(o.status.success(), "{}", stderr(&o));
        },
        |d| {
            let o = d.rpc_py(&["spdk_kill_instance", "SIGTERM"]);
            assert!(o.status.success(), "rpc.py: {}{}", stdout(&o), stderr(&o));
        },
    ];
    for (i, kill) in kills.into_iter().enumerate() {
        if i > 0 {
            d = Daemon::start();
        }
        kill(&d);
        let code = d.wait(Duration::from_secs(20)).code();
        assert_eq!(code, Some(0), "kill {i}: {}", d.log());
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn blockctl_output_and_exit_codes() {
    let d = Daemon::start();
    let o = d.blockctl(&["spdk_get_version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let printed: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed, d.rpc_ok("spdk_get_version", Value::Null));
    assert!(
        stdout(&o).contains("\n  \"fields\""),
        "indent 2: {}",
        stdout(&o)
    );

    let o = d.blockctl(&["rpc_get_methods"]);
    assert!(o.status.success());
    let printed: Vec<String> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(printed, d.methods());

    let o = d.blockctl(&["framework_get_config", "bdev"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // JSON-RPC errors: rpc.py's text on stderr, exit 1.
    let o = d.blockctl(&["rpc", "no_such_method", r#"{"a":1}"#]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("Got JSON-RPC error response"), "{e}");
    assert!(
        e.contains("-32601") && e.contains("Method not found"),
        "{e}"
    );
    assert!(e.contains("\"method\": \"no_such_method\""), "{e}");
    assert!(stdout(&o).is_empty());

    let o = d.blockctl(&["spdk_get_version_typo"]);
    assert_ne!(o.status.code(), Some(0));

    let o = d.blockctl(&["framework_get_config", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("-32602"));

    let o = d.blockctl(&["rpc", "spdk_get_version", "not json"]);
    assert_eq!(o.status.code(), Some(1));

    // Connection failure names the socket.
    let missing = d.tmp_dir().join("missing.sock");
    let o = Command::new(common::blockctl_bin())
        .arg("-s")
        .arg(&missing)
        .arg("spdk_get_version")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(missing.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
}

#[test]
fn blockctl_save_and_load_config() {
    let d = Daemon::start();
    let o = d.blockctl(&["save_config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let subs = saved["subsystems"].as_array().unwrap();
    assert_eq!(subs[0]["subsystem"], "keyring");
    assert_eq!(subs[1]["subsystem"], "bdev");
    assert!(subs.iter().all(|s| s["config"].is_array()));

    let o = d.blockctl(&["save_config", "-s", "bdev"]);
    let only: Value = serde_json::from_str(&stdout(&o)).unwrap();
    // With its dependency: the keys its bdevs refer to.
    let only: Vec<&Value> = only["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["subsystem"])
        .collect();
    assert_eq!(only, [&json!("keyring"), &json!("bdev")]);

    let file = d.tmp_dir().join("cfg.json");
    std::fs::write(&file, stdout(&d.blockctl(&["save_config"]))).unwrap();
    let o = d.blockctl(&["load_config", "-j", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    std::fs::write(
        &file,
        r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bogus_method"}]}]}"#,
    )
    .unwrap();
    let o = d.blockctl(&["load_config", "-j", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bogus_method"), "{}", stderr(&o));
}

/// With the bdev handlers present (merged from the bdev branch): create, print the name raw,
/// `true` prints nothing, save_config carries the bdev, and a restart with --json brings it
/// back.
#[test]
fn blockctl_bdev_round_trip() {
    let d = Daemon::start();
    let o = d.blockctl(&["bdev_malloc_create", "-b", "Malloc7", "8", "512"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "Malloc7\n");
    let bdevs = d.rpc_ok("bdev_get_bdevs", json!({"name": "Malloc7"}));
    assert_eq!(bdevs[0]["num_blocks"], 8 * 2048);
    assert_eq!(bdevs[0]["block_size"], 512);

    let saved: Value = serde_json::from_str(&stdout(&d.blockctl(&["save_config"]))).unwrap();
    let file = d.tmp_dir().join("saved.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    let bdev_cfg = &saved["subsystems"][1]["config"];
    assert!(
        bdev_cfg
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["method"] == "bdev_malloc_create"),
        "{saved}"
    );

    let o = d.blockctl(&["bdev_malloc_delete", "Malloc7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");

    let o = d.blockctl(&["bdev_get_bdevs", "-b", "Malloc7"]);
    assert_eq!(o.status.code(), Some(1));

    let d2 = Daemon::start_with(&["-m", "0x1", "--json", file.to_str().unwrap()]);
    let b = d2.rpc_ok("bdev_get_bdevs", json!({"name": "Malloc7"}));
    assert_eq!(b[0]["uuid"], bdevs[0]["uuid"]);
}

#[test]
fn spdk_rpc_py_works_unchanged() {
    let d = Daemon::start();
    let run = |args: &[&str]| d.rpc_py(args);
    let o = run(&["spdk_get_version"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, d.rpc_ok("spdk_get_version", Value::Null));

    let o = run(&["rpc_get_methods"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Vec<String> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(m, d.methods());

    let o = run(&["framework_get_reactors"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = run(&["save_config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ours: Value = serde_json::from_str(&stdout(&d.blockctl(&["save_config"]))).unwrap();
    assert_eq!(saved, ours);

    let file = d.tmp_dir().join("cfg.json");
    std::fs::write(&file, saved.to_string()).unwrap();
    let o = run(&["load_config", "-j", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    // An error comes back as rpc.py expects it (it prints it and exits 1).
    let o = run(&["framework_get_config", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("-32602"), "{}", stdout(&o));
}

#[test]
fn client_library_reuses_one_connection() {
    let d = Daemon::start();
    let mut c: RpcClient = d.client();
    for _ in 0..50 {
        c.call("spdk_get_version", None).unwrap();
    }
    let err = c
        .call("spdk_get_version", Some(json!({"x": 1})))
        .unwrap_err();
    assert_eq!(err.rpc_code(), Some(-32602));
    // Garbage sent raw: the server answers -32700 and closes; the client sees it.
    c.send_raw(b"{{{").unwrap();
    let v = c.read_value().unwrap();
    assert_eq!(v["error"]["code"], -32700);
    let _ = Duration::from_secs(0);
}
