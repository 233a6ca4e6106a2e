#!/usr/bin/env python3
"""A million distinct keys through one real ws-shard process: its RSS against the history
budget, with fan-out and recovery checked on hot channels all along.

The shard (release build) runs with `--history-budget` (default 64 MiB). A producer sends
`--keys` records, each on a key of its own (`user-<i>`, ~70-byte JSON, as a topic keyed by
user), and after every 1,000 of them one record on each of 8 hot channels. Three WebSocket
subscribers per hot channel check that they receive every hot record once, in order. At
the end a fresh client recovers the last 500 messages of each hot channel with `since`
(must be `recovered:true` with exactly those messages), and clients asking for early keys'
messages must get `recovered:false` (at least 4 of the 8 checked: a key that was the first
record of its partition has no position before it). The shard's RSS is sampled every 0.5 s.

Sources: `--source kafka` (tansu broker, memory storage; kafka-python producer; 3
partitions, channel `<topic>.<key>`) — the default when tansu is installed — or `--source
bus` (`POST /publish` on the embedded bus from 4 producer processes).

    python3 bench/cardinality.py [--keys 1000000] [--budget 67108864] [--source kafka|bus]

Result: bench/results/cardinality-<timestamp>.json (commit, machine, flags, RSS timeline,
checks) and a summary on stdout. Exit status 1 if a check failed or RSS went above budget +
overhead (a quarter of the budget + 16 MiB above the idle RSS, as docs/runbook.md states).
"""

import argparse
import asyncio
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (machine(), commit_of(), proc_rss_kb(), save())
import odin  # noqa: E402
from odin import free_port, metric  # noqa: E402

REPO = odin.REPO
HOT = [f"HOT-{i}" for i in range(8)]
SUBS_PER_HOT = 3
EARLY = (0, 1, 2, 3, 4, 5, 10_000, 100_000)
TOPIC = "users"


def rss_kib(pid):
    return bench.proc_rss_kb(pid)[0]


def record(i):
    return json.dumps({"user": f"user-{i}", "balance": i * 7, "ccy": "USD", "ts": 1795803982627})


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        t0 = time.time()
        while not self.stop.is_set():
            self.samples.append((round(time.time() - t0, 1), rss_kib(self.pid)))
            time.sleep(0.5)


# ---- producers ------------------------------------------------------------------------------

def kafka_produce(port, keys):
    from kafka import KafkaProducer
    p = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", linger_ms=20, batch_size=256 * 1024,
                      acks=1, max_in_flight_requests_per_connection=1)
    hot = 0
    early = {}
    for i in range(keys):
        f = p.send(TOPIC, key=f"user-{i}".encode(), value=record(i).encode())
        if i in EARLY:
            early[i] = f
        if i % 1000 == 999:
            hot += 1
            for h in HOT:
                p.send(TOPIC, key=h.encode(), value=json.dumps({"px": hot}).encode())
    p.flush(timeout=120)
    positions = {i: (f.get(timeout=60).partition, f.get(timeout=60).offset) for i, f in early.items()}
    p.close()
    return hot, positions


