#!/usr/bin/env bash
# Orders throughput on the configured store (SQLite in a scratch file by default):
# imports ORDERS generated orders (1-3 lines each, 50 products, stock for 60% of demand), then
# settles them with WORKERS executors. Prints rows/s imported and orders/s settled.
set -euo pipefail
ORDERS=${ORDERS:-50000}
WORKERS=${WORKERS:-64}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/conveyor}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 "$(dirname "$0")/gen-orders.py" "$dir" "$ORDERS"
export CONVEYOR_DATABASE_URL=${CONVEYOR_DATABASE_URL:-sqlite://$dir/bench.db}
"$BIN" products import "$dir/products.csv" >/dev/null
"$BIN" orders import "$dir/orders.csv" 2>&1 | grep '^read'
start=$(date +%s.%N)
"$BIN" work --concurrency "$WORKERS" --queue orders >/dev/null 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null; rm -rf "$dir"' EXIT
# The next step is enqueued in the transaction that acknowledges the last one, so the queue is
# empty only once every workflow has finished (rollbacks included).
open() { "$BIN" queue list --json | python3 -c 'import json,sys; print(sum(q["pending"]+q["delayed"]+q["reserved"] for q in json.load(sys.stdin) if q["queue"]=="orders"))'; }
while [ "$(open)" != 0 ]; do sleep 0.2; done
end=$(date +%s.%N)
kill -TERM $worker; wait $worker || true
python3 -c "import sys; s=$end-$start; print(f'settled $ORDERS orders in {s:.2f}s: {$ORDERS/s:.0f} orders/s with $WORKERS workers')"
