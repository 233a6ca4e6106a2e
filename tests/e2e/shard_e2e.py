#!/usr/bin/env python3
"""End-to-end checks of a real ws-shard process with an independent WebSocket client.

The client is the Python `websockets` library (it shares no code with ours); the server is
the ws-shard binary given as the first argument, started here on free loopback ports and
stopped by this script. Covers issue #2's acceptance 1 (ordered delivery with strictly
increasing seq), 2 (`since` recovery, unknown epoch) and 6 (SIGTERM with 1,000 clients: all
receive 1012, the process exits within the grace period, nobody sees a bare reset).

Every wait is bounded; the script exits non-zero on the first failed check.
"""

import asyncio
import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402


def publish(admin: int, channel: str, data) -> dict:
    body = json.dumps({"channel": channel, "data": data}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/publish", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202, r.status
        return json.loads(r.read())


async def recv_json(ws, timeout=5.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def ordered_delivery(base: int, admin: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{base}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": ["trades.BTC-USD"]}))
        sub = await recv_json(ws)
        assert sub["type"] == "subscribed" and sub["recovered"] is False, sub
        for i in range(100):
            publish(admin, "trades.BTC-USD", {"px": i})
        last = sub["seq"]
        for i in range(100):
            m = await recv_json(ws)
            assert m["type"] == "message", m
            assert m["seq"] > last, (m, last)
            assert m["data"] == {"px": i}, m
            last = m["seq"]
    print("ok: ordered delivery, strictly increasing seq (100 messages)")


async def recovery(base: int, admin: int) -> None:
    channel = "book.ETH-USD"
    async with websockets.connect(f"ws://127.0.0.1:{base}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": [channel]}))
        await recv_json(ws)
        for i in range(5):
            publish(admin, channel, i)
        for _ in range(5):
            m = await recv_json(ws)
        epoch, seq = m["epoch"], m["seq"]
    missed = [publish(admin, channel, 100 + i)["seq"] for i in range(50)]
    async with websockets.connect(f"ws://127.0.0.1:{base + 1}/ws") as ws:
        since = {channel: {"epoch": epoch, "seq": seq}}
        await ws.send(json.dumps({"type": "subscribe", "channels": [channel], "since": since}))
        sub = await recv_json(ws)
        assert sub["recovered"] is True, sub
        got = [await recv_json(ws) for _ in range(50)]
        assert [m["seq"] for m in got] == missed, [m["seq"] for m in got]
        assert [m["data"] for m in got] == [100 + i for i in range(50)]
        live = publish(admin, channel, "live")["seq"]
        m = await recv_json(ws)
        assert m["seq"] == live and m["data"] == "live", m
    async with websockets.connect(f"ws://127.0.0.1:{base}/ws") as ws:
        since = {channel: {"epoch": "some-old-epoch", "seq": 3}}
        await ws.send(json.dumps({"type": "subscribe", "channels": [channel], "since": since}))
        sub = await recv_json(ws)
        assert sub["recovered"] is False, sub
    print("ok: since recovery replays exactly the 50 missed messages; unknown epoch -> recovered:false")


async def sigterm_drain(proc, base: int, shards: int, clients: int, grace: float) -> None:
    conns = []
    for i in range(clients):
        conns.append(await websockets.connect(f"ws://127.0.0.1:{base + i % shards}/ws"))
    started = time.time()
    proc.send_signal(signal.SIGTERM)

    async def wait_close(ws):
        try:
            await asyncio.wait_for(ws.recv(), grace)
            return "message"
        except websockets.exceptions.ConnectionClosed as e:
            # `rcvd` is the server's close frame; None means the TCP connection ended
            # without one (a bare reset or EOF).
            if e.rcvd is None:
                return f"no close frame: {e}"
            if e.sent is None:
                return f"close handshake not completed: {e}"
            return e.rcvd.code

    results = await asyncio.gather(*(wait_close(ws) for ws in conns))
    codes = {}
    for r in results:
        codes[r] = codes.get(r, 0) + 1
    assert codes == {1012: clients}, codes
    proc.wait(timeout=grace)
    took = time.time() - started
    assert proc.returncode == 0, proc.returncode
    assert took < grace, took
    print(f"ok: SIGTERM with {clients} clients: all closed with 1012, exit after {took:.1f}s (grace {grace:.0f}s)")


async def main() -> None:
    binary = sys.argv[1]
    shards, base, admin = 2, odin.free_port(), odin.free_port()
    while base + 1 == admin or not odin.port_free(base + 1):
        base = odin.free_port()
    grace = 15.0
    with odin.Procs("shard-e2e") as procs:
        proc = procs.start("shard", [binary, "--shards", shards, "--base-port", base,
                                     "--admin-addr", f"127.0.0.1:{admin}", "--drain-window", "2s",
                                     "--grace", f"{grace:.0f}s", "--log-level", "warn"],
                           stdout=None, stderr=None)
        for i in range(shards):
            odin.wait_http(f"http://127.0.0.1:{base + i}/health", timeout=20, ready=odin.ok)
        await ordered_delivery(base, admin)
        await recovery(base, admin)
        await sigterm_drain(proc, base, shards, 1000, grace)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(), 120))
