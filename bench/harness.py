#!/usr/bin/env python3
"""blockd vs qemu-storage-daemon vs fio: runs the workloads of issue 7 and writes one JSON
file per run, plus idle.json, into a results directory (bench/report.py turns them into
table.md and plots). Started by bench/run.sh, which builds and installs what this needs.

Every target runs pinned to core 0 and every client to core 1 (taskset). The client is
`blockctl bench` (libblkio, vhost-user, busy-polling; sleeping on the completion eventfd for
the `-irq` workload) for blockd and qemu-storage-daemon, and
fio's io_uring engine on the same file for the device limit. A target's CPU is read from
/proc/PID/stat (utime + stime, all threads) before and after each client run.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_CPU = "0"
CLIENT_CPU = "1"
# Targets and clients run at nice -20 when root, so that other work on a shared machine
# disturbs the comparison less (it still runs: check meta.loadavg in the JSON).
NICE = ["nice", "-n", "-20"] if os.geteuid() == 0 else []

# name -> (pattern, block size, queue depth per queue, queues)
WORKLOADS = {
    "4k-randread-qd1": ("randread", "4k", 1, 1),
    # The same with a client that sleeps on the completion eventfd (a guest taking
    # interrupts) instead of polling: the setting of issue 7's reference latencies.
    "4k-randread-qd1-irq": ("randread", "4k", 1, 1),
    "4k-randread-qd32": ("randread", "4k", 32, 1),
    "4k-randwrite-qd32": ("randwrite", "4k", 32, 1),
    "4k-randread-qd128-2q": ("randread", "4k", 64, 2),
    "128k-read-qd8": ("read", "128k", 8, 1),
    "128k-write-qd8": ("write", "128k", 8, 1),
}

# (backend, target): what is compared. The malloc row is compared with QSD null-co.
ROWS = [
    ("null", "blockd"),
    ("null", "qsd"),
    ("malloc", "blockd"),
    ("file", "blockd"),
    ("file", "qsd"),
    ("file", "fio"),
]


def rows_in_order(rows, run):
    """The rows of run `run` (from 1): each backend's targets rotated by run - 1, so that
    over 3 runs each of blockd, QSD and fio on the file goes first, second and third once.
    The device drifts by tens of percent within minutes, and a target run right after
    another's 5 s of writes meets a different device than one run after reads: with a fixed
    order that drift would land on the same target in every run."""
    groups = {}
    for backend, target in rows:
        groups.setdefault(backend, []).append((backend, target))
    out = []
    for g in groups.values():
        k = (run - 1) % len(g)
        out += g[k:] + g[:k]
    return out


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def anon_huge_kib(pid):
    """Anonymous memory of the process in transparent huge pages (smaps_rollup)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def wait_path(p, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(p):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{p} did not appear within {timeout} s")
        time.sleep(0.02)


class Rpc:
    """A minimal JSON-RPC 2.0 client for blockd's Unix socket."""

    def __init__(self, path):
        self.path = path
        self.id = 0

    def __call__(self, method, params=None, timeout=30):
        self.id += 1
        req = {"jsonrpc": "2.0", "id": self.id, "method": method}
        if params is not None:
            req["params"] = params
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(self.path)
        s.sendall(json.dumps(req).encode())
        buf, dec = b"", json.JSONDecoder()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"{method}: connection closed")
            buf += chunk
            try:
                r, _ = dec.raw_decode(buf.decode())
                break
            except ValueError:
                continue
        s.close()
        if "error" in r:
            raise RuntimeError(f"{method}: {r['error']}")
        return r["result"]


