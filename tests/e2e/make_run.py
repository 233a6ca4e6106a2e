#!/usr/bin/env python3
"""Smoke test of the README's first command: `make run`, exactly as a new user types it.

Starts `make run` in the repository root in its own process group (as a terminal would),
waits for ws-lb's health, connects a WebSocket client through ws-lb as the README shows,
receives a demo-feed message and a message published with the README's `POST /publish`, then
sends SIGINT to the group (Ctrl-C) and checks that every process `make run` started is gone
and its ports are free again. A second run checks that when ws-lb cannot start, `make run`
fails and leaves nothing behind.

Fixed ports (3001-3004, 9101, 9102) are what `make run` uses; `make test` runs this script in
its own network namespace (scripts/in-netns.sh) so it cannot collide with anything.

Usage: make_run.py [repo-root]. Every wait is bounded.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import sys
import time
import urllib.request

import websockets

LB = "127.0.0.1:3001"
PORTS = [3001, 3002, 3003, 3004, 9101, 9102]


def proc_table():
    """pid -> (ppid, pgid, comm) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        out[int(d)] = (int(fields[1]), int(fields[2]), comm)
    return out


def descendants(root: int):
    table = proc_table()
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, (pp, _, _) in table.items() if pp in frontier} - found
        found |= frontier
    return {p: table[p][2] for p in found}


def in_group(pgid: int):
    return {p: c for p, (_, g, c) in proc_table().items() if g == pgid}


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(cond, timeout: float, what: str, make=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if make is not None and make.poll() is not None:
            raise SystemExit(f"FAIL: `make run` exited with {make.returncode} while waiting for {what}")
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"FAIL: timed out after {timeout:.0f}s waiting for {what}")


def lb_healthy() -> bool:
    with urllib.request.urlopen(f"http://{LB}/health", timeout=2) as r:
        h = json.loads(r.read())
    # Every shard admits: a client that connects now is relayed, not closed with 1012.
    return h.get("status") == "ok" and h.get("shards_available") == h.get("shards_total") == 3


async def client():
    """What the README's 'Watch the demo feed' section does, plus its publish example."""
    async with websockets.connect(f"ws://{LB}/ws") as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": ["trades.BTC-USD", "book.BTC-USD"]}))
        subscribed, demo = set(), None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(subscribed) < 2 or demo is None):
            m = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
            if m["type"] == "subscribed":
                subscribed.add(m["channel"])
            elif m["type"] == "message" and m["channel"] == "trades.BTC-USD":
                demo = m
        assert subscribed == {"trades.BTC-USD", "book.BTC-USD"}, subscribed
        assert demo is not None, "no demo-feed message on trades.BTC-USD within 15 s"
        assert {"px", "qty", "side", "ts"} <= set(demo["data"]), demo
        body = json.dumps({"channel": "trades.BTC-USD", "data": {"px": 1}}).encode()
        req = urllib.request.Request("http://127.0.0.1:9102/publish", data=body,
                                     headers={"content-type": "application/json"})
        await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=5).read())
        while time.monotonic() < deadline + 10:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] == "message" and m["data"] == {"px": 1}:
                return demo, m
        raise AssertionError("the published message did not arrive")


def start_make(root, env=None):
    """`make run` with its output in a file (`make.out`): a pipe nobody reads while it runs
    would fill (a cold release build prints a lot) and block it."""
    out = tempfile.TemporaryFile(mode="w+")
    make = subprocess.Popen(["make", "run"], cwd=root, start_new_session=True, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    make.out = out
    return make


def output(make):
    make.out.seek(0)
    return make.out.read()


def stop_group(make, pgid):
    """Ctrl-C: SIGINT to the foreground process group."""
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        make.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        make.wait()
        print(output(make)[-4000:])
        raise SystemExit("FAIL: `make run` did not exit within 30 s of SIGINT")
    return output(make)


def check_all_gone(pgid, started, what):
    def gone():
        return not in_group(pgid) and not any(p in proc_table() for p in started)
    try:
        wait(gone, 30, f"every process of {what} to exit")
    except SystemExit:
        left = in_group(pgid)
        for p in left:
            os.kill(p, signal.SIGKILL)
        raise SystemExit(f"FAIL: {what} left processes running: {left}")
    busy = [p for p in PORTS if port_in_use(p)]
    assert not busy, f"{what}: ports still accepting after exit: {busy}"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    busy = [p for p in PORTS if port_in_use(p)]
    if busy:
        raise SystemExit(f"FAIL: ports {busy} are already in use; `make run` needs them")

    # 1. The happy path, in a shell whose environment has variables with our prefixes that
    # name no setting (WS_URL is the load tool's; LB_PORT is the Makefile's own knob).
    env = dict(os.environ, WS_URL="ws://example.invalid/ws", LB_PORT="3001")
    make = start_make(root, env)
    pgid = make.pid
    started = {}
    try:
        def ready():
            started.update(descendants(make.pid))
            return lb_healthy()
        wait(ready, 600, "ws-lb /health ok after `make run` (includes the release build)", make)
        started.update(descendants(make.pid))
        names = set(started.values())
        assert {"ws-shard", "ws-lb"} <= names, f"expected ws-shard and ws-lb among {names}"
        demo, published = asyncio.run(asyncio.wait_for(client(), 60))
    except BaseException:
        out = stop_group(make, pgid)
        print(out[-4000:])
        raise
    out = stop_group(make, pgid)
    assert "odin-ws is running" in out, out[-2000:]
    assert "ignoring environment variables" in out and "WS_URL" in out and "LB_PORT" in out, \
        "expected one warning naming the ignored variables:\n" + out[-3000:]
    check_all_gone(pgid, started, "`make run` after SIGINT")
    print(f"ok: make run: demo feed seq {demo['seq']} and the README's publish arrived through ws-lb; "
          f"SIGINT stopped all {len(started)} processes ({', '.join(sorted(set(started.values())))})")

    # 2. ws-lb cannot start (its port is taken): make run fails and stops the shards too.
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 3001))
    blocker.listen()
    try:
        make = start_make(root)
        try:
            make.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            raise SystemExit("FAIL: `make run` kept running although ws-lb could not bind")
        out = output(make)
        assert make.returncode != 0, f"make run exited 0 although ws-lb failed:\n{out[-2000:]}"
    finally:
        blocker.close()
    check_all_gone(make.pid, set(), "a failed `make run`")
    print(f"ok: make run with port 3001 taken exits {make.returncode} and leaves no process behind")


if __name__ == "__main__":
    main()
