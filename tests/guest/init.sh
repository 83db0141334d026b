#!/bin/sh
# /init of blockd's test guest (busybox). Runs the scenario named on the kernel command
# line (`blockd.scenario=NAME`, options `blockd.arg=KEY=VALUE`, repeatable), prints
# machine-readable lines on the console and powers off:
#   BLOCKD-RESULT <key>=<value>      (value: one token, no spaces)
#   BLOCKD-DONE ok | BLOCKD-DONE fail <reason>
# Patterns: sector LBA (512-byte units, absolute on the disk) holds the 512 bytes
#   printf '%-8.8s %016x%486s\n' TAG LBA ''
# so the host can recompute them (tests/common/guest.rs `pattern`). A region written
# with TAG is reported as `<disk>.region.<TAG>=<offset>+<length>` (bytes).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo 1 >/proc/sys/kernel/printk

R() { echo "BLOCKD-RESULT $1=$2"; }
finish() { sync; echo "BLOCKD-DONE $*"; poweroff -f; sleep 5; exit 1; }
fail() { finish fail "$*"; }
MiB=1048576
# util-linux blkdiscard (has -z) if the image carries it; busybox's applet otherwise.
BLKDISCARD=blkdiscard
[ -x /usr/sbin/blkdiscard ] && BLKDISCARD=/usr/sbin/blkdiscard

