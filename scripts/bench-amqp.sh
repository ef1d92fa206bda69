#!/usr/bin/env bash
# `conveyor bench` with the queue on RabbitMQ (the ledger in a scratch SQLite store, or STORE_URL).
# Env: BIN (the conveyor binary), AMQP_URL (amqp://guest:guest@127.0.0.1:5672/%2f), JOBS (100000),
# CONCURRENCY (64), LATENCY_SECS (5). Uses a scratch queue prefix and deletes its queues afterwards.
set -euo pipefail
BIN="${BIN:-target/release/conveyor}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
PREFIX="bench-$$"
dir="$(mktemp -d)"
cleanup() {
  rabbitmqctl list_queues -q --no-table-headers name 2>/dev/null | grep "^$PREFIX\." | while read -r q; do
    rabbitmqctl delete_queue "$q" </dev/null >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
CONVEYOR_DATABASE_URL="${STORE_URL:-sqlite://$dir/store.db}" CONVEYOR_QUEUE=amqp CONVEYOR_AMQP_URL="$AMQP_URL" CONVEYOR_AMQP_PREFIX="$PREFIX" \
  "$BIN" bench --jobs "${JOBS:-100000}" --concurrency "${CONCURRENCY:-64}" --latency-secs "${LATENCY_SECS:-5}"
