# odin-ws entry points. `make run` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
CARGO ?= cargo
SHARDS ?= 3
BASE_PORT ?= 3002
LB_PORT ?= 3001

.PHONY: capacity bench-compare bench-fanout bench-hold bench-kafka bench-micro faults soak bench-tools
.PHONY: cluster cluster-test cluster-bench cluster-tools
.PHONY: help run build build-debug test deps fmt fmt-check lint test-rust test-e2e test-clients test-deploy conformance conformance-short test-make-run
TANSU ?= $(shell command -v tansu || echo $(HOME)/.cargo/bin/tansu)

help:
	@echo "make run        build release, start 3 shards (demo feed) + ws-lb on 127.0.0.1:$(LB_PORT)"
	@echo "make test       install what tests need, then fmt check, clippy, all tests"
	@echo "make lint       clippy -D warnings;  make fmt  format the code"
	@echo "make build      release binaries in target/release"
	@echo "make cluster    the production topology in network namespaces (root); prints the wss:// URL"
	@echo "make cluster-test / cluster-bench   its scenarios, short (a few minutes) / full size"

build:
	$(CARGO) build --release --locked -p ws-shard -p ws-lb

# Debug binaries with the same feature set as the test build (cargo builds every binary of
# a package whose integration tests it builds), so this is free after test-rust.
build-debug:
	$(CARGO) test --workspace --no-run --locked -q
	$(CARGO) build --locked -q -p delayline

run: build
	scripts/run-local.sh target/release $(SHARDS) $(BASE_PORT) $(LB_PORT)

# The README's `make run`, run as a user would, in its own network namespace (fixed ports).
test-make-run: build
	scripts/in-netns.sh python3 tests/e2e/make_run.py

deps:
	scripts/install-deps.sh

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# One process per test (nextest): the Prometheus recorder is process-global and several
# tests assert exact metric values.
test-rust:
	$(CARGO) nextest run --workspace --locked --no-fail-fast

# Real binaries against independent clients: Python websockets, kafka-python, tansu, PyJWT,
# a dnslib DNS server (membership_dns_e2e.py: in a network namespace of its own, needs root).
test-e2e: build-debug
	python3 tests/e2e/shard_e2e.py target/debug/ws-shard
	python3 tests/e2e/kafka_e2e.py $(TANSU) target/debug/ws-shard target/debug/ws-lb
	python3 tests/e2e/exported_metrics.py $(TANSU) target/debug/ws-shard target/debug/ws-lb
	python3 tests/e2e/auth_e2e.py target/debug/ws-shard target/debug/ws-lb
	python3 tests/e2e/membership_e2e.py $(TANSU) target/debug/ws-shard target/debug/ws-lb
	python3 tests/e2e/membership_dns_e2e.py target/debug/ws-shard target/debug/ws-lb

# Client libraries (docs/clients.md): the TypeScript client's unit tests on Node, then both
# clients (headless Chromium, and ws-tail on the Rust crate) through ws-lb to real shards while
# the tiers are broken (tests/clients).
test-clients: build-debug
	cd clients/js && npm run --silent build && npm test --silent
	ODIN_BIN=target/debug node --test --test-concurrency=1 tests/clients/

# Terraform, gcloud scripts, images, systemd units, alerts, dashboard (offline).
test-deploy:
	bash deploy/tests/run.sh

# Autobahn|Testsuite cases (kosoku) against a shard's /echo and through ws-lb.
conformance: build
	python3 tests/conformance/run.py --bin target/release --cases all --out target/conformance

conformance-short: build-debug
	python3 tests/conformance/run.py --bin target/debug --cases short --out target/conformance-short

test: deps fmt-check lint test-rust test-e2e test-clients test-deploy conformance-short cluster-test test-make-run
	@echo "make test: all checks passed"

# ---- The production topology on this machine (deploy/local, docs/topology.md) ----
# Network namespaces need root. CLUSTER_FLAGS passes options through, e.g.
# CLUSTER_FLAGS="--lbs 4 --delay-ms 0" or "rolling kill-lb" to pick scenarios.
CLUSTER_FLAGS ?=