scenario=none
for w in $(cat /proc/cmdline); do
  case $w in
    blockd.scenario=*) scenario=${w#blockd.scenario=} ;;
    blockd.arg=*=*) kv=${w#blockd.arg=}; eval "arg_$(echo "${kv%%=*}" | tr -c 'a-zA-Z0-9_\n' _)=\${kv#*=}" ;;
  esac
done
R scenario "$scenario"

while read -r m; do
  insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err || R "insmod.$m" "$(tr ' ' _ </tmp/insmod.err)"
done </etc/modules.order

# Disks appear during insmod (SCSI disks after an asynchronous scan); give udev-less
# devtmpfs a bounded moment. `blockd.arg=dev=sd` for vhost-user-scsi disks.
want=${arg_disks:-1}
dev=${arg_dev:-vd}
i=0
while [ "$(ls -d /sys/block/$dev* 2>/dev/null | wc -l)" -lt "$want" ] && [ $i -lt 100 ]; do
  usleep 100000; i=$((i + 1))
done
[ -b /dev/${dev}a ] || fail "no /dev/${dev}a"

# host_wait WHAT: tells the host (tests/common/guest.rs `wait_for`) that the guest now
# waits for it to act.
host_wait() { echo "BLOCKD-WAIT $1"; }

# poll_until SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds (bounded).
poll_until() {
  p_n=$(($1 * 10)); shift
  while ! "$@"; do
    p_n=$((p_n - 1)); [ $p_n -gt 0 ] || return 1
    usleep 100000
  done
}

# pattern TAG FIRST_LBA COUNT: the deterministic pattern on stdout.
pattern() {
  p_lba=$2; p_end=$(($2 + $3))
  while [ $p_lba -lt $p_end ]; do
    printf '%-8.8s %016x%486s\n' "$1" $p_lba ''
    p_lba=$((p_lba + 1))
  done
}

# write_verify DISK TAG OFFSET LENGTH direct|buffered [BS]: writes the pattern, reads it
# back with O_DIRECT (from the target, not the page cache) and compares.
write_verify() {
  wv_dev=/dev/$1 wv_bs=${6:-65536}
  pattern "$2" $(($3 / 512)) $(($4 / 512)) >/tmp/w
  if [ "$5" = direct ]; then
    dd if=/tmp/w of=$wv_dev bs=$wv_bs seek=$3 oflag=seek_bytes,direct conv=notrunc 2>/tmp/dd.err
  else
    dd if=/tmp/w of=$wv_dev bs=$wv_bs seek=$3 oflag=seek_bytes conv=notrunc,fsync 2>/tmp/dd.err
  fi || { R "$1.error.$2" "$(tail -1 /tmp/dd.err | tr ' ' _)"; return 1; }
  R "$1.region.$2" "$3+$4"
  dd if=$wv_dev of=/tmp/r bs=$wv_bs skip=$3 count=$4 iflag=skip_bytes,count_bytes,direct 2>/tmp/dd.err ||
    { R "$1.error.$2" "$(tail -1 /tmp/dd.err | tr ' ' _)"; return 1; }
  cmp -s /tmp/w /tmp/r || return 1
  if [ "$5" = buffered ]; then
    echo 3 >/proc/sys/vm/drop_caches
    dd if=$wv_dev of=/tmp/r bs=$wv_bs skip=$3 count=$4 iflag=skip_bytes,count_bytes 2>/dev/null &&
      cmp -s /tmp/w /tmp/r || return 1
  fi
}

# check NAME COMMAND...: runs COMMAND, reports NAME=ok|fail, returns its status.
check() {
  c_name=$1; shift
  if "$@"; then R "$c_name" ok; else R "$c_name" fail; return 1; fi
}

disk_info() {
  q=/sys/block/$1/queue
  R "$1.size" "$(cat /sys/block/$1/size)"
  R "$1.logical_block_size" "$(cat $q/logical_block_size)"
  R "$1.physical_block_size" "$(cat $q/physical_block_size)"
  R "$1.ro" "$(cat /sys/block/$1/ro)"
  R "$1.queues" "$(ls -d /sys/block/$1/mq/* | wc -l)"
  R "$1.write_cache" "$(tr ' ' _ <$q/write_cache)"
  R "$1.discard_max_bytes" "$(cat $q/discard_max_bytes)"
  R "$1.write_zeroes_max_bytes" "$(cat $q/write_zeroes_max_bytes)"
  # The negotiated feature bits, bit 0 first: VIRTIO_F_RING_PACKED is bit 34.
  # (the virtio device is /sys/block/vdX/device, or an ancestor of a scsi disk's).
  f=$(readlink -f /sys/block/$1/device)
  while [ "$f" != / ] && [ ! -f "$f/features" ]; do f=$(dirname "$f"); done
  R "$1.ring_packed" "$(cut -c35 "$f/features" 2>/dev/null || echo unknown)"
}

# rejected NAME COMMAND...: runs COMMAND expecting failure; reports NAME=rejected|accepted.
rejected() {
  r_name=$1; shift
  if "$@" >/tmp/rej.out 2>&1; then R "$r_name" accepted; else R "$r_name" rejected; fi
  R "$r_name.detail" "$(tail -1 /tmp/rej.out | tr ' ' _)"
}

sc_seed() {
  disk_info vda
  check vda.pattern.direct write_verify vda direct 0 $MiB direct || fail "direct pattern"
  check vda.pattern.buffered write_verify vda buffered $((8 * MiB)) $MiB buffered || fail "buffered pattern"
}

sc_multiqueue() {
  disk_info vda
  ncpu=$(nproc)
  R cpus "$ncpu"
  for q in /sys/block/vda/mq/*; do
    R "vda.mq.${q##*/}.cpu_list" "$(tr -d ' ' <$q/cpu_list)"
  done
  cpu=0
  while [ $cpu -lt "$ncpu" ]; do
    taskset -p -c $cpu $$ >/dev/null
    check "vda.pattern.cpu$cpu" write_verify vda "cpu$cpu" $(((16 + cpu) * MiB)) $MiB direct || fail "cpu$cpu pattern"
    cpu=$((cpu + 1))
  done
  taskset -p -c 0-$((ncpu - 1)) $$ >/dev/null
  # Dispatch runs per hardware queue (blk-mq debugfs `run`): each virtqueue carried I/O.
  if mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
    for h in /sys/kernel/debug/block/vda/hctx*; do
      [ -e "$h/run" ] && R "vda.${h##*/}.run" "$(cat $h/run)"
    done
  else
    R debugfs unavailable
  fi
}

sc_discard() {
  disk_info vda
  check vda.pattern.discard write_verify vda discard $((32 * MiB)) $MiB direct || fail "discard pre-pattern"
  check vda.pattern.zero write_verify vda zero $((34 * MiB)) $MiB direct || fail "zero pre-pattern"
  check vda.discard $BLKDISCARD -f -o $((32 * MiB)) -l $MiB /dev/vda || fail "blkdiscard"
  check vda.zeroout $BLKDISCARD -f -z -o $((34 * MiB)) -l $MiB /dev/vda || fail "blkdiscard -z"
  head -c $MiB /dev/zero >/tmp/z
  dd if=/dev/vda of=/tmp/r bs=65536 skip=$((34 * MiB)) count=$MiB iflag=skip_bytes,count_bytes,direct 2>/dev/null
  check vda.zeroout.verify cmp -s /tmp/z /tmp/r || fail "zeroed range reads non-zero"
}

