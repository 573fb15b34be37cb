#!/usr/bin/env bash
# make soak: the whole project under a steady mixed load for SOAK_SECONDS, then every copy
# checked and every long-lived process checked for flatness (docs/soak.md).
#
# One fakehost serve and one cusedev serve (FUSE) serve /dev/vmbus/hv_fcopy,
# /dev/azure_xs_fastpath and /dev/lguest at once; Debian's unmodified hv_fcopy_daemon
# receives the copies; the XStore host keeps its blobs in Azurite (build/node, the store the
# device tests use for Azure Blob). Three loops run in parallel:
#   copies    fakehost copy of a fresh random file (0 B .. SOAK_MAX_BYTES, many sizes around
#             the 6 KiB fragment, some names non-ASCII) into the guest directory; each copy's
#             sha256 is checked against its source as it goes, then both are deleted;
#   xs        tests/c/xs-client.c: `load` (4 threads, every answer checked against the
#             client's model), its blobs listed and removed through the device, and every
#             4th round a `big` put + get of up to 4 MiB compared byte for byte;
#   launcher  tests/c/lguest-launcher.c `pingpong 1000` against fixtures/lguest/pingpong.guest,
#             alternately through reads and through an eventfd.
# soak-sampler (tests/src/bin/soak-sampler/) records RSS, threads (the FUSE engine's readers
# apart) and descriptors of fakehost, cusedev, the daemon and Azurite every SOAK_INTERVAL
# seconds into build/soak/samples.csv. The order:
#   warm-up   the three loops for SOAK_WARMUP seconds;
#   settle    the loops stopped, wait (bounded) until the servers are quiet: baseline.csv;
#   soak      the three loops for SOAK_SECONDS;
#   drain     the loops stopped, wait (bounded) until the servers are quiet and back at the
#             baseline: end.csv;
# then the summary: runs and failures per loop (failures and sha256 mismatches must be 0) and
# per process baseline vs end with the flatness rule of soak-sampler's rule.rs. Exit status 1
# if any check fails. The summary is also saved to build/soak/summary.txt.
#
# Everything runs in its own mount, network and PID namespaces: the FUSE mounts vanish with
# the run, Azurite's port is on a loopback of our own, and whatever the script started dies
# with it (the script is PID 1 of the namespace) even if it is killed.
#
# Usage: soak.sh [BIN_DIR]   (BIN_DIR default target/release: fakehost, cusedev, soak-sampler)
#   SOAK_SECONDS=600     length of the soak phase
#   SOAK_WARMUP          length of the warm-up (default SOAK_SECONDS/10, at least 10)
#   SOAK_INTERVAL=2      seconds between samples
#   SOAK_MAX_BYTES=8M    largest copied file (bytes or K/M/G, IEC)
#   SOAK_SETTLE=15       seconds the servers must stay unchanged to count as quiet
#   SOAK_SETTLE_LIMIT=120  at most this long to get there
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)
. "$top/tests/scripts/lib.sh"

if [ -z "${CUSEDEV_IN_NAMESPACE:-}" ]; then
    exec env CUSEDEV_IN_NAMESPACE=1 unshare --mount --propagation private --net \
        --pid --fork --kill-child --mount-proc "$0" "$@"
fi

