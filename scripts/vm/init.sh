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
# lim (memory limit), swap, wb and nobd (swap with and without a backing store).

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
	raid_cleanup
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
fsck_clean() { # [DEVICE], default $DEV
	if e2fsck -fn "${1:-$DEV}" >/tmp/fsck.out 2>&1; then
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

# ---- the memory hog on swap, shared by swap, swapwb, swapnobd and raid0swap
# the first line a swap I/O error writes to the kernel log (the NBD client's line for an error
# reply comes first: the block layer's and swap's own lines can lag it by minutes)
SWAP_ERR_RE="nbd[0-9]+: (Other side returned error|Connection timed out|Dead connection)|(Write|Read)-error on swap-device|I/O error, dev (nbd|md)[0-9]+"
swap_io_errors() { dmesg | grep -cE "$SWAP_ERR_RE"; }
HOG_CG=/sys/fs/cgroup/hog
# hog_cgroup MIB: a memory cgroup of MIB MiB for the hog (cgroup v2, made once per boot)
hog_cgroup() {
	if [ ! -d $HOG_CG ]; then
		mkdir -p /sys/fs/cgroup
		mount -t cgroup2 none /sys/fs/cgroup || { fail "mounting cgroup2 failed"; return 1; }
		echo +memory >/sys/fs/cgroup/cgroup.subtree_control || { fail "no memory controller"; return 1; }
		mkdir $HOG_CG
	fi
	echo "$(($1 * 1048576))" >$HOG_CG/memory.max || { fail "setting memory.max failed"; return 1; }
}
# hog_on_swap SWAPDEV MIB SEED CGROUP_MIB: mkswap + swapon SWAPDEV, run the memory hog of MIB
# MiB (sync CUR-mid after its write pass, CUR-after when it ended), swapoff, and check: the hog
# verified every page, no swap I/O error, no OOM kill, pages went out to swap and came back.
# CGROUP_MIB 0 puts the whole guest under pressure; otherwise the hog runs in a memory cgroup of
# that size, so that a swap device that fails its writes stalls only the hog, not the guest.
# The first new swap I/O error ends the hog: a watcher forked with the hog blocks on /dev/kmsg
# (a guest whose swap-outs fail may fork nothing more, and the kernel would retry its failed
# writes for many minutes); a line of our own, unique to this run, ends the watcher when the
# hog ends first. The console shows only emergencies meanwhile (thousands of error lines slow
# the guest).
hog_on_swap() {
	_sdev=$1 _mib=$2 _seed=$3 _cg=$4
	mkswap "$_sdev" >/dev/null 2>&1 || { fail "mkswap $_sdev failed"; return 1; }
	swapon --discard "$_sdev" || { fail "swapon $_sdev failed"; return 1; }
	if [ "$_cg" -gt 0 ]; then hog_cgroup "$_cg" || { swapoff "$_sdev"; return 1; }; fi
	dmesg -n 1
	_in0=$(vmstat pswpin) _out0=$(vmstat pswpout) _oom0=$(vmstat oom_kill)
	_t=$(now)
	_done="zramd-vm: hog of $CUR ended at $_t"
	# /dev/kmsg is read from the oldest record on, as dmesg is (never cleared in this boot): the
	# watcher and the count skip the errors already there
	_err0=$(swap_io_errors)
	rm -f /tmp/hog.err
	if [ "$_cg" -gt 0 ]; then
		sh -c "echo \$\$ >$HOG_CG/cgroup.procs && exec memhog hog $_mib $_seed sync $CUR-mid" </dev/console &
	else
		memhog hog "$_mib" "$_seed" sync "$CUR-mid" </dev/console &
	fi
	_hog=$!
	(
		_l=$(grep -m $((_err0 + 1)) -E "$SWAP_ERR_RE|$_done" /dev/kmsg | tail -n 1)
		case "$_l" in *"$_done"*) ;; *) kill -9 $_hog; since "$_t" >/tmp/hog.err; info "hog killed on: ${_l#*;}" ;; esac
	) 2>/dev/null &
	_watch=$!
	wait $_hog
	_rc=$?
	echo "$_done" >/dev/kmsg
	wait $_watch
	_hog_s=$(since "$_t")
	_first_err=$(cat /tmp/hog.err 2>/dev/null || echo none)
	dmesg -n 4
	sync_host "$CUR-after"
	_err=$(($(swap_io_errors) - _err0))
	_in=$(($(vmstat pswpin) - _in0)) _out=$(($(vmstat pswpout) - _out0)) _oom=$(($(vmstat oom_kill) - _oom0))
	FIG="$FIG hog_mib=$_mib ram_mib=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024)) cgroup_mib=$_cg hog_s=$_hog_s pswpout=$_out pswpin=$_in oom_kills=$_oom swap_io_errors=$_err first_error_s=$_first_err"
	[ "$_err" = 0 ] || dmesg | grep -E "$SWAP_ERR_RE" | tail -n +$((_err0 + 1)) | head -n 3 | while read -r l; do info "dmesg: $l"; done
	swapoff "$_sdev" || { fail "swapoff $_sdev failed"; return 1; }
	[ "$_err" = 0 ] || { fail "$_err swap I/O errors"; return 1; }
	[ $_rc = 0 ] || { fail "memhog exited $_rc (2 = pattern mismatch, 137 = killed)"; return 1; }
	[ $_oom = 0 ] || { fail "OOM killer ran $_oom times"; return 1; }
	[ $_out -gt 0 ] && [ $_in -gt 0 ] || { fail "no swap traffic (out=$_out in=$_in)"; return 1; }
}

