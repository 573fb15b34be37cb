#!/usr/bin/env bash
# make bench, lguest part: tests/c/lguest-launcher.c (built here with gcc into build/) against
# /dev/lguest served by cusedev serve --frontend fuse, with fakehost serve's fake Guest.
# Measures, in one run:
#   - notify round trips per second: the Guest notifies (bench-read.guest: notify, again, for
#     ever), the Launcher's read returns the address, the Launcher handles it and reads again;
#   - eventfd-signalled notifies per second: the same Guest loop on an address with an eventfd
#     attached (bench-eventfd.guest), counted by a clone()d service process that reads the
#     eventfd, while the Launcher's one read keeps running the Guest;
# each next to a floor measured by the same Launcher process for the same time: a pipe
# ping-pong round trip between it and a clone()d process (two wake-ups, as a notify round trip
# has at best), and the ratio.
# Then the round-trip latency of the FUSE and the preload frontend (docs/preload.md: the same
# Launcher under `cusedev run`, the device seen through the LD_PRELOAD library), in rounds that
# alternate FUSE and preload against the same fakehost, each run with its own pipe floor: µs
# per notify round trip for each, and how many floors that is. The medians end the report.
# Prints the lines and appends them to build/bench/lguest-<date>.txt.
#
# Usage: bench-lguest.sh [BIN_DIR]   (BIN_DIR default target/release: fakehost, cusedev)
#   BENCH_LGUEST_SECONDS=5   seconds per run
#   BENCH_LGUEST_ROUNDS=3    FUSE/preload rounds of the latency comparison
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)
. "$top/tests/scripts/lib.sh"
in_private_mount_namespace "$0" "$@"

seconds=${BENCH_LGUEST_SECONDS:-5}
mkdir -p "$top/build/bench"
launcher=$top/build/lguest-launcher
gcc -O2 -std=gnu11 -Wall -Wextra -Werror -pthread -o "$launcher" "$top/tests/c/lguest-launcher.c"

work=$(mktemp -d /dev/shm/cusedev-bench-lguest.XXXXXX)
trap 'rig_stop; umount -l "$work/dev/lguest" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/dev"
"$bin/fakehost" serve --listen "unix:$work/bus.sock" --control "$work/ctl.sock" \
    --lguest-guest "$top/fixtures/lguest/bench-read.guest" 2>"$work/fakehost.log" &
rig_pids+=($!)
wait_for_line "$work/fakehost.log" listening
"$bin/cusedev" serve --host "unix:$work/bus.sock" --frontend fuse \
    --dev-root "$work/dev" 2>"$work/cusedev.log" &
rig_pids+=($!)
wait_for_line "$work/cusedev.log" "serving /dev/lguest"

"$bin/fakehost" serve --listen "unix:$work/preload-bus.sock" \
    --control "$work/preload-ctl.sock" \
    --lguest-guest "$top/fixtures/lguest/bench-read.guest" 2>"$work/preload-fakehost.log" &
rig_pids+=($!)
wait_for_line "$work/preload-fakehost.log" listening

dev=(--dev "$work/dev/lguest")
rounds=${BENCH_LGUEST_ROUNDS:-3}
rows=$work/latency.rows

# latency_row FRONTEND ROUND LINE: from the Launcher's `bench read-round-trips ... rate R/s
# floor F/s ...` line, µs per round trip, the floor's µs per pipe round trip, and how many
# floors a round trip is; remembered for the summary.
latency_row() {
    local frontend=$1 round=$2 line=$3
    echo "$line" | awk -v fe="$frontend" -v r="$round" -v rows="$rows" '
        $1 == "bench" && $2 == "read-round-trips" {
            rate = $8; floor = $10; sub("/s", "", rate); sub("/s", "", floor)
            us = 1e6 / rate; fus = 1e6 / floor
            printf "latency %-7s round %d: %.2f us per round trip, floor %.2f us, %.2f x floor (%s ops)\n", fe, r, us, fus, us / fus, $4
            printf "%s %f %f\n", fe, us, fus >> rows
            found = 1
        }
        END { if (!found) { print "latency " fe " round " r ": no bench line: " $0; exit 1 } }'
}

# summary: the median µs per round trip of each frontend and of its floors, and the ratios.
summary() {
    awk '
        function median(list, n,    i, j, t) {
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && list[j - 1] > list[j]; j--) {
                    t = list[j]; list[j] = list[j - 1]; list[j - 1] = t
                }
            return n % 2 ? list[(n + 1) / 2] : (list[n / 2] + list[n / 2 + 1]) / 2
        }
        { n[$1]++; us[$1, n[$1]] = $2; fl[$1, n[$1]] = $3 }
        END {
            for (fe in n) {
                for (i = 1; i <= n[fe]; i++) { a[i] = us[fe, i]; b[i] = fl[fe, i] }
                m[fe] = median(a, n[fe]); f[fe] = median(b, n[fe])
            }
            printf "latency median: fuse %.2f us (%.2f x floor), preload %.2f us (%.2f x floor), floor %.2f us; preload / fuse %.2f\n", m["fuse"], m["fuse"] / f["fuse"], m["preload"], m["preload"] / f["preload"], (f["fuse"] + f["preload"]) / 2, m["preload"] / m["fuse"]
        }' "$rows"
}
out=$top/build/bench/lguest-$(date +%Y%m%d-%H%M%S).txt
{
    echo "# lguest bench $(date -Is) on $(nproc) CPUs, $(uname -r); FUSE frontend"
    "$launcher" "${dev[@]}" bench "$seconds"
    FAKEHOST_CONTROL=$work/ctl.sock "$bin/fakehost" lguest script \
        "$top/fixtures/lguest/bench-eventfd.guest" >/dev/null
    "$launcher" "${dev[@]}" bench "$seconds" --eventfd

    # The latency comparison: bench-read.guest again, FUSE and preload alternated, each
    # frontend with a fakehost of its own (a host serves one guest at a time).
    FAKEHOST_CONTROL=$work/ctl.sock "$bin/fakehost" lguest script \
        "$top/fixtures/lguest/bench-read.guest" >/dev/null
    echo "# round-trip latency, FUSE and preload alternated: $rounds rounds of $seconds s"
    for round in $(seq "$rounds"); do
        line=$("$launcher" "${dev[@]}" bench "$seconds")
        latency_row fuse "$round" "$line"
        # cusedev run serves the host's devices to the Launcher alone; its log goes to a file.
        line=$("$bin/cusedev" run --host "unix:$work/preload-bus.sock" \
            --preload-dir "$work/preload-$round" -- \
            "$launcher" --dev /dev/lguest bench "$seconds" 2>>"$work/cusedev-run.log") ||
            { echo "cusedev run failed:" >&2; cat "$work/cusedev-run.log" >&2; exit 1; }
        latency_row preload "$round" "$line"
    done
    summary
} | tee "$out"
echo "(saved to $out)"
