#!/usr/bin/env python3
"""The cost of `blockd --metrics` (issue 21): null-bdev 4K randread QD32 IOPS with metrics
off and on (interleaved rounds, the on rounds scraped every second, 15x Prometheus'
usual rate), then blockd's idle CPU with metrics on and a scrape every 15 s.

    bench/metrics.sh [--rounds 3] [--runtime 5] [--idle-seconds 60]

blockd runs on core 0 (-m 0x1, --poll adaptive), the libblkio client (busy-polling) on core
1, both at nice -20, each run taken with the two vCPUs close together, as in bench/harness.py. Writes JSON to stdout; bench/README.md quotes the figures."""

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import harness  # bench/harness.py: the placement probes and the pinning

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def cpu_ticks(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


class Blockd:
    def __init__(self, a, metrics, binary=None):
        self.dir = tempfile.TemporaryDirectory(prefix="blockd-metrics-bench-")
        d = Path(self.dir.name)
        (d / "s").mkdir()
        self.sock = d / "rpc.sock"
        self.sockets = d / "s"
        self.port = free_port() if metrics else None
        argv = harness.NICE + ["taskset", "-c", harness.TARGET_CPU, binary or a.blockd, "-m", "0x1", "-S", str(self.sockets), "-r", str(self.sock)]
        if metrics:
            argv += ["--metrics", f"127.0.0.1:{self.port}"]
        self.log = open(d / "log", "w")
        self.p = subprocess.Popen(argv, stderr=self.log, stdout=self.log)
        self.a = a
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if time.monotonic() > deadline or self.p.poll() is not None:
                raise RuntimeError("blockd did not start")
            time.sleep(0.02)

    def rpc(self, method, params):
        subprocess.run([self.a.blockctl, "-s", str(self.sock), "rpc", method, json.dumps(params)],
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=30)
        self.dir.cleanup()


def qd32(a, metrics, binary=None):
    b = Blockd(a, metrics, binary)
    try:
        b.rpc("bdev_null_create", {"name": "Null0", "num_blocks": 2048 * 1024, "block_size": 512})
        b.rpc("vhost_create_blk_controller", {"ctrlr": "vhost.0", "dev_name": "Null0"})
        stop = threading.Event()
        scrapes = []

        def scraper():
            while not stop.is_set():
                t = time.monotonic()
                n = len(scrape(b.port))
                scrapes.append((time.monotonic() - t, n))
                stop.wait(1.0)

        # As bench/harness.py: the two vCPUs close together right before and right after
        # the run, or it is taken again (twice at most); the probes are recorded.
        for attempt in range(3):
            before = harness.wait_close(a)
            scrapes.clear()
            stop.clear()
            th = threading.Thread(target=scraper) if metrics else None
            if th:
                th.start()
            out = subprocess.run(harness.NICE + [
                "taskset", "-c", harness.CLIENT_CPU, a.blockctl, "bench", "-s",
                str(b.sockets / "vhost.0"), "-w", "randread", "-q", "32", "-t",
                str(a.runtime), "--cpus", harness.CLIENT_CPU, "--poll", "--json"],
                check=True, capture_output=True, text=True).stdout
            stop.set()
            if th:
                th.join()
            after = harness.core_latency(a)
            if max(before, after) <= harness.FAR_NS:
                break
        iops = json.loads(out)["phases"][0]["iops"]
        return iops, scrapes, [round(before), round(after)]
    finally:
        b.stop()


def idle(a):
    b = Blockd(a, True)
    try:
        for i in range(16):
            b.rpc("bdev_null_create", {"name": f"Null{i}", "num_blocks": 2048, "block_size": 512})
            b.rpc("vhost_create_blk_controller", {"ctrlr": f"idle{i}", "dev_name": f"Null{i}"})
        time.sleep(1.0)
        t0, c0 = time.monotonic(), cpu_ticks(b.p.pid)
        sizes = []
        next_scrape = t0
        end = t0 + a.idle_seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_scrape:
                sizes.append(len(scrape(b.port)))
                next_scrape += 15.0
            time.sleep(max(0.0, min(next_scrape, end) - time.monotonic()))
        t1, c1 = time.monotonic(), cpu_ticks(b.p.pid)
        return {"bdevs": 16, "controllers": 16, "seconds": round(t1 - t0, 1),
                "scrapes": len(sizes), "scrape_bytes": sizes[-1] if sizes else 0,
                "cpu_percent_of_a_core": round(100.0 * (c1 - c0) / CLK_TCK / (t1 - t0), 3)}
    finally:
        b.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--blockctl", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--baseline", help="another blockd binary (e.g. main's) run without "
                    "--metrics in each round as well")
    a = ap.parse_args()
    a.placement_wait = harness.PLACEMENT_WAIT_S
    work = tempfile.TemporaryDirectory(prefix="blockd-metrics-corelat-")
    a.corelat = str(Path(work.name) / "corelat")
    subprocess.run(["cc", "-O2", "-pthread", "-o", a.corelat,
                    str(Path(__file__).with_name("corelat.c"))], check=True)
    off, on, base, scrapes, probes = [], [], [], [], []
    for r in range(a.rounds):
        if a.baseline:
            iops, _, p = qd32(a, False, a.baseline)
            base.append(iops)
            probes.append(p)
        # Off first in even rounds, on first in odd ones: a drift of the host within a
        # round then favours neither.
        for metrics in (False, True) if r % 2 == 0 else (True, False):
            iops, s, p = qd32(a, metrics)
            (on if metrics else off).append(iops)
            probes.append(p)
            scrapes += s
    # Round by round, the on/off ratio (the two runs of a round are seconds apart).
    pairs = sorted(x / y for x, y in zip(on, off))
    res = {
        "qd32_null_randread_iops_metrics_off": off,
        "qd32_null_randread_iops_metrics_on": on,
        "median_on_over_off": round(statistics.median(on) / statistics.median(off), 4),
        "median_of_round_ratios": round(statistics.median(pairs), 4),
        # On a shared machine the best round is the least disturbed one.
        "max_on_over_off": round(max(on) / max(off), 4),
        "qd32_null_randread_iops_baseline": base,
        "median_off_over_baseline": round(statistics.median(off) / statistics.median(base), 4)
        if base else None,
        "max_off_over_baseline": round(max(off) / max(base), 4) if base else None,
        "scrape_ms_median_under_load": round(1e3 * statistics.median(t for t, _ in scrapes), 2)
        if scrapes else None,
        "idle_metrics_on_15s_scrape": idle(a),
        # Cache-line round trips between the two cores (ns) before and after each run, in
        # run order (baseline, then off and on, alternately first); close is under
        # harness.FAR_NS.
        "core_ns": probes,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
