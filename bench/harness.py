#!/usr/bin/env python3
"""blockd vs qemu-storage-daemon vs fio: runs the workloads of issues 7 and 20 and writes one
JSON file per run, plus idle.json, into a results directory (bench/report.py turns them into
table.md and plots). Started by bench/run.sh, which builds and installs what this needs.

Every target runs pinned to core 0 and every client to core 1 (taskset). The client is
`blockctl bench` (libblkio, vhost-user) for blockd and qemu-storage-daemon, in two modes per
workload: sleeping on the completion eventfd (`--no-poll`, a guest taking interrupts) and
busy-polling (`--poll`); fio's io_uring engine on the same file gives the device limit (it has
no client modes). Inside each client run a window (all but the first and last quarter-second
to second) measures the target's CPU (/proc/PID/stat, utime + stime, all threads), the
client's kicks and interrupts taken (perf's syscall tracepoints and /proc/PID/io, see
bench/notify.py) and, for blockd, its own per-queue counters. Right before each QD1 row
of a vhost-user target, bench/wakeup.c pingpong measures the host's floor for that client
mode (`host_floor_us`).
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import notify

CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_CPU = "0"
CLIENT_CPU = "1"
# Targets and clients run at nice -20 when root, so that other work on a shared machine
# disturbs the comparison less (it still runs: check meta.loadavg in the JSON).
NICE = ["nice", "-n", "-20"] if os.geteuid() == 0 else []

# name -> (pattern, block size, queue depth per queue, queues). Each runs with both clients.
WORKLOADS = {
    "4k-randread-qd1": ("randread", "4k", 1, 1),
    "4k-randread-qd32": ("randread", "4k", 32, 1),
    "4k-randwrite-qd32": ("randwrite", "4k", 32, 1),
    "4k-randread-qd128-2q": ("randread", "4k", 64, 2),
    "128k-read-qd8": ("read", "128k", 8, 1),
    "128k-write-qd8": ("write", "128k", 8, 1),
}

# Client modes of `blockctl bench`, in the order the report shows them: sleeping on the
# completion eventfd (as a Linux guest taking interrupts; issue 7's reference latencies were
# taken so) and busy-polling libblkio poll queues. fio's rows have no mode ("-").
CLIENTS = {"sleep": "--no-poll", "poll": "--poll"}

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
    (procs, {target: Proc}, {(backend, target): socket}, {backend: blockd controller},
    blockd's Rpc)."""
    procs, socks = [], {}
    blockd, rpc, d = start_blockd(a, work, "blockd")
    procs.append(blockd)
    ctrlrs = {}
    blocks = a.dev_mib * 2048
    rpc("bdev_null_create", {"name": "Null0", "num_blocks": blocks, "block_size": 512})
    rpc("bdev_malloc_create", {"name": "Malloc0", "num_blocks": blocks, "block_size": 512})
    rpc("bdev_aio_create", {"name": "Aio0", "filename": str(img), "block_size": 512})
    for ctrlr, bdev, backend in (("null", "Null0", "null"), ("malloc", "Malloc0", "malloc"),
                                 ("file", "Aio0", "file")):
        rpc("vhost_create_blk_controller", {"ctrlr": ctrlr, "dev_name": bdev})
        socks[(backend, "blockd")] = str(d / ctrlr)
        ctrlrs[backend] = ctrlr
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
    return procs, {"blockd": blockd, "qsd": qsd}, socks, ctrlrs, rpc


def blockctl_argv(a, sock, wl, runtime, client, extra=()):
    """`blockctl bench` for one workload in one client mode (`extra`: more options)."""
    pattern, bs, qd, queues = WORKLOADS[wl]
    return NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s", sock, "-w", pattern,
                   "-b", bs, "-q", str(qd), "--queues", str(queues), "-t", str(runtime),
                   "--cpus", CLIENT_CPU, "--json", "--timeout", "20", CLIENTS[client], *extra]


def phase_of(stdout, stderr, what):
    """The figures of `blockctl bench --json`'s (only) phase."""
    try:
        p = json.loads(stdout)["phases"][0]
    except (ValueError, KeyError, IndexError):
        raise RuntimeError(f"blockctl bench {what}: no report ({stderr.strip()})")
    return {"iops": p["iops"], "mib_s": p["mib_s"], "lat_us": p["lat_us"],
            "first_lat_us": p["first_lat_us"], "seconds": p["seconds"],
            "ios": p["reads"] + p["writes"]}


