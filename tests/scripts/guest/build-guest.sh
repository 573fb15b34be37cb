#!/usr/bin/env bash
# Builds (once) what tests/src/qemu.rs boots: Debian's generic 6.1 kernel as an uncompressed
# vmlinux and a busybox initramfs whose /init mounts the host's root over 9p under a tmpfs
# overlay, chroots into it and runs the guest agent (agent.sh) on ttyS1.
#
# Usage: build-guest.sh [OUT_DIR]          (default: <repo>/build/guest)
#   GUEST_KERNEL_REFRESH=1  pick the kernel version apt offers now instead of the cached one
#
# Everything is cached in OUT_DIR; a second run only checks stamps (well under a second).
# Progress goes to stderr; stdout carries only the result, as the last three lines:
#   KVER=<kernel release>  KERNEL=<vmlinux path>  INITRD=<initramfs path>
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=${1:-$repo/build/guest}

# Keep stdout for the result lines only: tools (apt, depmod, cpio) chatter on it otherwise.
exec 3>&1 1>&2

say() { echo "build-guest: $*"; }
die() { echo "build-guest: $*" >&2; exit 1; }

# The modules the guest needs; their dependencies are resolved from modules.dep.
module_roots=(virtio_pci fuse cuse vsock vmw_vsock_virtio_transport 9pnet_virtio 9p overlay)

mkdir -p "$out"
out=$(cd "$out" && pwd)
# Test binaries may run in parallel, each calling this script: one builder at a time (which
# also keeps two apt-get runs from fighting over dpkg's lock).
exec 9>"$out/.lock"
flock 9

"$repo/tests/scripts/install-deps.sh" || die "installing the host packages failed (see above)"

# --- Which kernel -------------------------------------------------------------------------
# The generic flavour (not -cloud-amd64, which lacks 9p). The version is whatever Debian's
# linux-image-amd64 metapackage depends on; it is remembered in OUT_DIR so later runs neither
# ask apt nor switch kernels under the tests' feet (the security archive drops old ABIs).
resolve_kver() {
    apt-cache depends --important linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

kver=""
if [ -s "$out/kver" ] && [ -z "${GUEST_KERNEL_REFRESH:-}" ]; then
    kver=$(cat "$out/kver")
else
    kver=$(resolve_kver)
    if [ -z "$kver" ]; then
        say "apt knows no linux-image-amd64 yet: apt-get update"
        apt-get update -qq || die "apt-get update failed"
        kver=$(resolve_kver)
    fi
    [ -n "$kver" ] || die "cannot tell which kernel linux-image-amd64 depends on (apt-cache depends)"
    case $kver in
        *-cloud-amd64) die "linux-image-amd64 resolved to the cloud flavour $kver (no 9p)" ;;
    esac
    echo "$kver" >"$out/kver.tmp" && mv "$out/kver.tmp" "$out/kver"
fi

root=$out/kernel-$kver                  # the unpacked package
moddir=$root/lib/modules/$kver
vmlinux=$out/vmlinux-$kver
initrd=$out/initrd.cpio.gz

