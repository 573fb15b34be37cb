#!/usr/bin/env bash
# make bench, xs_fastpath part: tests/c/xs-client.c (built here with gcc into build/) against
# /dev/azure_xs_fastpath served by cusedev serve --frontend fuse, with fakehost serve's XStore
# host over a blob root on tmpfs. Measures, in one run:
#   - small requests (64-byte GETs, request/response one page each): ops/s with 1 and with
#     16 client threads (xs-client bench, BENCH_XS_SECONDS each);
#   - 32 MiB-class data buffers (32 MiB - 12 KiB: the largest GET the 8192-page cap allows
#     with one request and one response page): GB/s of GET into the caller's buffer, next to
#     memcpy of the same size measured by the same client process (the floor), and the ratio
#     (xs-client bench-big, BENCH_XS_ROUNDS rounds).
# Prints the lines and appends them to build/bench/xs-<date>.txt.
#
# Usage: bench-xs.sh [BIN_DIR]   (BIN_DIR default target/release: fakehost, cusedev)
#   BENCH_XS_SECONDS=5   seconds per small-request run
#   BENCH_XS_ROUNDS=10   32 MiB GETs
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)
. "$top/tests/scripts/lib.sh"
in_private_mount_namespace "$0" "$@"

seconds=${BENCH_XS_SECONDS:-5}
rounds=${BENCH_XS_ROUNDS:-10}
mkdir -p "$top/build/bench"
client=$top/build/xs-client
gcc -O2 -std=gnu11 -Wall -Wextra -Werror -pthread -o "$client" "$top/tests/c/xs-client.c"

work=$(mktemp -d /dev/shm/cusedev-bench-xs.XXXXXX)
trap 'rig_stop; umount -l "$work/dev/azure_xs_fastpath" "$work/dev/vmbus" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/dev" "$work/blobs"
"$bin/fakehost" serve --listen "unix:$work/bus.sock" --control "$work/ctl.sock" \
    --blob-root "$work/blobs" 2>"$work/fakehost.log" &
rig_pids+=($!)
wait_for_line "$work/fakehost.log" listening
"$bin/cusedev" serve --host "unix:$work/bus.sock" --frontend fuse --dev-root "$work/dev" \
    2>"$work/cusedev.log" &
rig_pids+=($!)
wait_for_line "$work/cusedev.log" "serving /dev/azure_xs_fastpath"

dev=(--dev "$work/dev/azure_xs_fastpath")
out=$top/build/bench/xs-$(date +%Y%m%d-%H%M%S).txt
{
    echo "# xs_fastpath bench $(date -Is) on $(nproc) CPUs, $(uname -r); FUSE frontend, blob root on tmpfs"
    "$client" "${dev[@]}" bench --threads 1 --seconds "$seconds"
    "$client" "${dev[@]}" bench --threads 16 --seconds "$seconds"
    "$client" "${dev[@]}" bench-big --bytes $((32 * 1024 * 1024 - 12 * 1024)) --rounds "$rounds"
} | tee "$out"
echo "(saved to $out)"
