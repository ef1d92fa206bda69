#!/usr/bin/env bash
# Orders throughput on the configured store (SQLite in a scratch file by default):
# imports ORDERS generated orders (1-3 lines each, 50 products, stock for 60% of demand), then
# settles them with WORKERS executors. Prints rows/s imported and orders/s settled.
#
# SERVE=1 settles with `conveyor serve` instead of `work`. KILLS=N (default 0) does too, and
# SIGKILLs it N times while it
# settles (when 1/(N+1), 2/(N+1)… of the orders are done), restarting it at once: the jobs the
# killed process held must come back in seconds (issue: crash recovery), not after their lease.
set -euo pipefail
ORDERS=${ORDERS:-50000}
WORKERS=${WORKERS:-64}
KILLS=${KILLS:-0}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/conveyor}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 "$(dirname "$0")/gen-orders.py" "$dir" "$ORDERS"
export CONVEYOR_DATABASE_URL=${CONVEYOR_DATABASE_URL:-sqlite://$dir/bench.db}
"$BIN" products import "$dir/products.csv" >/dev/null
"$BIN" orders import "$dir/orders.csv" 2>&1 | grep '^read'
if [ "$KILLS" -gt 0 ] || [ "${SERVE:-0}" = 1 ]; then
  # serve's one supervisor over every queue, as an operator runs it; the API on a free port.
  printf '[[supervisors]]\nname = "orders"\nqueues = ["orders"]\nconcurrency = %s\n' "$WORKERS" >"$dir/conveyor.toml"
  export CONVEYOR_CONFIG="$dir/conveyor.toml" CONVEYOR_HTTP_ADDR=127.0.0.1:0 CONVEYOR_FAKTORY_ADDR=off
  start_worker() { "$BIN" serve --no-scheduler >/dev/null 2>&1 & worker=$!; }
else
  start_worker() { "$BIN" work --concurrency "$WORKERS" --queue orders >/dev/null 2>&1 & worker=$!; }
fi
# CPU while it settles (Linux): the machine's busy and idle time, and the local PostgreSQL
# server's processes (exited backends count through the postmaster's children's time).
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat 2>/dev/null || echo "0 0"; }
postgres_cpu() {
  local t=0 p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = postgres ] || continue
    t=$((t + $(awk '{ print $14 + $15 + $16 + $17 }' "$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
read -r busy0 idle0 < <(machine)
pg0=$(postgres_cpu)
start=$(date +%s.%N)
start_worker
trap 'kill $worker 2>/dev/null; rm -rf "$dir"' EXIT
# The next step is enqueued in the transaction that acknowledges the last one, so the queue is
# empty only once every workflow has finished (rollbacks included).
# Parsed with awk: a Python interpreter started 5 times a second took a sixth of the machine
# from the run it measured.
open() { "$BIN" queue list | awk '$1 == "orders" { n += $2 + $3 + $4 } END { print n + 0 }'; }
killed=0
while :; do
  left=$(open)
  [ "$left" = 0 ] && break
  if [ "$killed" -lt "$KILLS" ]; then
    # One step is queued per order not yet settled: the open jobs count the orders left.
    if [ "$left" -le $((ORDERS - ORDERS * (killed + 1) / (KILLS + 1))) ]; then
      kill -KILL $worker; wait $worker 2>/dev/null || true
      killed=$((killed + 1))
      echo "killed the worker ($killed of $KILLS) with $left jobs open; restarted at once"
      start_worker
    fi
  fi
  sleep 0.2
done
end=$(date +%s.%N)
read -r busy1 idle1 < <(machine)
pg1=$(postgres_cpu)
kill -TERM $worker; wait $worker || true
python3 -c "import sys; s=$end-$start; print(f'settled $ORDERS orders in {s:.2f}s: {$ORDERS/s:.0f} orders/s with $WORKERS workers, $KILLS kills')"
# Clock ticks (USER_HZ, 100 on Linux) to µs per order.
python3 -c "b=$busy1-$busy0; i=$idle1-$idle0; pg=$pg1-$pg0; n=$ORDERS
print(f'cpu while settling: {b*1e4/n:.0f} us per order on the machine ({pg*1e4/n:.0f} in local PostgreSQL processes), {100*i/max(b+i,1):.0f} % idle')"