# --- Fetch and unpack (never installed on the host) ---------------------------------------
if [ ! -f "$moddir/modules.dep" ]; then
    mkdir -p "$out/debs"
    deb=$(ls "$out/debs/linux-image-${kver}_"*_amd64.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        say "downloading linux-image-$kver"
        # As root apt-get download would try to drop to the _apt user, who cannot write here.
        (cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$kver") ||
            (say "retrying after apt-get update" && apt-get update -qq &&
                cd "$out/debs" && apt-get download -q -o APT::Sandbox::User=root "linux-image-$kver") ||
            die "apt-get download linux-image-$kver failed"
        deb=$(ls "$out/debs/linux-image-${kver}_"*_amd64.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "apt-get download left no linux-image-${kver}_*_amd64.deb in $out/debs"
    fi
    say "unpacking $(basename "$deb")"
    rm -rf "$root.tmp"
    dpkg-deb -x "$deb" "$root.tmp" || die "dpkg-deb -x $deb failed"
    # The package ships no modules.dep: dpkg's postinst would have generated it.
    depmod -b "$root.tmp" "$kver" || die "depmod -b $root.tmp $kver failed"
    rm -rf "$root"
    mv "$root.tmp" "$root"
fi

# --- vmlinux ------------------------------------------------------------------------------
# The bzImage's payload is xz-compressed; decompressing it under TCG costs ~5 s per boot.
# QEMU boots the plain ELF vmlinux through its PVH entry note (CONFIG_PVH=y), twice as fast.
if [ ! -f "$vmlinux" ]; then
    say "extracting vmlinux from vmlinuz-$kver"
    python3 - "$root/boot/vmlinuz-$kver" "$vmlinux.tmp" <<'PY' || die "extracting vmlinux failed"
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(f"{sys.argv[1]}: no xz stream in the bzImage")
# The payload is followed by padding and the bzImage's trailer: decompress one stream only.
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit(f"{sys.argv[1]}: the xz payload is not an ELF image")
open(sys.argv[2], "wb").write(elf)
PY
    mv "$vmlinux.tmp" "$vmlinux"
fi

# --- Modules in load order ----------------------------------------------------------------
# modules.dep lines read "kernel/path/name.ko: dep.ko dep.ko"; a depth-first walk puts every
# module after its dependencies. Module names use '_' but files may use '-' (9pnet_virtio).
declare -A dep_of=() path_of=() seen=()
while IFS= read -r line; do
    rel=${line%%:*}
    name=${rel##*/}
    name=${name%.ko}
    name=${name//-/_}
    path_of[$name]=$rel
    dep_of[$rel]=${line#*:}
done <"$moddir/modules.dep"

order=()
add_module() {
    local name=${1//-/_} rel dep
    rel=${path_of[$name]:-}
    [ -n "$rel" ] || die "module $name is not in $moddir/modules.dep (built in? renamed? compressed?)"
    [ -z "${seen[$rel]:-}" ] || return 0
    seen[$rel]=1
    for dep in ${dep_of[$rel]}; do
        dep=${dep##*/}
        add_module "${dep%.ko}"
    done
    order+=("$rel")
}
for m in "${module_roots[@]}"; do add_module "$m"; done

# --- Initramfs, rebuilt when an input changes ---------------------------------------------
stamp=$( {
    echo "$kver"
    printf '%s\n' "${order[@]}"
    cat "$here/init" "$here/agent.sh" "${BASH_SOURCE[0]}"
    sha256sum /bin/busybox
} | sha256sum | cut -d' ' -f1)

if [ ! -f "$initrd" ] || [ "$(cat "$out/initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
    say "building the initramfs (${#order[@]} modules)"
    [ -x /bin/busybox ] || die "/bin/busybox is missing (busybox-static)"
    staging=$out/initramfs.tmp
    rm -rf "$staging"
    mkdir -p "$staging"/{bin,sbin,etc,proc,sys,dev,run,host,rw,newroot,lib/modules}
    cp /bin/busybox "$staging/bin/busybox"
    # busybox --list names busybox itself; a symlink over the binary loops (ELOOP at boot).
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$staging/bin/$applet"
    done
    # The kernel opens /dev/console before devtmpfs is mounted: init's output needs it.
    mknod "$staging/dev/console" c 5 1
    mknod "$staging/dev/null" c 1 3
    : >"$staging/etc/modules"
    for rel in "${order[@]}"; do
        cp "$moddir/$rel" "$staging/lib/modules/"
        echo "${rel##*/}" >>"$staging/etc/modules"
    done
    cp "$staging/etc/modules" "$out/initramfs.modules"
    install -m 0755 "$here/init" "$staging/init"
    install -m 0755 "$here/agent.sh" "$staging/agent.sh"
    echo "$kver" >"$staging/etc/kver"
    (cd "$staging" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$initrd.tmp" ||
        die "packing the initramfs failed"
    mv "$initrd.tmp" "$initrd"
    echo "$stamp" >"$out/initrd.stamp"
    rm -rf "$staging"
    say "modules: $(tr '\n' ' ' <"$out/initramfs.modules")"
fi

printf 'KVER=%s\nKERNEL=%s\nINITRD=%s\n' "$kver" "$vmlinux" "$initrd" >&3