# ---- scenario 5: swap under pressure on export swap (the whole guest under pressure)
# swap_hog EXPORT MIB SEED CGROUP_MIB: hog_on_swap on /dev/nbd0 attached to EXPORT
swap_hog() {
	connect "$1" -b 4096 || return 1
	hog_on_swap "$DEV" "$2" "$3" "$4"
	_hrc=$?
	disconnect
	return $_hrc
}
scenario_swap() { swap_hog swap "$HOG_MIB" 12345 0; }

# ---- writeback (issue 12): swap on an export whose memory limit (64 MiB) is far below what the
# hog (WB_HOG_MIB, twice the guest's memory) pushes into swap. swapwb: export wb has a backing
# file, so the hog must complete with every page verified and no swap I/O error; swapnobd:
# export nobd has none, so the server refuses writes and the guest shows swap I/O errors (the
# harness expects that scenario to FAIL with swap_io_errors > 0). Both run the hog in a memory
# cgroup of WB_CG_MIB, so that swapnobd's failing swap-outs stall the hog and not the guest.
WB_HOG_MIB=512
WB_CG_MIB=96
scenario_swapwb() { swap_hog wb "$WB_HOG_MIB" 6789 "$WB_CG_MIB"; }
scenario_swapnobd() { swap_hog nobd "$WB_HOG_MIB" 6790 "$WB_CG_MIB"; }

# ---- md across two servers (issue 16): the second server is the guestfwd on PORT_B.
# Members: /dev/nbd1 /dev/nbd2 (raid0 on export r0), /dev/nbd3 (one server alone: export one),
# /dev/nbd4 /dev/nbd5 (striped swap: export sw), /dev/nbd6 /dev/nbd7 (raid1: export r1);
# server A is PORT, server B is PORT_B. Every member has -C 2 and the short -t RAID_TIMEOUT:
# a member whose server died must fail its requests, so md marks it faulty (never -persist).
PORT_B=10810
RAID_TIMEOUT=15
RAID_FILES=100
RAID_HOG_MIB=256
RAID_CG_MIB=96
BENCH_MIB=64
mdadm() { /sbin/mdadm "$@" </dev/null; }

