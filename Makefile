# Leasehold. `make run` starts a local cluster; `make test` runs every test.
# Both install what they need first, idempotently; `make doctor` reports what is there.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/leasehold/target
export CARGO_TERM_COLOR ?= never
DEBUG_BIN := $(CARGO_TARGET_DIR)/debug/leasehold
RELEASE_BIN := $(CARGO_TARGET_DIR)/release/leasehold

.PHONY: py-unit bench-scale bench-pekko all doctor deps test-install kafka-deps py-deps screenshots helm-deps build test fmt-check clippy doc unused-deps licenses unit integration helm-test run bench profile fmt chaos chaos-short soak

all: build

# One line per prerequisite, checked as the build uses it; installs nothing, needs no network.
doctor:
	@scripts/doctor.sh

# Debian packages (protoc with the well-known types, etcd, curl, iproute2, Java, Maven).
deps:
	@scripts/install-deps.sh

# Apache Kafka's jars from Maven Central, for the broker the tests and `make run` start.
kafka-deps:
	@scripts/install-kafka.sh

# Python test tools (the Prometheus OpenMetrics parser) and the Python client
# (clients/python) into $(HOME)/.cache/leasehold/venv.
py-deps:
	@scripts/install-python-tools.sh

# Regenerates docs/status-page.png (the README's picture) with the status page test.
screenshots: build kafka-deps py-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) LEASEHOLD_UPDATE_SCREENSHOTS=1 cargo test -p leasehold-integration-tests --test observability the_status_page -- --test-threads=1

# helm (go install, pinned) and the manifest validator, into $(HOME)/.cache/leasehold/bin.
helm-deps:
	@scripts/install-helm.sh

build: deps
	cargo build --bin leasehold --example embedded

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all -- --check

# Also the MSRV check: every crate inherits rust-version, and clippy's incompatible_msrv
# fails on std APIs newer than it.
clippy: deps
	cargo clippy --workspace --all-targets -- -D warnings

doc: deps
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

unused-deps:
	scripts/unused-deps.sh

licenses:
	scripts/licenses.sh

unit: deps
	cargo test --workspace --exclude leasehold-integration-tests

# The Python client's unit tests (clients/python/tests), in the test virtualenv.
py-unit: py-deps
	@scripts/py-unit.sh

# Real etcd, real Kafka and real leasehold processes; one scenario at a time (2-core machines).
integration: build kafka-deps py-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) cargo test -p leasehold-integration-tests -- --test-threads=1

# Ends with one line adding up every test binary's result.
test: deps kafka-deps py-deps helm-deps fmt-check clippy doc unused-deps licenses
	@scripts/doctor.sh
	@scripts/test-summary.sh $(MAKE) --no-print-directory unit py-unit integration helm-test test-install chaos-short

# The install path on a bare Debian 12 root (debootstrap, cached): install-deps must
# install every system prerequisite and the doctor must see each one missing, then present.
test-install:
	@scripts/test-fresh-machine.sh

# Chart: lint, render, strict validation against Kubernetes API types, the binary on
# the rendered config (lock-step), and values the schema must reject.
helm-test: build helm-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) helm/test-chart.sh

run: build kafka-deps
	@scripts/doctor.sh cargo protoc etcd curl java maven kafka-jars
	cargo build --bin leasehold-demo
	LEASEHOLD_BIN=$(DEBUG_BIN) LEASEHOLD_DEMO_BIN=$(CARGO_TARGET_DIR)/debug/leasehold-demo scripts/run-local.sh

# Where the time goes: perf samples of one instance under the Kafka benchmark load
# (installs Debian's linux-perf when missing; root).
profile: deps kafka-deps
	@command -v perf >/dev/null || (apt-get update && apt-get install -y --no-install-recommends linux-perf)
	cargo build --release --bin leasehold --bin leasehold-bench
	scripts/profile.sh

