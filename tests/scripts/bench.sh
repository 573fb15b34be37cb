#!/usr/bin/env bash
# make bench, host part: Debian's unmodified hv_fcopy_daemon receives one random file onto tmpfs
#   P  through the project: fakehost serve + cusedev serve --frontend fuse + the daemon, driven
#      by `fakehost copy` (as `make demo` does);
#   F  through the floor: bench/fcopy-floor.c, one single-threaded libfuse3 process that serves
#      /dev/vmbus/hv_fcopy and plays the host itself (built here with gcc into build/).
# In one run, alternated P F P F ..., BENCH_ROUNDS rounds each, first unpinned, then with every
# process of the data path pinned to CPU BENCH_CPU (taskset). Every copy is checked with cmp
# against its source. Then one untimed counting round per mode counts syscalls. Prints a table
# (medians) and appends it with the per-run lines to build/bench/fcopy-<date>.txt; the last
# line is the old `dd bs=6k` figure to the same tmpfs.
#
# Usage: bench.sh [BIN_DIR]   (BIN_DIR default target/release: fakehost, cusedev)
#   BENCH_BYTES=1G         bytes per timed copy (plain bytes or K/M/G, IEC)
#   BENCH_ROUNDS=3         timed copies per side and mode (the median is shown)
#   BENCH_COUNT_BYTES=64M  bytes of the counting copies (at most BENCH_BYTES)
#   BENCH_CPU=1            the CPU of the pinned mode
#   BENCH_SYSCALLS=auto    perf | strace | auto (perf if `perf stat -e raw_syscalls:sys_enter`
#                          works, else strace)
#
# What is counted (per fragment: divided by bytes / 6144, DATA_FRAGMENT):
#   MB/s: bytes / seconds / 1e6. P: wall time of the `fakehost copy` client process (spawn to
#     exit: connect, START ... COMPLETE answered); F: the floor's own clock from the start byte
#     (just before it builds START) to the daemon's status for COMPLETE.
#   wake-ups (timed runs): voluntary + nonvoluntary context switches of every thread of every
#     process of the data path. Long-lived processes (P: fakehost serve, cusedev, the daemon;
#     F: the floor, the daemon): /proc/PID/task/*/status summed just before the copy starts
#     (after the daemon registered) and just after it ended (P: the client exited; F: the floor
#     reported "idle", i.e. it has the daemon's next read in hand and waits on stdin). Threads
#     created in between count in full; one that exits in between takes its counts along (the
#     run prints a warning naming it). The client (exits): getrusage of the child via /usr/bin/time (%w + %c), all its
#     threads over its whole life.
#   syscalls (counting runs, never timed): perf stat -e raw_syscalls:sys_enter -p PID per
#     long-lived process (all threads, children inherited), enabled and disabled through perf's
#     control FIFO around the copy, and `perf stat -- fakehost copy` for the client; or, with
#     strace, `strace -f -c -p PID` attached around the copy and `strace -f -c` for the client
#     (the "total" calls) until the processes exit, so a few dozen syscalls of their teardown
#     count too (strace cannot detach from a daemon asleep in a FUSE read). The daemon's
#     syscalls count on both sides.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)

. "$top/tests/scripts/lib.sh"

die() {
    echo "bench: $*" >&2
    exit 1
}

size_of() { # VALUE NAME: bytes
    local n
    n=$(numfmt --from=iec "$1" 2>/dev/null) || die "$2=$1 is not a size (bytes, or with K, M, G)"
    [ "$n" -ge 1 ] || die "$2=$1 must be at least 1 byte"
    echo "$n"
}
bytes=$(size_of "${BENCH_BYTES:-1G}" BENCH_BYTES)
count_bytes=$(size_of "${BENCH_COUNT_BYTES:-64M}" BENCH_COUNT_BYTES)
[ "$count_bytes" -le "$bytes" ] || count_bytes=$bytes
rounds=${BENCH_ROUNDS:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS=$rounds is not a positive integer"
cpu=${BENCH_CPU:-1}
syscalls=${BENCH_SYSCALLS:-auto}
case $syscalls in auto | perf | strace) ;; *) die "BENCH_SYSCALLS=$syscalls: use perf, strace or auto" ;; esac
for b in fakehost cusedev; do
    [ -x "$bin/$b" ] || die "$bin/$b is missing (cargo build --release --workspace --bins)"
