#!/usr/bin/env bash
# Installs the Debian packages cusedev's demo, tests and bench use, if any is missing.
# Runs as root on Debian 12; safe to run again (does nothing when all is there).
set -euo pipefail

need=()
[ -x /usr/sbin/hv_fcopy_daemon ] || need+=(hyperv-daemons)
command -v sha256sum >/dev/null || need+=(coreutils)
command -v unshare >/dev/null || need+=(util-linux)
command -v mount >/dev/null || need+=(mount)
[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # hyperv-daemons' maintainer scripts try to start units; in a container without systemd
    # that fails harmlessly, the binaries are what we need.
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
