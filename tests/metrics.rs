//! `blockd --metrics`: the exposition agrees with `bdev_get_iostat` and
//! `vhost_get_controllers`, passes `promtool check metrics`, and a real Prometheus server
//! (Debian's `prometheus`) scrapes it under load and answers queries about it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::blk_client::BlkClient;
use common::Daemon;
use serde_json::{json, Value};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `GET path` over HTTP/1.1; (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    // Prometheus' API may answer chunked; its JSON is one chunk between size lines.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The address blockd logged for `--metrics 127.0.0.1:0` (the port it was given).
fn metrics_addr(d: &Daemon) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log();
        if let Some(l) = log.lines().find(|l| l.contains("metrics served")) {
            let a = l.split("addr=").nth(1).expect("addr= in the log line");
            let a = a.split_whitespace().next().unwrap().trim_matches('"');
            return a.parse().expect("socket address");
        }
        assert!(Instant::now() < deadline, "no metrics line in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Value of the sample `name{labels}` in the exposition `text` (labels exactly as written).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn within_1pct(a: f64, b: f64, what: &str) {
    let tol = b.abs() * 0.01;
    assert!((a - b).abs() <= tol, "{what}: metrics {a} vs RPC {b}");
}

fn malloc_ctrlr(d: &Daemon) -> String {
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "Malloc0", "num_blocks": 32768, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
    );
    d.socket_dir().join("vhost.0").to_str().unwrap().to_string()
}

