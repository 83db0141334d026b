#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): a few valid inputs per target in
the byte layouts the targets read (see fuzz/src/ring.rs for the virtqueue layout).
Run from anywhere; rewrites only the seed-* files."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4
PAYLOAD = 0x1000


def desc(addr, length, flags, nxt):
    return struct.pack("<IIHH", addr, length, flags, nxt)


def ring(descs, payload, size_log2=4, knobs=0, head=0):
    """A ring of 1 << size_log2 entries, chain head `head`, `descs` from index 0."""
    out = bytes([size_log2 | (knobs << 3)]) + struct.pack("<H", head) + bytes([len(descs)])
    return out + b"".join(desc(*d) for d in descs) + payload


def chain(*parts):
    """Linear chain of (addr, len, flags): NEXT links added."""
    return [(a, l, f | (NEXT if i + 1 < len(parts) else 0), i + 1)
            for i, (a, l, f) in enumerate(parts)]


def blk_hdr(typ, sector):
    return struct.pack("<IIQ", typ, 0, sector)


def blk():
    IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13
    hdr, status, data = 0x1000, 0x1800, 0x2000
    s = {}
    s["in"] = ring(chain((hdr, 16, 0), (data, 0x1000, WRITE), (status, 1, WRITE)), blk_hdr(IN, 8))
    s["out_shared_hdr"] = ring(chain((hdr, 16 + 0x200, 0), (data, 0x400, 0), (status, 1, WRITE)),
                               blk_hdr(OUT, 3))
    s["in_across_regions"] = ring(chain((hdr, 16, 0), (0xF800, 0x1000, WRITE), (status, 1, WRITE)),
                                  blk_hdr(IN, 0))
    s["flush"] = ring(chain((hdr, 16, 0), (status, 1, WRITE)), blk_hdr(FLUSH, 0))
    s["get_id"] = ring(chain((hdr, 16, 0), (data, 20, WRITE), (status, 1, WRITE)), blk_hdr(GET_ID, 0))
    seg = struct.pack("<QII", 16, 8, 0)
    s["discard"] = ring(chain((hdr, 32, 0), (status, 1, WRITE)), blk_hdr(DISCARD, 0) + seg, knobs=2)
    s["write_zeroes_unmap"] = ring(chain((hdr, 32, 0), (status, 1, WRITE)),
                                   blk_hdr(WZ, 0) + struct.pack("<QII", 0, 8, 1), knobs=2)
    # Indirect: descriptor 0 points at a table of three in the payload.
    table = 0x1100
    tbl = b"".join(desc(*d) for d in chain((hdr, 16, 0), (data, 0x200, WRITE), (status, 1, WRITE)))
    payload = blk_hdr(IN, 1).ljust(0x100, b"\0") + tbl
    s["indirect"] = ring([(table, len(tbl), INDIRECT, 0)], payload)
    # Status sharing the last data descriptor (legacy layout).
    s["status_in_data"] = ring(chain((hdr, 16, 0), (data, 0x201, WRITE)), blk_hdr(IN, 0))
    return s


def scsi():
    hdr, resp, data = 0x1000, 0x1800, 0x2000
    H, RL = 51, 108

    def cmd(cdb, tag=0x77):
        lun = bytes([1, 0, 0x40, 0, 0, 0, 0, 0])
        return lun + struct.pack("<Q", tag) + bytes(3) + bytes(cdb).ljust(32, b"\0")

    read10 = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]
    write10 = [0x2A, 0, 0, 0, 0, 2, 0, 0, 1, 0]
    s = {}
    s["read10"] = ring(chain((hdr, H, 0), (resp, RL, WRITE), (data, 0x200, WRITE)), cmd(read10))
    s["write10_shared_hdr"] = ring(chain((hdr, H + 0x200, 0), (resp, RL, WRITE)), cmd(write10))
    s["inquiry"] = ring(chain((hdr, H, 0), (resp, RL, WRITE), (data, 96, WRITE)),
                        cmd([0x12, 0, 0, 0, 96, 0]))
    s["tur_resp_split"] = ring(chain((hdr, H, 0), (resp, 10, WRITE), (resp + 10, RL - 10, WRITE)),
                               cmd([0] * 6))
    s["read_across_regions"] = ring(chain((hdr, H, 0), (resp, RL, WRITE), (0xF800, 0x1000, WRITE)),
                                    cmd([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]))
    tbl = b"".join(desc(*d) for d in chain((hdr, H, 0), (resp, RL, WRITE), (data, 0x200, WRITE)))
    s["indirect"] = ring([(0x1100, len(tbl), INDIRECT, 0)], cmd(read10).ljust(0x100, b"\0") + tbl)
    return s


