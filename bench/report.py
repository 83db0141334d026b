#!/usr/bin/env python3
"""Turns the run-N.json and idle.json of a bench/run.sh results directory into table.md
(medians over the runs, ratios blockd / peer, the goals of issue 7) and PNG plots."""

import glob
import json
import os
import statistics
import sys

# blockd row -> peer rows it is compared with.
PAIRS = [
    (("null", "blockd"), ("null", "qsd")),
    (("malloc", "blockd"), ("null", "qsd")),
    (("file", "blockd"), ("file", "qsd")),
    (("file", "blockd"), ("file", "fio")),
]


def load(d):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(d, "run-*.json")))]
    if not runs:
        sys.exit(f"no run-*.json in {d}")
    idle = None
    if os.path.exists(os.path.join(d, "idle.json")):
        idle = json.load(open(os.path.join(d, "idle.json")))
    return runs, idle


def medians(runs):
    """(backend, target, workload) -> median figures over the runs."""
    acc = {}
    for r in runs:
        for x in r["results"]:
            acc.setdefault((x["backend"], x["target"], x["workload"]), []).append(x)
    med = {}
    for k, xs in acc.items():
        m = lambda f: statistics.median(f(x) for x in xs)
        cores = m(lambda x: x.get("cpu_cores", 0.0))
        iops = m(lambda x: x["iops"])
        med[k] = {
            "iops": iops, "mib_s": m(lambda x: x["mib_s"]),
            "p50": m(lambda x: x["lat_us"]["p50"]), "p99": m(lambda x: x["lat_us"]["p99"]),
            "p99_9": m(lambda x: x["lat_us"]["p99_9"]), "mean": m(lambda x: x["lat_us"]["mean"]),
            "cores": cores,
            "iops_per_core": m(lambda x: x["iops"] / max(x.get("cpu_cores", 0.0), 1e-9)),
            "n": len(xs),
        }
        if all("anon_huge_kib" in x for x in xs):
            med[k]["huge_mib"] = m(lambda x: x["anon_huge_kib"]) / 1024
    return med


def placement(runs):
    """One sentence on where the host kept the two vCPUs (bench/corelat.c): the probes
    around every measurement, how many were taken again, and how many stayed apart (by
    the harness's threshold, `core_far_ns` in the meta)."""
    xs = [x for r in runs for x in r["results"] if "core_ns" in x]
    if not xs:
        return None
    # The runs of 2026-11-26 17:34 and 18:18 predate the field; their harness used 80 ns.
    far = runs[0]["meta"].get("core_far_ns", 80.0)
    probes = [ns for x in xs for ns in x["core_ns"]]
    retaken = sum(len(x["core_probes"]) - 1 for x in xs)
    apart = sum(1 for x in xs if max(x["core_ns"]) > far)
    return (f"Cache-line transfer between the two cores (bench/corelat.c) right before and "
            f"after each of the {len(xs)} measurements: median {statistics.median(probes):.0f} "
            f"ns, max {max(probes):.0f} ns. {retaken} measurement(s) were taken again because "
            f"a probe read apart (> {far:.0f} ns); {apart} read apart in all 3 attempts.")