done
[ -x /usr/sbin/hv_fcopy_daemon ] || die "/usr/sbin/hv_fcopy_daemon is missing (make deps)"
floor=$top/build/fcopy-floor

apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to install: $*"
    echo "bench: installing $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

perf_works() {
    command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1
}

# Outside the namespace: install what is missing, build the floor.
if [ -z "${CUSEDEV_IN_NAMESPACE:-}" ]; then
    need=()
    command -v gcc >/dev/null || need+=(gcc)
    command -v pkg-config >/dev/null || need+=(pkg-config)
    pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
    command -v fusermount3 >/dev/null || need+=(fuse3)
    command -v taskset >/dev/null || need+=(util-linux)
    command -v cmp >/dev/null || need+=(diffutils)
    [ -x /usr/bin/time ] || need+=(time)
    case $syscalls in
        auto | perf) command -v perf >/dev/null || need+=(linux-perf) ;;
        strace) command -v strace >/dev/null || need+=(strace) ;;
    esac
    [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
    taskset -c "$cpu" true 2>/dev/null || die "BENCH_CPU=$cpu: cannot pin to that CPU"

    mkdir -p "$top/build"
    # shellcheck disable=SC2046 # pkg-config prints several words
    gcc -O2 -Wall -Wextra -Werror -o "$floor" "$top/bench/fcopy-floor.c" \
        $(pkg-config --cflags --libs fuse3) || die "cannot build the floor (bench/fcopy-floor.c)"
fi
in_private_mount_namespace "$0" "$bin"

# --- inside the private mount namespace -------------------------------------------------------

# The syscall counter. perf resolves tracepoints through tracefs: mount one for this namespace
# when none is there (it goes away with the namespace).
if [ "$syscalls" != strace ] && ! perf_works && command -v perf >/dev/null &&
    ! grep -q ' tracefs ' /proc/self/mounts; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if [ "$syscalls" = auto ]; then
    if perf_works; then syscalls=perf; else
        echo "bench: perf stat -e raw_syscalls:sys_enter does not work here; counting with strace" >&2
        syscalls=strace
    fi
fi
if [ "$syscalls" = perf ]; then
    perf_works || die "perf stat -e raw_syscalls:sys_enter true fails: $(perf stat -e raw_syscalls:sys_enter true 2>&1 | tail -1)"
else
    command -v strace >/dev/null || apt_install strace
fi

out=$top/build/bench
work=$out/fcopy
logs=$work/logs
report=$out/fcopy-$(date +%F).txt
rm -rf "$work"
mkdir -p "$work/src" "$work/guest" "$logs"
# src: the timed file and the counting file; guest: one copy at a time.
mount -t tmpfs -o size=$((((bytes + count_bytes) >> 20) + 16))m tmpfs "$work/src"
mount -t tmpfs -o size=$(((bytes >> 20) + 16))m tmpfs "$work/guest"
vmbus_mounts() { awk '$2 == "/dev/vmbus"' /proc/self/mounts | wc -l; }
vmbus_base=$(vmbus_mounts)

# Every process we start is in `live` until it has been reaped; the EXIT trap ends those.
live=()
forget() {
    local p keep=()
    for p in "${live[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    live=("${keep[@]}")
}
stop() { # PID...: SIGTERM, reap (their exit status is not ours to judge here)
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do
        wait "$p" 2>/dev/null || true
        forget "$p"
    done
}
cleanup() {
    [ ${#live[@]} -eq 0 ] || stop "${live[@]}"
    exec 9>&- 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# await LOG TEXT PID [SECONDS]: until LOG has a line containing TEXT; fails at once if PID exits
# first, and after SECONDS (default 60).
await() {
    local file=$1 text=$2 pid=$3 limit=${4:-60} i
    for ((i = 0; i < limit * 10; i++)); do
        grep -qF -- "$text" "$file" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            grep -qF -- "$text" "$file" 2>/dev/null && return 0
            echo "bench: process $pid exited before '$text' appeared in $file:" >&2
            cat "$file" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "bench: timed out after $limit s waiting for '$text' in $file:" >&2
    cat "$file" >&2
    exit 1
}
# A copy's time limit: generous (10 s + 1 s per 2 MB, i.e. anything above 2 MB/s).
copy_limit=$((10 + bytes / 2000000))

# Wake-up counters: ctxt PID prints voluntary+nonvoluntary switches summed over PID's threads.
ctxt() {
    [ -d "/proc/$1/task" ] || die "process $1 is gone"
    { cat /proc/"$1"/task/*/status 2>/dev/null || true; } |
        awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}
threads() { ls "/proc/$1/task" | sort -n | tr '\n' ' '; }
declare -A w_before w_threads
wake_start() { # NAME=PID...
    local np
    for np in "$@"; do
        w_before[$np]=$(ctxt "${np#*=}")
        w_threads[$np]=$(threads "${np#*=}")
    done
}
wake_end() { # NAME=PID...: sets wake_total and wake_detail (per process)
    local np now th t
    wake_total=0 wake_detail=""
    for np in "$@"; do
        now=$(ctxt "${np#*=}")
        th=" $(threads "${np#*=}")"
        for t in ${w_threads[$np]}; do
            [[ $th == *" $t "* ]] ||
                echo "bench: warning: thread $t of ${np%%=*} exited during the copy: its switches are not counted" >&2
        done
        wake_total=$((wake_total + now - w_before[$np]))
        wake_detail+=" ${np%%=*} $((now - w_before[$np]))"
    done
}
rusage_wakeups() { # /usr/bin/time -f '%w %c' output (its last line)
    tail -n 1 "$1" | awk 'NF == 2 { print $1 + $2; ok = 1 } END { if (!ok) exit 1 }' ||
        die "cannot read the client's rusage from $1"
}

# Syscall counters: count_start PREFIX NAME=PID... attaches one counter per process.
c_names=() c_pids=() c_ctl=() c_ack=()
count_start() {
    local prefix=$1 np name pid ctl ack fd_c fd_a reply
    shift
    c_names=() c_pids=() c_ctl=() c_ack=()
    for np in "$@"; do
        name=${np%%=*} pid=${np#*=}
        if [ "$syscalls" = perf ]; then
            ctl=$prefix.$name.perf-ctl ack=$prefix.$name.perf-ack
            mkfifo "$ctl" "$ack"
            exec {fd_c}<>"$ctl" {fd_a}<>"$ack"
            perf stat -x, -e raw_syscalls:sys_enter -D -1 --control "fifo:$ctl,$ack" -p "$pid" \
                -o "$prefix.$name.perf" 2>"$prefix.$name.perf-err" &
            live+=($!)
            c_pids+=($!) c_ctl+=("$fd_c") c_ack+=("$fd_a")
            echo enable >&"$fd_c"
            read -r -t 30 -u "$fd_a" reply || die "perf for $name ($pid) did not start: $(cat "$prefix.$name.perf-err")"
            [ "$reply" = ack ] || die "perf for $name answered '$reply' to enable"
        else
            strace -f -c -o "$prefix.$name.strace" -p "$pid" 2>"$prefix.$name.strace-err" &
            live+=($!)
            c_pids+=($!)
            await "$prefix.$name.strace-err" attached $!
        fi
        c_names+=("$prefix.$name")
    done
}
syscalls_in() { # a perf -x, or strace -c output file: the count
    if [ "$syscalls" = perf ]; then
        awk -F, '$3 ~ /raw_syscalls:sys_enter/ { ok = 1; if ($1 ~ /^[0-9]+$/) s += $1 }
                 END { if (!ok) exit 1; print s + 0 }' "$1"
    else
        awk '$NF == "total" { print $4; ok = 1 } END { if (!ok) exit 1 }' "$1"
    fi || die "no syscall count in $1: $(cat "$1" 2>/dev/null)"
}
# count_pause: perf stops counting now; strace goes on until its processes exit (detaching
# would need them stopped, and the daemon sleeps in a FUSE read that only the server ends).
count_pause() {
    local i reply
    [ "$syscalls" = perf ] || return 0
    for i in "${!c_pids[@]}"; do
        echo disable >&"${c_ctl[$i]}"
        read -r -t 30 -u "${c_ack[$i]}" reply || die "perf ${c_names[$i]} did not answer disable"
        kill -INT "${c_pids[$i]}"
    done
}
# count_collect (after the processes stopped): sys_total and sys_detail (per process).
count_collect() {
    local i n fd_c fd_a
    sys_total=0 sys_detail=""
    for i in "${!c_pids[@]}"; do
        wait "${c_pids[$i]}" 2>/dev/null || true
        forget "${c_pids[$i]}"
        if [ "$syscalls" = perf ]; then
            fd_c=${c_ctl[$i]} fd_a=${c_ack[$i]}
            exec {fd_c}>&- {fd_a}>&-
            rm -f "${c_names[$i]}.perf-ctl" "${c_names[$i]}.perf-ack"
        fi
        n=$(syscalls_in "${c_names[$i]}.$syscalls")
        sys_total=$((sys_total + n))
        sys_detail+=" ${c_names[$i]##*.} $n"
    done
}

check_output() { # SRC: the guest's copy must be byte-identical, then it goes
    local dst=$work/guest/${1##*/}
    cmp "$1" "$dst" || die "$dst differs from $1"
    rm -f "$dst"
}
check_unmounted() {
    if [ "$(vmbus_mounts)" -gt "$vmbus_base" ]; then
        echo "bench: warning: a mount was left on /dev/vmbus; unmounting it" >&2
        umount -l /dev/vmbus
    fi
}

# run_project MODE KIND LABEL SRC: one copy through fakehost + cusedev + the daemon.
# KIND time: sets secs, wake_total, wake_detail; KIND count: sets sys_total, sys_detail.
run_project() {
    local mode=$1 kind=$2 label=$3 src=$4 l=$logs/$3 pin=() fh cd dm t0 t1 rc=0
    [ "$mode" = pinned ] && pin=(taskset -c "$cpu")
    export FAKEHOST_CONTROL=$work/ctl.sock
    rm -f "$work/bus.sock" "$work/ctl.sock"
    RUST_LOG=${RUST_LOG:-info} "${pin[@]}" "$bin/fakehost" serve --listen "unix:$work/bus.sock" \
        --control "$work/ctl.sock" 2>"$l.fakehost.log" &
    fh=$!
    live+=($fh)
    await "$l.fakehost.log" listening $fh
    RUST_LOG=${RUST_LOG:-info} "${pin[@]}" "$bin/cusedev" serve --host "unix:$work/bus.sock" \
        --frontend fuse 2>"$l.cusedev.log" &
    cd=$!
    live+=($cd)
    await "$l.cusedev.log" "serving /dev/vmbus/hv_fcopy" $cd
    "${pin[@]}" /usr/sbin/hv_fcopy_daemon -n </dev/null 2>"$l.daemon.log" &
    dm=$!
    live+=($dm)
    await "$l.cusedev.log" registered $cd
    kill -0 $dm 2>/dev/null || die "the daemon exited at registration: $(cat "$l.daemon.log")"

    local procs=(fakehost=$fh cusedev=$cd daemon=$dm)
    if [ "$kind" = time ]; then
        wake_start "${procs[@]}"
        t0=$EPOCHREALTIME
        "${pin[@]}" /usr/bin/time -f '%w %c' -o "$l.client.rusage" \
            "$bin/fakehost" copy "$src" "$work/guest/" >"$l.copy.out" 2>"$l.copy.err" || rc=$?
        t1=$EPOCHREALTIME
        wake_end "${procs[@]}"
    elif [ "$syscalls" = perf ]; then
        count_start "$l" "${procs[@]}"
        "${pin[@]}" perf stat -x, -e raw_syscalls:sys_enter -o "$l.client.perf" -- \
            "$bin/fakehost" copy "$src" "$work/guest/" >"$l.copy.out" 2>"$l.copy.err" || rc=$?
        count_pause
    else
        count_start "$l" "${procs[@]}"
        "${pin[@]}" strace -f -c -o "$l.client.strace" \
            "$bin/fakehost" copy "$src" "$work/guest/" >"$l.copy.out" 2>"$l.copy.err" || rc=$?
        count_pause
    fi
    # (perf stat exits 0 whatever its workload did: the result line and cmp decide.)
    [ "$rc" = 0 ] && grep -q '^copied ' "$l.copy.out" ||
        die "$label: fakehost copy failed (exit $rc): $(cat "$l.copy.out" "$l.copy.err")"
    stop $dm # one at a time, each before what it uses: no errors from a vanishing peer
    stop $cd
    stop $fh
    [ "$kind" = time ] || count_collect
    check_unmounted
    check_output "$src"
    if [ "$kind" = time ]; then
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
        local n
        n=$(rusage_wakeups "$l.client.rusage")
        wake_total=$((wake_total + n))
        wake_detail+=" client $n"
    else
        local n
        n=$(syscalls_in "$l.client.$syscalls")
        sys_total=$((sys_total + n))
        sys_detail+=" client $n"
    fi
}

# run_floor MODE KIND LABEL SRC: one copy through the floor + the daemon (same outputs).
run_floor() {
    local mode=$1 kind=$2 label=$3 src=$4 l=$logs/$3 pin=() fl dm rc=0
    [ "$mode" = pinned ] && pin=(taskset -c "$cpu")
    rm -f "$work/go"
    mkfifo "$work/go"
    exec 9<>"$work/go" # the start and exit bytes; holding it open means no EOF
    "${pin[@]}" "$floor" "$src" "$work/guest/" <"$work/go" >"$l.floor.log" 2>&1 9>&- &
    fl=$!
    live+=($fl)
    await "$l.floor.log" "serving /dev/vmbus/hv_fcopy" $fl
    "${pin[@]}" /usr/sbin/hv_fcopy_daemon -n </dev/null 2>"$l.daemon.log" 9>&- &
    dm=$!
    live+=($dm)
    await "$l.floor.log" registered $fl
    kill -0 $dm 2>/dev/null || die "the daemon exited at registration: $(cat "$l.daemon.log")"

    local procs=(floor=$fl daemon=$dm)
    if [ "$kind" = time ]; then wake_start "${procs[@]}"; else count_start "$l" "${procs[@]}"; fi
    printf g >&9 # one byte: start (the floor reads one byte per wait)
    await "$l.floor.log" idle $fl "$copy_limit"
    if [ "$kind" = time ]; then wake_end "${procs[@]}"; else count_pause; fi
    printf x >&9
    wait $fl || rc=$?
    forget $fl
    exec 9>&-
    rm -f "$work/go"
    [ "$rc" = 0 ] || die "$label: the floor failed (exit $rc): $(cat "$l.floor.log")"
    stop $dm # it exits by itself when the node goes (open fails); if not yet, now
    [ "$kind" = time ] || count_collect
    check_unmounted
    check_output "$src"
    secs=$(sed -n 's/.*complete: .* \([0-9.]*\) s, .*/\1/p' "$l.floor.log")
    [ -n "$secs" ] || die "$label: no time in $l.floor.log"
}

# --- the runs -----------------------------------------------------------------------------------
frag() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 6144 }'; }
echo "== fcopy: project (fakehost + cusedev FUSE + daemon) vs floor (fcopy-floor + daemon)"
echo "   $bytes bytes ($(frag "$bytes") fragments of 6144) x $rounds rounds per side and mode; syscalls: $syscalls over $count_bytes bytes"
head -c "$bytes" /dev/urandom >"$work/src/big.iso"
head -c "$count_bytes" "$work/src/big.iso" >"$work/src/count.iso"
runs=$work/runs.txt
: >"$runs"
for mode in unpinned pinned; do
    for ((r = 1; r <= rounds; r++)); do
        for side in P F; do
            label=$mode-$side$r
            if [ $side = P ]; then run_project $mode time "$label" "$work/src/big.iso"; else
                run_floor $mode time "$label" "$work/src/big.iso"
            fi
            line=$(awk -v m=$mode -v s=$side -v r="$r" -v b="$bytes" -v t="$secs" -v w="$wake_total" \
                'BEGIN { printf "%-8s %s%-2d %8.1f MB/s %9.3f s  wake-ups/fragment %6.2f", m, s, r, b / t / 1e6, t, w / (b / 6144) }')
            echo "$line  ($wake_detail )" | tee -a "$runs"
        done
    done
    for side in P F; do
        label=$mode-$side-count
        if [ $side = P ]; then run_project $mode count "$label" "$work/src/count.iso"; else
            run_floor $mode count "$label" "$work/src/count.iso"
        fi
        awk -v m=$mode -v s=$side -v b="$count_bytes" -v n="$sys_total" -v d="$sys_detail" \
            'BEGIN { printf "%-8s %s syscalls/fragment %6.2f  (%s )\n", m, s, n / (b / 6144), d }' | tee -a "$runs"
    done
done

# dd bs=6k to the same tmpfs, for orientation (the old floor).
t0=$EPOCHREALTIME
dd if="$work/src/big.iso" of="$work/guest/dd.bin" bs=6k status=none
t1=$EPOCHREALTIME
rm -f "$work/guest/dd.bin"

awk -v b="$bytes" -v rounds="$rounds" -v cpu="$cpu" -v t0="$t0" -v t1="$t1" -v tool="$syscalls" '
function median(key,   n, i, j, t, v) {
    n = cnt[key]
    for (i = 1; i <= n; i++) v[i] = val[key, i]
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
function put(key, x) { val[key, ++cnt[key]] = x }
/MB\/s/ { side = substr($2, 1, 1); put($1 SUBSEP side SUBSEP "mbs", $3); put($1 SUBSEP side SUBSEP "wake", $8) }
/syscalls\/fragment/ { put($1 SUBSEP $2 SUBSEP "sys", $4) }
END {
    printf "\n%-15s | %-30s | %-30s\n", "", "unpinned", "pinned (taskset -c " cpu ")"
    printf "%-15s | %8s %10s %10s | %8s %10s %10s\n", "", "MB/s", "wake/frag", "sysc/frag", "MB/s", "wake/frag", "sysc/frag"
    for (s = 1; s <= 2; s++) {
        side = s == 1 ? "P" : "F"
        printf "%-15s |", side == "P" ? "project" : "floor"
        for (m = 1; m <= 2; m++) {
            mode = m == 1 ? "unpinned" : "pinned"
            r[side, mode, "mbs"] = median(mode SUBSEP side SUBSEP "mbs")
            r[side, mode, "wake"] = median(mode SUBSEP side SUBSEP "wake")
            r[side, mode, "sys"] = median(mode SUBSEP side SUBSEP "sys")
            printf " %8.1f %10.2f %10.2f |", r[side, mode, "mbs"], r[side, mode, "wake"], r[side, mode, "sys"]
        }
        printf "\n"
    }
    printf "%-15s |", "project/floor"
    for (m = 1; m <= 2; m++) {
        mode = m == 1 ? "unpinned" : "pinned"
        printf " %8.3f %10.2f %10.2f |", r["P", mode, "mbs"] / r["F", mode, "mbs"], r["P", mode, "wake"] / r["F", mode, "wake"], r["P", mode, "sys"] / r["F", mode, "sys"]
    }
    printf "\n(medians of %d; MB/s = 1e6 bytes/s; per fragment = per 6144 bytes; syscalls by %s)\n", rounds, tool
    printf "dd bs=6k to the same tmpfs (unpinned, once): %.1f MB/s\n", b / (t1 - t0) / 1e6
}' "$runs" | tee "$work/table.txt"
{
    echo "== $(date -Is) fcopy bench: $bytes bytes, $rounds rounds, syscalls by $syscalls over $count_bytes bytes"
    cat "$runs" "$work/table.txt"
} >>"$report"
echo "(appended to $report; logs in $logs)"