# The first disk (vda, or sda with dev=sd) is read-only: reads work, writes fail.
sc_readonly() {
  d=${dev}a
  disk_info $d
  [ "$(cat /sys/block/$d/ro)" = 1 ] || fail "disk not read-only"
  dd if=/dev/$d of=/tmp/r bs=65536 count=$MiB iflag=count_bytes,direct 2>/dev/null || fail "read failed"
  R $d.read.sha256.0+$MiB "$(sha256sum </tmp/r | cut -d' ' -f1)"
  pattern readonly 0 8 >/tmp/w
  if dd if=/tmp/w of=/dev/$d bs=4096 oflag=direct conv=notrunc 2>/tmp/dd.err; then
    R $d.write accepted; fail "write to read-only disk succeeded"
  fi
  R $d.write rejected
  R $d.write.error "$(tail -1 /tmp/dd.err | tr ' ' _)"
}

sc_flush() {
  disk_info vda
  R vda.fua "$(cat /sys/block/vda/queue/fua)"
  check vda.pattern.flush write_verify vda flush $((40 * MiB)) $MiB buffered || fail "flush pattern"
  check vda.sync sync || fail "sync"
}

# The driver turns the device's cache to write-through (CONFIG_WCE), then writes 64 blocks
# with O_DIRECT and never syncs: the host must see a flush for every write.
sc_writethrough() {
  disk_info vda
  [ -w /sys/block/vda/cache_type ] || fail "no writable cache_type (CONFIG_WCE)"
  echo "write through" >/sys/block/vda/cache_type || fail "setting write through"
  R vda.cache_type "$(tr ' ' _ </sys/block/vda/cache_type)"
  pattern writethrough 0 512 >/tmp/w
  dd if=/tmp/w of=/dev/vda bs=4096 count=64 oflag=direct conv=notrunc 2>/dev/null || fail "writes"
}