def fmt_iops(v):
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def table(meta, med, idle, runs=()):
    wls = list(meta["workloads"])
    lines = [
        f"Medians of {len({m['n'] for m in med.values()}) and max(m['n'] for m in med.values())} "
        f"run(s) × {meta['runtime_s']} s, {meta['date']}, {meta['cpus']} CPUs, kernel "
        f"{meta['kernel']}; target on core {meta['target_cpu']}, client (`blockctl bench`, "
        f"libblkio, polling; `-irq`: sleeping on the completion eventfd) on core {meta['client_cpu']}; blockd `--poll {meta['poll']}` "
        f"({meta['poll_idle_us']} µs); {meta['qsd']} with an iothread; {meta['fio']} "
        f"(io_uring, O_DIRECT). QD128-2q = 2 queues × QD64. Cores = CPU time of the target "
        f"(fio: of fio) / wall time.",
    ]
    where = placement(runs)
    if where:
        lines += ["", where]
    lines += [
        "",
        "| workload | blockd backend | peer | blockd IOPS | peer IOPS | IOPS ratio | blockd p50 µs "
        "| peer p50 µs | p50 ratio | blockd p99 µs | peer p99 µs | blockd cores | peer cores "
        "| blockd IOPS/core | peer IOPS/core |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for wl in wls:
        for (bb, bt), (pb, pt) in PAIRS:
            b, p = med.get((bb, bt, wl)), med.get((pb, pt, wl))
            if not b or not p:
                continue
            peer = {"qsd": "QSD", "fio": "fio"}[pt] + f" {'null-co' if pb == 'null' else pb}"
            lines.append(
                f"| {wl} | {bb} | {peer} | {fmt_iops(b['iops'])} | {fmt_iops(p['iops'])} "
                f"| **{b['iops'] / max(p['iops'], 1e-9):.2f}×** | {b['p50']:.1f} | {p['p50']:.1f} "
                f"| {b['p50'] / max(p['p50'], 1e-9):.3f} | {b['p99']:.1f} | {p['p99']:.1f} "
                f"| {b['cores']:.2f} | {p['cores']:.2f} | {fmt_iops(b['iops_per_core'])} "
                f"| {fmt_iops(p['iops_per_core'])} |")
    lines.append("")
    lines += goals(med, idle)
    huge = [m["huge_mib"] for (b, _, _), m in med.items() if b == "malloc" and "huge_mib" in m]
    if huge:
        lines += ["", f"The malloc bdev's data in transparent huge pages during its runs: "
                      f"{statistics.median(huge):.0f} of {meta['dev_mib']} MiB (median). Without "
                      f"them its random reads miss the TLB on almost every copy (about a "
                      f"sixth fewer IOPS in an A/B)."]
    if idle:
        lines += ["", "Idle and wake-up (blockd, 16 controllers each with a connected, idle "
                      "libblkio client):", ""]
        rss = idle["rss_kib"]
        lines.append(f"- CPU over 3 s after 1 s idle: {idle['idle_cpu_percent']:.2f}% of a core")
        lines.append(f"- RSS: {rss['VmRSS'] / 1024:.1f} MiB (anon {rss['RssAnon'] / 1024:.1f}, "
                     f"file {rss['RssFile'] / 1024:.1f}, shmem {rss['RssShmem'] / 1024:.1f} "
                     f"= guest buffers and rings); before clients "
                     f"{idle['rss_kib_before_clients']['VmRSS'] / 1024:.1f} MiB")
        for w in idle["wakeup"]:
            first = ", ".join(f"{v:.1f}" for v in w["first_lat_us"][:6])
            cores = (f"; cores {w['core_ns'][0]:.0f}/{w['core_ns'][1]:.0f} ns apart"
                     if "core_ns" in w else "")
            lines.append(f"- after 1.5 s idle, first QD1 latencies µs: {first} … "
                         f"(steady p50 {w['p50_us']:.1f}{cores})")
    return "\n".join(lines) + "\n"


def goals(med, idle):
    def get(b, t, wl, f="iops"):
        x = med.get((b, t, wl))
        return x[f] if x else None

    out = ["| goal | measured | target | verdict |", "|---|--:|--:|---|"]

    def row(name, val, target, ok, unit="×"):
        if val is None:
            out.append(f"| {name} | n/a | {target} | not measured |")
            return
        out.append(f"| {name} | {val:.3g}{unit} | {target} | {'**holds**' if ok else 'misses'} |")

    for wl in ("4k-randread-qd32", "4k-randwrite-qd32"):
        b, q = get("null", "blockd", wl), get("null", "qsd", wl)
        r = b / q if b and q else None
        row(f"null {wl} IOPS vs QSD", r, "≥ 5×", r is not None and r >= 5)
    # Issue 7's reference latencies (QSD p50 52.9 µs) were taken with a client that sleeps
    # on the completion eventfd; with a polling client QSD answers in ~2 µs too.
    b, q = (get("null", "blockd", "4k-randread-qd1-irq", "p50"),
            get("null", "qsd", "4k-randread-qd1-irq", "p50"))
    r = b / q if b and q else None
    row("null QD1 p50 vs QSD (client sleeping on eventfd)", r, "≤ 0.06×",
        r is not None and r <= 0.06)
    b, q = get("null", "blockd", "4k-randread-qd1", "p50"), get("null", "qsd", "4k-randread-qd1", "p50")
    r = b / q if b and q else None
    row("null QD1 p50 vs QSD (polling client), for reference", r, "—", True)
    b, q = get("malloc", "blockd", "4k-randread-qd32"), get("null", "qsd", "4k-randread-qd32")
    r = b / q if b and q else None
    row("malloc 4k QD32 randread vs QSD null-co", r, "≥ 1.2×", r is not None and r >= 1.2)
    for wl in ("4k-randread-qd1", "4k-randread-qd32", "4k-randwrite-qd32", "4k-randread-qd128-2q",
               "128k-read-qd8", "128k-write-qd8"):
        b, f = get("file", "blockd", wl), get("file", "fio", wl)
        r = b / f if b and f else None
        row(f"file {wl} vs fio io_uring", r, "≥ 0.95×", r is not None and r >= 0.95)
    if idle:
        row("idle CPU, 16 controllers", idle["idle_cpu_percent"], "< 1%",
            idle["idle_cpu_percent"] < 1, unit="%")
        mib = idle["rss_kib"]["VmRSS"] / 1024
        row("RSS, 16 idle controllers", mib, "< 64 MiB", mib < 64, unit=" MiB")
        w = idle["wakeup"]
        firsts = [x["first_lat_us"][0] for x in w if x["first_lat_us"]]
        p50 = statistics.median(x["p50_us"] for x in w)
        # "back at polling latency within a few requests": the 4th request is within 2× p50.
        fourth = statistics.median(x["first_lat_us"][3] for x in w if len(x["first_lat_us"]) > 3)
        row("wake-up: 1st request after idle (µs)", statistics.median(firsts), "—", True, unit=" µs")
        row("wake-up: 4th request vs steady p50", fourth / p50, "≤ 2×", fourth <= 2 * p50)
    return out


def plots(d, meta, med, idle):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    wls = list(meta["workloads"])
    rows = [("null", "blockd"), ("null", "qsd"), ("malloc", "blockd"), ("file", "blockd"),
            ("file", "qsd"), ("file", "fio")]
    rows = [r for r in rows if any((r[0], r[1], w) in med for w in wls)]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(len(rows), 1)
    for i, (b, t) in enumerate(rows):
        ys = [med.get((b, t, w), {}).get("iops", 0) / 1e3 for w in wls]
        xs = [j + i * width for j in range(len(wls))]
        ax.bar(xs, ys, width, label=f"{t} {b}")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(wls))])
    ax.set_xticklabels(wls, rotation=15)
    ax.set_ylabel("kIOPS (median)")
    ax.set_yscale("log")
    ax.set_title("IOPS per workload and target (target on 1 core, client on 1 core)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(d, "iops.png"), dpi=110)
    plt.close(fig)

    for wl in ("4k-randread-qd1", "4k-randread-qd1-irq", "4k-randread-qd32"):
        if not any((b, t, wl) in med for b, t in rows):
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        pcts = ["p50", "p99", "p99_9"]
        width = 0.8 / max(len(rows), 1)
        for i, (b, t) in enumerate(rows):
            x = med.get((b, t, wl))
            if not x:
                continue
            ax.bar([j + i * width for j in range(len(pcts))], [x[p] for p in pcts], width,
                   label=f"{t} {b}")
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(pcts))])
        ax.set_xticklabels(["p50", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_ylabel("latency µs (median of runs)")
        ax.set_title(f"Latency percentiles, {wl}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(d, f"latency-{wl}.png"), dpi=110)
        plt.close(fig)


def main():
    d = sys.argv[1]
    runs, idle = load(d)
    meta = runs[0]["meta"]
    med = medians(runs)
    text = table(meta, med, idle, runs)
    with open(os.path.join(d, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(d, "medians.json"), "w") as f:
        json.dump({f"{b}/{t}/{w}": v for (b, t, w), v in med.items()}, f, indent=1)
    plots(d, meta, med, idle)
    print(text)


if __name__ == "__main__":
    main()
