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
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.read().decode()


_last = {}


def wait(url: str, timeout: float = 30, check=lambda body: True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            _last[url] = get(url)
            if check(_last[url]):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}: last body {body if (body := _last.get(url)) else None}")


def names(page: str) -> set:
    out = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            out.add(line.split()[2])
    return out


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
    broker = free_port()
    ports = {k: free_port() for k in ["shard", "shard_admin", "kshard", "kshard_admin", "lb", "lb_admin"]}
    procs = []

    def start(args):
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open("/tmp/odin-exported-metrics.log", "a")))

    try:
        start([tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{broker}",
               "--advertised-listener-url", f"tcp://127.0.0.1:{broker}", "--storage-engine", "memory://tansu/"])
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", broker), 1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("tansu did not start")
                time.sleep(0.1)
        subprocess.run([tansu, "topic", "create", "trades", "--partitions", "1", "--broker", f"tcp://127.0.0.1:{broker}"],
                       check=True, capture_output=True, timeout=30)
        start([shard_bin, "--shards", "1", "--base-port", str(ports["shard"]), "--admin-addr", f"127.0.0.1:{ports['shard_admin']}"])
        start([shard_bin, "--shards", "1", "--base-port", str(ports["kshard"]), "--admin-addr", f"127.0.0.1:{ports['kshard_admin']}",
               "--kafka-brokers", f"127.0.0.1:{broker}", "--kafka-topics", "trades"])
        wait(f"http://127.0.0.1:{ports['shard']}/health")
        wait(f"http://127.0.0.1:{ports['kshard']}/health", check=lambda b: '"connected":true' in b)
        start([lb_bin, "--listen", f"127.0.0.1:{ports['lb']}", "--admin-addr", f"127.0.0.1:{ports['lb_admin']}",
               "--backend-urls", f"ws://127.0.0.1:{ports['shard']}/ws"])
        wait(f"http://127.0.0.1:{ports['lb']}/health", check=lambda b: '"status":"ok"' in b)
        asyncio.run(traffic(ports["lb"], ports["shard_admin"]))
        # Kafka lag comes from librdkafka statistics, once a second.
        wait(f"http://127.0.0.1:{ports['kshard_admin']}/metrics", check=lambda b: "ws_kafka_consumer_lag" in b)
        exported = set()
        for key in ["shard_admin", "kshard_admin", "lb_admin"]:
            exported |= names(get(f"http://127.0.0.1:{ports[key]}/metrics"))
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
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
