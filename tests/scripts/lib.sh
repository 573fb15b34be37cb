# Shared by demo.sh and bench.sh: start fakehost (blobs in WORK_DIR/blobs), cusedev (FUSE) and Debian's hv_fcopy_daemon
# inside the current (private) mount namespace, and stop them on exit.
# Usage: . lib.sh; rig_start BIN_DIR WORK_DIR

# in_private_mount_namespace SCRIPT ARGS...: runs SCRIPT again inside its own mount namespace
# (private propagation) unless it already is there, so its mounts vanish with it.
in_private_mount_namespace() {
    if [ -z "${CUSEDEV_IN_NAMESPACE:-}" ]; then
        exec env CUSEDEV_IN_NAMESPACE=1 unshare --mount --propagation private "$@"
    fi
}

rig_pids=()
rig_stop() {
    for pid in "${rig_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# wait_for_line FILE TEXT: waits (up to 60 s) until FILE has a line containing TEXT.
wait_for_line() {
    local file=$1 text=$2 i
    for i in $(seq 600); do
        grep -q -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$text' in $file:" >&2
    cat "$file" >&2
    return 1
}

rig_start() {
    local bin=$1 work=$2
    export FAKEHOST_CONTROL=$work/ctl.sock
    RUST_LOG=${RUST_LOG:-info} "$bin/fakehost" serve --listen "unix:$work/bus.sock" \
        --control "$work/ctl.sock" --blob-root "$work/blobs" 2>"$work/fakehost.log" &
    rig_pids+=($!)
    wait_for_line "$work/fakehost.log" listening
    RUST_LOG=${RUST_LOG:-info} "$bin/cusedev" serve --host "unix:$work/bus.sock" \
        --frontend fuse 2>"$work/cusedev.log" &
    rig_pids+=($!)
    wait_for_line "$work/cusedev.log" "serving /dev/vmbus/hv_fcopy"
    /usr/sbin/hv_fcopy_daemon -n </dev/null 2>"$work/daemon.log" &
    rig_pids+=($!)
    wait_for_line "$work/cusedev.log" registered
}
