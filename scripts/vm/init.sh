#!/bin/sh
# /init of the zramd VM test guest (busybox sh, PID 1).
#
# Theory of operation
# -------------------
# Loads the modules listed in /lib/modules/load-order, brings up eth0 (qemu user networking:
# 10.0.2.15/24 via 10.0.2.2; the only reachable service is the guestfwd 10.0.2.100:10809, which
# qemu relays to the host's 127.0.0.1 zramd), runs the scenarios named on the kernel command line
# (zramd.run=fs,multiconn,discard,reconnect,memlimit,swap) in that order, and powers off.
#
# Console protocol, read by tests/vm/vm_harness.py (one line each, prefix "@@"):
#   @@BOOT ...                      init started (kernel, memory)
#   @@START name                    a scenario begins
#   @@INFO name text                a figure or a diagnostic
#   @@SYNC tag                      the host should act (read the server's stats), then send a line
#   @@RESULT name PASS|FAIL secs=N key=value... [reason="..."]
#   @@DONE                          all scenarios ran
# A scenario's figures are guest-side facts only; host-side checks belong to the harness.
# Scenarios never stop the run: each cleans up (umount, disconnect) so the next one can start.
# Export names are fixed: fs (scenarios fs, discard, reconnect), mc, dc (unaligned blkdiscard),
# lim (memory limit), swap.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=96m tmp /tmp
exec </dev/console >/dev/console 2>&1

# This busybox runs its own applets before searching PATH (mkswap, swapon, fstrim, blkdiscard,
# mkfs.ext2, nbd-client are applets too): the real tools are called by their full paths.
nbd_client() { /sbin/nbd-client "$@"; }
mkfs_ext2() { /sbin/mke2fs -t ext2 "$@"; }
e2fsck() { /sbin/e2fsck "$@"; }
mkswap() { /sbin/mkswap "$@"; }
swapon() { /sbin/swapon "$@"; }
swapoff() { /sbin/swapoff "$@"; }
fstrim() { /sbin/fstrim "$@"; }
blkdiscard() { /sbin/blkdiscard "$@"; }
SERVER=10.0.2.100
PORT=10809
DEV=/dev/nbd0
TIMEOUT=60
RUN=""
FILES=300
BIG_FILES=12
HOG_MIB=512
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	zramd.run=*) RUN="${arg#*=}" ;;
	zramd.files=*) FILES="${arg#*=}" ;;
	zramd.big=*) BIG_FILES="${arg#*=}" ;;
	zramd.hog_mib=*) HOG_MIB="${arg#*=}" ;;
	zramd.timeout=*) TIMEOUT="${arg#*=}" ;;
	esac
done

for m in $(cat /lib/modules/load-order); do
	insmod "/lib/modules/$m" || echo "@@INFO boot insmod $m failed"
done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "@@BOOT kernel=$(uname -r) mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo) cpus=$(grep -c ^processor /proc/cpuinfo) run=$RUN"

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
info() { echo "@@INFO $CUR $*"; }
# fail REASON: remember the first reason of the current scenario, return 1
fail() {
	[ -z "$REASON" ] && REASON="$*"
	info "FAIL: $*"
	return 1
}
sync_host() {
	echo "@@SYNC $1"
	read -t 900 _reply || info "no reply from host for sync $1"
}
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}
vmstat() { awk -v k="$1" '$1 == k { print $2 }' /proc/vmstat; }

nbd_size() { cat /sys/block/nbd0/size 2>/dev/null || echo 0; }
# connect EXPORT [nbd-client args...]: attach /dev/nbd0 and wait until it has a size
connect() {
	_exp="$1"
	shift
	if ! nbd_client "$SERVER" "$PORT" "$DEV" -N "$_exp" -t "$TIMEOUT" "$@" >/tmp/nbd.out 2>&1; then
		cat /tmp/nbd.out
		fail "nbd-client $_exp $* failed: $(tail -n 1 /tmp/nbd.out)"
		return 1
	fi
	_i=0
	while [ "$(nbd_size)" = 0 ]; do
		_i=$((_i + 1))
		[ $_i -gt 100 ] && { fail "nbd0 has no size after connect"; return 1; }
		sleep 0.1
	done
}
disconnect() {
	nbd_client -d "$DEV" >/dev/null 2>&1
	_i=0
	while [ "$(nbd_size)" != 0 ]; do
		_i=$((_i + 1))
		[ $_i -gt 100 ] && { info "nbd0 still sized after disconnect"; return 1; }
		sleep 0.1
	done
}
cleanup() {
	swapoff "$DEV" 2>/dev/null
	umount /mnt 2>/dev/null
	disconnect
}

