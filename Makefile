# Everyday targets; CI runs .ci/run, which runs the same commands.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/conveyor-target

.PHONY: test lint fmt bench bench-redis bench-amqp bench-amqp-broker bench-peers bench-criterion bench-orders bench-notify bench-http bench-sync run fuzz-api

test:
	cargo test --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

run:
	cargo run --release -p conveyor-cli -- serve

# The SPEC's benchmark on the configured backend (SQLite by default, in a scratch file).
bench:
	cargo build --release -p conveyor-cli
	rm -f /tmp/conveyor-bench.db*
	CONVEYOR_DATABASE_URL=sqlite:///tmp/conveyor-bench.db $(CARGO_TARGET_DIR)/release/conveyor bench --jobs 100000 --concurrency 64

# The same with the queue on Redis (REDIS_URL; default a private non-persistent redis-server, as the
# BullMQ harness in ../shared/peers starts its own) under a scratch prefix,
# printing Redis commands and round trips per job (INFO commandstats); JOBS=1000000 for the backlog run.
bench-redis:
	cargo build --release -p conveyor-cli
	BIN=$(CARGO_TARGET_DIR)/release/conveyor bash scripts/bench-redis.sh

# The same with the queue on RabbitMQ (AMQP_URL, default the local broker) under a scratch prefix;
# the ledger in a scratch SQLite store (STORE_URL=postgres://… for PostgreSQL).
bench-amqp:
	cargo build --release -p conveyor-cli
	BIN=$(CARGO_TARGET_DIR)/release/conveyor bash scripts/bench-amqp.sh

# What RabbitMQ itself carries with a plain client (persistent, confirmed, manual acks): the
# yardstick for bench-amqp.
bench-amqp-broker:
	cargo run --release -p conveyor-backends --example amqp_broker -- $${JOBS:-100000} 4 4

# BullMQ on this machine, for comparison with bench-redis (../shared/peers/).
bench-peers:
	bash ../shared/peers/bullmq/run.sh

# Criterion micro-benchmarks of the hot paths.
bench-criterion:
	cargo bench -p conveyor-backends --bench hot_paths

# Schema-based fuzzing of the HTTP API (schemathesis); more cases with EXAMPLES=200.
fuzz-api:
	bash scripts/fuzz-api.sh

# Orders import and settle throughput (ORDERS=50000 WORKERS=64 by default).
bench-orders:
	cargo build --release -p conveyor-cli
	BIN=$(CARGO_TARGET_DIR)/release/conveyor bash scripts/bench-orders.sh

# Product sync: a full sync of 100,000 products x 3 variants from the simulator (PRODUCTS, RPS).
bench-sync:
	cargo build --release -p conveyor-cli
	BIN=$(CARGO_TARGET_DIR)/release/conveyor bash scripts/bench-sync.sh

# Notifications: 100,000 events, each delivered to a signed webhook receiver on loopback.
bench-notify:
	cargo build --release -p conveyor-cli
	rm -f /tmp/conveyor-bench-notify.db*
	CONVEYOR_LOG=warn CONVEYOR_DATABASE_URL=sqlite:///tmp/conveyor-bench-notify.db $(CARGO_TARGET_DIR)/release/conveyor bench --webhooks --jobs 100000 --concurrency 128

bench-http:
	cargo build --release -p conveyor-cli
	rm -f /tmp/conveyor-bench-http.db*
	CONVEYOR_LOG=warn CONVEYOR_FAKTORY_ADDR=off CONVEYOR_DATABASE_URL=sqlite:///tmp/conveyor-bench-http.db $(CARGO_TARGET_DIR)/release/conveyor bench --http-kinds --jobs 100000