sc_many() {
  n=0
  for b in /sys/block/vd*; do
    d=${b##*/}
    disk_info "$d"
    check "$d.pattern.$d" write_verify "$d" "$d" 0 $MiB direct || fail "$d pattern"
    n=$((n + 1))
  done
  R disks $n
  [ $n -ge "$want" ] || fail "only $n disks"
}

sc_hostile() {
  disk_info vda
  sectors=$(cat /sys/block/vda/size)
  bytes=$((sectors * 512))
  # The kernel bounds-checks these itself; the target must just keep serving.
  dd if=/dev/vda of=/tmp/r bs=512 skip="$sectors" count=1 iflag=direct 2>/dev/null
  R hostile.read_past_end_bytes "$(wc -c </tmp/r)"
  pattern past 0 1 >/tmp/w
  rejected hostile.write_past_end dd if=/tmp/w of=/dev/vda bs=512 seek="$sectors" oflag=direct conv=notrunc
  # busybox's blkdiscard: util-linux's clamps the range to the device and does nothing.
  rejected hostile.discard_past_end busybox blkdiscard -o "$bytes" -l 4096 /dev/vda
  # Last sectors, a huge request (split by the kernel at max_sectors/seg_max), a storm.
  check hostile.last_4k write_verify vda last $((bytes - 4096)) 4096 direct
  check hostile.big_io write_verify vda big $((48 * MiB)) $((4 * MiB)) direct $((4 * MiB))
  pids=""
  for j in 0 1 2 3 4 5 6 7; do
    dd if=/dev/vda of=/dev/null bs=4096 skip=$((j * 256)) count=256 iflag=direct 2>/dev/null &
    pids="$pids $!"
  done
  storm=ok
  for p in $pids; do wait "$p" || storm=fail; done
  R hostile.read_storm $storm
  check hostile.still_serving write_verify vda after $((56 * MiB)) 65536 direct || fail "target stopped serving"
}

size_is_not() { [ "$(cat /sys/block/$1/size)" != "$2" ]; }

# Online resize: the host grows the disk while the guest runs; the config-change
# interrupt makes virtio_blk re-read the capacity. Writes a pattern into the new space.
sc_resize() {
  disk_info vda
  before=$(cat /sys/block/vda/size)
  host_wait resize
  poll_until 30 size_is_not vda "$before" || fail "capacity did not change"
  R vda.size.after "$(cat /sys/block/vda/size)"
  R vda.capacity_change_logged "$(dmesg | grep -c 'vda: detected capacity change')"
  check vda.pattern.grown write_verify vda grown $((before * 512)) $MiB direct || fail "pattern in new space"
}

sd_present() { [ -b "/dev/$1" ] && [ -e "/sys/block/$1/size" ] && [ "$(cat /sys/block/$1/size)" -gt 0 ]; }
sd_absent() { [ ! -e "/sys/block/$1" ]; }

# vhost-user-scsi: seed + discard (UNMAP) on sda; hot-add of target 1 (sdb) and its
# hot-remove, announced by TRANSPORT_RESET events.
sc_scsi() {
  disk_info sda
  R sda.provisioning_mode "$(cat /sys/block/sda/device/scsi_disk/*/provisioning_mode 2>/dev/null)"
  R sda.vendor "$(tr -d ' ' </sys/block/sda/device/vendor)"
  check sda.pattern.direct write_verify sda direct 0 $MiB direct || fail "direct pattern"
  check sda.pattern.buffered write_verify sda buffered $((8 * MiB)) $MiB buffered || fail "buffered pattern"
  check sda.pattern.discard write_verify sda discard $((32 * MiB)) $MiB direct || fail "discard pre-pattern"
  check sda.discard $BLKDISCARD -f -o $((32 * MiB)) -l $MiB /dev/sda || fail "blkdiscard"
  [ "${arg_hotplug:-0}" = 1 ] || return 0
  host_wait hotadd
  poll_until 30 sd_present sdb || fail "sdb did not appear"
  disk_info sdb
  check sdb.pattern.hot write_verify sdb hot 0 $MiB direct || fail "sdb pattern"
  host_wait hotremove
  poll_until 30 sd_absent sdb || fail "sdb did not go away"
  R sdb.removed yes
  check sda.pattern.after write_verify sda after $((40 * MiB)) 65536 direct || fail "sda after hot-remove"
}

# reads_zero OFFSET LENGTH: the range of vda reads back as zeros (O_DIRECT).
reads_zero() {
  head -c "$2" /dev/zero >/tmp/z
  dd if=/dev/vda of=/tmp/r bs=65536 skip="$1" count="$2" iflag=skip_bytes,count_bytes,direct 2>/dev/null &&
    cmp -s /tmp/z /tmp/r
}

# Ceph RBD in one boot: seed, discard of a whole 4 MiB object (librbd skips partial-object
# discards), write-zeroes, flush, then online resize (`rbd resize` on the host).
sc_rbd() {
  sc_seed
  check vda.pattern.object write_verify vda object $((16 * MiB)) $((4 * MiB)) direct $MiB || fail "object pattern"
  check vda.discard $BLKDISCARD -f -o $((16 * MiB)) -l $((4 * MiB)) /dev/vda || fail "blkdiscard"
  check vda.discard.verify reads_zero $((16 * MiB)) $((4 * MiB)) || fail "discarded object reads non-zero"
  check vda.pattern.zero write_verify vda zero $((34 * MiB)) $MiB direct || fail "zero pre-pattern"
  check vda.zeroout $BLKDISCARD -f -z -o $((34 * MiB)) -l $MiB /dev/vda || fail "blkdiscard -z"
  check vda.zeroout.verify reads_zero $((34 * MiB)) $MiB || fail "zeroed range reads non-zero"
  sc_flush
  sc_resize
}

# writer W BS BLOCKS: verified O_DIRECT writes until /tmp/stop exists. Block K of writer
# W is BS bytes at W*BLOCKS*BS (+1 MiB) on $data; each write fills it with 32-byte lines
# `wWW sSSSSSSSS bKKKKKKKK` + 8 spaces + newline (hex; tests/common/writers.rs), printed
# `BLOCKD-W I w seq blk` when issued and `BLOCKD-W A w seq blk` once acknowledged, then
# read back with O_DIRECT and compared (`BLOCKD-W M ...` on a mismatch, `E` on an error).
writer() {
  w_id=$1 w_bs=$2 w_nb=$3 w_seq=0
  w_rep=$(seq $((w_bs / 32)) | tr '\n' ' ')
  while [ ! -e /tmp/stop ]; do
    w_seq=$((w_seq + 1)); w_blk=$((w_seq % w_nb))
    w_off=$((MiB + (w_id * w_nb + w_blk) * w_bs))
    w_line=$(printf 'w%02x s%08x b%08x        ' $w_id $w_seq $w_blk)
    printf "$w_line\n%.0s" $w_rep >/tmp/b$w_id
    echo "BLOCKD-W I $w_id $w_seq $w_blk"
    if ! dd if=/tmp/b$w_id of=$data bs=$w_bs seek=$w_off oflag=seek_bytes,direct conv=notrunc 2>/tmp/e$w_id; then
      echo "BLOCKD-W E $w_id $w_seq $w_blk $(tail -1 /tmp/e$w_id | tr ' ' _)"
      sleep 1
      continue
    fi
    echo "BLOCKD-W A $w_id $w_seq $w_blk"
    if ! dd if=$data of=/tmp/r$w_id bs=$w_bs skip=$w_off count=1 iflag=skip_bytes,direct 2>/tmp/e$w_id ||
      ! cmp -s /tmp/b$w_id /tmp/r$w_id; then
      echo "BLOCKD-W M $w_id $w_seq $w_blk"
    fi
  done
  echo "BLOCKD-W D $w_id $w_seq"
  touch /tmp/done.$w_id
}

# poker P: commands blockd answers without the bdev (virtio-blk GET_ID, sent each time
# the serial is read; SCSI READ CAPACITY, MODE SENSE, INQUIRY on a rescan), so they
# complete at once, ahead of the writes queued before them on the same virtqueue (out of
# order), until /tmp/stop exists. `BLOCKD-W E p<P>` on an error.
poker() {
  p_id=${data#/dev/}
  while [ ! -e /tmp/stop ]; do
    case $p_id in
      vd*) cat /sys/block/$p_id/serial >/dev/null 2>&1 ;;
      *) echo 1 2>/dev/null >/sys/block/$p_id/device/rescan ;;
    esac || echo "BLOCKD-W E p$1"
    usleep 20000
  done
}

