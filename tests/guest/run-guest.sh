#!/usr/bin/env bash
# Boots the test guest by hand against running vhost-user-blk backends (the same QEMU
# command line as tests/common/guest.rs builds), prints the command line and the
# guest's console, and exits 0 iff the guest said `BLOCKD-DONE ok`.
#
# Usage: run-guest.sh [-s SCENARIO] [-a KEY=VALUE]... [-c CPUS] [-t SECONDS] [-w DIR]
#                     [-n] SOCKET[:QUEUES]...
#   -s  scenario (default seed)   -a  blockd.arg=KEY=VALUE (repeatable)
#   -c  vCPUs (default 1)         -t  hard timeout (default 60)
#   -w  directory for console.log (default: a new temp dir)
#   -n  print the QEMU command line only
# Each SOCKET is one vhost-user-blk-pci disk (vda, vdb, ... in order) with QUEUES
# virtqueues (default 1). The backend must already be listening.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
scenario=seed cpus=1 secs=60 work="" dry=0 args=()
while getopts s:a:c:t:w:n opt; do
  case $opt in
    s) scenario=$OPTARG ;; a) args+=("$OPTARG") ;; c) cpus=$OPTARG ;;
    t) secs=$OPTARG ;; w) work=$OPTARG ;; n) dry=1 ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }

eval "$(bash "$here/build-guest.sh" "$repo/.cache/guest" | grep -E '^(KERNEL|INITRD)=')"
[ -n "$work" ] || work=$(mktemp -d)
mkdir -p "$work"
console="$work/console-$scenario.log"
append="console=ttyS0 quiet panic=-1 blockd.scenario=$scenario"
for a in "${args[@]}"; do append+=" blockd.arg=$a"; done

qemu=(${BLOCKD_QEMU:-qemu-system-x86_64} -nodefaults -no-user-config -display none -monitor none
  -machine q35,memory-backend=mem -accel tcg -smp "$cpus" -m 512M
  -object memory-backend-memfd,id=mem,size=512M,share=on)
i=0
for d in "$@"; do
  sock=${d%%:*} queues=1
  [ "$sock" = "$d" ] || queues=${d##*:}
  qemu+=(-chardev "socket,id=char$i,path=$sock"
    -device "vhost-user-blk-pci,id=disk$i,chardev=char$i,num-queues=$queues")
  i=$((i + 1))
done
qemu+=(-kernel "$KERNEL" -initrd "$INITRD" -append "$append" -serial "file:$console" -no-reboot)

# Quote like tests/common/guest.rs shell_join: only words with unsafe characters.
quote() {
  local w out=()
  for w in "$@"; do
    if [[ -n $w && $w =~ ^[A-Za-z0-9_=,./:+@%-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
echo "# QEMU command line:"
quote "${qemu[@]}"
[ $dry -eq 0 ] || exit 0
start=$(date +%s.%N)
rc=0
timeout -k 5 "$secs" "${qemu[@]}" || rc=$?
end=$(date +%s.%N)
echo "# QEMU exit $rc after $(awk "BEGIN { printf \"%.1f\", $end - $start }") s; console ($console):"
cat "$console"
[ $rc -eq 0 ] && grep -q '^BLOCKD-DONE ok' "$console"
