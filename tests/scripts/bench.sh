#!/usr/bin/env bash
# make bench: 1 GiB copied by Debian's unmodified hv_fcopy_daemon through cusedev (FUSE), and
# the same byte count written by `dd bs=6k` to the same tmpfs as the floor. Usage: bench.sh BIN_DIR
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)

. "$top/tests/scripts/lib.sh"
in_private_mount_namespace "$0" "$bin"
work=$top/build/bench
rm -rf "$work"; mkdir -p "$work/src" "$work/guest"
mount -t tmpfs -o size=1100m tmpfs "$work/src"
mount -t tmpfs -o size=2200m tmpfs "$work/guest"
trap rig_stop EXIT

bytes=$((1 << 30))
head -c "$bytes" /dev/urandom > "$work/src/big.iso"
rig_start "$bin" "$work"

now() { date +%s.%N; }
t0=$(now)
"$bin/fakehost" copy "$work/src/big.iso" "$work/guest/" >"$work/copy.out"
t1=$(now)
cmp "$work/src/big.iso" "$work/guest/big.iso"
t1b=$(now)
dd if="$work/src/big.iso" of="$work/guest/dd.bin" bs=6k status=none
t2=$(now)

awk -v b="$bytes" -v t0="$t0" -v t1="$t1" -v t1b="$t1b" -v t2="$t2" 'BEGIN {
    c = t1 - t0; d = t2 - t1b;
    mc = b / c / 1e6; md = b / d / 1e6;
    printf "1 GiB via hv_fcopy_daemon + cusedev (FUSE): %8.1f MB/s  (%.2f s)\n", mc, c;
    printf "1 GiB via dd bs=6k to the same tmpfs:        %8.1f MB/s  (%.2f s)\n", md, d;
    printf "ratio (cusedev / dd floor):                  %8.3f\n", mc / md;
}'
cat "$work/copy.out"
