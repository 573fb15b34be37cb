#!/usr/bin/env bash
# Installs the Debian packages cusedev's demo, tests and bench use, if any is missing.
# Runs as root on Debian 12; safe to run again (does nothing when all is there).
set -euo pipefail

need=()
[ -x /usr/sbin/hv_fcopy_daemon ] || need+=(hyperv-daemons)
command -v sha256sum >/dev/null || need+=(coreutils)
command -v unshare >/dev/null || need+=(util-linux)
command -v mount >/dev/null || need+=(mount)
# tests/build.rs compiles the C client tests/c/xs-client.c 64-bit and 32-bit (-m32: the
# 32-bit process's ioctls are the compat path the xs_fastpath driver does not have).
command -v gcc >/dev/null || need+=(gcc)
[ "$(dpkg-query -W -f='${Status}' gcc-multilib 2>/dev/null)" = "install ok installed" ] ||
    need+=(gcc-multilib)
# cargo-fuzz's libFuzzer (make fuzz, and make test's corpus replay) is C++, built by cc.
command -v g++ >/dev/null || need+=(g++)
# The KVP/VSS tests mount a scratch directory over /var/lib/hyperv and format a guest disk.
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
# The QEMU guest (tests/scripts/guest/build-guest.sh): the emulator, a static busybox for the
# initramfs, depmod for the unpacked guest kernel's modules, cpio to pack the initramfs and
# python3's lzma to extract the uncompressed vmlinux.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# busybox (dynamic) also ships /bin/busybox, but the initramfs has no libc: ask for the static one.
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] ||
    need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
python3 -c 'import lzma' 2>/dev/null || need+=(python3)
[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends matters for qemu-system-x86: its recommends pull ~180 packages.
    # hyperv-daemons' maintainer scripts try to start units; in a container without systemd
    # that fails harmlessly, the binaries are what we need.
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
