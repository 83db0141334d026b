#!/usr/bin/env bash
# Builds the test guest for blockd's QEMU tests: an uncompressed ELF kernel (`vmlinux`,
# booted by QEMU through the PVH entry: ~3 s faster than bzImage under TCG) and a
# busybox initramfs whose /init (tests/guest/init.sh) runs one scenario and powers off.
#
# Usage: build-guest.sh OUTDIR
# Prints on stdout, as the last two lines:
#   KERNEL=<OUTDIR>/<kernel-version>/vmlinux
#   INITRD=<OUTDIR>/<kernel-version>/initramfs-<hash>.cpio.gz
# The kernel comes from Debian's linux-image-amd64 dependency (apt-get download +
# dpkg-deb -x: never installed). Results are cached per kernel package version; the
# initramfs additionally per hash of this script and init.sh. Concurrency-safe (flock).
# Needs (scripts/install-deps.sh): apt, dpkg, busybox-static, kmod, xz-utils, util-linux.
set -euo pipefail
export LC_ALL=C

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
log() { echo "build-guest: $*" >&2; }

exec 9>"$out/.lock"
flock 9

# --- Which kernel package? -------------------------------------------------------
resolve_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
}
pkg=$(resolve_pkg || true)
if [ -z "$pkg" ]; then
  log "apt has no linux-image-amd64 metadata; running apt-get update"
  apt-get update -qq >&2 || true
  pkg=$(resolve_pkg || true)
fi
if [ -z "$pkg" ]; then
  # Offline and no metadata: reuse the newest kernel already built, if any.
  ver=$(set +o pipefail; ls -1t "$out" 2>/dev/null | grep -v '^\.' | head -1)
  [ -n "$ver" ] && [ -f "$out/$ver/vmlinux" ] || { log "cannot resolve linux-image-amd64"; exit 1; }
  log "using cached kernel $ver"
else
  pkgver=$(apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" { print $2; exit }')
  ver="${pkg#linux-image-}_${pkgver}"
fi
dir="$out/$ver"
mkdir -p "$dir"

# --- Kernel: unpack the package, extract vmlinux ---------------------------------
if [ ! -f "$dir/vmlinux" ] || [ ! -d "$dir/pkg/lib/modules" ]; then
  tmp=$(mktemp -d "$dir/.dl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  log "downloading $pkg ($pkgver)"
  if ! (cd "$tmp" && apt-get download -q "$pkg=$pkgver" >&2); then
    log "download failed; running apt-get update and retrying"
    apt-get update -qq >&2
    (cd "$tmp" && apt-get download -q "$pkg=$pkgver" >&2)
  fi
  rm -rf "$dir/pkg"
  dpkg-deb -x "$tmp"/*.deb "$tmp/pkg"
  vmlinuz=$(set +o pipefail; ls "$tmp"/pkg/boot/vmlinuz-* | head -1)
  # bzImage carries an xz stream: find its magic and decompress just that stream.
  off=$(set +o pipefail; grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
  [ -n "$off" ] || { log "no xz stream in $vmlinuz"; exit 1; }
  # xz stops at the stream's end and tail gets SIGPIPE: judge the result, not the pipe.
  (set +o pipefail; tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$tmp/vmlinux")
  [ "$(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ] ||
    { log "extracted kernel is not ELF"; exit 1; }
  mv "$tmp/pkg" "$dir/pkg"
  mv "$tmp/vmlinux" "$dir/vmlinux"
  rm -rf "$tmp"
  trap - EXIT
fi

# --- initramfs ---------------------------------------------------------------------
hash=$(cat "$here/build-guest.sh" "$here/init.sh" | sha256sum | cut -c1-12)
initrd="$dir/initramfs-$hash.cpio.gz"
if [ ! -f "$initrd" ]; then
  kver=$(set +o pipefail; ls "$dir/pkg/lib/modules" | head -1)
  moddir="$dir/pkg/lib/modules/$kver"
  root=$(mktemp -d "$dir/.root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc}
  cp /bin/busybox "$root/bin/busybox"
  for app in $(/bin/busybox --list); do
    [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
  done
  # util-linux blkdiscard: busybox's lacks -z (BLKZEROOUT). Copy it with its libraries
  # to /usr/sbin; init.sh calls it by full path (busybox sh prefers its own applets).
  bd=$(PATH=/usr/sbin:/sbin:$PATH command -v blkdiscard || true)
  if [ -n "$bd" ] && [ -x "$bd" ]; then
    mkdir -p "$root/usr/sbin"
    cp "$bd" "$root/usr/sbin/blkdiscard"
    for lib in $(ldd "$bd" | awk '/=>/ { print $3 } /^\s*\/lib/ { print $1 }'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
    # The interpreter is looked up under /lib64 on x86_64.
    [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || { mkdir -p "$root/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"; }
  fi

  # Modules in dependency order (depth-first, dependencies first). No modules.dep is
  # shipped, so read each module's `depends=` from its .modinfo section.
  declare -A path_of seen
  while IFS= read -r f; do
    m=$(basename "$f"); m=${m%.xz}; m=${m%.ko}
    path_of[${m//-/_}]=$f
  done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz')
  order=()
  visit() {
    local m=${1//-/_} f dep
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    f=${path_of[$m]:-}
    if [ -z "$f" ]; then log "module $m not found (built in?)"; return 0; fi
    for dep in $(modinfo -F depends "$f" | tr ',' ' '); do visit "$dep"; done
    order+=("$m")
  }
  for m in virtio_pci virtio_blk virtio_scsi scsi_mod sd_mod nbd; do visit "$m"; done
  for m in "${order[@]}"; do
    f=${path_of[$m]}
    case $f in
      *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/etc/modules.order"
  done
  log "modules: ${order[*]}"
  cp "$here/init.sh" "$root/init"
  chmod 755 "$root/init"
  (cd "$root" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  # Older builds of init.sh are dead weight now.
  find "$dir" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -path "$initrd" -delete
  rm -rf "$root"
  trap - EXIT
fi

echo "KERNEL=$dir/vmlinux"
echo "INITRD=$initrd"
