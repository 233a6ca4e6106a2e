#!/usr/bin/env python3
"""Fails if a metric used by the alerts or the Grafana dashboard is not exported, or if an
exported metric is on no dashboard panel.

Starts the real binaries — ws-shard on the embedded bus, ws-shard on Kafka (tansu), ws-lb in
front of the first — drives a little traffic through them, scrapes every /metrics page and
compares the metric names found with those `deploy/tests/metrics_used.py` extracts from
deploy/prometheus/alerts.yml and deploy/grafana/odin-ws.json. Also reports exported
`ws_*`, `process_*` and `tokio_*` metrics that no dashboard panel shows.

Usage: exported_metrics.py <tansu> <ws-shard> <ws-lb>
"""

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402

REPO = odin.REPO


def get(url: str) -> str:
    return odin.http_get(url, timeout=3)[1]


def wait(url: str, check=lambda body: True):
    odin.wait_http(url, ready=lambda status, body: status == 200 and check(body))


async def traffic(lb: int, admin: int):
    async with websockets.connect(f"ws://127.0.0.1:{lb}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": ["m.a"]}))
        await ws.recv()
        body = json.dumps({"channel": "m.a", "data": {"x": 1}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/publish", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=3).read()
        await asyncio.wait_for(ws.recv(), 5)


def main():
    tansu, shard_bin, lb_bin = sys.argv[1:4]
    broker = odin.free_port()
    ports = {k: odin.free_port() for k in ["shard", "shard_admin", "kshard", "kshard_admin", "lb", "lb_admin"]}
    with odin.Procs("exported-metrics", stop_signal=signal.SIGKILL) as procs:
        procs.start("tansu", [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{broker}",
                              "--advertised-listener-url", f"tcp://127.0.0.1:{broker}",
                              "--storage-engine", "memory://tansu/"])
        odin.wait_port(broker, timeout=20)
        subprocess.run([tansu, "topic", "create", "trades", "--partitions", "1", "--broker", f"tcp://127.0.0.1:{broker}"],
                       check=True, capture_output=True, timeout=30)
        procs.start("shard", [shard_bin, "--shards", "1", "--base-port", ports["shard"],
                              "--admin-addr", f"127.0.0.1:{ports['shard_admin']}"])
        procs.start("kshard", [shard_bin, "--shards", "1", "--base-port", ports["kshard"],
                               "--admin-addr", f"127.0.0.1:{ports['kshard_admin']}",
                               "--kafka-brokers", f"127.0.0.1:{broker}", "--kafka-topics", "trades"])
        wait(f"http://127.0.0.1:{ports['shard']}/health")
        wait(f"http://127.0.0.1:{ports['kshard']}/health", check=lambda b: '"connected":true' in b)
        procs.start("lb", [lb_bin, "--listen", f"127.0.0.1:{ports['lb']}", "--admin-addr", f"127.0.0.1:{ports['lb_admin']}",
                           "--backend-urls", f"ws://127.0.0.1:{ports['shard']}/ws"])
        wait(f"http://127.0.0.1:{ports['lb']}/health", check=lambda b: '"status":"ok"' in b)
        asyncio.run(traffic(ports["lb"], ports["shard_admin"]))
        # Kafka lag comes from the consumer's status tick (high-water marks), once a second.
        wait(f"http://127.0.0.1:{ports['kshard_admin']}/metrics", check=lambda b: "ws_kafka_consumer_lag" in b)
        exported = set()
        for key in ["shard_admin", "kshard_admin", "lb_admin"]:
            exported |= odin.metric_names(get(f"http://127.0.0.1:{ports[key]}/metrics"))
        used = set(subprocess.run([sys.executable, str(REPO / "deploy/tests/metrics_used.py")], check=True,
                                  capture_output=True, text=True).stdout.split())
        missing = sorted(used - exported)
        unshown = sorted(n for n in exported - used if n.startswith(("ws_", "process_", "tokio_")))
        print(f"exported {len(exported)} metrics; alerts and dashboard use {len(used)}")
        if missing:
            raise SystemExit("used by alerts/dashboard but not exported: " + ", ".join(missing))
        if unshown:
            raise SystemExit("exported but on no dashboard panel or alert: " + ", ".join(unshown))
        print("ok: every metric used by the alerts and the dashboard is exported by the real binaries")


if __name__ == "__main__":
    main()
