//! QoS limits hold on the real path: a vhost-user client (blockctl bench, libblkio) saturating
//! a rate-limited bdev through blockd gets the limit, within 5%.

mod common;

use common::Daemon;
use serde_json::{json, Value};

fn bench(d: &Daemon, sock: &str, args: &[&str]) -> Value {
    let mut a = vec!["-t", "3"];
    a.extend_from_slice(args);
    d.bench(sock, &a)
}

fn iops(report: &Value) -> f64 {
    let r = &report["phases"][0];
    r["iops"]
        .as_f64()
        .unwrap_or_else(|| panic!("no iops in {report}"))
}

fn mibps(report: &Value) -> f64 {
    let r = &report["phases"][0];
    r["mib_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no MiB/s in {report}"))
}

#[test]
fn iops_and_bandwidth_limits_hold_within_5_percent() {
    let d = Daemon::start();
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 65536, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
    );
    let sock = d.socket_dir().join("vhost.0");
    let sock = sock.to_str().unwrap();

    d.rpc_ok(
        "bdev_set_qos_limit",
        json!({"name": "Malloc0", "rw_ios_per_sec": 5000}),
    );
    let r = bench(&d, sock, &["-w", "randread", "-b", "4k", "-q", "16"]);
    let got = iops(&r);
    assert!(
        (got - 5000.0).abs() <= 250.0,
        "IOPS {got} not within 5% of 5000: {r}"
    );

    d.rpc_ok(
        "bdev_set_qos_limit",
        json!({"name": "Malloc0", "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 20}),
    );
    let r = bench(&d, sock, &["-w", "read", "-b", "128k", "-q", "8"]);
    let got = mibps(&r);
    assert!(
        (got - 20.0).abs() <= 1.0,
        "MiB/s {got} not within 5% of 20: {r}"
    );

    // Limits removed: well above both.
    d.rpc_ok(
        "bdev_set_qos_limit",
        json!({"name": "Malloc0", "rw_mbytes_per_sec": 0}),
    );
    let r = bench(&d, sock, &["-w", "randread", "-b", "4k", "-q", "16"]);
    assert!(iops(&r) > 10000.0, "unlimited run too slow: {r}");
    assert_eq!(
        d.rpc_ok("bdev_get_bdevs", json!({"name": "Malloc0"}))[0]["assigned_rate_limits"],
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
}
