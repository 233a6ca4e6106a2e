#!/usr/bin/env python3
"""Shard membership with the real binaries: ws-lb follows a file of shard URLs while 1,000
clients are held and ~200 new connections per second arrive.

Setup: tansu (Kafka-protocol broker) with one topic of 3 partitions, three ws-shard
processes (one shard each, all consuming the topic, so a client can move between them and
recover with `since`), one ws-lb with `--backend-file`. A kafka-python producer writes a
steady stream of records over 50 keys (channels trades.S00..S49).

1. 1,000 clients connect through ws-lb as fast as this script can open them (~1,000/s
   asked) and subscribe to one channel each; the spread of those new connections over the
   shards is reported per second and must be even (live relay counts between health polls).
2. While 200 connections/s arrive (connect, subscribe, close) and the producer runs:
   - a fourth shard is started and added to the file: it takes no client before its
     /health answers ok, then its share of new connections ramps up over `--slow-start`
     and reaches its fair share within the window;
   - a shard is removed from the file: it gets no new connection, its held clients are not
     touched by ws-lb; then it is sent SIGTERM and its clients see only 1012 (its drain),
     reconnect through ws-lb with `since` and recover;
   - a shard flaps (removed and re-added within a second): same slot, no state reset;
   - the file is made invalid, then empty: counted as source errors, the last good set
     stays, no arrival fails.
3. No arrival failed its handshake; every held client received every record of its channel
   exactly once and in order (0 lost, 0 duplicated), across its reconnect.
4. A second ws-lb with a 1-hour `--membership-interval` picks up a file change on SIGHUP.

Usage: membership_e2e.py <tansu> <ws-shard> <ws-lb>. Every wait is bounded; the script
stops by itself (a 240 s limit on the whole run).
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402
from kafka_e2e import KEYS, TOPIC, Producer  # noqa: E402
from odin import free_port, metric  # noqa: E402

HELD = 1000
ARRIVAL_RATE = 200
SLOW_START = 6.0
MAX_CONNECTIONS = 2000
WORK = Path(f"/tmp/odin-membership-e2e-{os.getpid()}")


def get_json(url):
    return odin.get_json(url)


def page(port):
    return odin.http_get(f"http://127.0.0.1:{port}/metrics")[1]


def write_members(path: Path, urls):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# written by membership_e2e.py\n" + "".join(u + "\n" for u in urls))
    tmp.rename(path)


class Held:
    """A held client: subscribed to one channel, recording every message; on a 1012 it
    reconnects through ws-lb with `since` (like the client libraries)."""

    def __init__(self, url, channel):
        self.url, self.channel = url, channel
        self.got = []
        self.closes = []
        self.recovered = []
        self.done = False

    async def subscribe(self, since=None):
        ws = await websockets.connect(self.url, max_queue=None, open_timeout=20)
        req = {"type": "subscribe", "channels": [self.channel]}
        if since:
            req["since"] = since
        await ws.send(json.dumps(req))
        while True:
            m = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if m["type"] == "subscribed":
                if since:
                    self.recovered.append(m.get("recovered"))
                return ws
            if m["type"] == "message":
                self.got.append((m["epoch"], m["seq"], m["data"]["n"]))

    async def run(self, ready):
        ws = await self.subscribe()
        ready.set()
        while not self.done:
            try:
                async for raw in ws:
                    m = json.loads(raw)
                    if m["type"] == "message":
                        self.got.append((m["epoch"], m["seq"], m["data"]["n"]))
                return
            except websockets.exceptions.ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd else None)
            if self.done:
                return
            since = None
            if self.got:
                epoch, seq, _ = self.got[-1]
                since = {self.channel: {"epoch": epoch, "seq": seq}}
            ws = await self.subscribe(since)


async def handshakes(lb_admin):
    """ws_handshake_success_total per shard_id, from ws-lb."""
    text = await asyncio.to_thread(page, lb_admin)
    out = {}
    for line in text.splitlines():
        if line.startswith("ws_handshake_success_total{"):
            sid = line.split('shard_id="', 1)[1].split('"', 1)[0]
            out[int(sid)] = float(line.rsplit(" ", 1)[1])
    return out


async def members(lb_port):
    h = await asyncio.to_thread(get_json, f"http://127.0.0.1:{lb_port}/health")
    return {s["url"]: s for s in h["shards"]}


async def main():
    tansu, shard_bin, lb_bin = sys.argv[1:4]
    WORK.mkdir(parents=True, exist_ok=True)
    members_file = WORK / "shards"
    broker = free_port()
    procs = odin.Procs("membership-e2e", stop_signal=signal.SIGKILL)
    shard_ports = {f"s{i}": (free_port(), free_port()) for i in range(4)}
    url = {n: f"ws://127.0.0.1:{p}/ws" for n, (p, _) in shard_ports.items()}
    lb_port, lb_admin = free_port(), free_port()
    lb_url = f"ws://127.0.0.1:{lb_port}/ws"
    tasks = []
    closers = []
    try:
        procs.start("tansu", [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{broker}",
                              "--advertised-listener-url", f"tcp://127.0.0.1:{broker}",
                              "--storage-engine", "memory://tansu/"])
        await odin.until(lambda: socket.create_connection(("127.0.0.1", broker), 1).close() or True, 20, "tansu")
        out = await asyncio.to_thread(subprocess.run, [tansu, "topic", "create", TOPIC, "--partitions", "3",
                                                       "--broker", f"tcp://127.0.0.1:{broker}"],
                                      capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

        def start_shard(name):
            port, admin = shard_ports[name]
            procs.start(name, [shard_bin, "--shards", "1", "--base-port", port, "--admin-addr", f"127.0.0.1:{admin}",
                               "--kafka-brokers", f"127.0.0.1:{broker}", "--kafka-topics", TOPIC,
                               "--kafka-start", "back:100000", "--history-len", "5000", "--client-rate", "0",
                               "--max-connections", MAX_CONNECTIONS, "--drain-window", "3s", "--grace", "20s"])

        async def shard_ready(name):
            port = shard_ports[name][0]
            await odin.until(lambda: get_json(f"http://127.0.0.1:{port}/health")["status"] == "ok", 60, f"{name} ok")

        for n in ("s0", "s1", "s2"):
            start_shard(n)
        for n in ("s0", "s1", "s2"):
            await shard_ready(n)
        write_members(members_file, [url["s0"], url["s1"], url["s2"]])
        procs.start("lb", [lb_bin, "--listen", f"127.0.0.1:{lb_port}", "--admin-addr", f"127.0.0.1:{lb_admin}",
                           "--backend-file", members_file, "--membership-interval", "200ms",
                           "--slow-start", f"{SLOW_START}s", "--health-interval", "500ms",
                           "--per-ip-rate", "0", "--handshake-deadline", "10s"])
        await odin.until(lambda: get_json(f"http://127.0.0.1:{lb_port}/health")["status"] == "ok", 20, "ws-lb")
        sid = {u: s["shard_id"] for u, s in (await members(lb_port)).items()}
        name_of = {sid[url[n]]: n for n in ("s0", "s1", "s2")}

        # 1. 1,000 held clients, opened at up to 1,000/s; spread per second.
        held = [Held(lb_url, f"{TOPIC}.{KEYS[i % len(KEYS)]}") for i in range(HELD)]
        before = await handshakes(lb_admin)
        t0 = time.monotonic()
        readies = []
        per_second = []
        for i, h in enumerate(held):
            ev = asyncio.Event()
            readies.append(ev)
            tasks.append(asyncio.create_task(h.run(ev)))
            if i % 100 == 99:
                due = t0 + (i + 1) / 1000
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                snap = await handshakes(lb_admin)
                per_second.append({name_of.get(k, k): int(v - before.get(k, 0)) for k, v in snap.items()})
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 90)
        took = time.monotonic() - t0
        after = await handshakes(lb_admin)
        spread = {name_of[k]: int(after[k] - before.get(k, 0)) for k in name_of}
        print(f"ok: {HELD} clients held, opened in {took:.1f} s ({HELD / took:.0f}/s); per shard {spread}")
        print(f"    cumulative spread every 100 clients: {per_second}")
        assert sum(spread.values()) == HELD, spread
        assert max(spread.values()) - min(spread.values()) <= HELD * 0.12, f"uneven spread {spread}"

        # 2. Producer and arrivals run through everything below.
        producer = await asyncio.to_thread(Producer, broker)
        produced = {"n": 0, "stop": False}

        async def produce():
            while not produced["stop"]:
                await asyncio.to_thread(producer.send_many, 50, produced["n"])
                produced["n"] += 50
                await asyncio.sleep(0.5)

        closers.append(lambda: producer.p.close(timeout=5))
        prod_task = asyncio.create_task(produce())
        arrivals = odin.Arrivals(lb_url, ARRIVAL_RATE, [f"{TOPIC}.{k}" for k in KEYS])
        arr_task = asyncio.create_task(arrivals.run())

        # 2a. A fourth shard joins.
        start_shard("s3")
        write_members(members_file, [url[n] for n in ("s0", "s1", "s2", "s3")])
        deadline = time.time() + 30
        while url["s3"] not in await members(lb_port):
            assert time.time() < deadline, "s3 never listed"
            await asyncio.sleep(0.05)
        m = await members(lb_port)
        s3 = m[url["s3"]]["shard_id"]
        name_of[s3] = "s3"
        joined_pending = m[url["s3"]]["member"]
        # No handshake before it is admitted (it may still be starting).
        while (await members(lb_port))[url["s3"]]["member"] == "pending":
            assert (await handshakes(lb_admin)).get(s3, 0) == 0, "a pending shard got a client"
            assert time.time() < deadline + 30, "s3 never admitted"
            await asyncio.sleep(0.05)
        admitted = time.monotonic()
        shares = []
        prev = await handshakes(lb_admin)
        fair_at = None
        while time.monotonic() < admitted + SLOW_START + 3:
            await asyncio.sleep(1.0)
            cur = await handshakes(lb_admin)
            delta = {k: cur.get(k, 0) - prev.get(k, 0) for k in cur}
            prev = cur
            listed = [k for k in delta if name_of.get(k) in ("s0", "s1", "s2", "s3")]
            total = sum(delta[k] for k in listed)
            share = delta.get(s3, 0) / total if total else 0.0
            shares.append(round(share, 2))
            if fair_at is None and share >= 0.8 / 4:
                fair_at = time.monotonic() - admitted
        print(f"ok: s3 listed ({joined_pending}), no client before its /health said ok; "
              f"its share of new connections per second after admission: {shares}")
        assert shares[0] < 0.25, f"no slow start: {shares}"
        assert fair_at is not None, f"fair share not reached within the slow start + 3 s: {shares}"
        print(f"ok: s3 reached its fair share (1/4) {fair_at:.1f} s after admission (slow start {SLOW_START:.0f} s)")

        # 2b. s1 leaves the file: no new client; its relays untouched until it drains.
        s1 = sid[url["s1"]]
        # Held clients never move by themselves: s1 holds those it got at the start (plus
        # the odd arrival in flight).
        s1_held = spread["s1"]
        write_members(members_file, [url[n] for n in ("s0", "s2", "s3")])
        deadline = time.time() + 10
        while (await members(lb_port))[url["s1"]]["member"] != "removed":
            assert time.time() < deadline, "s1 never removed"
            await asyncio.sleep(0.05)
        await arrivals.settle()
        a0 = (await handshakes(lb_admin)).get(s1, 0)
        ok0 = arrivals.ok
        await arrivals.pass_(2 * ARRIVAL_RATE)
        assert (await handshakes(lb_admin)).get(s1, 0) == a0, "a removed shard got new clients"
        # Arrivals placed on s1 before its removal close by themselves; the shard counts a
        # close when it has read it: polled (bounded), never below the held clients.
        def s1_holds_its_held_clients():
            n = get_json(f"http://127.0.0.1:{shard_ports['s1'][0]}/health")["connections"]
            assert n >= s1_held, f"ws-lb cut relays of a removed shard: {s1_held} -> {n}"
            return n == s1_held
        await odin.until(s1_holds_its_held_clients, 10, f"s1 to hold exactly its {s1_held} held clients")
        print(f"ok: s1 removed: no new connection in {arrivals.ok - ok0} arrivals; its {s1_held} held clients untouched")
        procs.signal("s1", signal.SIGTERM)
        await asyncio.to_thread(procs.wait, "s1", 40)
        print(f"ok: s1 drained on SIGTERM and exited ({s1_held} clients had it)")

        # 2c. s2 flaps: out and back within a second.
        s2_before = (await members(lb_port))[url["s2"]]
        write_members(members_file, [url[n] for n in ("s0", "s3")])
        deadline = time.time() + 10
        while (await members(lb_port))[url["s2"]]["member"] != "removed":
            assert time.time() < deadline, "s2 never removed"
            await asyncio.sleep(0.02)
        write_members(members_file, [url[n] for n in ("s0", "s2", "s3")])
        while (await members(lb_port))[url["s2"]]["member"] != "active":
            assert time.time() < deadline, "s2 never back"
            await asyncio.sleep(0.02)
        s2_after = (await members(lb_port))[url["s2"]]
        assert s2_after["shard_id"] == s2_before["shard_id"]
        print("ok: s2 flapped (removed and re-added): same slot, active again at once")

        # 2d. A broken file, then an empty one: the last good set stays.
        members_file.write_text("ws://127.0.0.1:1/ws this is not a URL list\n")
        await odin.until(lambda: metric(page(lb_admin), "ws_lb_membership_source_errors_total", 'reason="invalid"') >= 1, 10, "invalid counted")
        write_members(members_file, [])
        await odin.until(lambda: metric(page(lb_admin), "ws_lb_membership_source_errors_total", 'reason="empty"') >= 1, 10, "empty counted")
        listed = {u for u, s in (await members(lb_port)).items() if s["member"] != "removed"}
        assert listed == {url["s0"], url["s2"], url["s3"]}, listed
        await arrivals.pass_(ARRIVAL_RATE)
        write_members(members_file, [url[n] for n in ("s0", "s2", "s3")])
        print("ok: invalid and empty files counted as source errors; the last good set stayed")

        # 3. Stop arrivals and the producer; every held client has every record once.
        arrivals.stop = True
        await asyncio.wait_for(arr_task, 60)
        produced["stop"] = True
        await asyncio.wait_for(prod_task, 60)
        total_arrivals = arrivals.ok + len(arrivals.failed)
        assert not arrivals.failed, f"{len(arrivals.failed)} of {total_arrivals} arrivals failed: {arrivals.failed[:5]}"
        print(f"ok: {arrivals.ok} arrivals at ~{ARRIVAL_RATE}/s, none failed")
        deadline = time.time() + 60
        for h in held:
            key = h.channel.split(".")[1]
            want = [i for _, _, i in producer.expected(key)]
            while [n for _, _, n in h.got] != want:
                got = [n for _, _, n in h.got]
                if time.time() > deadline or len(got) > len(want) or got != want[:len(got)]:
                    raise AssertionError(f"{h.channel}: got {len(got)} (dups {len(got) - len(set(got))}), want {len(want)}; "
                                         f"closes {h.closes}; first diff at "
                                         f"{next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))}")
                await asyncio.sleep(0.05)
        codes = [c for h in held for c in h.closes]
        moved = sum(1 for h in held if h.closes)
        assert set(codes) <= {1012}, f"held clients saw closes other than 1012: {sorted(set(codes))}"
        assert all(r is True for h in held for r in h.recovered), "a reconnect did not recover"
        assert moved == s1_held, f"{moved} clients reconnected, s1 held {s1_held}"
        print(f"ok: {produced['n']} records; all {HELD} held clients got every record of their channel once, in order; "
              f"{moved} moved off s1 with only 1012 and recovered with since")
        page_lb = await asyncio.to_thread(page, lb_admin)
        updates = metric(page_lb, "ws_lb_membership_updates_total")
        active = metric(page_lb, "ws_lb_members", 'state="active"')
        removed = metric(page_lb, "ws_lb_members", 'state="removed"')
        print(f"    ws_lb_membership_updates_total {updates:.0f}, members active {active:.0f}, removed {removed:.0f}")
        for h in held:
            h.done = True

        # 4. SIGHUP on an LB that does not poll in practice.
        hup_file = WORK / "hup-shards"
        write_members(hup_file, [url["s0"]])
        lb2, lb2_admin = free_port(), free_port()
        procs.start("lb-hup", [lb_bin, "--listen", f"127.0.0.1:{lb2}", "--admin-addr", f"127.0.0.1:{lb2_admin}",
                               "--backend-file", hup_file, "--membership-interval", "1h", "--per-ip-rate", "0"])
        await odin.until(lambda: get_json(f"http://127.0.0.1:{lb2}/health")["status"] == "ok", 20, "ws-lb (SIGHUP)")
        write_members(hup_file, [url["s0"], url["s2"]])
        procs.signal("lb-hup", signal.SIGHUP)
        await odin.until(lambda: url["s2"] in {s["url"] for s in get_json(f"http://127.0.0.1:{lb2}/health")["shards"]}, 10,
                   "SIGHUP to apply the file")
        assert procs["lb-hup"].poll() is None, "SIGHUP stopped ws-lb"
        print("ok: SIGHUP made ws-lb re-read its membership file at once")
    finally:
        for t in tasks:
            t.cancel()
        for c in closers:
            try:
                c()
            except Exception:  # noqa: BLE001 - cleanup after a failure
                pass
        procs.stop()
        for f in WORK.glob("*"):
            f.unlink()
        WORK.rmdir()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(), 240))