# Writers for restart tests: `writers` (4) writers of verified O_DIRECT writes and
# `pokers` (2) pokers on the data disk (the first ${dev}* disk that is not the control disk),
# spread over the CPUs, until the host writes `stop` at the start of the control disk (a
# QEMU virtio-blk disk with serial blockdctl). Then reports finished writers and the
# kernel's I/O errors.
sc_writers() {
  nw=${arg_writers:-4}
  ctl=""
  for b in /sys/block/vd*; do
    [ "$(cat $b/serial 2>/dev/null)" = blockdctl ] && ctl=/dev/${b##*/}
  done
  [ -n "$ctl" ] || fail "no control disk"
  data=""
  for b in /sys/block/$dev*; do
    [ "/dev/${b##*/}" = "$ctl" ] || { data=/dev/${b##*/}; break; }
  done
  [ -n "$data" ] || fail "no data disk"
  R data "$data"
  disk_info "${data#/dev/}"
  R queues "$(ls -d /sys/block/${data#/dev/}/mq/* | wc -l)"
  i=0
  while [ $i -lt "$nw" ]; do
    writer $i "${arg_bs:-131072}" "${arg_blocks:-8}" &
    taskset -p -c $((i % $(nproc))) $! >/dev/null
    i=$((i + 1))
  done
  i=0
  while [ $i -lt "${arg_pokers:-2}" ]; do
    poker $i &
    taskset -p -c $((i % $(nproc))) $! >/dev/null
    i=$((i + 1))
  done
  host_wait writers
  until [ "$(dd if=$ctl bs=512 count=1 iflag=direct 2>/dev/null | head -c 4)" = stop ]; do sleep 1; done
  touch /tmp/stop
  i=0
  while [ "$(ls /tmp/done.* 2>/dev/null | wc -l)" -lt "$nw" ] && [ $i -lt 600 ]; do
    usleep 100000; i=$((i + 1))
  done
  R writers.done "$(ls /tmp/done.* 2>/dev/null | wc -l)"
  R dmesg.io_errors "$(dmesg | grep -c 'I/O error')"
  R dmesg.not_a_head "$(dmesg | grep -c 'not a head')"
  dmesg | grep -E 'I/O error|not a head|virtio' | head -20 | sed 's/^/BLOCKD-DMESG /'
}

case $scenario in
  seed | multiqueue | discard | readonly | flush | writethrough | many | hostile | resize | scsi | rbd | writers) "sc_$scenario" ;;
  *) fail "unknown scenario $scenario" ;;
esac
finish ok