die() {
    echo "soak: $*" >&2
    exit 1
}
whole() { # VALUE NAME: VALUE if it is a whole number >= 1
    [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2=$1 is not a whole number of at least 1"
    echo "$1"
}
seconds=$(whole "${SOAK_SECONDS:-600}" SOAK_SECONDS)
default_warmup=$((seconds / 10 > 10 ? seconds / 10 : 10))
warmup=$(whole "${SOAK_WARMUP:-$default_warmup}" SOAK_WARMUP)
interval=$(whole "${SOAK_INTERVAL:-2}" SOAK_INTERVAL)
settle=$(whole "${SOAK_SETTLE:-15}" SOAK_SETTLE)
settle_limit=$(whole "${SOAK_SETTLE_LIMIT:-120}" SOAK_SETTLE_LIMIT)
max_bytes=$(numfmt --from=iec "${SOAK_MAX_BYTES:-8M}" 2>/dev/null) \
    || die "SOAK_MAX_BYTES=${SOAK_MAX_BYTES:-} is not a size"
[ "$max_bytes" -ge 2097152 ] || die "SOAK_MAX_BYTES must be at least 2M (the MB-class copies)"
for b in fakehost cusedev soak-sampler; do
    [ -x "$bin/$b" ] || die "$bin/$b is missing (cargo build --release --workspace --bins)"
done
[ -x /usr/sbin/hv_fcopy_daemon ] || die "/usr/sbin/hv_fcopy_daemon is missing (make deps)"
azurite=$top/build/node/node_modules/.bin/azurite-blob
[ -x "$azurite" ] || "$top/fakehost/scripts/install-azurite.sh"

work=$top/build/soak
rm -rf "$work"
mkdir -p "$work/src" "$work/guest" "$work/azurite" "$work/logs"
logs=$work/logs
phase_file=$work/phase
export FAKEHOST_CONTROL=$work/ctl.sock

loop_pids=()
sampler_pid=
cleanup() {
    for pid in "${loop_pids[@]}" $sampler_pid; do kill "$pid" 2>/dev/null || true; done
    rig_stop
}
trap cleanup EXIT

ip link set lo up

echo "== building the clients (gcc) into $work"
gcc -O2 -std=gnu11 -Wall -Wextra -Werror -pthread -o "$work/xs-client" "$top/tests/c/xs-client.c"
gcc -O2 -std=gnu11 -Wall -Wextra -Werror -pthread -o "$work/lguest-launcher" \
    "$top/tests/c/lguest-launcher.c"

echo "== starting Azurite, fakehost, cusedev (FUSE) and /usr/sbin/hv_fcopy_daemon -n (logs in $logs)"
port=10000
"$azurite" --blobHost 127.0.0.1 --blobPort "$port" --location "$work/azurite" --silent \
    </dev/null >"$logs/azurite.log" 2>&1 &
azurite_pid=$!
rig_pids+=("$azurite_pid")
for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$azurite_pid" 2>/dev/null || die "Azurite exited: $(cat "$logs/azurite.log")"
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "Azurite's port $port never opened"

# Put Container, signed with Azurite's well-known development key (Shared Key: the verb, 11
# empty standard headers, the x-ms- headers, the canonical resource).
account=devstoreaccount1
key=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==
container=soak
date=$(LC_ALL=C TZ=GMT date '+%a, %d %b %Y %H:%M:%S GMT')
version=2021-08-06
to_sign=$(printf 'PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:%s\nx-ms-version:%s\n/%s/%s/%s\nrestype:container' \
    "$date" "$version" "$account" "$account" "$container")
hexkey=$(printf %s "$key" | base64 -d | od -An -v -tx1 | tr -d ' \n')
signature=$(printf %s "$to_sign" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hexkey" -binary | base64)
code=$(curl -s -o "$logs/container.txt" -w '%{http_code}' -X PUT -H 'Content-Length: 0' \
    -H "x-ms-date: $date" -H "x-ms-version: $version" \
    -H "Authorization: SharedKey $account:$signature" \
    "http://127.0.0.1:$port/$account/$container?restype=container")
[ "$code" = 201 ] || die "Azurite refused Put Container ($code): $(cat "$logs/container.txt")"

RUST_LOG=${RUST_LOG:-info} "$bin/fakehost" serve --listen "unix:$work/bus.sock" \
    --control "$work/ctl.sock" \
    --blob-store "azure://$account/$container?endpoint=http://127.0.0.1:$port/$account" \
    --lguest-guest "$top/fixtures/lguest/pingpong.guest" 2>"$logs/fakehost.log" &
fakehost_pid=$!
rig_pids+=("$fakehost_pid")
wait_for_line "$logs/fakehost.log" listening
RUST_LOG=${RUST_LOG:-info} "$bin/cusedev" serve --host "unix:$work/bus.sock" --frontend fuse \
    2>"$logs/cusedev.log" &
cusedev_pid=$!
rig_pids+=("$cusedev_pid")
for node in vmbus/hv_fcopy azure_xs_fastpath lguest; do
    wait_for_line "$logs/cusedev.log" "serving /dev/$node ("
done
/usr/sbin/hv_fcopy_daemon -n </dev/null 2>"$logs/daemon.log" &
daemon_pid=$!
rig_pids+=("$daemon_pid")
wait_for_line "$logs/cusedev.log" registered
procs=(fakehost="$fakehost_pid" cusedev="$cusedev_pid" hv_fcopy_daemon="$daemon_pid"
    azurite="$azurite_pid")

# ---------------------------------------------------------------- the three loops
# Each runs until its deadline (Unix seconds) and writes one line per run to its log:
# "ok ..." or "FAIL ..." (copies also "MISMATCH ...").

# A file size: tiny (0 included), within two bytes of a multiple of the 6 KiB fragment, up to
# 256 KiB, up to 1 MiB, or 1 MiB .. max_bytes.
pick_size() {
    case $((SRANDOM % 8)) in
    0) echo $((SRANDOM % 64)) ;;
    1) echo $((6144 * (1 + SRANDOM % 8) + SRANDOM % 5 - 2)) ;;
    2 | 3) echo $((SRANDOM % 262144)) ;;
    4 | 5) echo $((SRANDOM % 1048576)) ;;
    *) echo $((1048576 + SRANDOM % (max_bytes - 1048576 + 1))) ;;
    esac
}