class Proc:
    """A pinned daemon, stopped with SIGTERM (then SIGKILL) on close."""

    def __init__(self, name, argv, logfile):
        self.name = name
        self.log = open(logfile, "w")
        self.p = subprocess.Popen(NICE + ["taskset", "-c", TARGET_CPU] + argv,
                                  stdout=self.log, stderr=subprocess.STDOUT)
        # nice and taskset exec the daemon: same pid.
        self.pid = self.p.pid

    def check(self):
        if self.p.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.p.returncode}, see {self.log.name}")

    def close(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def start_blockd(a, work, name, extra=()):
    d = work / name
    d.mkdir(exist_ok=True)
    rpc_sock = d / "rpc.sock"
    p = Proc(name, [a.blockd, "-m", "0x1", "-S", str(d), "-r", str(rpc_sock), "-L", "warn",
                    "--poll", a.poll, "--poll-idle-us", str(a.poll_idle_us), *extra],
             work / f"{name}.log")
    wait_path(rpc_sock)
    return p, Rpc(str(rpc_sock)), d


def start_targets(a, work, img, file_bytes):
    """blockd with null, malloc and aio bdevs; QSD with null-co and the file. Returns
    (procs, {(backend, target): socket})."""
    procs, socks = [], {}
    blockd, rpc, d = start_blockd(a, work, "blockd")
    procs.append(blockd)
    blocks = a.dev_mib * 2048
    rpc("bdev_null_create", {"name": "Null0", "num_blocks": blocks, "block_size": 512})
    rpc("bdev_malloc_create", {"name": "Malloc0", "num_blocks": blocks, "block_size": 512})
    rpc("bdev_aio_create", {"name": "Aio0", "filename": str(img), "block_size": 512})
    for ctrlr, bdev, backend in (("null", "Null0", "null"), ("malloc", "Malloc0", "malloc"),
                                 ("file", "Aio0", "file")):
        rpc("vhost_create_blk_controller", {"ctrlr": ctrlr, "dev_name": bdev})
        socks[(backend, "blockd")] = str(d / ctrlr)
    # Every block of the malloc bdev written once, so that its reads copy real memory in
    # every run (never-written pages read from the shared zero page, which stays in cache).
    subprocess.run(NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s",
                           socks[("malloc", "blockd")], "--verify", "--verify-phase", "write",
                           "--size", f"{a.dev_mib}M", "-b", "1m", "-q", "8", "--timeout", "60"],
                   check=True, capture_output=True, timeout=120)
    drv = rpc("bdev_get_bdevs", {"name": "Aio0"})[0]["driver_specific"]["aio"]
    if not drv.get("o_direct"):
        log("warning: blockd opened the file without O_DIRECT")

    q = work / "qsd"
    q.mkdir(exist_ok=True)
    qsd = Proc("qsd", [
        "qemu-storage-daemon",
        "--object", "iothread,id=io0",
        "--blockdev", f"driver=null-co,node-name=null0,size={blocks * 512},read-zeroes=off",
        "--blockdev", f"driver=file,node-name=file0,filename={img},aio=io_uring,cache.direct=on",
        "--export", f"type=vhost-user-blk,id=e0,node-name=null0,addr.type=unix,"
                    f"addr.path={q}/null.sock,writable=on,iothread=io0,num-queues=2",
        "--export", f"type=vhost-user-blk,id=e1,node-name=file0,addr.type=unix,"
                    f"addr.path={q}/file.sock,writable=on,iothread=io0,num-queues=2",
    ], work / "qsd.log")
    procs.append(qsd)
    wait_path(q / "null.sock")
    wait_path(q / "file.sock")
    socks[("null", "qsd")] = str(q / "null.sock")
    socks[("file", "qsd")] = str(q / "file.sock")
    return procs, {"blockd": blockd, "qsd": qsd}, socks


def run_blockctl(a, sock, wl, runtime, extra=()):
    pattern, bs, qd, queues = WORKLOADS[wl]
    argv = NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s", sock, "-w", pattern,
            "-b", bs, "-q", str(qd), "--queues", str(queues), "-t", str(runtime),
            "--cpus", CLIENT_CPU, "--json", "--timeout", "20",
            "--no-poll" if wl.endswith("-irq") else "--poll", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 60)
    if out.returncode != 0:
        raise RuntimeError(f"blockctl bench {wl} on {sock}: {out.stderr.strip()}")
    p = json.loads(out.stdout)["phases"][0]
    return {"iops": p["iops"], "mib_s": p["mib_s"], "lat_us": p["lat_us"],
            "first_lat_us": p["first_lat_us"], "seconds": p["seconds"]}