# member N PORT EXPORT [TIMEOUT]: attach /dev/nbdN with two connections and -t TIMEOUT (default
# RAID_TIMEOUT), wait until it has a size
member() {
	_hn=$1 _hport=$2 _hexp=$3 _hto=${4:-$RAID_TIMEOUT}
	if ! nbd_client "$SERVER" "$_hport" "/dev/nbd$_hn" -N "$_hexp" -b 4096 -t "$_hto" -C 2 >/tmp/nbd.out 2>&1; then
		cat /tmp/nbd.out
		fail "nbd-client $_hexp on port $_hport failed: $(tail -n 1 /tmp/nbd.out)"
		return 1
	fi
	_hi=0
	while [ "$(cat "/sys/block/nbd$_hn/size")" = 0 ]; do
		_hi=$((_hi + 1))
		[ $_hi -gt 100 ] && { fail "nbd$_hn has no size after connect"; return 1; }
		sleep 0.1
	done
	_hc=$(ls "/sys/block/nbd$_hn/mq" | wc -l)
	[ "$_hc" = 2 ] || { fail "nbd$_hn uses $_hc connections, not 2"; return 1; }
}
unmember() {
	for _hn in "$@"; do
		nbd_client -d "/dev/nbd$_hn" >/dev/null 2>&1
		_hi=0
		while [ "$(cat "/sys/block/nbd$_hn/size")" != 0 ]; do
			_hi=$((_hi + 1))
			[ $_hi -gt 100 ] && { info "nbd$_hn still sized after disconnect"; break; }
			sleep 0.1
		done
	done
}
# md_create MD LEVEL COUNT [mdadm args and members...]: --create; mdadm's output shown on failure
md_create() {
	_hmd=$1 _hlvl=$2 _hcnt=$3
	shift 3
	if ! mdadm --create "/dev/$_hmd" --run --level="$_hlvl" --raid-devices="$_hcnt" "$@" >/tmp/md.out 2>&1; then
		while read -r l; do info "mdadm: $l"; done </tmp/md.out
		fail "mdadm --create $_hmd level $_hlvl failed"
		return 1
	fi
}
mdstat_of() { grep -A 3 "^$1 :" /proc/mdstat | tr -s ' \n' ' '; }
# md_wait MD REGEX SECS: wait until the array's /proc/mdstat lines match; the wait in WAITED
md_wait() {
	_ht=$(now)
	while ! mdstat_of "$1" | grep -qE "$2"; do
		WAITED=$(since "$_ht")
		if [ "${WAITED%.*}" -ge "$3" ]; then
			info "mdstat $1 after ${WAITED}s: $(mdstat_of "$1")"
			return 1
		fi
		sleep 0.2
	done
	WAITED=$(since "$_ht")
}
md_stop() { mdadm --stop "/dev/$1" >/dev/null 2>&1; }
raid_cleanup() {
	swapoff /dev/md2 2>/dev/null
	umount /mnt 2>/dev/null
	echo >/tmp/bg.stop
	for _hmd in md0 md1 md2; do md_stop $_hmd; done
	unmember 1 2 3 4 5 6 7
}
# mibs MIB T0: MiB/s since uptime T0 (two decimals: the clock's resolution)
mibs() { awk -v m="$1" -v a="$2" -v b="$(now)" 'BEGIN { printf "%.1f", m / (b - a) }'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b ? a : b) }'; }
# bench DEV: write BENCH_MIB MiB of text with O_DIRECT, then read it back; MiB/s in BW BR
bench() {
	_ht=$(now)
	_hk=0
	while [ $_hk -lt "$BENCH_MIB" ]; do
		dd if=/tmp/bench.dat of="$1" bs=1M seek=$_hk oflag=direct 2>/dev/null || return 1
		_hk=$((_hk + 32))
	done
	BW=$(mibs "$BENCH_MIB" "$_ht")
	_ht=$(now)
	dd if="$1" of=/dev/null bs=1M count="$BENCH_MIB" iflag=direct 2>/dev/null || return 1
	BR=$(mibs "$BENCH_MIB" "$_ht")
}