#[test]
fn exposition_agrees_with_the_rpcs_and_promtool() {
    let d = Daemon::start_with(&["-m", "0x1", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&d);
    let sock = malloc_ctrlr(&d);
    let mut c = BlkClient::connect(&sock, 2, 1 << 20).unwrap();
    for i in 0..200u64 {
        assert_eq!(c.write((i % 2) as usize, i * 4096, 4096), 0);
        assert_eq!(c.read((i % 2) as usize, i * 8192 % (8 << 20), 8192), 0);
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.discard(0, 1 << 20, 1 << 20), 0);
    assert_eq!(c.write_zeroes(1, 2 << 20, 65536, false), 0);

    // Quiescent now: the scrape and the RPCs see the same interval.
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    let io = d.rpc_ok("bdev_get_iostat", json!({"name": "Malloc0"}));
    let s = &io["bdevs"][0];
    let tick = io["tick_rate"].as_f64().unwrap();
    let n = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} in {s}"));
    for (op, ops, bytes, ticks) in [
        ("read", "num_read_ops", "bytes_read", "read_latency_ticks"),
        (
            "write",
            "num_write_ops",
            "bytes_written",
            "write_latency_ticks",
        ),
        (
            "unmap",
            "num_unmap_ops",
            "bytes_unmapped",
            "unmap_latency_ticks",
        ),
        (
            "write_zeroes",
            "num_write_zeroes_ops",
            "bytes_write_zeroes",
            "write_zeroes_latency_ticks",
        ),
    ] {
        let l = format!("{{bdev=\"Malloc0\",operation=\"{op}\"}}");
        within_1pct(
            sample(&text, &format!("blockd_bdev_operations_total{l}")),
            n(ops),
            ops,
        );
        within_1pct(
            sample(&text, &format!("blockd_bdev_bytes_total{l}")),
            n(bytes),
            bytes,
        );
        within_1pct(
            sample(&text, &format!("blockd_bdev_operation_seconds_total{l}")),
            n(ticks) / tick,
            ticks,
        );
        // The histogram counted the same operations.
        within_1pct(
            sample(&text, &format!("blockd_bdev_latency_seconds_count{l}")),
            n(ops),
            "histogram count",
        );
    }
    assert_eq!(n("num_read_ops"), 200.0);
    assert_eq!(n("num_write_ops"), 200.0);
    within_1pct(
        sample(
            &text,
            "blockd_bdev_operations_total{bdev=\"Malloc0\",operation=\"flush\"}",
        ),
        n("num_flush_ops"),
        "flush",
    );
    within_1pct(
        sample(&text, "blockd_bdev_errors_total{bdev=\"Malloc0\"}"),
        n("io_error"),
        "errors",
    );
    let ctrl = &d.rpc_ok("vhost_get_controllers", json!({"name": "vhost.0"}))[0];
    within_1pct(
        sample(
            &text,
            "blockd_vhost_interrupts_held_back_total{controller=\"vhost.0\"}",
        ),
        ctrl["interrupts_held_back"].as_f64().unwrap(),
        "interrupts_held_back",
    );
    assert_eq!(
        sample(
            &text,
            "blockd_vhost_frontend_connected{controller=\"vhost.0\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "blockd_vhost_connects_total{controller=\"vhost.0\"}"),
        1.0
    );
    // Nothing is in flight any more. The queues publish their counters at the end of a
    // poll pass, a moment after the last completion went back to the client: once that
    // pass is done, the scrape and the RPC agree on every queue counter.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, t) = http_get(addr, "/metrics");
        let c = d.rpc_ok("vhost_get_controllers", json!({"name": "vhost.0"}))[0].clone();
        let queues = c["sessions"][0]["queues"]
            .as_array()
            .expect("queues")
            .clone();
        assert!(!queues.is_empty(), "{c}");
        let mut diffs = Vec::new();
        for q in &queues {
            let l = format!("{{controller=\"vhost.0\",queue=\"{}\"}}", q["index"]);
            for (name, k) in [
                ("requests_total", "requests"),
                ("kicks_total", "kicks"),
                ("interrupts_total", "interrupts"),
                ("in_flight", "in_flight"),
            ] {
                let m = sample(&t, &format!("blockd_vhost_queue_{name}{l}"));
                let r = q[k].as_f64().unwrap();
                if (m - r).abs() > r.abs() * 0.01 {
                    diffs.push(format!("queue {} {k}: metrics {m} vs RPC {r}", q["index"]));
                }
            }
        }
        let requests: f64 = queues.iter().map(|q| q["requests"].as_f64().unwrap()).sum();
        if diffs.is_empty() && requests >= 400.0 && c["sessions"][0]["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{diffs:?}\n{c}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reactors = d.rpc_ok("framework_get_reactors", json!({}));
    let busy = reactors["reactors"][0]["busy"].as_f64().unwrap() / 1e9;
    // Read after the scrape: at least what the scrape saw (to rounding).
    let scraped = sample(&text, "blockd_reactor_busy_seconds_total{reactor=\"0\"}");
    assert!(
        scraped > 0.0 && scraped <= busy * (1.0 + 1e-9),
        "{scraped} > {busy}"
    );
    assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&text, "process_open_fds") > 3.0);

    drop(c);
    // The disconnection shows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, t) = http_get(addr, "/metrics");
        if sample(&t, "blockd_vhost_disconnects_total{controller=\"vhost.0\"}") == 1.0 {
            assert_eq!(
                sample(
                    &t,
                    "blockd_vhost_frontend_connected{controller=\"vhost.0\"}"
                ),
                0.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "no disconnection in:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    }

    assert_eq!(http_get(addr, "/nope").0, 404);
    if !have("promtool") {
        eprintln!("SKIP promtool: not installed (scripts/install-deps.sh)");
        return;
    }
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A free TCP port on 127.0.0.1 (closed again: Prometheus binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: blockd\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query?query=q` once the server answers; `None` while it does not.
    fn query(&self, q: &str) -> Option<Value> {
        TcpStream::connect(self.addr).ok()?;
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={q}"));
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Already exited is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_rate(r: &Value) -> Option<f64> {
    r["data"]["result"]
        .as_array()?
        .iter()
        .find(|s| s["metric"]["bdev"] == "Malloc0" && s["metric"]["operation"] == "read")?["value"]
        [1]
    .as_str()?
    .parse()
    .ok()
}

#[test]
fn prometheus_scrapes_blockd_under_load() {
    if !have("prometheus") {
        eprintln!("SKIP: prometheus not installed (scripts/install-deps.sh)");
        return;
    }
    let d = Daemon::start_with(&["-m", "0x1", "--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&d);
    let sock = malloc_ctrlr(&d);
    let prom = Prometheus::start(addr);
    // A load in the background for the whole test.
    let mut load = Command::new(common::blockctl_bin())
        .args([
            "bench", "-s", &sock, "-w", "randread", "-q", "4", "-t", "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let ok = loop {
        if let Some(v) = prom.query("blockd_bdev_operations_total") {
            if let Some(x) = read_rate(&v) {
                seen.push(x);
                // Two scrapes of a growing counter: Prometheus sees the load.
                if seen.len() >= 2 && seen[seen.len() - 1] > seen[0] && seen[0] > 0.0 {
                    break Some(v);
                }
            }
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = load.kill();
    let _ = load.wait();
    let v = ok.unwrap_or_else(|| panic!("no growing series; seen {seen:?}\n{}", prom.log()));
    let series = v["data"]["result"].as_array().unwrap();
    let ops: Vec<&str> = series
        .iter()
        .filter(|s| s["metric"]["bdev"] == "Malloc0")
        .map(|s| s["metric"]["operation"].as_str().unwrap())
        .collect();
    for op in ["read", "write", "unmap", "flush", "write_zeroes"] {
        assert!(ops.contains(&op), "{op} missing in {v}");
    }
    assert!(series.iter().all(|s| s["metric"]["job"] == "blockd"));
    // The scrape target is healthy, and a histogram quantile is computable.
    let up = prom.query("up").unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let q = prom
        .query("histogram_quantile(0.5,rate(blockd_bdev_latency_seconds_bucket%7Boperation=%22read%22%7D%5B10s%5D))")
        .unwrap();
    assert_eq!(q["status"], "success", "{q}");
}

/// Decodes `bdev_get_histogram`'s result as SPDK's `spdk_histogram_data_iterate` walks it:
/// (bucket start, bucket end, count) in ticks, for the non-empty buckets.
fn spdk_buckets(h: &Value) -> Vec<(u64, u64, u64)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(h["histogram"].as_str().unwrap())
        .unwrap();
    let g = h["granularity"].as_u64().unwrap() as u32;
    let (min, max) = (
        h["min_range"].as_u64().unwrap() as u32,
        h["max_range"].as_u64().unwrap() as u32,
    );
    assert_eq!(raw.len(), ((max - min + 1) << g) as usize * 8);
    let start_of = |r: u32, i: u64| -> u64 {
        // __spdk_histogram_data_get_bucket_start(range, index) with index + 1.
        if r > 0 {
            (1u64 << (r + g - 1)).wrapping_add((i + 1) << (r - 1))
        } else {
            i + 1
        }
    };
    let mut out = Vec::new();
    let mut last = 0u64;
    for (n, c) in raw.chunks(8).enumerate() {
        let count = u64::from_le_bytes(c.try_into().unwrap());
        let (r, i) = (min + (n as u32 >> g), (n as u64) & ((1 << g) - 1));
        let end = start_of(r, i);
        if count > 0 {
            out.push((last, end, count));
        }
        last = end;
    }
    out
}

#[test]
fn histogram_rpcs_in_spdk_shape() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let sock = malloc_ctrlr(&d);
    // SPDK: -EFAULT while not enabled, -ENODEV for an unknown bdev.
    let e = d
        .rpc("bdev_get_histogram", json!({"name": "Malloc0"}))
        .unwrap_err();
    assert_eq!(e, (-32603, "Bad address".into()));
    assert_eq!(
        d.rpc(
            "bdev_enable_histogram",
            json!({"name": "nope", "enable": true})
        )
        .unwrap_err()
        .0,
        -19
    );
    assert_eq!(
        d.rpc(
            "bdev_enable_histogram",
            json!({"name": "Malloc0", "enable": true, "opc": "compare_and_write_x"})
        )
        .unwrap_err(),
        (-32603, "Invalid Io type".into())
    );
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    // Before enabling: not counted by bdev_get_histogram.
    for i in 0..50u64 {
        assert_eq!(c.read(0, i * 4096, 4096), 0);
    }
    assert_eq!(
        d.rpc_ok(
            "bdev_enable_histogram",
            json!({"name": "Malloc0", "enable": true})
        ),
        json!(true)
    );
    let before = d.rpc_ok("bdev_get_iostat", json!({"name": "Malloc0"}))["bdevs"][0].clone();
    for i in 0..300u64 {
        assert_eq!(c.read(0, i * 4096, 4096), 0);
        assert_eq!(c.write(0, i * 4096, 4096), 0);
    }
    let h = d.rpc_ok("bdev_get_histogram", json!({"name": "Malloc0"}));
    let after = d.rpc_ok("bdev_get_iostat", json!({"name": "Malloc0"}))["bdevs"][0].clone();
    assert_eq!(h["tsc_rate"], 1_000_000_000u64);
    assert_eq!(h["bucket_shift"], h["granularity"]);
    assert_eq!(
        (h["min_range"].as_u64(), h["max_range"].as_u64()),
        (Some(0), Some(61))
    );
    let buckets = spdk_buckets(&h);
    let total: u64 = buckets.iter().map(|b| b.2).sum();
    assert_eq!(total, 600, "{buckets:?}");
    // Every latency iostat saw lies within the buckets' span: the bounds mean what SPDK's
    // iterate says they mean.
    let lat = |s: &Value, k: &str| s[k].as_u64().unwrap();
    let sum = lat(&after, "read_latency_ticks") + lat(&after, "write_latency_ticks")
        - lat(&before, "read_latency_ticks")
        - lat(&before, "write_latency_ticks");
    let lo: u64 = buckets.iter().map(|b| b.0 * b.2).sum();
    let hi: u64 = buckets.iter().map(|b| b.1 * b.2).sum();
    assert!(lo <= sum && sum <= hi, "{lo} <= {sum} <= {hi}");
    // SPDK's histogram.py, when one is at hand (scripts/histogram.py of an SPDK tree).
    if let Ok(py) = std::env::var("SPDK_HISTOGRAM_PY") {
        let mut p = Command::new("python3")
            .arg(&py)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin
            .take()
            .unwrap()
            .write_all(h.to_string().as_bytes())
            .unwrap();
        let o = p.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{out}");
        let counts: u64 = out
            .lines()
            .filter_map(|l| {
                l.rsplit('(')
                    .next()?
                    .trim()
                    .trim_end_matches(')')
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert_eq!(counts, 600, "{out}");
    }
    // One operation type, and a range: values outside count in the end buckets.
    d.rpc_ok(
        "bdev_enable_histogram",
        json!({"name": "Malloc0", "enable": true, "opc": "write", "min_nsec": 1000, "max_nsec": 1_000_000_000u64}),
    );
    for i in 0..20u64 {
        assert_eq!(c.read(0, i * 4096, 4096), 0);
        assert_eq!(c.write(0, i * 4096, 4096), 0);
    }
    let h = d.rpc_ok("bdev_get_histogram", json!({"name": "Malloc0"}));
    assert_eq!(spdk_buckets(&h).iter().map(|b| b.2).sum::<u64>(), 20);
    assert!(h["min_range"].as_u64().unwrap() > 0);
    d.rpc_ok(
        "bdev_enable_histogram",
        json!({"name": "Malloc0", "enable": false}),
    );
    assert!(d
        .rpc("bdev_get_histogram", json!({"name": "Malloc0"}))
        .is_err());
    // SPDK's own client speaks to it.
    if let Some(_rpc) = common::spdk_rpc() {
        let o = d.rpc_py(&["bdev_enable_histogram", "--histogram", "Malloc0"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = d.rpc_py(&["bdev_get_histogram", "Malloc0"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["histogram"].is_string(), "{v}");
    }
}

/// The r/s column of `Malloc0`'s lines in `blockctl iostat` output.
fn iostat_reads(text: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.contains("Malloc0"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "Malloc0")?;
            f.get(i + 1)?.parse().ok()
        })
        .collect()
}

#[test]
fn blockctl_iostat_piped_and_in_a_terminal() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let sock = malloc_ctrlr(&d);
    let mut load = Command::new(common::blockctl_bin())
        .args([
            "bench", "-s", &sock, "-w", "randread", "-q", "4", "-t", "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rpc = d.rpc_socket().to_str().unwrap().to_string();
    // The load is running before iostat starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.rpc_ok("bdev_get_iostat", json!({"name": "Malloc0"}))["bdevs"][0]["num_read_ops"] == 0 {
        assert!(Instant::now() < deadline, "the load did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Piped: a header, then one plain line per bdev and interval.
    let o = Command::new(common::blockctl_bin())
        .args(["-s", &rpc, "iostat", "-i", "0.5", "-c", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !text.contains('\x1b'),
        "escape sequences when piped: {text:?}"
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("time") && lines[0].contains("r/s"),
        "{text}"
    );
    let reads = iostat_reads(&text);
    assert_eq!(reads.len(), 3, "{text}");
    // The load was running: reads every interval.
    assert!(reads.iter().all(|&r| r > 0.0), "{text}");

    if !have("tmux") {
        eprintln!("SKIP tmux part: tmux not installed (scripts/install-deps.sh)");
    } else {
        let server = format!("blockd-iostat-{}", std::process::id());
        let tmux = |args: &[&str]| {
            Command::new("tmux")
                .args(["-L", &server])
                .args(args)
                .output()
                .unwrap()
        };
        let cmd = format!("{} -s {rpc} iostat -i 0.3", common::blockctl_bin());
        let o = tmux(&["new-session", "-d", "-x", "120", "-y", "30", &cmd]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut refreshes = 0;
        let mut last = String::new();
        let pane = loop {
            let o = tmux(&["capture-pane", "-p"]);
            let p = String::from_utf8_lossy(&o.stdout).into_owned();
            if p != last && p.contains("Malloc0") {
                refreshes += 1;
                last = p.clone();
            }
            // Several refreshes, each redrawn in place: one header on the screen.
            if refreshes >= 3 {
                break p;
            }
            assert!(Instant::now() < deadline, "pane:\n{p}");
            std::thread::sleep(Duration::from_millis(100));
        };
        tmux(&["kill-server"]);
        assert_eq!(pane.matches("r/s").count(), 1, "{pane}");
        assert!(pane.contains("blockctl iostat: 1 bdev(s)"), "{pane}");
        assert!(!pane.contains("time "), "{pane}");
        assert_eq!(iostat_reads(&pane).len(), 1, "{pane}");
        assert!(iostat_reads(&pane)[0] > 0.0, "{pane}");
    }
    let _ = load.kill();
    let _ = load.wait();
}

/// Under `Type=notify`, READY=1 arrives once the configuration is replayed and every
/// socket listens: at that moment the RPC socket answers, the replayed controller's socket
/// and the metrics endpoint accept.
#[test]
fn ready_notification_after_replay_and_listen() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let rx = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let sockets = dir.path().join("s");
    std::fs::create_dir(&sockets).unwrap();
    let rpc = dir.path().join("rpc.sock");
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        json!({"subsystems": [
            {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
                "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}}]},
            {"subsystem": "vhost_blk", "config": [{"method": "vhost_create_blk_controller",
                "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0"}}]}
        ]})
        .to_string(),
    )
    .unwrap();
    let port = free_port();
    let mut child = Command::new(common::blockd_bin())
        .args(["-m", "0x1", "-S"])
        .arg(&sockets)
        .arg("-r")
        .arg(&rpc)
        .arg("--json")
        .arg(&cfg)
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Checked right at the notification, without waiting for anything.
    let rpc_up = std::os::unix::net::UnixStream::connect(&rpc).is_ok();
    let vhost_up = std::os::unix::net::UnixStream::connect(sockets.join("vhost.0")).is_ok();
    let metrics_up = TcpStream::connect(("127.0.0.1", port)).is_ok();
    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = rx.recv(&mut buf).expect("STOPPING=1");
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = child.wait().unwrap();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        rpc_up && vhost_up && metrics_up,
        "{rpc_up} {vhost_up} {metrics_up}"
    );
    assert_eq!(stopping, "STOPPING=1");
    assert!(status.success(), "{status}");
}

/// contrib/systemd/blockd.service passes `systemd-analyze verify` (with ExecStart pointing
/// at the binary under test, which verify requires to exist).
#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze") {
        eprintln!("SKIP: systemd-analyze not installed");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/blockd.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("LimitMEMLOCK=infinity"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blockd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/blockd", common::blockd_bin()),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Under systemd, stderr goes to the journal (`$JOURNAL_STREAM` = its device:inode): each
/// line carries its priority (`<6>` info, `<4>` warning, `<3>` error) for journald; with
/// stderr elsewhere, no prefix.
#[test]
fn journal_lines_carry_their_priority() {
    use std::os::unix::fs::MetadataExt;
    for journal in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let f = std::fs::File::create(&log).unwrap();
        let m = f.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", m.dev(), m.ino())
        } else {
            "1:1".to_string()
        };
        std::fs::create_dir(dir.path().join("s")).unwrap();
        let mut child = Command::new(common::blockd_bin())
            .args(["-m", "0x1", "-S"])
            .arg(dir.path().join("s"))
            .arg("-r")
            .arg(dir.path().join("rpc.sock"))
            .env("JOURNAL_STREAM", &stream)
            .stderr(f)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let t = std::fs::read_to_string(&log).unwrap();
            if t.contains("blockd ready") {
                break t;
            }
            assert!(Instant::now() < deadline, "{t}");
            std::thread::sleep(Duration::from_millis(20));
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
        let ready = text.lines().find(|l| l.contains("blockd ready")).unwrap();
        assert_eq!(ready.starts_with("<6>"), journal, "{text}");
        assert!(ready.contains("INFO"), "{ready}");
    }
}