copy_loop() { # DEADLINE LOG
    local deadline=$1 n=0 size name want got code
    while [ "$(date +%s)" -lt "$deadline" ]; do
        n=$((n + 1))
        size=$(pick_size)
        # Every third name is not ASCII (UTF-16 on the wire, UTF-8 on the guest's disk).
        if [ $((n % 3)) = 0 ]; then name="soak é ✓ $n.bin"; else name="soak-$n.bin"; fi
        head -c "$size" /dev/urandom >"$work/src/$name"
        want=$(sha256sum <"$work/src/$name" | cut -d' ' -f1)
        code=0
        "$bin/fakehost" copy "$work/src/$name" "$work/guest/" >>"$logs/copy.out" 2>&1 || code=$?
        if [ "$code" != 0 ]; then
            echo "FAIL $n $size fakehost copy exited $code"
        elif ! got=$(sha256sum <"$work/guest/$name" 2>/dev/null | cut -d' ' -f1) || [ -z "$got" ]; then
            echo "FAIL $n $size the guest has no $name"
        elif [ "$got" != "$want" ]; then
            echo "MISMATCH $n $size $want $got"
        else
            echo "ok $n $size"
        fi
        rm -f "$work/src/$name" "$work/guest/$name"
    done >>"$2"
}

xs_loop() { # DEADLINE LOG
    local deadline=$1 n=0 out names name bytes requests
    local xs=("$work/xs-client")
    while [ "$(date +%s)" -lt "$deadline" ]; do
        n=$((n + 1))
        if out=$("${xs[@]}" load --threads 4 --ops 250 --seed "$n" 2>>"$logs/xs.err"); then
            # "load: ... put P get G stat S ls L rm R; ..."
            requests=$(sed -E 's/.*put ([0-9]+) get ([0-9]+) stat ([0-9]+) ls ([0-9]+) rm ([0-9]+);.*/\1+\2+\3+\4+\5/' <<<"$out")
            echo "ok load $n $((requests)) requests: $out"
        else
            echo "FAIL load $n: $out"
        fi
        # What the load left in the store goes, through the device: its model starts empty.
        if names=$("${xs[@]}" ls load/ 2>>"$logs/xs.err"); then
            echo "ok ls $n 1 requests"
            for name in $names; do
                if "${xs[@]}" rm "$name" >/dev/null 2>>"$logs/xs.err"; then
                    echo "ok rm $n 1 requests"
                else
                    echo "FAIL rm $n $name"
                fi
            done
        else
            echo "FAIL ls $n"
        fi
        if [ $((n % 4)) = 0 ]; then
            bytes=$((1 + SRANDOM % 4194304))
            if "${xs[@]}" big --bytes "$bytes" >/dev/null 2>>"$logs/xs.err" \
                && "${xs[@]}" rm "big/$bytes-bytes" >/dev/null 2>>"$logs/xs.err"; then
                echo "ok big $n 3 requests: $bytes bytes"
            else
                echo "FAIL big $n $bytes bytes"
            fi
        fi
    done >>"$2"
}

launcher_loop() { # DEADLINE LOG
    local deadline=$1 n=0 out mode
    while [ "$(date +%s)" -lt "$deadline" ]; do
        n=$((n + 1))
        mode=()
        [ $((n % 2)) = 0 ] && mode=(--eventfd)
        if out=$("$work/lguest-launcher" pingpong 1000 "${mode[@]}" 2>>"$logs/launcher.err"); then
            echo "ok $n ${mode[*]:-read} $(tr '\n' ' ' <<<"$out")"
        else
            echo "FAIL $n ${mode[*]:-read} $(tr '\n' ' ' <<<"$out")"
        fi
    done >>"$2"
}

run_loops() { # SECONDS PHASE
    local deadline=$(($(date +%s) + $1))
    echo "$2" >"$phase_file"
    loop_pids=()
    copy_loop "$deadline" "$logs/copies-$2.log" &
    loop_pids+=($!)
    xs_loop "$deadline" "$logs/xs-$2.log" &
    loop_pids+=($!)
    launcher_loop "$deadline" "$logs/launcher-$2.log" &
    loop_pids+=($!)
    wait "${loop_pids[@]}"
    loop_pids=()
}