# ---- raid0 over both servers: throughput against one server, then ext2, files, fsck, fstrim
scenario_raid0() {
	member 1 "$PORT" r0 && member 2 "$PORT_B" r0 && member 3 "$PORT" one || return 1
	md_create md0 0 2 /dev/nbd1 /dev/nbd2 || return 1
	md_wait md0 "active raid0" 10 || { fail "md0 not active"; return 1; }
	mdstat_of md0 | grep "nbd1\[0\]" | grep -q "nbd2\[1\]" || { fail "md0 lacks a member: $(mdstat_of md0)"; return 1; }
	memhog gen text 31 33554432 >/tmp/bench.dat
	# two rounds, alternating; the better of each (the machine is shared)
	_w1=0 _r1=0 _w2=0 _r2=0
	for _round in 1 2; do
		bench /dev/nbd3 || { fail "dd on one server failed"; return 1; }
		_w1=$(best "$_w1" "$BW") _r1=$(best "$_r1" "$BR")
		bench /dev/md0 || { fail "dd on md0 failed"; return 1; }
		_w2=$(best "$_w2" "$BW") _r2=$(best "$_r2" "$BR")
	done
	FIG="$FIG one_server_write_mibs=$_w1 one_server_read_mibs=$_r1 raid0_write_mibs=$_w2 raid0_read_mibs=$_r2"
	rm -f /tmp/bench.dat
	unmember 3
	mkfs_ext2 -q -F -b 4096 /dev/md0 >/tmp/mkfs.out 2>&1 || { cat /tmp/mkfs.out; fail "mkfs.ext2 on md0 failed"; return 1; }
	mount -t ext2 /dev/md0 /mnt || { fail "mount md0 failed"; return 1; }
	make_files /mnt "$RAID_FILES" 3 /tmp/sums.r0 || { fail "writing files failed"; return 1; }
	FIG="$FIG files=$(wc -l </tmp/sums.r0) du_kib=$(du_kib /mnt)"
	umount /mnt || { fail "umount md0 failed"; return 1; }
	drop_caches
	fsck_clean /dev/md0 || return 1
	mount -t ext2 /dev/md0 /mnt || { fail "remount md0 failed"; return 1; }
	verify_files /mnt /tmp/sums.r0 || return 1
	sync_host raid0-written
	awk 'NR % 2 == 0 { print $2 }' /tmp/sums.r0 | while read -r f; do rm -f "/mnt/$f"; done
	awk 'NR % 2 == 1' /tmp/sums.r0 >/tmp/sums.r0.new && mv /tmp/sums.r0.new /tmp/sums.r0
	sync
	_out=$(fstrim -v /mnt 2>&1) || { info "$_out"; fail "fstrim on md0 failed"; return 1; }
	info "fstrim: $_out"
	sync
	sync_host raid0-trimmed
	drop_caches
	verify_files /mnt /tmp/sums.r0 || return 1
	umount /mnt || { fail "umount md0 failed"; return 1; }
	fsck_clean /dev/md0 || return 1
	md_stop md0 || { fail "mdadm --stop md0 failed"; return 1; }
	unmember 1 2
}

# ---- swap striped over both servers, the hog in a memory cgroup of RAID_CG_MIB (with the whole
# guest under pressure, one CI run's guest stopped answering its NBD sockets for 60 s: a member
# timed out, and the watcher, starved too, never ended the hog); the members get the long
# TIMEOUT: a stall under memory pressure must not fail a member, as -t RAID_TIMEOUT would (only
# raid1 needs to detect a dead server quickly)
scenario_raid0swap() {
	member 4 "$PORT" sw "$TIMEOUT" && member 5 "$PORT_B" sw "$TIMEOUT" || return 1
	md_create md2 0 2 /dev/nbd4 /dev/nbd5 || return 1
	hog_on_swap /dev/md2 "$RAID_HOG_MIB" 4321 "$RAID_CG_MIB"
	_hrc=$?
	md_stop md2 || { fail "mdadm --stop md2 failed"; return 1; }
	unmember 4 5
	return $_hrc
}

