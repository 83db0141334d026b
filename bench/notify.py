"""Notifications per I/O between a vhost-user client and its target, counted from the
driver's side (the client process) so that every target is counted the same way, and for
blockd also from the device's side (its per-queue counters). Used by bench/harness.py.

What libblkio 0.5.1 (virtio-blk-vhost-user driver, virtio-driver 0.6.1) does, which gives
the counts their meaning:
- A kick is `EventFd::write(1)` on the queue's kick eventfd (`VhostUserNotifier::notify`),
  made in `Queue::do_io` only when requests were added since the last kick and the device
  asked for one (`avail_notif_needed`: `avail_event` with VIRTIO_F_EVENT_IDX, which libblkio
  always offers, else VRING_USED_F_NO_NOTIFY). During a run the client's only `write`
  syscalls are these (the completion eventfd is written only for rejected requests).
- A sleeping client (`--no-poll`, `do_io` with min_completions 1) that finds no completion
  enables interrupts (`used_event`), checks the ring again, then `ppoll`s the completion
  (call) eventfd and `read`s it once when it is readable. So `read`s = interrupts taken
  (eventfd reads: several signals the device sent in between coalesce into one), and
  `ppoll`s = waits (a ppoll that timed out has no read). With EVENT_IDX, "disabling"
  interrupts (when do_io returns; once at the start of a poll queue) writes used_event = the
  next used index, i.e. asks for an interrupt at the next completion, and leaves it there. A
  polling client (`--poll`, libblkio poll queues) never reads the call eventfd; the device
  signals it when its used index passes that first used_event (once per 65,536 requests).
- The client's requests of the window come from `blockctl bench --progress-file`: each
  queue's completed requests, which the client stores into a shared file mapping after every
  batch (no syscall), read at the window's start and end.
- Counted two ways for the client: `perf stat -e syscalls:sys_enter_{write,read,ppoll},
  context-switches -p PID`, enabled and disabled through perf's control fd so that the
  window is known to the millisecond, and the process's `syscw`/`syscr` in /proc/PID/io
  (every read/write syscall, no tracepoint), which needs no perf and disturbs nothing.
"""

import mmap
import os
import signal
import struct
import subprocess
import time

PERF_EVENTS = ("syscalls:sys_enter_write", "syscalls:sys_enter_read",
               "syscalls:sys_enter_ppoll", "context-switches")
# Our names for the perf events.
PERF_NAMES = ("writes", "reads", "ppolls", "switches")


