#!/usr/bin/env python3
"""Encrypted disks (issue 22): the crypto bdev against the machine's AES-XTS-256 limit, and
LUKS2 on RBD against the unencrypted image. Started by bench/crypto.sh.

1. The limit: `openssl speed -evp aes-256-xts -bytes BS` on the target's core, one thread,
   BS = the data unit (the bdev's logical block: each EVP call is one XTS data unit with its
   own tweak, as the crypto bdev's blocks are). `cryptsetup benchmark` would be the issue's
   reference, but it needs the kernel's AF_ALG sockets, which this machine refuses.
2. 128K sequential writes and reads at QD8 through a crypto bdev over a malloc bdev and on
   a plain malloc bdev of the same size, for 512-byte and 4K blocks, in interleaved rounds
   (the order of plain and crypto alternates). Goal: crypto MiB/s >= 0.8x the openssl
   figure of its data unit.
3. When a Ceph cluster is reachable ($CEPH_CONF): 4K randread QD32 through LUKS2 on RBD
   (`rbd encryption format ... luks2`, loaded with bdev_rbd_create --encryption-format)
   against an unencrypted image of the same size, both filled first. Goal: within 10%.

As bench/harness.py: blockd on core 0 (-m 0x1, its librbd threads inherit it), the client
(`blockctl bench`, libblkio) on core 1; the target's CPU from /proc/PID/stat. Writes one
JSON file into --out; bench/README.md ("Encryption") says how to read it.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import (CLIENT_CPU, CLK_TCK, NICE, TARGET_CPU, cpu_ticks, log,  # noqa: E402
                     start_blockd)


def openssl_xts_mib_s(a, unit, bits=256):
    """`openssl speed -evp aes-BITS-xts` MiB/s for data units of `unit` bytes, on the target's
    core (one thread, AES-NI as OpenSSL detects it). The crypto bdev is AES-256-XTS (a 512-bit
    XTS key); cryptsetup's "aes-xts 256b" counts XTS key bits, i.e. AES-128-XTS."""
    out = subprocess.run(NICE + ["taskset", "-c", TARGET_CPU, "openssl", "speed", "-evp",
                                 f"aes-{bits}-xts", "-seconds", str(a.openssl_seconds), "-bytes",
                                 str(unit)], capture_output=True, text=True, check=True,
                         timeout=a.openssl_seconds * 4 + 60)
    m = re.search(rf"^AES-{bits}-XTS\s+([0-9.]+)k\s*$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"cannot parse openssl speed:\n{out.stdout}\n{out.stderr}")
    # "The 'numbers' are in 1000s of bytes per second processed."
    return float(m.group(1)) * 1000 / 2**20


def bench(a, sock, pattern, bs, qd, runtime, poll, pid):
    """One `blockctl bench` run on core 1; MiB/s, IOPS, latency and the target's CPU."""
    argv = NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s", sock, "-w", pattern,
                   "-b", bs, "-q", str(qd), "-t", str(runtime), "--cpus", CLIENT_CPU, "--json",
                   "--timeout", "60", "--poll" if poll else "--no-poll"]
    t0, c0 = time.monotonic(), cpu_ticks(pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    t1, c1 = time.monotonic(), cpu_ticks(pid)
    if out.returncode != 0:
        raise RuntimeError(f"blockctl bench {pattern} {bs} on {sock}: {out.stderr.strip()}")
    p = json.loads(out.stdout)["phases"][0]
    return {"mib_s": p["mib_s"], "iops": p["iops"], "lat_us": p["lat_us"],
            "seconds": p["seconds"], "target_cpu_cores": (c1 - c0) / CLK_TCK / (t1 - t0)}


def fill(a, sock, mib):
    """Writes every block once (1M writes), so that reads move real data."""
    subprocess.run(NICE + ["taskset", "-c", CLIENT_CPU, a.blockctl, "bench", "-s", sock,
                           "--verify", "--verify-phase", "write", "--size", f"{mib}M", "-b",
                           "1m", "-q", "8", "--timeout", "300"],
                   check=True, capture_output=True, timeout=1800)


def median(rows, key="mib_s"):
    return statistics.median(r[key] for r in rows)


def malloc_part(a, work, proc, rpc, d):
    """Crypto bdev over malloc vs plain malloc, 128K sequential QD8."""
    key = work / "xts.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(64))
    os.close(fd)
    rpc("keyring_file_add_key", {"name": "bench", "path": str(key)})
    units = [int(u) for u in a.block_sizes.split(",")]
    socks = {}
    for u in units:
        blocks = (a.dev_mib << 20) // u
        rpc("bdev_malloc_create", {"name": f"Plain{u}", "num_blocks": blocks, "block_size": u})
        rpc("bdev_malloc_create", {"name": f"Base{u}", "num_blocks": blocks, "block_size": u})
        rpc("bdev_crypto_create", {"base_bdev_name": f"Base{u}", "name": f"Crypto{u}",
                                   "key_name": "bench"})
        for kind, bdev in (("plain", f"Plain{u}"), ("crypto", f"Crypto{u}")):
            ctrlr = f"{kind}-{u}"
            rpc("vhost_create_blk_controller", {"ctrlr": ctrlr, "dev_name": bdev})
            socks[(kind, u)] = str(d / ctrlr)
            fill(a, socks[(kind, u)], a.dev_mib)
    limits = {u: openssl_xts_mib_s(a, u) for u in units}
    limits128 = {u: openssl_xts_mib_s(a, u, 128) for u in units}
    for u, v in limits.items():
        log(f"openssl speed -evp aes-256-xts -bytes {u}: {v:.0f} MiB/s "
            f"(aes-128-xts: {limits128[u]:.0f})")
    runs = {}
    for rnd in range(a.rounds):
        for pattern in ("write", "read"):
            for u in units:
                kinds = ["plain", "crypto"] if rnd % 2 == 0 else ["crypto", "plain"]
                for kind in kinds:
                    r = bench(a, socks[(kind, u)], pattern, "128k", 8, a.runtime, True, proc.pid)
                    r["round"] = rnd + 1
                    runs.setdefault(f"128k-{pattern}-qd8/{u}/{kind}", []).append(r)
                    log(f"round {rnd + 1} 128k {pattern:5} unit {u:4} {kind:6} "
                        f"{r['mib_s']:8.0f} MiB/s  target cpu {r['target_cpu_cores']:.2f}")
    summary = {}
    for u in units:
        for pattern in ("write", "read"):
            cr = runs[f"128k-{pattern}-qd8/{u}/crypto"]
            pr = runs[f"128k-{pattern}-qd8/{u}/plain"]
            c, p = median(cr), median(pr)
            # Per second of the target's own CPU time: what other tenants of the core do not
            # change (openssl speed divides by its user CPU time too, unless -elapsed).
            cc, pc = (statistics.median(r["mib_s"] / max(r["target_cpu_cores"], 1e-3)
                                        for r in rows) for rows in (cr, pr))
            summary[f"128k-{pattern}-qd8/{u}"] = {
                "crypto_mib_s": round(c, 1), "plain_mib_s": round(p, 1),
                "openssl_mib_s": round(limits[u], 1),
                "crypto_over_openssl": round(c / limits[u], 3),
                "crypto_over_plain": round(c / p, 3),
                "goal_crypto_over_openssl": 0.8,
                "crypto_target_cpu_cores": round(median(cr, "target_cpu_cores"), 2),
                "plain_target_cpu_cores": round(median(pr, "target_cpu_cores"), 2),
                "crypto_mib_per_target_cpu_s": round(cc, 1),
                "plain_mib_per_target_cpu_s": round(pc, 1),
                "crypto_per_cpu_over_openssl": round(cc / limits[u], 3),
                "openssl_aes_128_xts_mib_s": round(limits128[u], 1),
                "crypto_over_openssl_aes_128_xts": round(c / limits128[u], 3),
            }
    return {"openssl_aes_256_xts_mib_s": {str(u): round(v, 1) for u, v in limits.items()},
            "openssl_aes_128_xts_mib_s": {str(u): round(v, 1) for u, v in limits128.items()},
            "summary": summary, "runs": runs}


def delete_controller(rpc, ctrlr, timeout=30.0):
    """vhost_delete_controller once the client's disconnection is processed (busy until
    then; bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rpc("vhost_delete_controller", {"ctrlr": ctrlr})
        except RuntimeError as e:
            if "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rbd(args, env, check=True):
    return subprocess.run(["rbd", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=600)


def rbd_part(a, work, proc, rpc, d):
    """4K randread QD32: LUKS2 on RBD vs the unencrypted image."""
    env = dict(os.environ)
    tag = f"cryptobench-{os.getpid()}"
    plain, luks = f"{tag}-plain", f"{tag}-luks2"
    made = []
    try:
        for img in (plain, luks):
            rbd(["create", "--size", f"{a.rbd_mib}M", f"{a.pool}/{img}"], env)
            made.append(img)
            # Every object written, so that reads hit real objects in both images.
            rbd(["bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "4M",
                 "--io-threads", "4", "--io-total", f"{a.rbd_mib}M", f"{a.pool}/{img}"], env)
        pw = work / "luks.pass"
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(24).hex().encode())
        os.close(fd)
        rbd(["encryption", "format", f"{a.pool}/{luks}", "luks2", str(pw)], env)
        rpc("keyring_file_add_key", {"name": "luks", "path": str(pw)})
        rpc("bdev_rbd_create", {"name": "RbdPlain", "pool_name": a.pool, "rbd_name": plain,
                                "block_size": 512})
        # Unlocking runs the LUKS2 PBKDF (about 2 s of CPU, longer under load).
        rpc("bdev_rbd_create", {"name": "RbdLuks", "pool_name": a.pool, "rbd_name": luks,
                                "block_size": 512, "encryption_format": "luks2",
                                "key_name": "luks"}, timeout=600)
        socks = {}
        for kind, bdev in (("plain", "RbdPlain"), ("luks2", "RbdLuks")):
            rpc("vhost_create_blk_controller", {"ctrlr": f"rbd-{kind}", "dev_name": bdev})
            socks[kind] = str(d / f"rbd-{kind}")
        runs = {}
        for rnd in range(a.rounds):
            kinds = ["plain", "luks2"] if rnd % 2 == 0 else ["luks2", "plain"]
            for kind in kinds:
                # Sleeping on the completion eventfd, as bench/rbd.sh's client.
                r = bench(a, socks[kind], "randread", "4k", 32, a.runtime, False, proc.pid)
                r["round"] = rnd + 1
                runs.setdefault(kind, []).append(r)
                log(f"round {rnd + 1} rbd 4k randread qd32 {kind:6} {r['iops']:8.0f} IOPS  "
                    f"target cpu {r['target_cpu_cores']:.2f}")
        for kind in socks:
            delete_controller(rpc, f"rbd-{kind}")
        rpc("bdev_rbd_delete", {"name": "RbdPlain"})
        rpc("bdev_rbd_delete", {"name": "RbdLuks"})
        lu, pl = median(runs["luks2"], "iops"), median(runs["plain"], "iops")
        return {"image_mib": a.rbd_mib, "pool": a.pool, "ceph_conf": env.get("CEPH_CONF"),
                "summary": {"4k-randread-qd32": {"luks2_iops": round(lu), "plain_iops": round(pl),
                                                 "luks2_over_plain": round(lu / pl, 3),
                                                 "goal_luks2_over_plain": 0.9}},
                "runs": runs}
    finally:
        for img in made:
            rbd(["rm", "--no-progress", f"{a.pool}/{img}"], env, check=False)


def cpu_info():
    model, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "model name":
            model = v.strip()
        elif k.strip() == "flags":
            flags = set(v.split())
    return {"model": model,
            "flags": sorted(flags & {"aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2",
                                     "avx512f"})}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--blockctl", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--dev-mib", type=int, default=512, help="malloc bdev size")
    ap.add_argument("--block-sizes", default="512,4096", help="data units (logical blocks)")
    ap.add_argument("--openssl-seconds", type=int, default=3)
    ap.add_argument("--rbd", choices=["auto", "yes", "no"], default="auto",
                    help="LUKS on RBD part: auto = when CEPH_CONF names a cluster")
    ap.add_argument("--rbd-mib", type=int, default=256)
    ap.add_argument("--pool", default=os.environ.get("POOL", "testpool"))
    ap.add_argument("--poll", default="adaptive", choices=["adaptive", "always", "never"])
    ap.add_argument("--poll-idle-us", type=int, default=200)
    a = ap.parse_args()
    do_rbd = a.rbd == "yes" or (a.rbd == "auto" and bool(os.environ.get("CEPH_CONF")))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"blockd-cryptobench.{os.getpid()}"
    work.mkdir(parents=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {
        "date": started, "host": os.uname().nodename, "kernel": os.uname().release,
        "cpus": os.cpu_count(), "cpu": cpu_info(), "target_cpu": TARGET_CPU,
        "client_cpu": CLIENT_CPU, "rounds": a.rounds, "runtime_s": a.runtime,
        "dev_mib": a.dev_mib, "poll": a.poll, "loadavg_start": os.getloadavg(),
        "openssl": subprocess.run(["openssl", "version"], capture_output=True,
                                  text=True).stdout.strip(),
        "limit_method": "openssl speed -evp aes-256-xts -bytes UNIT, one thread on the target's "
                        "core, bytes per second of its user CPU time (cryptsetup benchmark "
                        "needs AF_ALG, refused here)",
    }
    res = {"meta": meta}
    proc = None
    try:
        proc, rpc, d = start_blockd(a, work, "blockd")
        res["malloc"] = malloc_part(a, work, proc, rpc, d)
        if do_rbd:
            res["rbd"] = rbd_part(a, work, proc, rpc, d)
        else:
            res["rbd"] = None
            log("no CEPH_CONF: LUKS on RBD skipped")
        proc.check()
    finally:
        if proc:
            proc.close()
    meta["loadavg_end"] = os.getloadavg()
    name = f"run-{time.strftime('%H%M%S')}-{a.rounds}x{a.runtime}s.json"
    (out / name).write_text(json.dumps(res, indent=1) + "\n")
    summary = dict(res["malloc"]["summary"])
    if res["rbd"]:
        summary.update(res["rbd"]["summary"])
    print(json.dumps({"file": str(out / name), "summary": summary}, indent=1))
    subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