# make_files DIR COUNT SEED SUMS: a few hundred files of mixed content; sha256 of each in SUMS
make_files() {
	_d=$1 _n=$2 _s=$3 _sums=$4
	_i=0 _big=0
	_every=$((_n / (BIG_FILES + 1) + 1))
	while [ $_i -lt "$_n" ]; do
		_f=$_d/f$_i
		_seed=$((_s * 100000 + _i))
		if [ $((_i % _every)) = $((_every - 1)) ] && [ $_big -lt "$BIG_FILES" ]; then
			# big: 2-4 MiB, random or text or mixed
			_big=$((_big + 1))
			_sz=$((2097152 + (_i * 7919) % 2097152))
			case $((_big % 3)) in
			0) memhog gen random $_seed $_sz >"$_f" ;;
			1) memhog gen text $_seed $_sz >"$_f" ;;
			2) { memhog gen text $_seed $((_sz / 3)); dd if=/dev/zero bs=4096 count=$((_sz / 12288)) 2>/dev/null;
			     memhog gen random $_seed $((_sz / 3)); } >"$_f" ;;
			esac
		else
			case $((_i % 8)) in
			0 | 1 | 2) memhog gen text $_seed $((100 + (_i * 7919) % 20000)) >"$_f" ;;
			3 | 4) memhog gen random $_seed $((1 + (_i * 104729) % 65536)) >"$_f" ;;
			5) dd if=/dev/zero of="$_f" bs=4096 count=$((1 + _i % 64)) 2>/dev/null ;;
			6) # sparse: a hole, some data, a hole to an odd end
				memhog gen random $_seed 5000 | dd of="$_f" bs=4096 seek=$((1 + _i % 300)) conv=notrunc 2>/dev/null
				truncate -s $(((_i % 300 + 4) * 4096 + 123)) "$_f" ;;
			7) { memhog gen text $_seed 3000; dd if=/dev/zero bs=512 count=$((_i % 17)) 2>/dev/null;
			     memhog gen random $_seed 7000; } >"$_f" ;;
			esac
		fi
		_i=$((_i + 1))
	done
	(cd "$_d" && sha256sum f*) >"$_sums"
}
# verify_files DIR SUMS: every listed file's sha256 matches
verify_files() {
	(cd "$1" && sha256sum -c "$2") >/tmp/verify.out 2>&1
	_bad=$(grep -vc ': OK$' /tmp/verify.out)
	_n=$(wc -l <"$2")
	if [ "$_bad" != 0 ]; then
		grep -v ': OK$' /tmp/verify.out | head -n 5 | while read -r l; do info "sha: $l"; done
		fail "$_bad of $_n files differ"
		return 1
	fi
	info "sha256 of $_n files ok"
}
fsck_clean() {
	if e2fsck -fn "$DEV" >/tmp/fsck.out 2>&1; then
		info "e2fsck -fn clean: $(tail -n 1 /tmp/fsck.out)"
	else
		head -n 20 /tmp/fsck.out | while read -r l; do info "fsck: $l"; done
		fail "e2fsck -fn not clean"
		return 1
	fi
}
du_kib() { du -sk "$1" | cut -f1; }

