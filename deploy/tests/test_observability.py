#!/usr/bin/env python3
"""Static checks of deploy/prometheus/alerts.yml and deploy/grafana/odin-ws.json
(promtool checks the rule syntax and behaviour separately).

- every alert has `for`, a severity label, summary/description annotations and
  runbook_url = docs/runbook.md#<alert name in lowercase>;
- the documented alerts exist with their exact expressions and thresholds;
- the dashboard is well-formed (schemaVersion, unique ids, grid inside 24
  columns, panel types, Prometheus datasource, non-empty expressions), is
  what build_dashboard.py generates, and shows every exported metric;
- alerts and dashboard reference only exported metrics (metrics_used.py).

Run: python3 deploy/tests/test_observability.py   (exit 0 = all passed)
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from checks import check, eq, run

DEPLOY = Path(__file__).resolve().parent.parent
TESTS = DEPLOY / "tests"
EXPECTED = {
    "HighHandshakeFailureRate": "sum by (instance) (rate(ws_handshake_failures_total[5m])) > 0.15",
    "NoShardAvailable": "max by (instance) (ws_lb_shards_available) == 0",
    "FileDescriptorsNearLimit": 'process_open_fds{job=~"ws-lb|ws-shard"} / process_max_fds{job=~"ws-lb|ws-shard"} > 0.8',
    "ShardUnhealthy": "ws_shard_health_score < 0.3",
    "SlowConsumerSpike": "sum by (instance, shard_id) (rate(ws_shard_slow_consumer_disconnects_total[5m])) > 1",
    "KafkaConsumerLagHigh": "max by (instance, topic) (ws_kafka_consumer_lag) > 10000",
    "AdmissionRejections": "sum by (instance, reason) (rate(ws_lb_admission_rejections_total[5m])) > 1",
    "KafkaDisconnected": "ws_kafka_connected == 0",
    "MembershipSourceStale": "(time() - ws_lb_membership_last_update_timestamp_seconds > 120) and ws_lb_membership_last_update_timestamp_seconds > 0",
    "ShardTierSaturated": "sum(ws_shard_connections) / sum(ws_shard_max_connections) > 0.85",
    "HistoryBudgetNearlyFull": "max by (instance) (ws_shard_history_bytes / ws_shard_history_budget_bytes) > 0.9",
}


def exported():
    return [line.strip() for line in (TESTS / "exported_metrics.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_alerts():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    eq("alert names", sorted(alerts), sorted(EXPECTED))
    for name, rule in alerts.items():
        eq(f"{name}: expression", " ".join(str(rule.get("expr", "")).split()), EXPECTED.get(name))
        check(f"{name}: has for:", bool(rule.get("for")))
        check(f"{name}: severity label", rule.get("labels", {}).get("severity") in ("warning", "critical"))
        ann = rule.get("annotations", {})
        check(f"{name}: summary", bool(ann.get("summary")))
        check(f"{name}: description", bool(ann.get("description")))
        eq(f"{name}: runbook_url", ann.get("runbook_url"), f"docs/runbook.md#{name.lower()}")
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    for name in alerts:
        cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", []) if c["alertname"] == name]
        check(f"{name}: unit test with a firing case", any(c.get("exp_alerts") for c in cases))
        check(f"{name}: unit test with a non-firing case", any(not c.get("exp_alerts") for c in cases))


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def test_dashboard():
    path = DEPLOY / "grafana" / "odin-ws.json"
    d = json.loads(path.read_text())
    check("dashboard schemaVersion 36..41", 36 <= d.get("schemaVersion", 0) <= 41, d.get("schemaVersion"))
    eq("dashboard uid", d.get("uid"), "odin-ws")
    ps = list(panels(d.get("panels", [])))
    ids = [p.get("id") for p in ps]
    eq("panel ids unique", len(ids), len(set(ids)))
    for p in ps:
        name = f"panel {p.get('id')} {p.get('title')!r}"
        check(f"{name}: type", p.get("type") in ("row", "timeseries", "stat"), p.get("type"))
        g = p.get("gridPos", {})
        check(f"{name}: gridPos within 24 columns", g.get("x", -1) >= 0 and g.get("w", 0) > 0
              and g["x"] + g["w"] <= 24 and g.get("h", 0) > 0, g)
        if p.get("type") == "row":
            continue
        check(f"{name}: Prometheus datasource", p.get("datasource", {}).get("type") == "prometheus")
        targets = p.get("targets", [])
        check(f"{name}: has targets", bool(targets))
        for t in targets:
            check(f"{name}: target {t.get('refId')} has an odin-ws expression",
                  any(p in t.get("expr", "") for p in ("ws_", "process_", "tokio_")))
        refs = [t.get("refId") for t in targets]
        eq(f"{name}: refIds unique", len(refs), len(set(refs)))
    text = " ".join(t.get("expr", "") for p in ps for t in p.get("targets", []))
    for m in exported():
        check(f"dashboard shows {m}", m in text)
    p = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"],
                       capture_output=True, text=True)
    check("odin-ws.json is what build_dashboard.py generates", p.returncode == 0, p.stderr.strip())


def test_metrics_used():
    p = subprocess.run([sys.executable, str(TESTS / "metrics_used.py")], capture_output=True, text=True)
    eq("metrics_used.py exit code", p.returncode, 0)
    lines = p.stdout.splitlines()
    eq("metrics_used.py output sorted and unique", lines, sorted(set(lines)))
    check("metrics_used.py finds the histograms by base name",
          "ws_shard_fanout_seconds" in lines and not any(n.endswith("_bucket") for n in lines))
    check("metrics_used.py keeps the counter ws_handshake_retry_count", "ws_handshake_retry_count" in lines)
    known = set(exported())
    eq("referenced metrics not exported", [n for n in lines if n not in known], [])
    p = subprocess.run([sys.executable, str(TESTS / "metrics_used.py"), "--against",
                        str(TESTS / "exported_metrics.txt")], capture_output=True, text=True)
    eq("metrics_used.py --against exit code", p.returncode, 0)


def main():
    return run("test_observability", (test_alerts, test_dashboard, test_metrics_used))


if __name__ == "__main__":
    sys.exit(main())