def perf_available():
    """perf's version when it can count the syscall tracepoints here, else None."""
    try:
        out = subprocess.run(["perf", "stat", "-x,", "-e", ",".join(PERF_EVENTS), "true"],
                             capture_output=True, text=True, timeout=30)
        ver = subprocess.run(["perf", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or "<not supported>" in out.stderr or "not counted" in out.stderr:
        return None
    return ver.stdout.strip() or "perf"


class PerfWindow:
    """`perf stat -p PID`, started with its counters off (`-D -1`) and switched on and off
    through its control fd; `enable` and `disable` return once perf has acknowledged, so the
    window lies between the two calls' returns. perf follows threads the process starts later
    (inherit), so it may start before the client's queue threads exist."""

    def __init__(self, pid, outfile):
        self.outfile = outfile
        ctl_r, self.ctl_w = os.pipe()
        self.ack_r, ack_w = os.pipe()
        self.p = subprocess.Popen(
            ["perf", "stat", "-x,", "-o", str(outfile), "-D", "-1",
             "--control", f"fd:{ctl_r},{ack_w}", "-e", ",".join(PERF_EVENTS), "-p", str(pid)],
            pass_fds=(ctl_r, ack_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(ctl_r)
        os.close(ack_w)
        self.t_on = self.t_off = None

    def _command(self, cmd):
        os.write(self.ctl_w, cmd.encode() + b"\n")
        ack = os.read(self.ack_r, 64)
        if not ack.startswith(b"ack"):
            raise RuntimeError(f"perf stat did not acknowledge {cmd!r} ({ack!r})")
        return time.monotonic()

    def enable(self):
        self.t_on = self._command("enable")

    def disable(self):
        self.t_off = self._command("disable")

    def close(self):
        """Stops perf and returns {writes, reads, ppolls, switches, window_s}, or None when
        the window was not measured."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for fd in (self.ctl_w, self.ack_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.t_on is None or self.t_off is None:
            return None
        counts = {}
        with open(self.outfile) as f:
            for line in f:
                fields = line.strip().split(",")
                if len(fields) > 2 and fields[2] in PERF_EVENTS:
                    v = fields[0]
                    counts[PERF_NAMES[PERF_EVENTS.index(fields[2])]] = (
                        int(v) if v.isdigit() else None)
        if any(counts.get(n) is None for n in PERF_NAMES):
            raise RuntimeError(f"perf stat counted nothing, see {self.outfile}")
        counts["window_s"] = self.t_off - self.t_on
        return counts


def proc_io(pid):
    """(syscr, syscw) of the process: its read and write syscalls so far, all threads; None
    where the kernel keeps no such accounting (CONFIG_TASK_IO_ACCOUNTING)."""
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except OSError:
        return None
    return out["syscr"], out["syscw"]


class ProgressFile:
    """`blockctl bench --progress-file`: queue i's completed requests as the native-endian
    u64 at byte 8·i, stored by the client after every batch. An aligned 8-byte load (struct's
    copy of 8 bytes) reads each whole; the queues are read one after the other."""

    def __init__(self, path, queues):
        with open(path, "rb") as f:
            self.m = mmap.mmap(f.fileno(), 8 * queues, access=mmap.ACCESS_READ)
        self.queues = queues

    def requests(self):
        return sum(struct.unpack_from(f"={self.queues}Q", self.m))

    def close(self):
        self.m.close()


def blockd_counts(rpc, ctrlr):
    """The connected session's counters summed over its queues, or None without a session:
    {requests, kicks, interrupts} (`vhost_get_controllers`, docs/rpc.md)."""
    sessions = rpc("vhost_get_controllers", {"name": ctrlr})[0]["sessions"]
    if not sessions:
        return None
    tot = {"requests": 0, "kicks": 0, "interrupts": 0}
    for q in sessions[0]["queues"]:
        for k in tot:
            tot[k] += q[k]
    return tot


# Slack of the cross-check: the device's and the client's windows differ by the time of an
# RPC call (about a millisecond), and a few notifications may fall into that gap.
CHECK_REL = 0.02
CHECK_ABS = 8


def summarise(iops, perf, io0, io1, io_window_s, b0, b1, b_window_s):
    """Per-I/O figures of one measurement. `iops` is the client's rate within the window
    (from its progress file), so that a count over a window of w seconds is per I/O when
    divided by iops × w (the windows are nested and differ by milliseconds); blockd's counts
    are divided by the requests it returned in its own window.

    Returns {kicks_per_io, interrupts_per_io, source, ...}: the headline figures come from
    perf if it ran, else from /proc/PID/io, else from blockd's own counters (source
    "blockd": kicks seen and interrupts sent)."""
    out = {}
    if perf:
        n = iops * perf["window_s"]
        out["perf"] = dict(perf, ios=n)
        out["perf_per_io"] = {k: perf[k] / n if n else None
                              for k in ("writes", "reads", "ppolls", "switches")}
    if io0 and io1 and io_window_s:
        n = iops * io_window_s
        reads, writes = io1[0] - io0[0], io1[1] - io0[1]
        out["proc_io"] = {"reads": reads, "writes": writes, "window_s": io_window_s, "ios": n}
        out["proc_io_per_io"] = {"reads": reads / n if n else None,
                                 "writes": writes / n if n else None}
    if b0 and b1 and b_window_s:
        d = {k: b1[k] - b0[k] for k in b0}
        d["window_s"] = b_window_s
        out["blockd"] = d
        req = d["requests"]
        out["blockd_per_io"] = {"kicks": d["kicks"] / req if req else None,
                                "interrupts": d["interrupts"] / req if req else None}
        # Requests blockd returned against the client's I/Os estimated from its IOPS.
        out["blockd_requests_vs_client"] = req / (iops * b_window_s) if iops else None
    if "perf" in out:
        out["source"] = "perf"
        out["kicks_per_io"] = out["perf_per_io"]["writes"]
        out["interrupts_per_io"] = out["perf_per_io"]["reads"]
        out["waits_per_io"] = out["perf_per_io"]["ppolls"]
    elif "proc_io" in out:
        out["source"] = "proc_io"
        out["kicks_per_io"] = out["proc_io_per_io"]["writes"]
        out["interrupts_per_io"] = out["proc_io_per_io"]["reads"]
    elif "blockd" in out:
        out["source"] = "blockd"
        out["kicks_per_io"] = out["blockd_per_io"]["kicks"]
        out["interrupts_per_io"] = out["blockd_per_io"]["interrupts"]
    out["check"] = cross_check(out)
    return out


def cross_check(out):
    """Whether the device's and the driver's counts agree, scaled to the client's window:
    kicks blockd saw ≤ kicks the client sent (it may read two as one), interrupts blockd sent
    ≥ interrupts the client took (eventfd signals coalesce); and perf against /proc/PID/io.
    A list of what disagrees ([] = all agree), or None when there is nothing to compare."""
    notes = []
    client = None
    if "perf" in out:
        client = (out["perf"]["writes"], out["perf"]["reads"], out["perf"]["window_s"], "perf")
    elif "proc_io" in out:
        p = out["proc_io"]
        client = (p["writes"], p["reads"], p["window_s"], "/proc/PID/io")
    if "perf" in out and "proc_io" in out:
        p, q = out["perf"], out["proc_io"]
        scale = p["window_s"] / q["window_s"]
        for name in ("writes", "reads"):
            a, b = p[name], q[name] * scale
            if abs(a - b) > CHECK_REL * max(a, b) + CHECK_ABS:
                notes.append(f"perf {name} {a} vs /proc/PID/io {b:.0f}")
    if client and "blockd" in out:
        b = out["blockd"]
        scale = client[2] / b["window_s"]
        seen, sent = b["kicks"] * scale, client[0]
        if seen > sent * (1 + CHECK_REL) + CHECK_ABS:
            notes.append(f"blockd saw {seen:.0f} kicks, the client sent {sent} ({client[3]})")
        irq_sent, taken = b["interrupts"] * scale, client[1]
        if irq_sent < taken * (1 - CHECK_REL) - CHECK_ABS:
            notes.append(f"blockd sent {irq_sent:.0f} interrupts, the client took {taken} "
                         f"({client[3]})")
    elif not ("perf" in out and "proc_io" in out):
        return None
    return notes
