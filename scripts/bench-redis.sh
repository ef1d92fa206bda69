#!/usr/bin/env bash
# `conveyor bench` with the queue on Redis, and what it cost Redis per job.
# Env: BIN (the conveyor binary), REDIS_URL (default: a private, non-persistent redis-server
# started on a free port for the run, configured as ../shared/peers' BullMQ harness starts its
# own, so the two figures compare), JOBS (100000), CONCURRENCY (64), LATENCY_SECS (5). Uses a
# scratch prefix and deletes its keys afterwards; resets the server's INFO commandstats (with
# REDIS_URL, use a Redis of your own if others share it).
set -euo pipefail
BIN="${BIN:-target/release/conveyor}"
JOBS="${JOBS:-100000}"
private_dir=""
if [ -z "${REDIS_URL:-}" ]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  private_dir="$(mktemp -d)"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$private_dir" \
    --logfile "$private_dir/redis.log" --daemonize yes --pidfile "$private_dir/redis.pid"
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  REDIS_URL="redis://127.0.0.1:$port"
  echo "bench-redis: a private redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on port $port (no persistence)" >&2
fi
PREFIX="bench-$$"
dir="$(mktemp -d)"
cleanup() {
  if [ -n "$private_dir" ]; then
    redis-cli -u "$REDIS_URL" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$private_dir"
  else
    redis-cli -u "$REDIS_URL" --scan --pattern "{$PREFIX}:*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
redis-cli -u "$REDIS_URL" config resetstat >/dev/null
cpu() { redis-cli -u "$REDIS_URL" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { print s }'; }
c0="$(cpu)"
CONVEYOR_DATABASE_URL="sqlite://$dir/store.db" CONVEYOR_QUEUE=redis CONVEYOR_REDIS_URL="$REDIS_URL" CONVEYOR_REDIS_PREFIX="$PREFIX" \
  "$BIN" bench --jobs "$JOBS" --concurrency "${CONCURRENCY:-64}" --latency-secs "${LATENCY_SECS:-5}"
c1="$(cpu)"
redis-cli -u "$REDIS_URL" info commandstats | tr -d '\r' | awk -F'[:=,]' -v jobs="$((JOBS + 1000 * ${LATENCY_SECS:-5}))" -v cpu="$(echo "$c1 - $c0" | bc)" '
  /^cmdstat_/ {
    name = substr($1, 9); calls[name] = $3
    if (name != "evalsha" && name != "exec" && name != "multi" && name != "config|resetstat" && name != "info") inner += $3
  }
  END {
    # Per job of both phases (the latency phase adds 1,000 jobs a second). A round trip is a
    # script call (EVALSHA) or a MULTI/EXEC block (the plain enqueue); commands are those
    # that run inside either.
    trips = calls["evalsha"] + calls["exec"]
    printf "redis: round trips (evalsha %d + exec %d) = %.4f per job; commands inside them %d = %.3f per job; redis CPU %.2f s = %.1f us per job\n",
      calls["evalsha"], calls["exec"], trips / jobs, inner, inner / jobs, cpu, cpu * 1e6 / jobs
  }'