def run_blockctl(a, sock, wl, runtime, client, extra=()):
    out = subprocess.run(blockctl_argv(a, sock, wl, runtime, client, extra), capture_output=True,
                         text=True, timeout=runtime + 60)
    if out.returncode != 0:
        raise RuntimeError(f"blockctl bench {wl} on {sock}: {out.stderr.strip()}")
    return phase_of(out.stdout, out.stderr, f"{wl} on {sock}")


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
    """Probes until the cores are close (at most `--placement-wait`, PLACEMENT_WAIT_S by
    default); returns the last probe."""
    deadline = time.monotonic() + a.placement_wait
    ns = core_latency(a)
    while ns > FAR_NS and time.monotonic() < deadline:
        time.sleep(1.0)
        ns = core_latency(a)
    return ns


# What the host allows a QD1 round trip before any target code runs: a thread on the
# target's core polling a flag and answering on an eventfd, the client on its core sleeping
# in poll(2) on it or spinning on it (bench/wakeup.c pingpong). Taken right before every
# QD1 row of a vhost-user target, so that the row's latency can be read against the floor
# of the same moment: wake-ups on this kind of VM are bimodal with the host's state and
# the halt-polling setting, and only a figure next to its floor compares across hosts.
FLOOR_ROUNDS = 20000


def is_qd1(wl):
    _, _, qd, queues = WORKLOADS[wl]
    return qd == 1 and queues == 1


def host_floor(a, client):
    """bench/wakeup.c pingpong in client mode `client` ("sleep" or "poll"), pinned and at
    the niceness of the runs: {"us": {mean, p10, p50, p90, p99}, "rounds": N, "slept": fraction
    of rounds the client slept (sleep only)}. At most 0.4 s (the program stops early)."""
    out = subprocess.run(NICE + [a.wakeup, "pingpong", str(FLOOR_ROUNDS), TARGET_CPU,
                                 CLIENT_CPU, client],
                         capture_output=True, text=True, timeout=30, check=True)
    j = json.loads(out.stdout.strip().splitlines()[-1])
    return {"us": j[f"{client}_us"], "rounds": j[f"{client}_rounds"],
            "slept": j.get(f"{client}_slept")}


def measure_placed(a, t, backend, target, wl, client, runtime):
    """`measure`, with the cores close right before and right after; otherwise the
    measurement is taken again (twice at most). Records the probes.

    The placement is not fixed for minutes: probes 0.5 s and 2 s after a run read apart
    while one a moment later read close, and a retake with a close probe before it and a
    close one within 2 s after it once made the far placement's figures. A busy vCPU seems
    to stay where it is, and one that idles (between runs, or a client sleeping on its
    eventfd) may come back elsewhere, so only the probes next to the run say anything about
    it, and even they do not prove that the vCPUs stayed close throughout."""
    probes = []
    for attempt in range(3):
        before = wait_close(a)
        # With `--poll always` blockd's reactor spins on the target's core and the probe's
        # target thread would share it: no floor then.
        floor = (host_floor(a, client) if is_qd1(wl) and target != "fio" and a.poll != "always"
                 else None)
        r = measure(a, t, backend, target, wl, client, runtime)
        after = core_latency(a)
        probes.append([before, after])
        if max(before, after) <= FAR_NS or a.placement_wait <= 0:
            break
        log(f"{wl} {client} {backend} {target}: cores {before:.0f}/{after:.0f} ns apart, "
            f"attempt {attempt + 1}")
    r["core_ns"] = probes[-1]
    r["core_probes"] = probes
    if floor:
        r["host_floor_us"] = floor["us"]
        r["host_floor_rounds"] = floor["rounds"]
        if floor["slept"] is not None:
            r["host_floor_slept"] = floor["slept"]
    return r


def window_bounds(runtime):
    """(lead, window) in seconds: the measuring window starts `lead` after the client is
    started and ends `lead` before its timed phase does. The lead covers the vhost-user
    handshake (milliseconds) and the first requests; the window ends well before the last
    completions and the disconnect, when blockd's session and its counters disappear."""
    lead = min(1.0, runtime / 4)
    return lead, runtime - 2 * lead


