#!/usr/bin/env bash
# make fuzz: every fuzz target (fuzz/fuzz_targets: vmbus, engine, ioctl, vhost) under libFuzzer for FUZZ_SECONDS each,
# on the stable toolchain (cargo-fuzz --sanitizer none; docs/fuzzing.md says why), then one
# line per target: execs, coverage (cov/ft from libFuzzer's final stats) and crashes.
#
# Usage: fuzz.sh [replay]
#   (none)   fuzz: each target starts from its committed seeds (fuzz/corpus/<t>, read only) and
#            what earlier runs found (build/fuzz/corpus/<t>, where new inputs go)
#   replay   run every target once over its committed corpus only (-runs=0); fails on a crash
#   FUZZ_SECONDS=60      time per target
#   FUZZ_TARGETS="a b"   a subset (default: every target in fuzz/fuzz_targets)
#   FUZZ_MAX_LEN=16384   libFuzzer -max_len (a KVP message is 7432 bytes, above its 4096 default)
#   FUZZ_TIMEOUT=10      libFuzzer -timeout: an input running longer is a crash (a hung engine)
#   FUZZ_ARGS="..."      more libFuzzer flags
# Exit status 1 when any target crashed; the input is in build/fuzz/artifacts/<t>/ and the
# command that reproduces it is printed.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
mode=${1:-fuzz}
seconds=${FUZZ_SECONDS:-60}
max_len=${FUZZ_MAX_LEN:-16384}
timeout=${FUZZ_TIMEOUT:-10}
targets=${FUZZ_TARGETS:-$(basename -s .rs fuzz/fuzz_targets/*.rs | tr '\n' ' ')}

# cargo-fuzz, pinned, into the project's own cargo root (like vhost-device-vsock in bench).
cf_version=0.13.2
cargo_root=$top/build/cargo-root
cargo_fuzz=$cargo_root/bin/cargo-fuzz
if ! "$cargo_fuzz" --version 2>/dev/null | grep -qF "$cf_version"; then
    echo "fuzz: installing cargo-fuzz $cf_version into $cargo_root (once)" >&2
    cargo install --locked --quiet cargo-fuzz --version "$cf_version" --root "$cargo_root"
fi
export PATH=$cargo_root/bin:$PATH

# Stable: no -Zsanitizer, so --sanitizer none; coverage instrumentation (sancov) and libFuzzer
# itself need no nightly. Debug assertions stay on (cargo-fuzz's default), so an overflow
# or a debug_assert! is a crash too.
cargo fuzz build --fuzz-dir fuzz --sanitizer none >&2
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release

status=0
summary=()
for t in $targets; do
    art=build/fuzz/artifacts/$t
    work=build/fuzz/corpus/$t
    log=build/fuzz/logs/$t.log
    mkdir -p "$art" "$work" "$(dirname "$log")"
    rm -f "$art"/crash-* "$art"/leak-* "$art"/timeout-* "$art"/oom-*
    if [ "$mode" = replay ]; then
        args=(-runs=0 "fuzz/corpus/$t")
    else
        args=(-max_total_time="$seconds" "$work" "fuzz/corpus/$t")
    fi
    # shellcheck disable=SC2086
    if "$bin_dir/$t" -artifact_prefix="$art/" -max_len="$max_len" -timeout="$timeout" -print_final_stats=1 \
        ${FUZZ_ARGS:-} "${args[@]}" >"$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    covft=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+).*/cov \1 ft \2/')
    crashes=$(find "$art" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="?(exit $rc)"; fi
    line=$(printf '%-14s execs %-12s %-20s crashes %s' "$t" "${execs:-?}" "${covft:-cov ? ft ?}" "$crashes")
    echo "fuzz: $line" >&2
    summary+=("$line")
    if [ "$rc" -ne 0 ] || [ "$crashes" != 0 ]; then
        status=1
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -5 >&2 || true
        for f in "$art"/*; do
            [ -f "$f" ] && echo "fuzz:   reproduce: $bin_dir/$t $f   (minimise: $bin_dir/$t -minimize_crash=1 -runs=100000 $f)" >&2
        done
    fi
done

if [ "$mode" = replay ]; then echo "fuzz replay (committed corpus only):"; else echo "fuzz (${seconds}s per target):"; fi
printf '  %s\n' "${summary[@]}"
exit $status