failed=0
fail() {
    echo "soak: FAILED: $*" >&2
    failed=1
}

echo warmup >"$phase_file"
"$bin/soak-sampler" sample --out "$work/samples.csv" --phase-file "$phase_file" \
    --interval "$interval" "${procs[@]}" 2>"$logs/sampler.log" &
sampler_pid=$!
echo "== warm-up: the three loops for $warmup s"
run_loops "$warmup" warmup
echo "== waiting for the servers to be quiet (unchanged for $settle s): the baseline"
echo settle >"$phase_file"
"$bin/soak-sampler" settle --out "$work/baseline.csv" --phase baseline --window "$settle" \
    --limit "$settle_limit" "${procs[@]}" || fail "no quiet baseline"
echo "== soak: the three loops for $seconds s ($(date -Is))"
run_loops "$seconds" soak
echo "== waiting for the servers to be quiet and back at the baseline"
echo drain >"$phase_file"
"$bin/soak-sampler" settle --out "$work/end.csv" --phase end --baseline "$work/baseline.csv" \
    --window "$settle" --limit "$settle_limit" "${procs[@]}" || fail "not back at the baseline"
echo stop >"$phase_file"
wait "$sampler_pid" || fail "the sampler stopped: $(cat "$logs/sampler.log")"
sampler_pid=
for p in "${procs[@]}"; do
    kill -0 "${p#*=}" 2>/dev/null || fail "${p%%=*} is gone"
done

# ---------------------------------------------------------------- the summary
count() { # PATTERN FILE...: lines matching
    cat "${@:2}" 2>/dev/null | grep -c -E "$1" || true
}
sum_field() { # AWK-FIELD PATTERN FILE...: sum of that field over matching lines (%.0f: mawk's
    # %d stops at 2^31 - 1)
    cat "${@:3}" 2>/dev/null | awk -v f="$1" "/$2/ { s += \$f } END { printf \"%.0f\", s }"
}
summary() {
    local phase copies xs_logs launcher_logs
    echo "# soak $(date -Is) on $(nproc) CPUs ($(uname -r)): SOAK_SECONDS=$seconds, warm-up $warmup s, samples every $interval s"
    printf '%-9s %-12s %8s %9s %11s  %s\n' phase loop runs failures mismatches detail
    for phase in warmup soak; do
        copies=$logs/copies-$phase.log
        xs_logs=$logs/xs-$phase.log
        launcher_logs=$logs/launcher-$phase.log
        printf '%-9s %-12s %8d %9d %11d  %s\n' "$phase" copies "$(count '^(ok|FAIL|MISMATCH) ' "$copies")" \
            "$(count '^FAIL ' "$copies")" "$(count '^MISMATCH ' "$copies")" \
            "$(numfmt --to=iec "$(sum_field 3 '^ok ' "$copies")")B copied and checked by sha256"
        printf '%-9s %-12s %8d %9d %11s  %s\n' "$phase" xs-requests "$(sum_field 4 '^ok ' "$xs_logs")" \
            "$(count '^FAIL ' "$xs_logs")" - \
            "$(count '^ok load ' "$xs_logs") loads (mismatches $(sed -nE 's/.*mismatches ([0-9]+).*/\1/p' "$xs_logs" | awk '{s+=$1} END {print s+0}')), $(count '^ok big ' "$xs_logs") big put+get"
        printf '%-9s %-12s %8d %9d %11s  %s\n' "$phase" launcher "$(count '^(ok|FAIL) ' "$launcher_logs")" \
            "$(count '^FAIL ' "$launcher_logs")" - \
            "$(sum_field 5 '^ok ' "$launcher_logs") notify/IRQ round trips"
    done
}
summary | tee "$work/summary.txt"
for phase in warmup soak; do
    for log in copies xs launcher; do
        n=$(count '^(FAIL|MISMATCH) ' "$logs/$log-$phase.log")
        [ "$n" = 0 ] || fail "$log ($phase): $n failed runs, e.g. $(grep -m1 -E '^(FAIL|MISMATCH) ' "$logs/$log-$phase.log")"
        [ "$(count '^ok ' "$logs/$log-$phase.log")" -gt 0 ] || fail "$log ($phase): no run completed"
    done
done
echo | tee -a "$work/summary.txt"
"$bin/soak-sampler" report --samples "$work/samples.csv" --baseline "$work/baseline.csv" \
    --end "$work/end.csv" 2>&1 | tee -a "$work/summary.txt" || fail "a process did not stay flat"
echo "(summary in $work/summary.txt, samples in $work/samples.csv)"
[ "$failed" = 0 ] || exit 1
echo "== soak passed"
