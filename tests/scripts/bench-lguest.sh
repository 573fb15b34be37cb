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
# Prints the lines and appends them to build/bench/lguest-<date>.txt.
#
# Usage: bench-lguest.sh [BIN_DIR]   (BIN_DIR default target/release: fakehost, cusedev)
#   BENCH_LGUEST_SECONDS=5   seconds per run
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

dev=(--dev "$work/dev/lguest")
out=$top/build/bench/lguest-$(date +%Y%m%d-%H%M%S).txt
{
    echo "# lguest bench $(date -Is) on $(nproc) CPUs, $(uname -r); FUSE frontend"
    "$launcher" "${dev[@]}" bench "$seconds"
    FAKEHOST_CONTROL=$work/ctl.sock "$bin/fakehost" lguest script \
        "$top/fixtures/lguest/bench-eventfd.guest" >/dev/null
    "$launcher" "${dev[@]}" bench "$seconds" --eventfd
} | tee "$out"
echo "(saved to $out)"