# ---- scenario 1 and 2: filesystem round trip on EXPORT with extra nbd-client args
filesystem() {
	_exp=$1
	shift
	connect "$_exp" -b 4096 "$@" || return 1
	_conns=$(ls /sys/block/nbd0/mq | wc -l)
	FIG="$FIG conns=$_conns"
	mkfs_ext2 -q -F -b 4096 "$DEV" >/tmp/mkfs.out 2>&1 || { cat /tmp/mkfs.out; fail "mkfs.ext2 failed"; return 1; }
	mount -t ext2 "$DEV" /mnt || { fail "mount after mkfs failed"; return 1; }
	_t=$(now)
	make_files /mnt "$FILES" 1 "/tmp/sums.$_exp" || { fail "writing files failed"; return 1; }
	FIG="$FIG files=$(wc -l <"/tmp/sums.$_exp") du_kib=$(du_kib /mnt) write_s=$(since "$_t")"
	drop_caches
	umount /mnt || { fail "umount failed"; return 1; }
	drop_caches
	fsck_clean || return 1
	drop_caches
	mount -t ext2 "$DEV" /mnt || { fail "remount failed"; return 1; }
	_t=$(now)
	verify_files /mnt "/tmp/sums.$_exp" || return 1
	FIG="$FIG verify_s=$(since "$_t")"
	umount /mnt && disconnect
}
scenario_fs() { filesystem fs; }
scenario_multiconn() {
	filesystem mc -C 2 || return 1
	case "$FIG" in *conns=2*) ;; *) fail "kernel did not use 2 connections ($FIG)" ;; esac
}

# ---- scenario 3: discard (continues on export fs from scenario 1)
scenario_discard() {
	[ -s /tmp/sums.fs ] || { fail "needs the filesystem of scenario fs"; return 1; }
	connect fs -b 4096 || return 1
	mount -t ext2 "$DEV" /mnt || { fail "mount failed"; return 1; }
	drop_caches
	sync_host discard-before
	# delete every other file (half of them)
	awk 'NR % 2 == 0 { print $2 }' /tmp/sums.fs | while read -r f; do rm -f "/mnt/$f"; done
	awk 'NR % 2 == 1' /tmp/sums.fs >/tmp/sums.fs.new && mv /tmp/sums.fs.new /tmp/sums.fs
	sync
	_out=$(fstrim -v /mnt 2>&1) || { info "$_out"; fail "fstrim failed"; return 1; }
	info "fstrim: $_out"
	_trimmed=$(echo "$_out" | sed -n 's/.*(\([0-9]*\) bytes) trimmed.*/\1/p')
	[ -n "$_trimmed" ] || _trimmed=$(echo "$_out" | sed -n 's/.*: *\([0-9]*\) bytes trimmed.*/\1/p')
	FIG="$FIG trimmed_bytes=${_trimmed:-?} files_left=$(wc -l </tmp/sums.fs)"
	[ "${_trimmed:-0}" -gt 0 ] 2>/dev/null || { fail "fstrim trimmed nothing"; return 1; }
	sync
	sync_host discard-after
	drop_caches
	verify_files /mnt /tmp/sums.fs || return 1
	umount /mnt || { fail "umount failed"; return 1; }
	drop_caches
	fsck_clean || return 1
	disconnect
	unaligned_blkdiscard
}