def bus_worker(admin, start, stop, step):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
    for i in range(start, stop, step):
        body = json.dumps({"channel": f"{TOPIC}.user-{i}", "data": json.loads(record(i))})
        c.request("POST", "/publish", body, {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise SystemExit(f"publish: {r.status}")


def bus_produce(admin, keys, workers=4):
    import http.client
    hot_c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
    hot = 0
    chunk = 1000 * workers * 10
    for base in range(0, keys, chunk):
        procs = [multiprocessing.Process(target=bus_worker, args=(admin, base + w, min(base + chunk, keys), workers))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit("bus producer failed")
        for _ in range(min(chunk, keys - base) // 1000):
            hot += 1
            for h in HOT:
                body = json.dumps({"channel": f"{TOPIC}.{h}", "data": {"px": hot}})
                hot_c.request("POST", "/publish", body, {"content-type": "application/json"})
                r = hot_c.getresponse()
                r.read()
    # A bus channel is numbered from 1 unless its segment forgot channels before it was
    # created (then above that floor): the early keys come before the budget is first reached.
    return hot, {i: (None, 1) for i in EARLY}


# ---- subscribers ------------------------------------------------------------------------------

class Sub:
    def __init__(self, url, channel):
        self.url, self.channel = url, channel
        self.seqs, self.epoch, self.errors = [], None, []

    async def run(self, ready):
        async with websockets.connect(self.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "channels": [self.channel]}))
            ready.set()
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "message":
                    if self.seqs and m["seq"] <= self.seqs[-1]:
                        self.errors.append(f"out of order or duplicate: {m['seq']} after {self.seqs[-1]}")
                    self.epoch = m["epoch"]
                    self.seqs.append(m["seq"])
                elif m["type"] == "error":
                    self.errors.append(str(m))


async def recover(url, channel, epoch, seq):
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": [channel],
                                  "since": {channel: {"epoch": epoch, "seq": seq}}}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        got = []
        if first.get("recovered"):
            while not got or got[-1] < first["seq"]:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m["type"] == "message":
                    got.append(m["seq"])
        return first, got


async def run(a):
    shard_bin = odin.release_bin() / "ws-shard"
    port, admin = free_port(), free_port()
    # SIGKILL: nothing here needs a drain, and a shard holding a million keys should not
    # delay the next run.
    procs = odin.Procs("card", stop_signal=signal.SIGKILL)
    src_args = []
    broker = None
    try:
        if a.source == "kafka":
            broker = free_port()
            procs.start("tansu", [a.tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{broker}",
                                  "--advertised-listener-url", f"tcp://127.0.0.1:{broker}",
                                  "--storage-engine", "memory://tansu/"])
            odin.wait_port(broker, 30)
            out = subprocess.run([a.tansu, "topic", "create", TOPIC, "--partitions", "3",
                                  "--broker", f"tcp://127.0.0.1:{broker}"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            src_args = ["--kafka-brokers", f"127.0.0.1:{broker}", "--kafka-topics", TOPIC, "--kafka-start", "latest"]
        flags = ["--shards", "1", "--base-port", str(port), "--admin-addr", f"127.0.0.1:{admin}", "--client-rate", "0",
                 "--history-budget", str(a.budget), *src_args]
        shard = procs.start("shard", [shard_bin, *flags])
        odin.wait_for(lambda: odin.get_json(f"http://127.0.0.1:{port}/health")["source"]["connected"],
                      60, "shard source connected")
        url = f"ws://127.0.0.1:{port}/ws"
        subs = [Sub(url, f"{TOPIC}.{h}") for h in HOT for _ in range(SUBS_PER_HOT)]
        tasks = []
        for s in subs:
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(s.run(ready)))
            await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(1)
        idle_rss = rss_kib(shard.pid)
        machine = bench.machine()
        sampler = Sampler(shard.pid)
        sampler.start()
        t0 = time.time()
        if a.source == "kafka":
            hot, early_pos = await asyncio.to_thread(kafka_produce, broker, a.keys)
        else:
            hot, early_pos = await asyncio.to_thread(bus_produce, admin, a.keys)
        produced_s = time.time() - t0
        # Wait until every subscriber has every hot message.
        deadline = time.time() + 300
        while time.time() < deadline and any(len(s.seqs) < hot for s in subs):
            await asyncio.sleep(0.2)
        settled_s = time.time() - t0
        await asyncio.sleep(2)
        sampler.stop.set()
        sampler.join()
        page = odin.http_get(f"http://127.0.0.1:{admin}/metrics", timeout=5)[1]
        checks = {}
        checks["every subscriber got every hot message once, in order"] = all(
            len(s.seqs) == hot and not s.errors for s in subs)
        # All subscribers of one channel saw the same sequence.
        by_chan = {}
        for s in subs:
            by_chan.setdefault(s.channel, []).append(s)
        checks["subscribers of a channel agree"] = all(
            len({tuple(x.seqs) for x in group}) == 1 for group in by_chan.values())
        rec = {}
        ok = True
        for chan, group in by_chan.items():
            seqs = group[0].seqs
            if len(seqs) < 501:
                ok = False
                continue
            first, got = await recover(url, chan, group[0].epoch, seqs[-501])
            rec[chan] = {"recovered": first.get("recovered"), "replayed": len(got)}
            ok &= bool(first.get("recovered")) and got == seqs[-500:]
        checks["hot channels recover their last 500 messages exactly"] = ok
        # Each early key's message, asked for with the position just before it: its history
        # was evicted long ago, so the answer must be recovered:false. Kafka epochs are per
        # partition (`<topic>-<partition>-<generation>`): take them from the hot channels.
        epochs = {}
        for s in subs:
            part = int(s.epoch.split("-")[-2]) if a.source == "kafka" else None
            epochs[part] = s.epoch
        early = {}
        for i, (part, seq) in early_pos.items():
            if part not in epochs:
                early[i] = "partition without a hot channel: not checked"
                continue
            if seq == 0:
                # Kafka: seq is the offset; no position lies before a partition's first record.
                early[i] = "first record of its partition: no position before it, not checked"
                continue
            first, got = await recover(url, f"{TOPIC}.user-{i}", epochs[part], seq - 1)
            early[i] = first.get("recovered") if first.get("type") == "subscribed" else f"answer: {first}"
        answered = [v for v in early.values() if not (isinstance(v, str) and "not checked" in v)]
        checks["early keys answer recovered:false"] = len(answered) >= 4 and all(v is False for v in answered)
        for t in tasks:
            t.cancel()
        peak = max(r for _, r in sampler.samples)
        grown = (peak - idle_rss) * 1024
        allowed = a.budget + a.budget // 4 + (16 << 20)
        checks["RSS growth within budget + overhead"] = grown <= allowed
        res = {
            "machine": {**machine, "loadavg_at_end": bench.load()},
            "binary": str(shard_bin),
            "command": " ".join(sys.argv),
            "commit": bench.commit_of(REPO),
            "flags": {"keys": a.keys, "budget": a.budget, "source": a.source, "shard_flags": flags},
            "hot_messages_per_channel": hot, "produce_s": round(produced_s, 1), "settled_s": round(settled_s, 1),
            "idle_rss_mib": idle_rss / 1024, "peak_rss_mib": peak / 1024, "growth_mib": grown / 2**20,
            "allowed_growth_mib": allowed / 2**20,
            "metrics": {n: metric(page, n) for n in ["ws_shard_history_bytes", "ws_shard_channels",
                                                     "ws_shard_channel_positions", "ws_shard_messages_published_total"]},
            "evictions": {c: metric(page, "ws_shard_channel_evictions_total", f'cause="{c}"')
                          for c in ("budget", "idle", "position")},
            "recoveries": rec, "early_keys_recovered": early, "checks": checks,
            "rss_timeline_kib": sampler.samples,
        }
        print(json.dumps({k: v for k, v in res.items() if k != "rss_timeline_kib"}, indent=1))
        bench.save("cardinality", res)
        return all(checks.values())
    finally:
        procs.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tansu = shutil.which("tansu") or str(Path.home() / ".cargo" / "bin" / "tansu")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--budget", type=int, default=64 << 20)
    ap.add_argument("--source", choices=["kafka", "bus"], default="kafka" if Path(tansu).exists() else "bus")
    ap.add_argument("--tansu", default=tansu)
    a = ap.parse_args()
    sys.exit(0 if asyncio.run(run(a)) else 1)


if __name__ == "__main__":
    main()
