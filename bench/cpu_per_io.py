#!/usr/bin/env python3
"""CPU time per I/O of every process and thread on the host while a benchmark runs.

    bench/cpu_per_io.py [--threads] [--json] -- COMMAND...

COMMAND is a benchmark that prints JSON on stdout: `blockctl bench --json` or
`fio --output-format=json`. The I/O count comes from that JSON; the CPU time from
/proc/*/task/*/stat (utime + stime) sampled before and after, plus the command's own
children (getrusage), so a client that exits, as fio's job process does, still counts.

Why: on the RBD path the host's two cores are shared by the target, librbd's threads, the
client and the OSD, and IOPS alone do not say who spends the time. Per-I/O CPU by thread
does (bench/README.md, "Where the time goes"). `--json` prints one object instead:
{"iops", "ios", "client_us", "process_us": {name: µs per I/O}}.
"""

import json
import os
import resource
import subprocess
import sys


def snapshot():
    """{(pid, tid): (process name, thread name, ticks)} for every thread on the host."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            pname = open(f"/proc/{pid}/comm").read().strip()
            for tid in os.listdir(f"/proc/{pid}/task"):
                s = open(f"/proc/{pid}/task/{tid}/stat").read()
                tname = s[s.index("(") + 1 : s.rindex(")")]
                f = s[s.rindex(")") + 2 :].split()
                out[(pid, tid)] = (pname, tname, int(f[11]) + int(f[12]))
        except (OSError, ValueError):
            continue  # the thread ended between listing and reading
    return out


def ios_of(stdout):
    """(IOPS, I/O count) from blockctl bench's or fio's JSON report."""
    j = json.loads(stdout[stdout.index("{") :])
    if "phases" in j:
        p = j["phases"][0]
        return p["iops"], p["reads"] + p["writes"]
    job = j["jobs"][0]
    return (
        job["read"]["iops"] + job["write"]["iops"],
        job["read"]["total_ios"] + job["write"]["total_ios"],
    )


def main():
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit(__doc__)
    # Our options come before "--"; everything after it is the benchmark's.
    opts, cmd = args[: args.index("--")], args[args.index("--") + 1 :]
    threads, as_json = "--threads" in opts, "--json" in opts
    hz = os.sysconf("SC_CLK_TCK")
    before, ru0 = snapshot(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    after, ru1 = snapshot(), resource.getrusage(resource.RUSAGE_CHILDREN)
    iops, ios = ios_of(run.stdout)
    if ios == 0:
        sys.exit("the benchmark completed no I/O")
    client = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    per_proc, per_thread = {"(client)": client * 1e6}, {}
    for key, (pname, tname, ticks) in after.items():
        spent = (ticks - before.get(key, (0, 0, 0))[2]) / hz * 1e6
        if spent > 0:
            per_proc[pname] = per_proc.get(pname, 0) + spent
            per_thread[f"{pname}/{tname}"] = per_thread.get(f"{pname}/{tname}", 0) + spent
    if as_json:
        print(
            json.dumps(
                {
                    "iops": iops,
                    "ios": ios,
                    "client_us": client * 1e6 / ios,
                    "process_us": {n: v / ios for n, v in per_proc.items() if n != "(client)"},
                }
            )
        )
        return
    total = sum(per_proc.values())
    top = sorted(per_proc.items(), key=lambda kv: -kv[1])[:8]
    print(
        f"{iops:.0f} IOPS; CPU µs per I/O: total {total / ios:.1f}; "
        + ", ".join(f"{n} {v / ios:.1f}" for n, v in top)
    )
    if threads:
        for n, v in sorted(per_thread.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {n:40} {v / ios:6.1f}")


if __name__ == "__main__":
    main()
