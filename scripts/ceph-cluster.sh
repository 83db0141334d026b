#!/bin/bash
# A throw-away single-node Ceph cluster for tests and development (no systemd, no cephadm).
#
#   scripts/ceph-cluster.sh start DIR   start (or reuse) the cluster in DIR, create+init testpool
#   scripts/ceph-cluster.sh stop DIR    kill the daemons started in DIR and remove DIR
#   scripts/ceph-cluster.sh env DIR     print `export CEPH_CONF=...` for the shell
#
# 1 mon, 1 mgr, 1 memstore OSD, cephx, everything on 127.0.0.1 (settings proven in
# /work/shared/test-environment.md). Data lives in the OSD's RAM: keep images small.
# Ports: mon on 3300/6789 by default; set CEPH_MON_PORT_V2/CEPH_MON_PORT_V1 to run another.
# `start` is idempotent: when DIR holds a healthy cluster, it only (re)checks testpool.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
fi
mkdir -p "$dir" 2>/dev/null || true
dir=$(cd "$dir" 2>/dev/null && pwd || echo "$dir")
conf="$dir/ceph.conf"
keyring="$dir/ceph.client.admin.keyring"
v2=${CEPH_MON_PORT_V2:-3300}
v1=${CEPH_MON_PORT_V1:-6789}
pool=${CEPH_TEST_POOL:-testpool}
timeout_s=${CEPH_START_TIMEOUT:-60}

log() { echo "ceph-cluster: $*" >&2; }

# Runs `ceph` against this cluster with a short timeout so a dead mon never hangs us.
c() { timeout 15 ceph -c "$conf" --connect-timeout 5 "$@"; }

# Whether the daemon of pid file $1 runs, and runs *this* cluster: a pid file copied with
# the directory (a copied target/) names another cluster's daemons, never ours to reuse
# or kill.
ours() {
    local f=$1 pid
    [[ -f "$f" ]] || return 1
    pid=$(cat "$f")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "-c $conf "
}

alive() { ours "$1"; }

stop() {
    local f
    # Only daemons started with this directory's ceph.conf (see `ours`).
    for f in "$dir"/run/*.pid; do
        ours "$f" && kill "$(cat "$f")" 2>/dev/null || true
    done
    # Bounded wait for the daemons to exit, then force.
    for _ in $(seq 50); do
        local any=0
        for f in "$dir"/run/*.pid; do
            ours "$f" && any=1
        done
        [[ $any == 0 ]] && break
        sleep 0.1
    done
    for f in "$dir"/run/*.pid; do
        ours "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$dir"
}

wait_for() { # wait_for WHAT CMD... : polls CMD until it succeeds or the timeout passes
    local what=$1
    shift
    local deadline=$((SECONDS + timeout_s))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout_s}s waiting for $what (logs in $dir/log)"
            tail -n 20 "$dir"/log/*.log >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

osd_up() { c osd stat -f json | grep -q '"num_up_osds":1'; }

ensure_pool() {
    if ! c osd pool ls | grep -qx "$pool"; then
        c osd pool create "$pool" 8 8 >/dev/null 2>&1
    fi
    if ! c osd pool application get "$pool" 2>/dev/null | grep -q rbd; then
        timeout 60 rbd -c "$conf" pool init "$pool"
    fi
}

start() {
    if alive "$dir/run/mon.pid" && alive "$dir/run/osd.pid" && alive "$dir/run/mgr.pid" \
        && c health >/dev/null 2>&1; then
        ensure_pool
        log "cluster already running in $dir"
        return
    fi
    # A half-started or stale cluster: start over.
    [[ -d "$dir/run" ]] && stop
    mkdir -p "$dir"/{mon,osd,mgr,run,log}
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool delete = true
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$type.pid

[client]
keyring = $keyring

[mon]
mon data = $dir/mon/\$name
mon cluster log file = $dir/log/cluster.log

[mgr]
mgr data = $dir/mgr/\$name
keyring = $dir/mgr/\$name/keyring
mgr stats period = 1

[osd]
osd data = $dir/osd/\$name
keyring = $dir/osd/\$name/keyring
osd objectstore = memstore
memstore device bytes = 4294967296
memstore page set = true
osd max object name len = 256
osd max object namespace len = 64
EOF
    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    ceph-mon -c "$conf" -i a
    wait_for "the monitor" c health

    mkdir -p "$dir/mgr/mgr.x"
    c auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        >"$dir/mgr/mgr.x/keyring"
    ceph-mgr -c "$conf" -i x

    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(c osd new "$uuid")
    mkdir -p "$dir/osd/osd.$id"
    c auth get-or-create "osd.$id" mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' \
        >"$dir/osd/osd.$id/keyring"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >/dev/null 2>&1
    ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/osd-stderr.log"
    wait_for "the OSD to come up" osd_up
    ensure_pool
    log "cluster running in $dir (CEPH_CONF=$conf)"
}

case "$cmd" in
start) start ;;
stop) stop ;;
env) echo "export CEPH_CONF=$conf" ;;
*)
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
    ;;
esac
