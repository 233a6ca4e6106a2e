#!/usr/bin/env python3
"""Builds deploy/grafana/odin-ws.json, the odin-ws Grafana dashboard.

    python3 deploy/grafana/build_dashboard.py           # rewrite odin-ws.json
    python3 deploy/grafana/build_dashboard.py --check   # exit 1 if it is stale

Edit the panel list here, not the JSON. The dashboard uses a Prometheus
datasource variable and two instance filters ($lb for ws-lb VMs, $shard_vm
for ws-shard VMs).
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("odin-ws.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
LB = 'instance=~"$lb"'
SH = 'instance=~"$shard_vm"'
PROC = 'instance=~"$lb|$shard_vm"'


def q(expr, legend=""):
    return {"expr": expr, "legend": legend}


def ts(title, targets, unit="short", w=8, h=8, description="", stack=False):
    return {"kind": "timeseries", "title": title, "targets": targets, "unit": unit,
            "w": w, "h": h, "description": description, "stack": stack}


def stat(title, targets, unit="short", w=4, h=4, description="", thresholds=None):
    return {"kind": "stat", "title": title, "targets": targets, "unit": unit,
            "w": w, "h": h, "description": description, "thresholds": thresholds}


def quantiles(metric, selector, by=""):
    grp = f"le{', ' + by if by else ''}"
    leg = f"{{{{{by}}}}} " if by else ""
    return [q(f"histogram_quantile({p}, sum by ({grp}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
              f"{leg}p{label}")
            for p, label in (("0.5", "50"), ("0.99", "99"), ("0.999", "99.9"))]


ROWS = [
    ("Clients and admission (ws-lb)", [
        stat("Client connections", [q(f"sum(ws_lb_active_connections{{{LB}}})")]),
        stat("Admission queue", [q(f"sum(ws_lb_admission_queue_length{{{LB}}})")]),
        stat("Rejections/s", [q(f"sum(rate(ws_lb_admission_rejections_total{{{LB}}}[{RI}]))")],
             unit="reqps", thresholds=[("green", None), ("orange", 1)]),
        stat("Open circuit breakers", [q(f'sum(ws_circuit_breaker_state{{{LB}, state="open"}})')],
             thresholds=[("green", None), ("red", 1)]),
        stat("LBs with no shard available", [q(f"count(max by (instance) (ws_lb_shards_available{{{LB}}}) == 0) or vector(0)")],
             description="ws-lb VMs that can place no client (every new client gets 1012); NoShardAvailable fires after 1 minute. /health stays 200 meanwhile.",
             thresholds=[("green", None), ("red", 1)]),
        stat("Shard fill", [q(f"sum(ws_shard_connections{{{SH}}}) / sum(ws_shard_max_connections{{{SH}}})")],
             unit="percentunit", thresholds=[("green", None), ("orange", 0.7), ("red", 0.9)]),
        stat("Kafka connected", [q(f"min(ws_kafka_connected{{{SH}}})")],
             description="1 when every shard VM is connected to Kafka.",
             thresholds=[("red", None), ("green", 1)]),
        ts("Client connections per ws-lb", [q(f"sum by (instance) (ws_lb_active_connections{{{LB}}})", "{{instance}}")]),
        ts("Client connection outcomes", [q(f"sum by (result) (rate(ws_lb_client_connections_total{{{LB}}}[{RI}]))", "{{result}}"),
                                          q(f"sum by (reason) (rate(ws_lb_auth_failures_total{{{LB}}}[{RI}]))", "auth failure {{reason}}")],
           unit="cps", description="relayed, closed_1012, closed_1013, rejected, closed_4001, closed_4003; and tokens refused at the edge by reason (ws_lb_auth_failures_total)"),
        ts("Close codes sent to clients", [q(f"sum by (code) (rate(ws_lb_close_codes_total{{{LB}}}[{RI}]))", "{{code}}")], unit="cps"),
        ts("Token verifications by cache result", [
            q(f"sum by (result) (rate(ws_lb_auth_cache_lookups_total{{{LB}}}[{RI}]))", "ws-lb {{result}}"),
            q(f"sum by (result) (rate(ws_shard_auth_cache_lookups_total{{{SH}}}[{RI}]))", "ws-shard {{result}}"),
        ], unit="ops", description="hit: a token verified before with the current keys (no signature check); miss: verified in full. Every token misses once after a key rotation."),
        ts("Relay ends by cause", [q(f"sum by (end) (rate(ws_lb_relay_ends_total{{{LB}}}[{RI}]))", "{{end}}")], unit="cps",
           description="closed, client_gone, shard_lost, drained, client_stalled (dropped after stall_timeout without reading)"),
        ts("Admission queue length", [q(f"max by (instance) (ws_lb_admission_queue_length{{{LB}}})", "{{instance}}")]),
        ts("Admission wait", quantiles("ws_lb_admission_wait_seconds", LB), unit="s"),
        ts("Admission rejections by reason", [q(f"sum by (reason) (rate(ws_lb_admission_rejections_total{{{LB}}}[{RI}]))", "{{reason}}")],
           unit="reqps"),
    ]),
    ("Upstream handshakes (ws-lb to shards)", [
        ts("Handshakes", [
            q(f"sum(rate(ws_handshake_attempts_total{{{LB}}}[{RI}]))", "attempts"),
            q(f"sum(rate(ws_handshake_success_total{{{LB}}}[{RI}]))", "success"),
            q(f"sum(rate(ws_handshake_failures_total{{{LB}}}[{RI}]))", "failures"),
        ], unit="ops"),
        ts("Handshake failures by shard", [q(f"sum by (shard_id) (rate(ws_handshake_failures_total{{{LB}}}[{RI}]))", "shard {{shard_id}}")],
           unit="ops", description="HighHandshakeFailureRate fires above 0.15/s per ws-lb."),
        ts("Handshake duration", quantiles("ws_handshake_duration_seconds", LB), unit="s"),
        ts("Handshake retries by attempt", [q(f"sum by (attempt) (rate(ws_handshake_retry_count{{{LB}}}[{RI}]))", "attempt {{attempt}}")],
           unit="ops", description="Attempts made as the N-th try for one client."),
        ts("Failed attempts by kind", [q(f"sum by (kind) (rate(ws_lb_attempt_errors_total{{{LB}}}[{RI}]))", "{{kind}}")],
           unit="ops", description="refused = shard down, handshake_timeout = hung or overloaded, http_503 = full, not_ready = draining or starting."),
        ts("Shard /health poll failures", [q(f"sum by (shard_id) (rate(ws_lb_health_poll_failures_total{{{LB}}}[{RI}]))", "shard {{shard_id}}")],
           unit="ops"),
    ]),
    ("Shard membership (ws-lb)", [
        ts("Shard members by state", [q(f"max by (state) (ws_lb_members{{{LB}}})", "{{state}}")],
           description="pending (waiting for a healthy /health), warming (slow start), active, removed (no new clients; relays run until the shard drains them). Max over ws-lb VMs."),
        ts("Membership updates and source errors", [
            q(f"sum(increase(ws_lb_membership_updates_total{{{LB}}}[{RI}]))", "updates applied"),
            q(f"sum by (reason) (increase(ws_lb_membership_source_errors_total{{{LB}}}[{RI}]))", "source error: {{reason}}"),
        ], description="A failing source keeps the last good set (MembershipSourceStale after 2 minutes)."),
        ts("Membership source age", [q(f"max by (instance) (time() - (ws_lb_membership_last_update_timestamp_seconds{{{LB}}} > 0))", "{{instance}}")],
           unit="s", description="Seconds since each ws-lb last read its backend_file / backend_dns successfully (absent with a static backend_urls)."),
        ts("Relays per shard (ws-lb view)", [q(f"sum by (shard_id) (ws_lb_shard_relays{{{LB}}})", "shard {{shard_id}}")],
           description="Handshakes in progress and relays per shard slot, summed over ws-lb VMs; selection uses each LB's live count between health polls."),
    ]),
    ("Circuit breakers and shard scores (as seen by ws-lb)", [
        ts("Breaker states", [q(f"sum by (state) (ws_circuit_breaker_state{{{LB}}})", "{{state}}")],
           description="Number of (ws-lb, shard) breakers in each state.", stack=True),
        ts("Breaker transitions", [q(f"sum by (from, to) (increase(ws_circuit_breaker_transitions_total{{{LB}}}[{RI}]))", "{{from}} -> {{to}}")]),
        ts("Breaker failures by shard", [q(f"sum by (shard_id) (rate(ws_circuit_breaker_failures_total{{{LB}}}[{RI}]))", "shard {{shard_id}}")],
           unit="ops"),
        ts("Panic-routed shard calls", [q(f"sum by (instance) (rate(ws_lb_panic_routed_total{{{LB}}}[{RI}]))", "{{instance}}")],
           unit="ops", description="Calls a ws-lb made past breakers opened by timeouts because none admitted (panic routing): that LB is overloaded, not its shards."),
        ts("Shard health score", [q(f"min by (shard_id) (ws_shard_health_score{{{LB}}})", "shard {{shard_id}}")],
           unit="percentunit", description="Worst score over all ws-lb VMs; ShardUnhealthy fires below 0.3."),
        ts("Shard utilization", [q(f"max by (shard_id) (ws_shard_utilization{{{LB}}})", "shard {{shard_id}}")], unit="percentunit"),
        ts("Shard recent failures", [q(f"max by (shard_id) (ws_shard_recent_failures{{{LB}}})", "shard {{shard_id}}")]),
        ts("Shards available per ws-lb", [q(f"min by (instance) (ws_lb_shards_available{{{LB}}})", "{{instance}}")],
           description="Shards each ws-lb would send a new client to now; 0 = every new client gets 1012 (NoShardAvailable)."),
    ]),
    ("Shards (ws-shard)", [
        ts("Connections per shard", [
            q(f"sum by (instance, shard_id) (ws_shard_connections{{{SH}}})", "{{instance}} / {{shard_id}}"),
        ]),
        ts("Connections and capacity", [
            q(f"sum(ws_shard_connections{{{SH}}})", "connections"),
            q(f"sum(ws_shard_max_connections{{{SH}}})", "capacity"),
            q(f"sum(ws_shard_tier_links{{{SH}}})", "tier links (--tier-mux)"),
        ], description="Tier links: one per ws-lb and shard when ws-lb runs with --tier-mux, each carrying many clients."),
        ts("Accepted and rejected", [
            q(f"sum(rate(ws_shard_connections_accepted_total{{{SH}}}[{RI}]))", "accepted"),
            q(f"sum by (reason) (rate(ws_shard_connections_rejected_total{{{SH}}}[{RI}]))", "rejected: {{reason}}"),
        ], unit="cps"),
        ts("Closes by code", [q(f"sum by (code) (rate(ws_shard_closes_total{{{SH}}}[{RI}]))", "{{code}}")], unit="cps"),
        ts("Slow-consumer disconnects", [q(f"sum by (instance, shard_id) (rate(ws_shard_slow_consumer_disconnects_total{{{SH}}}[{RI}]))", "{{instance}} / {{shard_id}}")],
           unit="cps", description="SlowConsumerSpike fires above 1/s per shard."),
        ts("Channels and subscriptions", [
            q(f"sum(ws_shard_channels{{{SH}}})", "channels"),
            q(f"sum(ws_shard_subscriptions{{{SH}}})", "subscriptions"),
        ]),
        ts("Error replies by code", [q(f"sum by (code) (rate(ws_shard_error_replies_total{{{SH}}}[{RI}]))", "{{code}}"),
                                     q(f"sum by (reason) (rate(ws_shard_auth_failures_total{{{SH}}}[{RI}]))", "auth failure {{reason}}")],
           unit="ops", description="error replies by code (forbidden: a subscribe outside the token's entitlements), and tokens the shard's own verification refused"),
        ts("Replays and recoveries", [
            q(f"sum(rate(ws_shard_replayed_total{{{SH}}}[{RI}]))", "replayed"),
            q(f"sum by (recovered) (rate(ws_shard_recoveries_total{{{SH}}}[{RI}]))", "recoveries (recovered={{recovered}})"),
        ], unit="ops"),
        ts("Accept errors", [q(f"sum by (job, listener, kind) (rate(ws_accept_errors_total{{instance=~\"$lb|$shard_vm\"}}[{RI}]))", "{{job}} {{listener}} {{kind}}")],
           unit="ops", description="Both binaries."),
        ts("Refused for lack of file descriptors (503)", [q(f"sum by (job, listener) (rate(ws_accept_fd_exhausted_rejects_total{{instance=~\"$lb|$shard_vm\"}}[{RI}]))", "{{job}} {{listener}}")],
           unit="ops", description="Connections answered 503 from the reserved descriptor. Both binaries."),
    ]),
    ("Process and runtime (both binaries)", [
        ts("Memory", [q(f"process_resident_memory_bytes{{{PROC}}}", "resident {{job}} {{instance}}"),
                      q(f"process_virtual_memory_bytes{{{PROC}}}", "virtual {{job}} {{instance}}")], unit="bytes"),
        ts("CPU", [q(f"rate(process_cpu_seconds_total{{{PROC}}}[{RI}])", "{{job}} {{instance}}")], unit="percentunit",
           description="CPU seconds per second (1.0 = one core)."),
        ts("Open descriptors / limit", [q(f"process_open_fds{{{PROC}}} / process_max_fds{{{PROC}}}", "{{job}} {{instance}}")],
           unit="percentunit", description="FileDescriptorsNearLimit fires above 0.8. ws-lb holds two per relayed client."),
        ts("Open descriptors", [q(f"process_open_fds{{{PROC}}}", "{{job}} {{instance}}")]),
        ts("Threads", [q(f"process_threads{{{PROC}}}", "{{job}} {{instance}}"),
                       q(f"tokio_workers{{{PROC}}}", "workers {{job}} {{instance}}")]),
        ts("Tokio tasks alive", [q(f"tokio_alive_tasks{{{PROC}}}", "{{job}} {{instance}}")],
           description="About one per connection plus a fixed few; growth at a flat connection count is a leak."),
        ts("Tokio global queue", [q(f"tokio_global_queue_depth{{{PROC}}}", "{{job}} {{instance}}")],
           description="Tasks waiting for a worker; persistently above 0 = the runtime cannot keep up."),
        ts("Tokio busy ratio", [q(f"rate(tokio_worker_busy_seconds_total{{{PROC}}}[{RI}]) / tokio_workers{{{PROC}}}", "{{job}} {{instance}}")],
           unit="percentunit"),
        ts("Restarts", [q(f"changes(process_start_time_seconds{{{PROC}}}[1h])", "{{job}} {{instance}}")],
           description="Process restarts in the last hour (autohealing, crashes, deploys)."),
    ]),
    ("Fan-out", [
        ts("Messages published", [
            q(f"sum(rate(ws_shard_messages_published_total{{{SH}}}[{RI}]))", "published"),
            q(f"sum(rate(ws_shard_messages_duplicate_total{{{SH}}}[{RI}]))", "duplicates"),
        ], unit="ops"),
        ts("Deliveries", [q(f"sum by (instance) (rate(ws_shard_deliveries_total{{{SH}}}[{RI}]))", "{{instance}}")], unit="ops"),
        ts("Fan-out latency", quantiles("ws_shard_fanout_seconds", SH), unit="s"),
    ]),
    ("History and memory (ws-shard)", [
        ts("History budget used", [
            q(f"max by (instance) (ws_shard_history_bytes{{{SH}}} / ws_shard_history_budget_bytes{{{SH}}})", "{{instance}}"),
        ], unit="percentunit", description="HistoryBudgetNearlyFull fires above 0.9 for 15 minutes; eviction keeps it at or below 1."),
        ts("Registry entries", [
            q(f"sum(ws_shard_channels{{{SH}}})", "channels"),
            q(f"sum(ws_shard_channel_positions{{{SH}}})", "kept positions"),
            q(f"sum(ws_shard_empty_channels{{{SH}}})", "empty (subscribed, no message)"),
        ], description="Kept positions: channels that left the registry, remembered as (epoch, last seq)."),
        ts("Evictions by cause", [
            q(f"sum by (cause) (rate(ws_shard_channel_evictions_total{{{SH}}}[{RI}]))", "{{cause}}"),
        ], unit="ops", description="budget: history dropped to stay within history_budget; idle: channel left after channel_idle_timeout; position: a kept position dropped."),
    ]),
    ("Kafka", [
        ts("Consumer lag by topic", [q(f"max by (topic) (ws_kafka_consumer_lag{{{SH}}})", "{{topic}}")],
           description="Worst partition; KafkaConsumerLagHigh fires above 10000."),
        ts("Records consumed", [
            q(f"sum by (topic) (rate(ws_kafka_records_total{{{SH}}}[{RI}]))", "{{topic}}"),
            q(f"sum by (topic) (rate(ws_kafka_invalid_records_total{{{SH}}}[{RI}]))", "invalid: {{topic}}"),
        ], unit="ops"),
        ts("Record to fan-out latency", quantiles("ws_kafka_record_to_fanout_seconds", SH), unit="s"),
        ts("Kafka connected per VM", [q(f"min by (instance) (ws_kafka_connected{{{SH}}})", "{{instance}}")]),
        ts("Consumer restarts", [q(f"sum by (reason) (increase(ws_kafka_consumer_restarts_total{{{SH}}}[{RI}]))", "{{reason}}")],
           description="The librdkafka consumer runs in a child process; restarts resume at the next offset."),
    ]),
]


def thresholds_json(steps):
    return {"mode": "absolute",
            "steps": [{"color": c, "value": v} for c, v in (steps or [("green", None)])]}


def panel_json(p, pid, x, y):
    targets = [{"datasource": DS, "refId": chr(ord("A") + i), "expr": t["expr"],
                "legendFormat": t["legend"] or "__auto", "range": True}
               for i, t in enumerate(p["targets"])]
    out = {"id": pid, "type": p["kind"], "title": p["title"], "datasource": DS,
           "gridPos": {"h": p["h"], "w": p["w"], "x": x, "y": y}, "targets": targets}
    if p["description"]:
        out["description"] = p["description"]
    if p["kind"] == "timeseries":
        out["fieldConfig"] = {"defaults": {"unit": p["unit"], "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
            "stacking": {"mode": "normal" if p["stack"] else "none", "group": "A"}}},
            "overrides": []}
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["fieldConfig"] = {"defaults": {"unit": p["unit"], "thresholds": thresholds_json(p["thresholds"]),
                                           "color": {"mode": "thresholds"}}, "overrides": []}
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto",
                          "justifyMode": "auto", "orientation": "auto"}
    return out


def build():
    panels, pid, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x, line_h = pid + 1, y + 1, 0, 0
        for p in row:
            if x + p["w"] > 24:
                x, y, line_h = 0, y + line_h, 0
            panels.append(panel_json(p, pid, x, y))
            pid, x, line_h = pid + 1, x + p["w"], max(line_h, p["h"])
        y += line_h
    var = {"current": {}, "datasource": DS, "includeAll": True, "multi": True, "refresh": 2,
           "type": "query", "allValue": ".*", "sort": 1}
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "odin-ws: ws-lb load balancers and ws-shard fan-out servers (deploy/grafana/build_dashboard.py).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["odin-ws", "websocket", "market-data"],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            dict(var, name="lb", label="ws-lb VMs", definition="label_values(ws_lb_active_connections, instance)",
                 query={"query": "label_values(ws_lb_active_connections, instance)", "refId": "lb"}),
            dict(var, name="shard_vm", label="ws-shard VMs",
                 definition="label_values(ws_shard_connections, instance)",
                 query={"query": "label_values(ws_shard_connections, instance)", "refId": "shard_vm"}),
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "title": "odin-ws",
        "uid": "odin-ws",
        "version": 1,
    }


def main():
    text = json.dumps(build(), indent=2) + "\n"
    if sys.argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 {Path(__file__)}", file=sys.stderr)
            return 1
        return 0
    if sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
