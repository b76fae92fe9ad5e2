# Leasehold. `make run` starts a local cluster; `make test` runs every test.
# Both install what they need (etcd-server, protobuf-compiler) first, idempotently.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/leasehold/target
export CARGO_TERM_COLOR ?= never
DEBUG_BIN := $(CARGO_TARGET_DIR)/debug/leasehold
RELEASE_BIN := $(CARGO_TARGET_DIR)/release/leasehold

.PHONY: all deps kafka-deps helm-deps build test fmt-check clippy unit integration helm-test run bench fmt

all: build

deps:
	@scripts/install-deps.sh

# Apache Kafka's jars from Maven Central, for the broker the tests and `make run` start.
kafka-deps:
	@scripts/install-kafka.sh

# helm (go install, pinned) and the manifest validator, into $(HOME)/.cache/leasehold/bin.
helm-deps:
	@scripts/install-helm.sh

build: deps
	cargo build --bin leasehold

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all -- --check

clippy: deps
	cargo clippy --workspace --all-targets -- -D warnings

unit: deps
	cargo test --workspace --exclude leasehold-integration-tests

# Real etcd, real Kafka and real leasehold processes; one scenario at a time (2-core machines).
integration: build kafka-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) cargo test -p leasehold-integration-tests -- --test-threads=1

# Ends with one line adding up every test binary's result.
test: deps kafka-deps helm-deps fmt-check clippy
	@scripts/test-summary.sh $(MAKE) --no-print-directory unit integration helm-test

# Chart: lint, render, strict validation against Kubernetes API types, the binary on
# the rendered config (lock-step), and values the schema must reject.
helm-test: build helm-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) helm/test-chart.sh

run: build kafka-deps
	cargo build --bin leasehold-demo
	LEASEHOLD_BIN=$(DEBUG_BIN) LEASEHOLD_DEMO_BIN=$(CARGO_TARGET_DIR)/debug/leasehold-demo scripts/run-local.sh

# Figures into docs/BENCHMARKS.md (release build; takes a few minutes).
bench: deps
	cargo build --release --bin leasehold --bin leasehold-bench
	LEASEHOLD_BIN=$(RELEASE_BIN) $(CARGO_TARGET_DIR)/release/leasehold-bench --out docs/BENCHMARKS.md
