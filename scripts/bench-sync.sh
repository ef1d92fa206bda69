#!/usr/bin/env bash
# Product sync throughput: a full sync of PRODUCTS products with VARIANTS variants each from the
# partner simulator (fault-free, stale target: up to 2 x VARIANTS updates per product) on the
# configured store (SQLite in a scratch file by default), with CONVEYOR_SYNC_TARGET_RPS=RPS.
# Prints the run's products/s and the target's requests/s (average and peak second).
set -euo pipefail
PRODUCTS=${PRODUCTS:-100000}
VARIANTS=${VARIANTS:-3}
RPS=${RPS:-100000}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/conveyor}
dir=$(mktemp -d)
"$BIN" dev partners --port 0 --products "$PRODUCTS" --variants "$VARIANTS" >"$dir/sim.out" 2>/dev/null &
sim=$!
trap 'kill $sim 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do grep -q listening "$dir/sim.out" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$dir/sim.out")
export CONVEYOR_DATABASE_URL=${CONVEYOR_DATABASE_URL:-sqlite://$dir/bench.db}
export CONVEYOR_SYNC_SOURCE_URL=$url/source CONVEYOR_SYNC_SOURCE_TOKEN=src
export CONVEYOR_SYNC_TARGET_URL=$url/target CONVEYOR_SYNC_TARGET_KEY=tgt CONVEYOR_SYNC_TARGET_RPS=$RPS
export CONVEYOR_LOG=${CONVEYOR_LOG:-warn}
"$BIN" sync products --json 2>/dev/null >"$dir/run.json"
curl -s "$url/stats" >"$dir/stats.json"
audited=$("$BIN" sync health --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["partners"]["target"]["requests_24h"])')
python3 - "$dir/run.json" "$dir/stats.json" "$audited" <<'PY'
import json, sys
run = json.load(open(sys.argv[1])); stats = json.load(open(sys.argv[2])); audited = int(sys.argv[3])
r, s = run["run"], run["seconds"]
reqs = sum(stats["requests"].values())
c = r["counts"]
print(f"sync: {r['status']}: {c['seen']} products ({c['pushed']} pushed, {c['failed']} failed) in {s:.1f}s = {c['seen']/s:.0f} products/s; "
      f"target: {reqs} requests ({reqs/s:.0f}/s average, peak {stats['peak_rps']}/s), {audited} audited")
PY
