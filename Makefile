# cusedev — see README.md. Every target installs what it needs on a fresh Debian 12 (as root).

CARGO      ?= cargo
RELEASE    := target/release

.PHONY: all build deps demo qemu-demo test check lint unit e2e bench soak guest fuzz fuzz-replay clean

all: build

## deps: Debian packages the end-to-end paths need (the real daemon, sha256sum, unshare), and
## Azurite (npm, into build/node) for fakehost's blob store tests.
deps:
	@tests/scripts/install-deps.sh
	@fakehost/scripts/install-azurite.sh --apt

build:
	$(CARGO) build --workspace --bins

## demo: the main job — a fixture file copied into a "guest" directory by Debian's unmodified
## hv_fcopy_daemon through /dev/vmbus/hv_fcopy served by cusedev on a FUSE mount.
demo: deps
	$(CARGO) build --release --workspace --bins
	@tests/scripts/demo.sh $(RELEASE)

## qemu-demo: the main job in a real guest kernel: QEMU (TCG) boots Debian's 6.1 kernel with our
## vhost-user-vsock backend; in the guest cusedev serves /dev/vmbus/hv_fcopy as a CUSE character
## device and the unmodified daemon receives the fixtures; sha256 checked in the guest.
qemu-demo: deps guest
	$(CARGO) build --release --workspace --bins
	$(RELEASE)/qemu-demo

## test: formatting, lints, unit tests, real-syscall tests and end-to-end tests with the real daemon,
## on FUSE mounts here and over CUSE + vhost-user-vsock in a QEMU guest.
test: deps lint guest fuzz-replay
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

## fuzz-replay (part of test): every fuzz target over its committed corpus (fuzz/corpus), twice:
## the libFuzzer binaries with -runs=0 (cargo-fuzz --sanitizer none on stable, installed into
## build/cargo-root) and a plain `cargo test` of the same bodies (fuzz/tests/corpus.rs; engine
## inputs also through a session with a reader thread). A crashing input fails the build. Cold
## a few minutes, warm a few seconds (docs/fuzzing.md).
fuzz-replay:
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
	$(CARGO) test --manifest-path fuzz/Cargo.toml
	@tests/scripts/fuzz.sh replay

## fuzz (not part of test): every fuzz target (vmbus, engine, ioctl, vhost) under libFuzzer for
## FUZZ_SECONDS (default 60) each, on stable (cargo-fuzz --sanitizer none, installed into build/cargo-root); prints execs,
## coverage and crashes per target (FUZZ_TARGETS, FUZZ_MAX_LEN, FUZZ_ARGS: tests/scripts/fuzz.sh).
FUZZ_SECONDS ?= 60
fuzz:
	@FUZZ_SECONDS=$(FUZZ_SECONDS) tests/scripts/fuzz.sh

## check: the daily loop on a warm tree, in a few minutes: fmt, clippy, unit tests and the
## real-FUSE tests (the real daemon included), with no apt and no QEMU. Run `make deps` once
## first. `make test` stays the whole suite, the one CI runs.
# A test is a file tests/tests/<t>.rs or a directory tests/tests/<t>/main.rs (the fault matrix).
TEST_NAMES := $(basename $(notdir $(wildcard tests/tests/*.rs))) \
              $(notdir $(patsubst %/,%,$(dir $(wildcard tests/tests/*/main.rs))))
HOST_TESTS := $(addprefix --test ,$(filter-out qemu_%,$(TEST_NAMES)))
check: lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --lib --bins --no-fail-fast
	$(CARGO) test -p vhost-vsock $(addprefix --test ,$(basename $(notdir $(wildcard vhost/tests/*.rs)))) --no-fail-fast
	$(CARGO) test -p fakehost $(addprefix --test ,$(basename $(notdir $(wildcard fakehost/tests/*.rs)))) --no-fail-fast
	$(CARGO) test -p cusedev-tests $(HOST_TESTS) --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench (not part of test): 1 GiB through the unmodified daemon, the project (fakehost + cusedev
## FUSE) against the floor (bench/fcopy-floor.c, one libfuse3 process that also plays the host),
## alternated, medians of 3, unpinned and pinned to one CPU, with wake-ups and syscalls per
## fragment (BENCH_BYTES, BENCH_ROUNDS, ... : see tests/scripts/bench.sh); then xs_fastpath: ops/s of small
## requests with 1 and 16 client threads and GB/s of 32 MiB GETs next to memcpy (tests/scripts/bench-xs.sh); then lguest: notify round trips/s and eventfd-signalled notifies/s next to a pipe ping-pong floor (tests/scripts/bench-lguest.sh); then in QEMU: guest boot -> daemon ready and fcopy over CUSE + vsock, and our vhost-user-vsock
## backend against rust-vmm's vhost-device-vsock (installed into build/cargo-root) in the same run.
bench: deps guest
	$(CARGO) build --release --workspace --bins
	@tests/scripts/bench.sh $(RELEASE)
	@tests/scripts/bench-xs.sh $(RELEASE)
	@tests/scripts/bench-lguest.sh $(RELEASE)
	@tests/scripts/bench-qemu.sh $(RELEASE)

## soak (not part of test): for SOAK_SECONDS (default 600) fakehost copy through the real daemon,
## the xs client and a lguest Launcher in parallel against one fakehost + cusedev (FUSE), blobs
## in Azurite; every copy checked by sha256, and RSS, threads and fds of fakehost, cusedev, the
## daemon and Azurite sampled into build/soak/samples.csv and checked flat (docs/soak.md).
SOAK_SECONDS ?= 600
soak: deps
	$(CARGO) build --release --workspace --bins
	@SOAK_SECONDS=$(SOAK_SECONDS) tests/scripts/soak.sh $(RELEASE)

## guest: the QEMU test guest (Debian's 6.1 kernel as vmlinux + busybox initramfs that chroots
## into the host root); cached in build/guest, rebuilt only when its inputs change.
guest:
	@tests/scripts/guest/build-guest.sh

clean:
	$(CARGO) clean
