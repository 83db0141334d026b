#!/usr/bin/env bash
# Installs what blockd's test suite needs on a Debian 12 machine (root):
# QEMU 10 from bookworm-backports (matching the preinstalled qemu-utils; bookworm's 7.2
# would remove it), fio, libnbd tools, Ceph, busybox for the guest initramfs.
# Idempotent: a second run installs nothing.
set -euo pipefail

need=()
for pkg in qemu-system-x86 qemu-block-extra fio libnbd-bin busybox-static xz-utils \
           ceph-mon ceph-osd ceph-mgr ceph-common librbd1 librados2 kmod; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
# SPDK's own rpc.py (`spdk-rpc`, PyPI package spdk), the reference client the RPC tests run
# against blockd: into the project's venv unless already on PATH (tests look in both).
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v spdk-rpc >/dev/null && [ ! -x "$root/.cache/venv/bin/spdk-rpc" ]; then
  if ! python3 -m venv "$root/.cache/venv" >/dev/null 2>&1; then
    rm -rf "$root/.cache/venv"
    DEBIAN_FRONTEND=noninteractive $([ "$(id -u)" -eq 0 ] || echo sudo) \
      sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv" >/dev/null
    python3 -m venv "$root/.cache/venv"
  fi
  "$root/.cache/venv/bin/pip" install -q spdk==26.9
fi

[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
src=/etc/apt/sources.list.d/debian.sources
bp=/etc/apt/sources.list.d/blockd-backports.sources
if [ ! -f "$bp" ]; then
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
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# QEMU must come from backports, all at one version (see the README's test notes).
$SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-utils qemu-block-extra >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends \
  fio libnbd-bin busybox-static xz-utils kmod \
  ceph-mon ceph-osd ceph-mgr ceph-common librbd1 librados2 >/dev/null