cluster-tools: deps
	@command -v haproxy >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; }
	@python3 -c 'import hcl2; hcl2.SerializationOptions' 2>/dev/null || python3 -m pip install -q 'python-hcl2>=8,<9'

cluster: build-bench cluster-tools
	python3 deploy/local/cluster.py up $(CLUSTER_FLAGS)

# Short version of every scenario on the debug binaries that test-e2e built (~7 minutes; part
# of `make test`; docs/topology.md). Needs root (network namespaces).
# In make test without the added delay (--delay-ms 0): on 2 cores a saturated delay line
# loses frames (its TAP queue overflows), which failed the short kill-lb in 2 of 2 CI runs
# (docs/topology.md, "In make test"); override with CLUSTER_TEST_DELAY=0.25.
CLUSTER_TEST_DELAY ?= 0
cluster-test: build-debug cluster-tools
	python3 deploy/local/cluster.py test --bin-dir target/debug --delay-ms $(CLUSTER_TEST_DELAY) $(CLUSTER_FLAGS)

cluster-bench: build-bench cluster-tools
	python3 deploy/local/cluster.py bench $(CLUSTER_FLAGS)

# ---- Measurements (not part of make test; release builds, loopback only) ----
bench-tools:
	@command -v nginx >/dev/null && command -v haproxy >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy)

build-bench:
	$(CARGO) build --release --locked -p ws-shard -p ws-lb -p loadtest -p delayline

capacity: build-bench
	python3 bench/bench.py capacity

# What authentication costs (docs/benchmarks.md "Authentication"): verification per token,
# ws-lb auth on vs off (HS256/RS256/ES256), and memory under a flood of bad tokens.
.PHONY: bench-auth
bench-auth: build-bench
	python3 bench/auth_bench.py verify
	python3 bench/auth_bench.py rate
	python3 bench/auth_bench.py flood

bench-compare: build-bench bench-tools
	python3 bench/bench.py compare

bench-fanout: build-bench
	python3 bench/bench.py fanout

bench-hold: build-bench
	python3 bench/bench.py hold

# Produce-to-client latency through the Kafka source vs a plain consumer (a: 1 rec/s,
# b: 1,000/s, c: 10,000/s; 1,000 subscribers through ws-lb), then one shard's ingest rate
# with 5,000 subscribers. Needs tansu (make deps installs it).
bench-kafka: build-bench deps
	python3 bench/kafka_bench.py latency --tansu $(TANSU)
	python3 bench/kafka_bench.py ingest --tansu $(TANSU)

bench-micro:
	$(CARGO) bench --locked -p ws-protocol -p shard-core -p lb-core

.PHONY: bench-budget bench-cardinality bench-hold-budget bench-cold-start
# Hub publish throughput, history budget enforced vs the hub before it (built from git).
bench-budget:
	python3 bench/publish_budget.py

# 1,000,000 distinct keys through a release ws-shard: RSS vs history budget (Kafka if tansu).
bench-cardinality: build deps
	python3 bench/cardinality.py

# Memory per held connection, this ws-shard vs BASE_BIN/ws-shard, alternating (docs/benchmarks.md).
bench-hold-budget: build-bench
	@test -x "$(BASE_BIN)/ws-shard" || { echo "BASE_BIN=<dir with the base commit's release ws-shard>"; exit 2; }
	python3 bench/hold_budget.py --base-bin $(BASE_BIN) $(HOLD_FLAGS)

# The first ramp after a start and the slow accept4/socket calls behind it (perf trace), this
# build alone or against BASE_BIN's ws-shard and ws-lb, alternating (docs/benchmarks.md).
bench-cold-start: build-bench
	python3 bench/cold_start.py $(if $(BASE_BIN),--a $(BASE_BIN))

faults: build-bench deps
	python3 tests/faults/faults.py

soak: build-bench
	python3 bench/soak.py
