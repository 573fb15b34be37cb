#!/usr/bin/env bash
# Installs Azurite, Microsoft's Azure Storage emulator (npm package "azurite"), into
# build/node for fakehost's blob store tests (fakehost/tests/xs_store.rs); does nothing when
# the pinned version is there. Project-local: nothing is installed globally.
#
#   fakehost/scripts/install-azurite.sh          needs node and npm, fails if they are missing
#   fakehost/scripts/install-azurite.sh --apt    installs Debian's nodejs and npm first if
#                                                missing (root; what `make deps` runs)
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
prefix="$root/build/node"
# 3.35.0 is the last release that runs on Node 20 (3.36 asks for Node >= 21, 3.37 for 22).
version=3.35.0
marker="$prefix/.azurite-version"

if [ -x "$prefix/node_modules/.bin/azurite-blob" ] && [ "$(cat "$marker" 2>/dev/null)" = "$version" ]; then
    exit 0
fi
if [ "${1:-}" = "--apt" ] && ! { command -v node && command -v npm; } >/dev/null; then
    echo "install-azurite: installing Debian's nodejs and npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm
fi
for tool in node npm; do
    command -v "$tool" >/dev/null || {
        echo "install-azurite: $tool is missing: install Node.js and npm (apt-get install nodejs npm, or make deps)" >&2
        exit 1
    }
done
echo "install-azurite: installing azurite@$version into $prefix"
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$version"
echo "$version" >"$marker"
