#!/usr/bin/env bash
# Installs what blockd needs beyond cargo on a Debian 12 machine (as root, or with sudo).
#
#   scripts/install-deps.sh          everything the test suite needs
#   scripts/install-deps.sh demo     only what the demo needs (QEMU and the guest's tools)
#
# QEMU comes from bookworm-backports at the version of the preinstalled qemu-utils (10.0.2):
# bookworm's own qemu-system 7.2 would remove qemu-utils 10.0.2. Idempotent: a second run
# installs nothing and does not touch the network.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}

qemu_pkgs=(qemu-system-x86 qemu-utils qemu-block-extra)
guest_pkgs=(busybox-static xz-utils kmod)
test_pkgs=(fio libnbd-bin ceph-mon ceph-osd ceph-mgr ceph-common librbd1 librados2
  prometheus tmux systemd python3-cryptography)

missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() {
  [ $updated -eq 1 ] && return
  local src=/etc/apt/sources.list.d/debian.sources bp=/etc/apt/sources.list.d/blockd-backports.sources
  if [ ! -f "$bp" ]; then
    local uri
    uri=$(awk '/^URIs:/{print $2; exit}' "$src" 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    $SUDO tee "$bp" >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  $SUDO apt-get update -qq
  updated=1
}

need_qemu=$(missing "${qemu_pkgs[@]}")
if [ -n "$need_qemu" ] || ! command -v qemu-system-x86_64 >/dev/null; then
  apt_update
  $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${qemu_pkgs[@]}" >/dev/null
fi
pkgs=("${guest_pkgs[@]}")
[ "$what" = demo ] || pkgs+=("${test_pkgs[@]}")
need=$(missing "${pkgs[@]}")
if [ -n "$need" ]; then
  apt_update
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
[ "$what" = demo ] && exit 0

# SPDK's own rpc.py (`spdk-rpc`, PyPI package spdk), the reference client the RPC tests run
# against blockd: into the project's venv unless already on PATH (tests look in both).
if ! command -v spdk-rpc >/dev/null && [ ! -x "$root/.cache/venv/bin/spdk-rpc" ]; then
  if ! python3 -m venv "$root/.cache/venv" >/dev/null 2>&1; then
    rm -rf "$root/.cache/venv"
    apt_update
    $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$root/.cache/venv"
  fi
  "$root/.cache/venv/bin/pip" install -q spdk==26.9
fi
