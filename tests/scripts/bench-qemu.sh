#!/usr/bin/env bash
# make bench, QEMU part: virtio-vsock through our vhost-user backend (`vhost`) against
# rust-vmm's vhost-device-vsock, same guest image, same run. For each backend the guest
# measures guest->host latency (64 B x 1000) and throughput (64 MiB) against a host
# `vsock-tool serve`, then the host measures host->guest the same way through the backend's
# hybrid-vsock socket. Prints both side by side with the ratio ours/theirs and appends the raw
# lines to build/bench/qemu-<date>.txt. The driver is tests/src/bin/qemu-vsock-bench.rs.
#
# Usage: bench-qemu.sh [BIN_DIR [OPTIONS...]]
#   BIN_DIR  default target/release; must hold vhost, vsock-tool and qemu-vsock-bench, i.e.
#            after `cargo build --release --workspace --bins`
#   OPTIONS  passed to qemu-vsock-bench: --rounds 3 --count 1000 --bytes 64M --cpus 1
#   BENCH_BACKENDS=ours,theirs   which backends to run (default both)
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)
shift || true

# The reference backend, built once into build/cargo-root (a few minutes the first time). The
# version is pinned so figures from different days compare the same code.
vdv_version=0.3.0
cargo_root=$top/build/cargo-root
vdv=$cargo_root/bin/vhost-device-vsock
if ! "$vdv" --version 2>/dev/null | grep -qF "$vdv_version"; then
    echo "bench-qemu: installing vhost-device-vsock $vdv_version into $cargo_root (once)" >&2
    cargo install --locked --quiet vhost-device-vsock --version "$vdv_version" --root "$cargo_root"
fi

backends=${BENCH_BACKENDS:-ours,theirs}
need=(vsock-tool qemu-vsock-bench)
case ,$backends, in *,ours,*) need+=(vhost qemu-fcopy-bench cusedev fakehost wait-log) ;; esac
for b in "${need[@]}"; do
    [ -x "$bin/$b" ] || { echo "bench-qemu: $bin/$b is missing (cargo build --release --workspace --bins)" >&2; exit 1; }
done
# The guest runs vsock-tool from the host's root over 9p, but /run and /dev are the guest's
# own there: a binary under them would not be found.
case $bin/ in
    /run/* | /dev/*) echo "bench-qemu: $bin is not visible in the guest (it mounts its own /run and /dev)" >&2; exit 1 ;;
esac

mkdir -p "$top/build/bench"
# The main job in a guest: boot -> daemon ready, and a copy through CUSE + vsock.
case ,$backends, in
    *,ours,*)
        echo "== fcopy in QEMU: boot -> daemon ready, 20 MB through the daemon (CUSE + our vhost)"
        "$bin/qemu-fcopy-bench" --mb 20 | tee -a "$top/build/bench/qemu-$(date +%F).txt"
        ;;
esac
echo "== vsock: our vhost backend against vhost-device-vsock $vdv_version"
exec "$bin/qemu-vsock-bench" \
    --bin-dir "$bin" \
    --theirs "$vdv" \
    --work "$top/build/bench/qemu-vsock" \
    --raw "$top/build/bench/qemu-$(date +%F).txt" \
    --backends "$backends" \
    "$@"
