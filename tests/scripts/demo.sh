#!/usr/bin/env bash
# make demo: Debian's unmodified hv_fcopy_daemon receives the fixtures from fakehost through
# /dev/vmbus/hv_fcopy served by cusedev on a FUSE mount, in a private mount namespace (nothing
# stays mounted afterwards); then a fixture goes through /dev/azure_xs_fastpath into fakehost's
# blob store and back, with the C client tests/c/xs-client.c (built here with gcc); then a
# Launcher (tests/c/lguest-launcher.c) prints the fake console Guest's line through /dev/lguest;
# then one KVP exchange with Debian's hv_kvp_daemon through /dev/vmbus/hv_kvp.
# Usage: demo.sh BIN_DIR
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
bin=$(cd "${1:-$top/target/release}" && pwd)

. "$top/tests/scripts/lib.sh"
in_private_mount_namespace "$0" "$bin"
work=$top/build/demo
rm -rf "$work"; mkdir -p "$work/guest"
trap rig_stop EXIT

echo "== starting fakehost, cusedev (FUSE) and /usr/sbin/hv_fcopy_daemon -n (logs in $work)"
rig_start "$bin" "$work"

echo "== copying the fixtures into the guest at $work/guest/incoming/"
"$bin/fakehost" copy "$top/fixtures/hello.txt" "$work/guest/incoming/" --create-path
"$bin/fakehost" copy "$top/fixtures/sample.bin" "$work/guest/incoming/" --create-path

echo "== trying again without --overwrite (the guest must refuse)"
if "$bin/fakehost" copy "$top/fixtures/hello.txt" "$work/guest/incoming/"; then
    echo "demo: the second copy should have failed with 0x80070050" >&2; exit 1
fi

echo "== checking content"
for f in hello.txt sample.bin; do
    cmp "$top/fixtures/$f" "$work/guest/incoming/$f"
    echo "   $f: identical ($(stat -c %s "$work/guest/incoming/$f") bytes)"
done
echo "== /dev/azure_xs_fastpath: sample.bin into the fake XStore's blob store and back"
gcc -O2 -std=gnu11 -Wall -Wextra -pthread -o "$work/xs-client" "$top/tests/c/xs-client.c"
"$work/xs-client" put demo/sample.bin "$top/fixtures/sample.bin"
"$bin/fakehost" blobs ls -l demo/
"$work/xs-client" get demo/sample.bin "$work/sample.back"
cmp "$top/fixtures/sample.bin" "$work/sample.back"
echo "   sample.bin: identical after the round trip ($(stat -c %s "$work/sample.back") bytes)"
echo "== /dev/lguest: a Launcher runs fakehost's console Guest, which prints one line and powers down"
wait_for_line "$work/cusedev.log" "serving /dev/lguest"
gcc -O2 -std=gnu11 -Wall -Wextra -pthread -o "$work/lguest-launcher" "$top/tests/c/lguest-launcher.c"
code=0
"$work/lguest-launcher" console >"$work/lguest.out" 2>"$work/lguest.err" || code=$?
sed 's/^/   guest console: /' "$work/lguest.out"
sed 's/^/   launcher: /' "$work/lguest.err"
if [ "$code" != 1 ] || ! grep -q "hello from the fake guest" "$work/lguest.out" \
    || ! grep -q "lguest: CRASH: Power down" "$work/lguest.err"; then
    echo "demo: the Launcher should print the Guest's line and exit 1 with CRASH: Power down" >&2
    exit 1
fi
"$bin/fakehost" lguest notifies
echo "== /dev/vmbus/hv_kvp: Debian's hv_kvp_daemon answers the fake Hyper-V host's KVP exchange"
# The daemon keeps its pools in /var/lib/hyperv; in this mount namespace that is our directory.
mkdir -p /var/lib/hyperv "$work/hyperv"
mount --bind "$work/hyperv" /var/lib/hyperv
/usr/sbin/hv_kvp_daemon -n </dev/null 2>"$work/kvp-daemon.log" &
rig_pids+=($!)
"$bin/fakehost" kvp set --pool 0 DemoGreeting "hello from the host"
"$bin/fakehost" kvp list --pool 0
"$bin/fakehost" kvp list --pool auto | grep -E "^(FullyQualifiedDomainName|OSName|OSVersion)=" | sed 's/^/   guest: /'
echo "   pool 3 (the host's items, as the daemon stored them): $("$bin/fakehost" kvp list --pool 3 | wc -l) records"
echo "== demo passed"