def cdb_seeds():
    def c(sel, cdb, params=b""):
        return bytes([sel]) + bytes(cdb).ljust(32, b"\0") + params

    unmap_params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 8, 16)
    s = {
        "tur": c(0, [0] * 6),
        "inquiry": c(0, [0x12, 0, 0, 0, 0x60, 0]),
        "inquiry_vpd_00": c(0, [0x12, 1, 0x00, 0, 0xFF, 0]),
        "inquiry_vpd_83": c(1, [0x12, 1, 0x83, 0, 0xFF, 0]),
        "inquiry_vpd_b0": c(1, [0x12, 1, 0xB0, 0, 0xFF, 0]),
        "inquiry_vpd_b2": c(0, [0x12, 1, 0xB2, 0, 0xFF, 0]),
        "read_capacity10": c(0, [0x25] + [0] * 9),
        "read_capacity16": c(1, [0x9E, 0x10] + [0] * 11 + [32, 0, 0]),
        "read6": c(0, [0x08, 0, 0, 1, 1, 0]),
        "read10": c(0, [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]),
        "write12_fua": c(1, [0xAA, 0x08, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0]),
        "read16": c(1, [0x88, 0] + list(struct.pack(">QI", 16, 8)) + [0, 0]),
        "write16": c(0, [0x8A, 0] + list(struct.pack(">QI", 16, 8)) + [0, 0]),
        "sync_cache10": c(0, [0x35] + [0] * 9),
        "unmap": c(0, [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap_params),
        "write_same16_unmap": c(1, [0x93, 0x08] + list(struct.pack(">QI", 0, 64)) + [0, 0]),
        "write_same10": c(0, [0x41, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
        "mode_sense6": c(0, [0x1A, 0, 0x3F, 0, 0xFF, 0]),
        "mode_sense10": c(1, [0x5A, 0, 0x08, 0, 0, 0, 0, 0, 0xFF, 0]),
        "report_luns": c(0, [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
        "request_sense": c(0, [0x03, 0, 0, 0, 18, 0]),
        "get_lba_status": c(1, [0x9E, 0x12] + [0] * 11 + [32, 0, 0]),
        "verify10": c(0, [0x2F, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
    }
    return s


def nbd():
    flags = struct.pack(">I", 3)

    def opt(o, data=b""):
        return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data

    def name(n):
        return struct.pack(">I", len(n)) + n

    go = lambda n, infos=(): opt(7, name(n) + struct.pack(">H", len(infos))
                                 + b"".join(struct.pack(">H", i) for i in infos))
    meta = lambda o, n, qs: opt(o, name(n) + struct.pack(">I", len(qs)) + b"".join(name(q) for q in qs))
    return {
        "go": flags + go(b"disk"),
        "info_then_go": flags + opt(6, name(b"ro") + struct.pack(">HHH", 2, 2, 3)) + go(b"ro", (1, 3)),
        "list": flags + opt(3) + opt(2),
        "structured_meta_go": flags + opt(8) + meta(9, b"disk", [b"base:"])
        + meta(10, b"disk", [b"base:allocation"]) + go(b"disk"),
        "export_name": flags + opt(1, b"disk"),
        "export_name_zeroes": struct.pack(">I", 1) + opt(1, b"ro"),
        "unknown_then_go_missing": flags + opt(0x55, b"xyz") + go(b"nope") + opt(5) + go(b"disk"),
    }


def nbd_conn():
    """Byte 0 bit 0: straight to transmission on "m" (simple replies)."""
    def opt(o, data=b""):
        return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data

    def req(flags, typ, cookie, off, ln):
        return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln)

    name = lambda n: struct.pack(">I", len(n)) + n
    go = lambda n: opt(7, name(n) + struct.pack(">H", 0))
    meta = opt(10, name(b"m") + struct.pack(">I", 1) + name(b"base:allocation"))
    READ, WRITE, DISC, FLUSH, TRIM, WZ, STATUS = 0, 1, 2, 3, 4, 6, 7
    rw = (req(0, WRITE, 1, 512, 1024) + b"\xab" * 1024 + req(0, READ, 2, 512, 1024)
          + req(1, FLUSH, 3, 0, 0) + req(0, TRIM, 4, 0, 4096) + req(2, WZ, 5, 4096, 512)
          + req(0, DISC, 6, 0, 0))
    return {
        "go_rw": b"\x00" + struct.pack(">I", 3) + go(b"m") + rw,
        "structured_status": b"\x00" + struct.pack(">I", 3) + opt(8) + meta + go(b"m")
        + req(4, READ, 1, 0, 4096) + req(1, STATUS, 2, 0, 1 << 20) + req(0, STATUS, 3, 0, 512)
        + req(0, DISC, 9, 0, 0),
        "ro_errors": b"\x00" + struct.pack(">I", 1) + opt(1, b"ro") + req(0, WRITE, 1, 0, 4096)
        + bytes(4096) + req(0, READ, 2, 1 << 40, 4096) + req(0, READ, 3, 4096, 4096),
        "kernel_rw": b"\x01" + rw,
        "kernel_bad": b"\x01" + req(0, WRITE, 1, 1 << 20, 512) + b"x" * 512
        + req(0, 0x55, 2, 0, 0) + req(0, READ, 3, 1, 1) + b"junk",
    }


def rpc():
    def req(i, method, params=None):
        r = {"jsonrpc": "2.0", "id": i, "method": method}
        if params is not None:
            r["params"] = params
        return json.dumps(r).encode()

    create = req(1, "bdev_null_create", {"name": "n0", "num_blocks": 64, "block_size": 512})
    return {
        "null_lifecycle": b"\x03" + create + req(2, "bdev_get_bdevs", {"name": "n0"})
        + req(3, "bdev_null_resize", {"name": "n0", "new_size": 1})
        + req(4, "bdev_get_iostat") + req(5, "bdev_reset_iostat", {"mode": "all"})
        + req(6, "bdev_null_delete", {"name": "n0"}),
        "qos": b"\x00" + create + b"\n" + req(2, "bdev_set_qos_limit",
                                            {"name": "n0", "rw_ios_per_sec": 1000,
                                             "r_mbytes_per_sec": 10}),
        "log": b"\x07" + req("a", "log_set_flag", {"flag": "all"}) + req(None, "log_get_flags")
        + b'{"jsonrpc":"2.0","method":"log_set_level","params":{"level":"DEBUG"}}',
        "invalid": b"\x01" + b'{"jsonrpc":"1.0","id":1,"method":"x"} [1,2] {"id":{}} '
        + req(9, "bdev_wait_for_examine", []) + b"{bad",
        "split_strings": b"\x00" + b'{"jsonrpc":"2.0","id":"}{\\"","method":"bdev_get_bdevs"}',
    }


def vhost_session():
    """Operations of fuzz_targets/vhost_session.rs (see its header for the encoding)."""
    def op(n, *fields, need_reply=False, extra_fds=0):
        return bytes([n | (0x80 if need_reply else 0) | (extra_fds << 5)]) + b"".join(fields)

    u8 = lambda v: struct.pack("<B", v)
    u16 = lambda v: struct.pack("<H", v)
    u32 = lambda v: struct.pack("<I", v)
    u64 = lambda v: struct.pack("<Q", v)
    NEW = 0xFF

    def region(gpa, size, fd_size, off=0, fd=NEW, skew=0):
        return u32(gpa >> 12) + u32(size >> 8) + u32(fd_size >> 8) + u8(off) + u8(fd) + u16(skew)

    simple = lambda sel: op(3, u8(sel))  # SET_OWNER RESET_OWNER GET_FEATURES GET_PROTOCOL_F...
    vring = lambda sel, i, n: op(7, u8(sel), u8(i), u16(n))  # NUM BASE ENABLE GET_BASE
    IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8

    def request(typ, sector, length, head, gpa, layout=0, ring=0):
        return op(14, u8(ring), u8(typ), u32(sector), u16(length), u8(head), u32(gpa), u8(layout))

    negotiate = (simple(2) + simple(0) + simple(3) + op(1, u8(0), u64(0))
                 + op(2, u8(0), u64(0), need_reply=True))
    mem = op(4, u8(1), region(0, 1 << 20, 1 << 20))

    def ring_up(i=0, desc=0x1000, avail=0x2000, used=0x3000, size=16):
        return (vring(0, i, size) + vring(1, i, 0) + op(8, u8(i), u8(0), u32(desc), u32(avail), u32(used))
                + op(9, u8(1), u8(i)) + op(9, u8(0), u8(i)) + vring(2, i, 1))

    read = request(IN, 8, 4096, 0, 0x10000) + op(16, u8(0))
    s = {}
    s["read"] = negotiate + mem + ring_up() + read + vring(3, 0, 0)
    s["rw_indirect_flush"] = (negotiate + mem + ring_up()
                              + request(OUT, 16, 8192, 0, 0x10000, layout=1) + op(16, u8(0))
                              + request(IN, 16, 8192, 3, 0x20000) + request(FLUSH, 0, 0, 6, 0x30000, layout=2)
                              + request(GET_ID, 0, 20, 9, 0x40000) + op(16, u8(0)) + vring(3, 0, 0))
    # Two queues, guest memory added region by region (CONFIGURE_MEM_SLOTS), one removed.
    s["mem_slots"] = (negotiate + op(5, region(0, 1 << 20, 1 << 20))
                      + op(5, region(0x100000, 1 << 16, 1 << 16)) + ring_up()
                      + ring_up(1, 0x100000, 0x101000, 0x102000, 8)
                      + request(IN, 0, 512, 0, 0x10000, ring=1) + op(16, u8(1))
                      + op(6, region(0x100000, 1 << 16, 1 << 16, fd=0)) + read)
    # In-flight region from GET_INFLIGHT_FD, handed back; reconnect and hand it back again.
    inflight = op(10, u16(2), u16(16)) + op(11, u8(1), u32(4096), u8(0), u16(2), u16(16), u32(0))
    s["inflight_reconnect"] = (negotiate + inflight + mem + ring_up() + read + op(19)
                               + negotiate + op(11, u8(1), u32(4096), u8(0), u16(2), u16(16), u32(0))
                               + op(4, u8(1), region(0, 1 << 20, 0, fd=0)) + ring_up() + read)
    # The frontend shrinks guest memory under a running ring: the ring's reads fault.
    s["shrink_under_ring"] = (negotiate + mem + ring_up() + request(IN, 0, 4096, 0, 0x10000)
                              + op(17, u8(0), u32(0x1000 >> 8)) + op(16, u8(0)))
    s["config"] = (negotiate + op(12, u8(0), u8(60), u8(0)) + op(13, u8(32), u8(1), b"\x00", u8(0))
                   + op(12, u8(32), u8(1), u8(0)) + op(13, u8(0), u8(8), b"\xff" * 8, u8(0)))
    # Regions that do not fit their fd, of size 0, overlapping, at a huge offset.
    # Regions that do not fit their fd, overlapping, then (fatal framing errors: the
    # session ends) of size 0 and at an offset that overflows.
    s["bad_regions"] = (negotiate + op(4, u8(1), region(0, 1 << 20, 1 << 16))
                        + op(4, u8(2), region(0, 1 << 16, 1 << 16), region(0x8000, 1 << 16, 1 << 16))
                        + mem + ring_up() + op(5, region(0x200000, 1 << 20, 4096)) + read
                        + op(5, region(0x300000, 4096, 4096, off=0xFF)) + negotiate
                        + op(4, u8(2), region(0, 1 << 20, 0, fd=0), region(0x100000, 0, 4096)))
    s["bad_frames"] = (negotiate + op(0, u8(2), u16(8), u8(0))  # SET_FEATURES without its body
                       + op(19) + simple(0) + op(3, u8(0), extra_fds=2)
                       + op(18, u8(0x85)))  # 5 bytes of a header, then hang up
    # 5 bytes of a header, then silence: the read times out (it used to spin forever).
    s["partial_header_silent"] = negotiate + op(18, u8(5))
    return s


def main():
    for target, seeds in [("blk_request", blk()), ("scsi_request", scsi()),
                          ("scsi_cdb", cdb_seeds()), ("nbd_negotiation", nbd()), ("nbd_conn", nbd_conn()),
                          ("rpc_stream", rpc()),
                          ("vhost_session", vhost_session())]:
        d = os.path.join(HERE, "corpus", target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