# unaligned blkdiscard on export dc (logical block 512): sectors outside the ranges unchanged
DC_BYTES=16777216
DC_RANGES="512:3584 5120:9216 65024:1024 412160:82944 1049088:1048064 8389120:512 16776704:512"
dc_segments() { # the complement of DC_RANGES as offset:length pairs
	_pos=0
	for _r in $DC_RANGES; do
		_o=${_r%:*} _l=${_r#*:}
		[ "$_o" -gt "$_pos" ] && echo "$_pos:$((_o - _pos))"
		_pos=$((_o + _l))
	done
	[ "$_pos" -lt "$DC_BYTES" ] && echo "$_pos:$((DC_BYTES - _pos))"
}
seg_sums() { # FILE-or-DEVICE -> one sha per complement segment
	dc_segments | while read -r _s; do
		_o=${_s%:*} _l=${_s#*:}
		echo "$_s $(dd if="$1" bs=512 skip=$((_o / 512)) count=$((_l / 512)) 2>/dev/null | sha256sum | cut -c1-16)"
	done
}
unaligned_blkdiscard() {
	memhog gen random 4242 $DC_BYTES >/tmp/dc.img
	connect dc -b 512 || return 1
	dd if=/tmp/dc.img of="$DEV" bs=1048576 conv=fsync 2>/dev/null || { fail "writing dc failed"; return 1; }
	disconnect
	seg_sums /tmp/dc.img >/tmp/dc.want
	connect dc -b 512 || return 1
	_gran=$(cat /sys/block/nbd0/queue/discard_granularity)
	[ "$_gran" -le 512 ] || { fail "discard granularity $_gran: the ranges would be rounded"; return 1; }
	seg_sums "$DEV" >/tmp/dc.before
	cmp -s /tmp/dc.want /tmp/dc.before || { fail "dc data wrong before any discard"; return 1; }
	for _r in $DC_RANGES; do
		blkdiscard -o "${_r%:*}" -l "${_r#*:}" "$DEV" || { fail "blkdiscard $_r failed"; return 1; }
	done
	disconnect
	connect dc -b 512 || return 1
	seg_sums "$DEV" >/tmp/dc.after
	disconnect
	if ! cmp -s /tmp/dc.want /tmp/dc.after; then
		diff /tmp/dc.want /tmp/dc.after | head -n 6 | while read -r l; do info "dc: $l"; done
		fail "blkdiscard changed sectors outside its ranges"
		return 1
	fi
	FIG="$FIG blkdiscard_ranges=$(echo $DC_RANGES | wc -w) discard_granularity=$_gran outside_segments_ok=$(wc -l </tmp/dc.want)"
}

# ---- scenario 4: reconnect (netlink, then ioctl, then netlink) on export fs
reconnect_round() { # label new-file nbd-client-args...
	_label=$1 _new=$2
	shift 2
	connect fs -b 4096 "$@" || return 1
	fsck_clean || return 1
	mount -t ext2 "$DEV" /mnt || { fail "mount ($_label) failed"; return 1; }
	verify_files /mnt /tmp/sums.fs || return 1
	memhog gen random $((77 + ${#_new})) 300000 >"/mnt/$_new"
	(cd /mnt && sha256sum "$_new") >>/tmp/sums.fs
	umount /mnt || { fail "umount ($_label) failed"; return 1; }
	disconnect || { fail "disconnect ($_label) failed"; return 1; }
}
scenario_reconnect() {
	[ -s /tmp/sums.fs ] || { fail "needs the filesystem of scenario fs"; return 1; }
	reconnect_round netlink r1 || return 1
	reconnect_round ioctl r2 -nonetlink || return 1
	reconnect_round netlink-again r3 || return 1
	connect fs -b 4096 -C 2 || return 1
	fsck_clean || return 1
	mount -t ext2 "$DEV" /mnt && verify_files /mnt /tmp/sums.fs || { fail "final verify failed"; return 1; }
	umount /mnt && disconnect
	FIG="$FIG rounds=4 files=$(wc -l </tmp/sums.fs)"
}

# ---- scenario 6: the server's memory limit on export lim (incompressible 512 KiB chunks)
CHUNK=524288
scenario_memlimit() {
	connect lim -b 4096 || return 1
	_chunks=$(($(nbd_size) * 512 / CHUNK))
	[ $_chunks -gt 256 ] && _chunks=256 # 128 MiB: far past any limit this test sets
	_i=0 _failed=-1
	: >/tmp/lim.sums
	while [ $_i -lt $_chunks ]; do
		memhog gen random $((5000 + _i)) $CHUNK >/tmp/chunk
		if ! dd if=/tmp/chunk of="$DEV" bs=$CHUNK seek=$_i count=1 oflag=direct conv=fsync 2>/tmp/dd.err; then
			_failed=$_i
			info "write of chunk $_i failed: $(head -n 1 /tmp/dd.err)"
			break
		fi
		echo "$_i $(sha256sum </tmp/chunk | cut -c1-64)" >>/tmp/lim.sums
		_i=$((_i + 1))
	done
	[ $_failed -ge 0 ] || { fail "wrote all $_chunks chunks ($((_chunks / 2)) MiB) without an error: no limit?"; return 1; }
	[ $_failed -gt 0 ] || { fail "the very first write failed"; return 1; }
	disconnect
	connect lim -b 4096 || return 1
	_bad=0
	while read -r _c _sum; do
		_got=$(dd if="$DEV" bs=$CHUNK skip="$_c" count=1 2>/dev/null | sha256sum | cut -c1-64)
		[ "$_got" = "$_sum" ] || { _bad=$((_bad + 1)); info "chunk $_c differs after the limit"; }
	done </tmp/lim.sums
	# every page of the failed chunk is either still zero or the new data: never garbage
	_zero=$(dd if=/dev/zero bs=4096 count=1 2>/dev/null | sha256sum | cut -c1-64)
	_p=0 _old=0 _new=0 _garbage=0
	while [ $_p -lt $((CHUNK / 4096)) ]; do
		_got=$(dd if="$DEV" bs=4096 skip=$((_failed * CHUNK / 4096 + _p)) count=1 2>/dev/null | sha256sum | cut -c1-64)
		_want=$(dd if=/tmp/chunk bs=4096 skip=$_p count=1 2>/dev/null | sha256sum | cut -c1-64)
		if [ "$_got" = "$_zero" ]; then _old=$((_old + 1))
		elif [ "$_got" = "$_want" ]; then _new=$((_new + 1))
		else _garbage=$((_garbage + 1)); fi
		_p=$((_p + 1))
	done
	disconnect
	FIG="$FIG ok_chunks=$_failed failed_at_kib=$((_failed * CHUNK / 1024)) failed_chunk_pages_old=$_old new=$_new garbage=$_garbage"
	[ $_bad = 0 ] || { fail "$_bad chunks written before the limit read back wrong"; return 1; }
	[ $_garbage = 0 ] || { fail "$_garbage pages of the failed write read back as garbage"; return 1; }
}

# ---- scenario 5: swap under pressure on export swap
scenario_swap() {
	connect swap -b 4096 || return 1
	mkswap "$DEV" >/dev/null 2>&1 || { fail "mkswap failed"; return 1; }
	swapon --discard "$DEV" || { fail "swapon failed"; return 1; }
	info "zswap enabled=$(cat /sys/module/zswap/parameters/enabled 2>/dev/null) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
	_in0=$(vmstat pswpin) _out0=$(vmstat pswpout) _oom0=$(vmstat oom_kill)
	_t=$(now)
	memhog hog "$HOG_MIB" 12345 sync
	_rc=$?
	grep -E '^(SwapTotal|SwapFree|Zswap|Zswapped|AnonHugePages)' /proc/meminfo | tr -s ' ' | while read -r l; do info "$l"; done
	info "vmstat: $(grep -E '^(thp_swpout|thp_swpout_fallback|swap_ra|zswpout|zswpin) ' /proc/vmstat | tr '\n' ' ')"
	_in=$(($(vmstat pswpin) - _in0)) _out=$(($(vmstat pswpout) - _out0)) _oom=$(($(vmstat oom_kill) - _oom0))
	FIG="$FIG hog_mib=$HOG_MIB ram_mib=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024)) hog_s=$(since "$_t") pswpout=$_out pswpin=$_in oom_kills=$_oom"
	swapoff "$DEV" || { fail "swapoff failed"; return 1; }
	disconnect
	[ $_rc = 0 ] || { fail "memhog exited $_rc (2 = pattern mismatch)"; return 1; }
	[ $_oom = 0 ] || { fail "OOM killer ran $_oom times"; return 1; }
	[ $_out -gt 0 ] || { fail "nothing was swapped out"; return 1; }
	[ $_in -gt 0 ] || { fail "nothing was swapped in"; return 1; }
}

for CUR in $(echo "$RUN" | tr ',' ' '); do
	REASON="" FIG=""
	echo "@@START $CUR"
	T0=$(now)
	if "scenario_$CUR"; then
		echo "@@RESULT $CUR PASS secs=$(since "$T0")$FIG"
	else
		echo "@@RESULT $CUR FAIL secs=$(since "$T0")$FIG reason=\"$REASON\""
		cleanup
	fi
done
echo "@@DONE"
sync
poweroff -f
