# cusedev — see README.md. Every target installs what it needs on a fresh Debian 12 (as root).

CARGO      ?= cargo
RELEASE    := target/release

.PHONY: all build deps demo test lint unit e2e bench clean

all: build

## deps: Debian packages the end-to-end paths need (the real daemon, sha256sum, unshare).
deps:
	@tests/scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

## demo: the main job — a fixture file copied into a "guest" directory by Debian's unmodified
## hv_fcopy_daemon through /dev/vmbus/hv_fcopy served by cusedev on a FUSE mount.
demo: deps
	$(CARGO) build --release --workspace --bins
	@tests/scripts/demo.sh $(RELEASE)

## test: formatting, lints, unit tests, real-syscall tests and end-to-end tests with the real daemon.
test: deps lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: 1 GiB through the unmodified daemon vs. dd bs=6k to the same tmpfs (not part of test).
bench: deps
	$(CARGO) build --release --workspace --bins
	@tests/scripts/bench.sh $(RELEASE)

clean:
	$(CARGO) clean