def run_fio(a, img, wl, runtime):
    pattern, bs, qd, queues = WORKLOADS[wl]
    argv = NICE + ["taskset", "-c", CLIENT_CPU, "fio", "--name=dev", "--ioengine=io_uring",
            "--direct=1", f"--filename={img}", f"--rw={pattern}", f"--bs={bs}",
            f"--iodepth={qd}", f"--numjobs={queues}", "--thread", "--time_based",
            # fio's random map, as blockctl bench's: every block once per pass.
            f"--runtime={runtime}", "--randrepeat=0",
            "--output-format=json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 60)
    if out.returncode != 0:
        raise RuntimeError(f"fio {wl}: {out.stderr.strip()}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    iops = mib = cpu = 0.0
    for job in j["jobs"]:
        for d in ("read", "write"):
            iops += job[d]["iops"]
            mib += job[d]["bw_bytes"] / 2**20
        cpu += (job["usr_cpu"] + job["sys_cpu"]) / 100.0
    d = j["jobs"][0]["write" if "write" in pattern else "read"]
    pct = d["clat_ns"].get("percentile", {})
    us = lambda k: pct.get(k, 0) / 1000.0
    lat = {"mean": d["lat_ns"]["mean"] / 1000.0, "p50": us("50.000000"), "p99": us("99.000000"),
           "p99_9": us("99.900000"), "max": d["lat_ns"]["max"] / 1000.0}
    # fio's own CPU is the cost of driving the device from a process: the "target" here.
    return {"iops": iops, "mib_s": mib, "lat_us": lat, "first_lat_us": [],
            "seconds": float(runtime), "cpu_cores": cpu}


# A cache line moves between the target's and the client's core in about 30 ns when the
# host places the two vCPUs close together, and in 156-176 ns when it places them far apart
# (and it moves them now and then). The null and malloc rows move a few lines per request,
# so a measurement taken far apart is one of the host's interconnect, not of the targets
# (bench/corelat.c). Measurements are taken close together when the host allows it. The
# report reads the threshold from the run's meta.
FAR_NS = 80.0
PLACEMENT_WAIT_S = 60.0


def core_latency(a):
    out = subprocess.run(NICE + [a.corelat, TARGET_CPU, CLIENT_CPU], capture_output=True,
                         text=True, timeout=30, check=True)
    return float(out.stdout)


def wait_close(a):
    """Probes until the cores are close (at most PLACEMENT_WAIT_S); returns the last probe."""
    deadline = time.monotonic() + PLACEMENT_WAIT_S
    ns = core_latency(a)
    while ns > FAR_NS and time.monotonic() < deadline:
        time.sleep(1.0)
        ns = core_latency(a)
    return ns


def measure_placed(a, procs, socks, img, backend, target, wl, runtime):
    """`measure`, with the cores close right before and right after; otherwise the
    measurement is taken again (twice at most). Records the probes.

    The placement is not fixed for minutes: probes 0.5 s and 2 s after a run read apart
    while one a moment later read close, and a retake with a close probe before it and a
    close one within 2 s after it once made the far placement's figures. A busy vCPU seems to stay where it is, and one that
    idles (between runs, or a client sleeping on its eventfd) may come back elsewhere, so
    only the probes next to the run say anything about it, and even they do not prove
    that the vCPUs stayed close throughout."""
    probes = []
    for attempt in range(3):
        before = wait_close(a)
        r = measure(a, procs, socks, img, backend, target, wl, runtime)
        after = core_latency(a)
        probes.append([before, after])
        if max(before, after) <= FAR_NS:
            break
        log(f"{wl} {backend} {target}: cores {before:.0f}/{after:.0f} ns apart, "
            f"attempt {attempt + 1}")
    r["core_ns"] = probes[-1]
    r["core_probes"] = probes
    return r


def measure(a, procs, socks, img, backend, target, wl, runtime):
    if target == "fio":
        return run_fio(a, img, wl, runtime)
    proc = procs[target]
    proc.check()
    t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
    r = run_blockctl(a, socks[(backend, target)], wl, runtime)
    t1, c1 = time.monotonic(), cpu_ticks(proc.pid)
    r["cpu_cores"] = (c1 - c0) / CLK_TCK / (t1 - t0)
    r["target_rss_kib"] = rss_kib(proc.pid)
    if backend == "malloc":
        # Random 4K copies over the whole bdev miss the TLB on almost every request without
        # huge pages. Whether the kernel found 2 MiB pages for the malloc data (it may not
        # on a fragmented host) moved this row by a sixth in an A/B (THP on: 1.67-1.85M
        # IOPS; off: 1.41-1.53M), so every run records it.
        r["anon_huge_kib"] = anon_huge_kib(proc.pid)
    return r


def idle_test(a, work):
    """16 controllers with a connected, idle libblkio client each: blockd's CPU and RSS
    over 3 s once the clients have been idle for 1 s; then the wake-up latency of a client
    that was idle for 1.5 s (first completions vs. the steady p50)."""
    n = 16
    p, rpc, d = start_blockd(a, work, "blockd-idle")
    try:
        for i in range(n):
            rpc("bdev_null_create", {"name": f"Null{i}", "num_blocks": 2048 * 64,
                                     "block_size": 512})
            rpc("vhost_create_blk_controller", {"ctrlr": f"idle{i}", "dev_name": f"Null{i}"})
        base_rss = rss_kib(p.pid)
        clients = []
        hold = 6.0
        for i in range(n):
            argv = NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s", str(d / f"idle{i}"),
                    "-q", "1", "-t", "1", "--idle-before", str(hold), "--no-poll", "--json",
                    "--timeout", "30"]
            clients.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 10
        while True:
            ctrls = rpc("vhost_get_controllers")
            running = sum(1 for c in ctrls for s in c["sessions"] if s["running_queues"] > 0)
            if running == n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {running} of {n} clients connected")
            time.sleep(0.05)
        time.sleep(1.0)
        t0, c0 = time.monotonic(), cpu_ticks(p.pid)
        time.sleep(3.0)
        t1, c1 = time.monotonic(), cpu_ticks(p.pid)
        rss = rss_kib(p.pid)
        reactors = rpc("framework_get_reactors")["reactors"]
        for c in clients:
            out, err = c.communicate(timeout=60)
            if c.returncode != 0:
                raise RuntimeError(f"idle client: {err.strip()}")
        idle = {
            "controllers": n,
            "idle_cpu_percent": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
            "rss_kib": rss,
            "rss_kib_before_clients": base_rss,
            "pollers": sum(r["lw_threads"].__len__() for r in reactors),
            "poll_mode": a.poll,
            "poll_idle_us": a.poll_idle_us,
        }
        # Wake-up: one client in polling mode, idle 1.5 s, then QD1 reads.
        wakes = []
        for _ in range(3):
            before = wait_close(a)
            r = run_blockctl(a, str(d / "idle0"), "4k-randread-qd1", 1,
                             extra=("--idle-before", "1.5"))
            wakes.append({"first_lat_us": r["first_lat_us"], "p50_us": r["lat_us"]["p50"],
                          "core_ns": [before, core_latency(a)]})
        idle["wakeup"] = wakes
        return idle
    finally:
        p.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per workload")
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--blockctl", required=True)
    ap.add_argument("--file", required=True, help="backing file for the file rows")
    ap.add_argument("--file-mib", type=int, default=1024)
    ap.add_argument("--dev-mib", type=int, default=1024, help="null and malloc bdev size")
    ap.add_argument("--poll", default="adaptive", choices=["adaptive", "always", "never"])
    ap.add_argument("--poll-idle-us", type=int, default=200)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rows", default=",".join(f"{b}/{t}" for b, t in ROWS))
    ap.add_argument("--skip-idle", action="store_true")
    a = ap.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"blockd-bench.{os.getpid()}"
    work.mkdir(parents=True)
    img = Path(a.file)
    if not img.exists() or img.stat().st_size != a.file_mib << 20:
        log(f"writing {a.file_mib} MiB to {img}")
        img.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={a.file_mib}",
                        "oflag=direct", "status=none"], check=True)
    a.corelat = str(work / "corelat")
    subprocess.run(["cc", "-O2", "-pthread", "-o", a.corelat,
                    str(Path(__file__).with_name("corelat.c"))], check=True)
    wls = a.workloads.split(",")
    rows = [tuple(r.split("/")) for r in a.rows.split(",")]
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": os.uname().nodename, "kernel": os.uname().release,
        "cpus": os.cpu_count(), "runtime_s": a.runtime, "poll": a.poll,
        "poll_idle_us": a.poll_idle_us, "file": str(img), "file_mib": a.file_mib,
        "dev_mib": a.dev_mib, "target_cpu": TARGET_CPU, "client_cpu": CLIENT_CPU,
        "qsd": subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0],
        "fio": subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip(),
        "core_far_ns": FAR_NS,
        "workloads": {k: dict(zip(("pattern", "bs", "qd_per_queue", "queues"), v))
                      for k, v in WORKLOADS.items() if k in wls},
    }
    plist = []
    try:
        plist, procs, socks = start_targets(a, work, img, a.file_mib << 20)
        for run in range(1, a.runs + 1):
            results = []
            for wl in wls:
                for backend, target in rows_in_order(rows, run):
                    r = measure_placed(a, procs, socks, img, backend, target, wl, a.runtime)
                    r.update({"backend": backend, "target": target, "workload": wl})
                    results.append(r)
                    log(f"run {run} {wl:22} {backend:6} {target:6} {r['iops']:>10.0f} IOPS "
                        f"p50 {r['lat_us']['p50']:7.1f} us  cpu {r['cpu_cores']:.2f}")
            with open(out / f"run-{run}.json", "w") as f:
                json.dump({"meta": meta, "run": run, "loadavg": os.getloadavg(),
                           "results": results}, f, indent=1)
    finally:
        for p in plist:
            p.close()
    if not a.skip_idle:
        idle = idle_test(a, work)
        log(f"idle: {idle['idle_cpu_percent']:.2f}% CPU, RSS {idle['rss_kib']['VmRSS']} KiB, "
            f"wake-up first latencies {[w['first_lat_us'][:4] for w in idle['wakeup']]}")
        with open(out / "idle.json", "w") as f:
            json.dump({"meta": meta, **idle}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