# Figures into docs/BENCHMARKS.md (release build; takes a few minutes).
# Many instances on one etcd (default 50 × 4096 shards): convergence, etcd load, RSS,
# a rolling restart under load, the planner at 200 × 65 536. Writes docs/BENCHMARKS.md's
# "Scale" section.
bench-scale: deps
	cargo build --release --bin leasehold --bin leasehold-bench
	LEASEHOLD_BIN=$(RELEASE_BIN) $(CARGO_TARGET_DIR)/release/leasehold-bench --scale --out docs/BENCHMARKS.md

# Side by side with Apache Pekko Cluster Sharding 1.1.5: the same Java client loop drives
# both, one and three nodes (Java 17; the jars come from Maven Central into the cache).
# Writes docs/BENCHMARKS.md's "Pekko" section.
PEKKO_BUILD := $(HOME)/.cache/leasehold/pekko
bench-pekko: deps
	cargo build --release --bin leasehold --bin leasehold-bench
	mvn -q -B -f integration-tests/pekko/pom.xml -Dmaven.repo.local=$(HOME)/.cache/leasehold/m2 \
	  -Dpekko.build=$(PEKKO_BUILD) compile dependency:copy-dependencies -DoutputDirectory=$(PEKKO_BUILD)/lib
	PEKKO_BENCH_CLASSPATH='$(PEKKO_BUILD)/classes:$(PEKKO_BUILD)/lib/*' LEASEHOLD_BIN=$(RELEASE_BIN) \
	  $(CARGO_TARGET_DIR)/release/leasehold-bench --pekko --out docs/BENCHMARKS.md

bench: deps
	cargo build --release --bin leasehold --bin leasehold-bench
	LEASEHOLD_BIN=$(RELEASE_BIN) $(CARGO_TARGET_DIR)/release/leasehold-bench --out docs/BENCHMARKS.md

# Randomized, seeded fault campaign against real processes in network namespaces (root):
# partitions, isolation, SIGKILL/SIGSTOP, etcd leader kill and compaction, Kafka and handler
# restarts. Writes docs/CHAOS.md; exits non-zero on any violation and prints the seed.
# `make chaos RUNS=100 SEED=42` for the long campaign; DURATION is seconds of faults per run.
RUNS ?= 3
SEED ?=
DURATION ?= 60
chaos: build kafka-deps
	cargo build -p leasehold-integration-tests --bin leasehold-chaos --bin leasehold-chaos-handler
	LEASEHOLD_BIN=$(DEBUG_BIN) $(CARGO_TARGET_DIR)/debug/leasehold-chaos --runs $(RUNS) --duration $(DURATION) $(if $(SEED),--seed $(SEED)) --out docs/CHAOS.md
	$(MAKE) soak

# Longer runs of the placement and Kafka failover scenarios than `make test` has: 60 s of
# steady skewed load that must not move a shard, and failover, fail-back and a member cut
# off from etcd, three times over.
SOAK_RUNS ?= 3
soak: build kafka-deps
	LEASEHOLD_BIN=$(DEBUG_BIN) LEASEHOLD_SOAK_SECONDS=60 cargo test -p leasehold-integration-tests --test core placement_follows -- --test-threads=1 --nocapture
	for i in $$(seq $(SOAK_RUNS)); do \
	  LEASEHOLD_BIN=$(DEBUG_BIN) cargo test -p leasehold-integration-tests --test kafka -- --test-threads=1 --nocapture standby cut_off || exit 1; \
	done

# About 3 minutes: one run with 150 s of faults on a fixed schedule (part of `make test`;
# its report goes to the build cache, not docs/).
CHAOS_SHORT_SEED ?= 11
chaos-short: build kafka-deps
	cargo build -p leasehold-integration-tests --bin leasehold-chaos --bin leasehold-chaos-handler
	LEASEHOLD_BIN=$(DEBUG_BIN) $(CARGO_TARGET_DIR)/debug/leasehold-chaos --runs 1 --duration 150 --seed $(if $(SEED),$(SEED),$(CHAOS_SHORT_SEED)) --out $(CARGO_TARGET_DIR)/chaos-short.md
