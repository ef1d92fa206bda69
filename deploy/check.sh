#!/usr/bin/env bash
# Offline checks of the monitoring files (exits non-zero on the first failure):
#   - prometheus/prometheus.yml is a valid configuration, rule files included
#     (`promtool check config`, on a copy with the example token file as the credentials);
#   - prometheus/alerts.yml is valid and its unit tests pass (`promtool check rules`,
#     `promtool test rules prometheus/alerts_test.yml`);
#   - grafana/conveyor-dashboard.json is valid JSON, schemaVersion 39, every panel on the
#     ${DS_PROMETHEUS} data source, unique panel ids, and every PromQL expression parses
#     (each one, with the dashboard variables substituted, becomes a recording rule that
#     `promtool check rules` parses);
#   - every conveyor_* series named in the alerts and the dashboard is one /metrics exposes.
# The end-to-end test (crates/conveyor-cli/tests/cli/prometheus.rs) runs the same expressions
# against a real Prometheus scraping `conveyor serve`.
# Needs promtool (apt-get install prometheus) and python3. Without promtool this fails under CI
# (CI set) and skips otherwise.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null 2>&1; then
  if [ -n "${CI:-}" ]; then
    echo "!! promtool is not installed (apt-get install prometheus)" >&2
    exit 1
  fi
  echo "skipping the monitoring checks: promtool is not installed (apt-get install prometheus)" >&2
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== promtool check config prometheus/prometheus.yml"
cp prometheus/prometheus.yml prometheus/alerts.yml "$tmp/"
cp prometheus/conveyor-read-token.example "$tmp/conveyor-read-token"
promtool check config "$tmp/prometheus.yml"

echo "== promtool check rules prometheus/alerts.yml"
promtool check rules prometheus/alerts.yml

echo "== promtool test rules prometheus/alerts_test.yml"
(cd prometheus && promtool test rules alerts_test.yml)

echo "== grafana/conveyor-dashboard.json"
python3 - grafana/conveyor-dashboard.json prometheus/alerts.yml "$tmp/dashboard-rules.yml" <<'PY'
import json, re, sys

dashboard_path, alerts_path, rules_path = sys.argv[1:4]
errors = []
with open(dashboard_path) as f:
    try:
        dash = json.load(f)
    except json.JSONDecodeError as e:
        sys.exit(f"!! {dashboard_path}: invalid JSON: {e}")

if dash.get("schemaVersion") != 39:
    errors.append(f"schemaVersion is {dash.get('schemaVersion')!r}, expected 39")
names = [v.get("name") for v in dash.get("templating", {}).get("list", [])]
for var in ("DS_PROMETHEUS", "queue", "kind"):
    if var not in names:
        errors.append(f"no template variable {var}")

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

exprs, ids = [], set()
for p in panels(dash.get("panels", [])):
    title = p.get("title", "?")
    if p.get("id") in ids:
        errors.append(f"panel {title!r}: duplicate id {p.get('id')}")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        errors.append(f"panel {title!r}: data source is not ${{DS_PROMETHEUS}}")
    targets = p.get("targets", [])
    if not targets:
        errors.append(f"panel {title!r}: no query")
    for t in targets:
        if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"panel {title!r} query {t.get('refId')}: data source is not ${{DS_PROMETHEUS}}")
        expr = t.get("expr", "")
        if not expr.strip():
            errors.append(f"panel {title!r} query {t.get('refId')}: empty expr")
        exprs.append((title, expr))

# What /metrics exposes (SPEC.md "Telemetry"); histograms with their _bucket, _sum, _count.
known = {
    "conveyor_jobs_total", "conveyor_jobs_enqueued_total", "conveyor_events_total",
    "conveyor_deliveries_total", "conveyor_sync_requests_total",
    "conveyor_queue_jobs", "conveyor_queue_paused", "conveyor_queue_oldest_wait_seconds",
    "conveyor_worker_processes", "conveyor_worker_executors", "conveyor_worker_busy",
    "conveyor_breaker_state", "conveyor_breaker_failure_rate", "conveyor_build_info",
}
for h in ("conveyor_job_duration_seconds", "conveyor_job_wait_seconds"):
    known |= {h + "_bucket", h + "_sum", h + "_count"}
with open(alerts_path) as f:
    # Comments aside (they name families such as conveyor_queue_*).
    alerts_text = "\n".join(l for l in f.read().splitlines() if not l.lstrip().startswith("#"))
for where, text in [("alerts.yml", alerts_text)] + [(f"panel {t!r}", e) for t, e in exprs]:
    for name in re.findall(r"\bconveyor_[a-z_]*[a-z]\b", text):
        if name not in known:
            errors.append(f"{where}: unknown series {name}")

def concrete(expr):
    return (expr.replace("$__rate_interval", "1m").replace("${queue}", ".*").replace("$queue", ".*")
            .replace("${kind}", ".*").replace("$kind", ".*"))

# JSON is YAML: one recording rule per expression, for promtool to parse.
rules = [{"record": f"dashboard:expr_{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs)]
with open(rules_path, "w") as f:
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, indent=1)
with open(rules_path + ".index", "w") as f:
    f.writelines(f"dashboard:expr_{i}  {t}: {e}\n" for i, (t, e) in enumerate(exprs))

if errors:
    print("\n".join("!! " + e for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"  {len(exprs)} queries in {len(ids)} panels")
PY
echo "== promtool check rules (the dashboard's queries)"
if ! promtool check rules "$tmp/dashboard-rules.yml"; then
  echo "!! a dashboard query does not parse; the rules above are:" >&2
  cat "$tmp/dashboard-rules.yml.index" >&2
  exit 1
fi
echo "monitoring files OK"