# bg_writer DIR SUMS: 256 KiB files (fsync'd) into DIR until /tmp/bg.stop exists; sha256 in SUMS
bg_writer() {
	_i=0
	while [ ! -e /tmp/bg.stop ]; do
		memhog gen random $((900000 + _i)) 262144 >/tmp/bg.chunk
		dd if=/tmp/bg.chunk of="$1/g$_i" bs=65536 conv=fsync 2>/dev/null || exit 1
		echo "$(sha256sum </tmp/bg.chunk | cut -c1-64)  g$_i" >>"$2"
		_i=$((_i + 1))
	done
}
# md_settled MD: wait for the array's resync/recovery to finish ([UU], no progress bar)
md_settled() {
	md_wait "$1" "\[UU\]" 600 || return 1
	_ht=$(now)
	while [ "$(cat "/sys/block/$1/md/sync_action")" != idle ]; do
		[ "$(since "$_ht" | cut -d. -f1)" -ge 600 ] && return 1
		sleep 0.2
	done
}

# ---- raid1 with a write-intent bitmap: kill A mid-write, restart it empty, add, resync, kill B
scenario_raid1() {
	rm -f /tmp/bg.stop
	member 6 "$PORT" r1 && member 7 "$PORT_B" r1 || return 1
	# both exports are fresh (all zero): no initial resync needed. B is write-mostly, so reads
	# come from A while both are in: the reads after A's death are the survivor's own data.
	md_create md1 1 2 --bitmap=internal --bitmap-chunk=4M --assume-clean /dev/nbd6 --write-mostly /dev/nbd7 || return 1
	md_wait md1 "\[2/2\] \[UU\]" 10 || { fail "md1 not [UU]"; return 1; }
	mdstat_of md1 | grep -q "nbd7\[1\](W)" || { fail "nbd7 not write-mostly: $(mdstat_of md1)"; return 1; }
	mkfs_ext2 -q -F -b 4096 /dev/md1 >/tmp/mkfs.out 2>&1 || { cat /tmp/mkfs.out; fail "mkfs.ext2 on md1 failed"; return 1; }
	mount -t ext2 /dev/md1 /mnt || { fail "mount md1 failed"; return 1; }
	mkdir /mnt/a /mnt/bg
	make_files /mnt/a "$RAID_FILES" 5 /tmp/sums.a || { fail "writing files failed"; return 1; }
	: >/tmp/sums.bg
	: >/tmp/sums.a.extra
	bg_writer /mnt/bg /tmp/sums.bg &
	_bg=$!
	while [ "$(wc -l </tmp/sums.bg)" -lt 4 ]; do sleep 0.2; done
	sync_host raid1-kill-a
	md_wait md1 "nbd6\[0\]\(F\)" 120 || { fail "md did not mark nbd6 faulty after its server was killed"; return 1; }
	FIG="$FIG detect_s=$WAITED"
	_n=$(wc -l </tmp/sums.bg)
	_t=$(now)
	while [ "$(wc -l </tmp/sums.bg)" -lt $((_n + 4)) ]; do
		[ "$(since "$_t" | cut -d. -f1)" -ge 120 ] && break
		sleep 0.2
	done
	echo >/tmp/bg.stop
	wait $_bg || { fail "a write failed after server A was killed"; return 1; }
	FIG="$FIG bg_files=$(wc -l </tmp/sums.bg) bg_after_fault=$(($(wc -l </tmp/sums.bg) - _n))"
	grep -q " /mnt ext2 rw" /proc/mounts || { fail "md1 is no longer mounted read-write"; return 1; }
	mdstat_of md1 | grep -qE "\[2/1\] \[_U\]" || { fail "md1 not degraded [_U]: $(mdstat_of md1)"; return 1; }
	drop_caches
	verify_files /mnt/a /tmp/sums.a && verify_files /mnt/bg /tmp/sums.bg || return 1
	sync_host raid1-restart-a
	# a faulty member leaves once its requests ended (the in-flight ones after -t)
	_t=$(now)
	until mdadm /dev/md1 --remove /dev/nbd6 >/dev/null 2>&1; do
		[ "$(since "$_t" | cut -d. -f1)" -ge $((RAID_TIMEOUT * 3)) ] && { fail "mdadm --remove nbd6 refused"; return 1; }
		sleep 0.5
	done
	unmember 6
	member 6 "$PORT" r1 || return 1
	# the restarted server is empty: a --re-add (bitmap-only resync) must be refused
	if mdadm /dev/md1 --re-add /dev/nbd6 >/dev/null 2>&1; then
		fail "mdadm --re-add accepted an empty member"
		return 1
	fi
	mdadm /dev/md1 --add /dev/nbd6 >/tmp/md.out 2>&1 || { fail "mdadm --add nbd6 failed: $(cat /tmp/md.out)"; return 1; }
	_t=$(now)
	md_settled md1 || { fail "md1 recovery did not finish"; return 1; }
	_s=$(since "$_t")
	_bytes=$(($(cat /sys/block/md1/size) * 512))
	FIG="$FIG resync_s=$_s array_mib=$((_bytes >> 20)) used_mib=$(($(du_kib /mnt) / 1024)) resync_s_per_gib=$(awk -v s="$_s" -v b="$_bytes" 'BEGIN { printf "%.0f", s * 1073741824 / b }')"
	echo check >/sys/block/md1/md/sync_action
	sleep 1
	md_settled md1 || { fail "md1 check did not finish"; return 1; }
	_mm=$(cat /sys/block/md1/md/mismatch_cnt)
	FIG="$FIG mismatch_cnt=$_mm"
	# a mismatch fails the scenario, which still goes on to read everything from A alone
	[ "$_mm" = 0 ] || fail "md check: the members differ in $_mm sectors after the resync"
	sync_host raid1-resynced
	# B drops out and comes back with its data: the bitmap resyncs only what changed meanwhile
	mdadm /dev/md1 --fail /dev/nbd7 --remove /dev/nbd7 >/dev/null 2>&1 || { fail "mdadm --fail --remove nbd7 failed"; return 1; }
	memhog gen random 4711 8388608 >/mnt/while-b-out
	(cd /mnt && sha256sum while-b-out) >>/tmp/sums.a.extra
	sync
	mdadm /dev/md1 --re-add /dev/nbd7 >/tmp/md.out 2>&1 || { fail "mdadm --re-add nbd7 failed: $(cat /tmp/md.out)"; return 1; }
	_t=$(now)
	md_settled md1 || { fail "md1 bitmap resync did not finish"; return 1; }
	FIG="$FIG bitmap_resync_s=$(since "$_t")"
	awk 'NR % 2 == 0 { print $2 }' /tmp/sums.a | while read -r f; do rm -f "/mnt/a/$f"; done
	awk 'NR % 2 == 1' /tmp/sums.a >/tmp/sums.a.new && mv /tmp/sums.a.new /tmp/sums.a
	sync
	_out=$(fstrim -v /mnt 2>&1) || { info "$_out"; fail "fstrim on md1 failed"; return 1; }
	info "fstrim: $_out"
	sync
	sync_host raid1-trimmed
	sync_host raid1-kill-b
	_t=$(now)
	memhog gen random 4712 1048576 >/mnt/after-b
	(cd /mnt && sha256sum after-b) >>/tmp/sums.a.extra
	sync
	md_wait md1 "nbd7\[1\](\(W\))?\(F\)" 120 || { fail "md did not mark nbd7 faulty after its server was killed"; return 1; }
	FIG="$FIG detect_b_s=$(since "$_t")"
	grep -q " /mnt ext2 rw" /proc/mounts || { fail "md1 is no longer mounted read-write"; return 1; }
	drop_caches
	if ! { verify_files /mnt/a /tmp/sums.a && verify_files /mnt/bg /tmp/sums.bg && verify_files /mnt /tmp/sums.a.extra; }; then
		FIG="$FIG survivor_a_verify=bad"
		return 1
	fi
	FIG="$FIG survivor_a_verify=ok"
	umount /mnt || { fail "umount md1 failed"; return 1; }
	fsck_clean /dev/md1 || return 1
	md_stop md1
	unmember 6 7
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