def measure(a, t, backend, target, wl, client, runtime):
    if target == "fio":
        return run_fio(a, t["img"], wl, runtime)
    proc = t["procs"][target]
    proc.check()
    ctrlr = t["ctrlrs"][backend] if target == "blockd" else None
    what = f"{wl} {client} on {backend}/{target}"
    lead, window = window_bounds(runtime)
    queues = WORKLOADS[wl][3]
    progress_path = t["work"] / "progress"
    progress_path.unlink(missing_ok=True)
    c_run0, t_run0 = cpu_ticks(proc.pid), time.monotonic()
    cl = subprocess.Popen(blockctl_argv(a, t["socks"][(backend, target)], wl, runtime, client,
                                        extra=("--progress-file", str(progress_path))),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    perf, pc, prog = None, None, None
    try:
        if a.perf:
            time.sleep(lead / 2)
            perf = notify.PerfWindow(cl.pid, t["work"] / "perf.out")
        time.sleep(max(0.0, t_run0 + lead - time.monotonic()))
        if not progress_path.exists() or progress_path.stat().st_size < 8 * queues:
            raise RuntimeError(f"{what}: the client did not start its queues within {lead} s")
        prog = notify.ProgressFile(progress_path, queues)
        # Nested: perf's window holds the client's request count's, which holds
        # /proc/PID/io's, then blockd's, then the CPU's; each is timed on its own.
        if perf:
            perf.enable()
        n0, tn0 = prog.requests(), time.monotonic()
        io0, ti0 = notify.proc_io(cl.pid), time.monotonic()
        b0 = notify.blockd_counts(t["rpc"], ctrlr) if ctrlr else None
        tb0 = time.monotonic()
        c0, tc0 = cpu_ticks(proc.pid), time.monotonic()
        time.sleep(max(0.0, t_run0 + lead + window - time.monotonic()))
        c1, tc1 = cpu_ticks(proc.pid), time.monotonic()
        b1 = notify.blockd_counts(t["rpc"], ctrlr) if ctrlr else None
        tb1 = time.monotonic()
        io1, ti1 = notify.proc_io(cl.pid), time.monotonic()
        n1, tn1 = prog.requests(), time.monotonic()
        if perf:
            perf.disable()
        if cl.poll() is not None:
            raise RuntimeError(f"{what}: the client ended inside the measuring window "
                               f"({cl.stderr.read().strip()})")
        if ctrlr and (b0 is None or b1 is None):
            raise RuntimeError(f"{what}: no blockd session at the window's "
                               f"{'start' if b0 is None else 'end'}")
        out, err = cl.communicate(timeout=runtime + 60)
        if cl.returncode != 0:
            raise RuntimeError(f"blockctl bench {what}: {err.strip()}")
    finally:
        if cl.poll() is None:
            cl.kill()
            cl.wait()
        if perf:
            pc = perf.close()
        if prog:
            prog.close()
    t_run1, c_run1 = time.monotonic(), cpu_ticks(proc.pid)
    r = phase_of(out, err, what)
    r["cpu_cores"] = (c1 - c0) / CLK_TCK / (tc1 - tc0)
    r["cpu_window_s"] = tc1 - tc0
    # The client's rate within the window; CPU and notifications are per I/O of it.
    r["window_iops"] = (n1 - n0) / (tn1 - tn0)
    r["cpu_us_per_io"] = r["cpu_cores"] * 1e6 / r["window_iops"] if n1 > n0 else None
    # The whole client run, connect and disconnect included (the figure before issue 20).
    r["cpu_cores_run"] = (c_run1 - c_run0) / CLK_TCK / (t_run1 - t_run0)
    r["target_rss_kib"] = rss_kib(proc.pid)
    r["notify"] = notify.summarise(r["window_iops"], pc, io0, io1, ti1 - ti0, b0, b1, tb1 - tb0)
    if r["notify"]["check"]:
        log(f"{what}: notification counts disagree: {'; '.join(r['notify']['check'])}")
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
            r = run_blockctl(a, str(d / "idle0"), "4k-randread-qd1", 1, "poll",
                             extra=("--idle-before", "1.5"))
            wakes.append({"first_lat_us": r["first_lat_us"], "p50_us": r["lat_us"]["p50"],
                          "core_ns": [before, core_latency(a)]})
        idle["wakeup"] = wakes
        return idle
    finally:
        p.close()


CPUIDLE_DRIVER = "/sys/devices/system/cpu/cpuidle/current_driver"
HALT_POLL_NS = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def read_text(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def read_halt_poll():
    """How long an idle vCPU polls before it halts (cpuidle-haltpoll), None without the driver."""
    v = read_text(HALT_POLL_NS)
    return int(v) if v is not None else None


def write_halt_poll(ns):
    Path(HALT_POLL_NS).write_text(f"{ns}\n")


def halt_poll_cmdline():
    """The kernel command line's halt-polling settings (the host's choice for this VM)."""
    words = (read_text("/proc/cmdline") or "").split()
    return [w for w in words if "halt_poll" in w or w.startswith("idle=")]


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
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=", ".join(WORKLOADS))
    ap.add_argument("--rows", default=",".join(f"{b}/{t}" for b, t in ROWS),
                    help=", ".join(f"{b}/{t}" for b, t in ROWS))
    ap.add_argument("--clients", default=",".join(CLIENTS),
                    help="client modes of the vhost-user rows: sleep (--no-poll), poll (--poll)")
    ap.add_argument("--no-perf", action="store_true",
                    help="count the client's syscalls from /proc/PID/io only, without perf")
    ap.add_argument("--placement-wait", type=float, default=PLACEMENT_WAIT_S,
                    help="seconds to wait for the two cores to be close before a measurement; "
                         "0: probe only, never wait or take a measurement again (a busy "
                         "machine, where the probes read apart anyway)")
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--guest-halt-poll-ns", type=int, default=None,
                    help="set the cpuidle-haltpoll driver's guest_halt_poll_ns for the run and "
                         "restore it after (a VM whose kernel command line turns halt polling "
                         "off: bench/README.md, Wake-ups); the value in force is recorded")
    a = ap.parse_args()
    wls, rows, clients = a.workloads.split(","), a.rows.split(","), a.clients.split(",")
    for what, given, known in (("workload", wls, list(WORKLOADS)),
                               ("row", rows, [f"{b}/{t}" for b, t in ROWS]),
                               ("client", clients, list(CLIENTS))):
        bad = [g for g in given if g not in known]
        if bad:
            ap.error(f"unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
    rows = [tuple(r.split("/")) for r in rows]
    # The report shows the sleeping client first.
    clients = [c for c in CLIENTS if c in clients]
    a.perf = None if a.no_perf else notify.perf_available()
    if not a.perf and not a.no_perf:
        log("perf cannot count syscalls:sys_enter_* here: the client's kicks and interrupts "
            "come from /proc/PID/io only (no ppoll or context-switch counts)")

    if os.geteuid() == 0:
        # The harness times the measuring windows (perf's acknowledgements, the counter
        # reads) while the target and the client hold both cores at nice -20. At nice 0 (a
        # loaded machine, polling client) perf's count of the client's writes came out 6%
        # above /proc/PID/io's for the same window: late wake-ups stretch a window.
        os.setpriority(os.PRIO_PROCESS, 0, -20)
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
    a.wakeup = str(work / "wakeup")
    subprocess.run(["cc", "-O2", "-pthread", "-o", a.wakeup,
                    str(Path(__file__).with_name("wakeup.c"))], check=True)
    lead, window = window_bounds(a.runtime)
    halt_poll_before = read_halt_poll()
    if a.guest_halt_poll_ns is not None:
        if halt_poll_before is None:
            ap.error("--guest-halt-poll-ns: this kernel has no cpuidle-haltpoll driver")
        write_halt_poll(a.guest_halt_poll_ns)
        atexit.register(write_halt_poll, halt_poll_before)
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
        "host_floor_rounds": FLOOR_ROUNDS,
        "placement_wait_s": a.placement_wait,
        "cpuidle": {"driver": read_text(CPUIDLE_DRIVER), "guest_halt_poll_ns": read_halt_poll(),
                    "cmdline_halt_poll": halt_poll_cmdline()},
        "clients": {c: CLIENTS[c] for c in clients},
        "perf": a.perf,
        "window_s": [lead, lead + window],
        "workloads": {k: dict(zip(("pattern", "bs", "qd_per_queue", "queues"), v))
                      for k, v in WORKLOADS.items() if k in wls},
    }
    plist = []
    try:
        plist, procs, socks, ctrlrs, rpc = start_targets(a, work, img, a.file_mib << 20)
        t = {"procs": procs, "socks": socks, "ctrlrs": ctrlrs, "rpc": rpc, "img": img,
             "work": work}
        for run in range(1, a.runs + 1):
            results = []
            # The client modes alternate their order from run to run; fio (no client mode)
            # runs once per workload, with the first mode.
            order = clients if run % 2 else clients[::-1]
            for wl in wls:
                for i, client in enumerate(order):
                    mode_rows = [r for r in rows if r[1] != "fio" or i == 0]
                    for backend, target in rows_in_order(mode_rows, run):
                        c = "-" if target == "fio" else client
                        r = measure_placed(a, t, backend, target, wl, c, a.runtime)
                        r.update({"backend": backend, "target": target, "workload": wl,
                                  "client": c})
                        results.append(r)
                        n = r.get("notify") or {}
                        kicks, irqs = n.get("kicks_per_io"), n.get("interrupts_per_io")
                        nf = (f"  kicks/io {kicks:.3f} irqs/io {irqs:.3f}"
                              if kicks is not None and irqs is not None else "")
                        if "host_floor_us" in r:
                            nf += f"  floor {r['host_floor_us']['p10']:.1f} us"
                        log(f"run {run} {wl:20} {c:5} {backend:6} {target:6} "
                            f"{r['iops']:>10.0f} IOPS p50 {r['lat_us']['p50']:7.1f} us  "
                            f"cpu {r['cpu_cores']:.2f}{nf}")
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
