#!/usr/bin/env python3
"""ws-lb's `--backend-dns` against a real DNS server: a name with several A records that
changes while clients are held and new ones arrive, then a DNS server that stops answering
and one that answers "no such name" / "no address".

Everything runs in a network namespace this script creates (`odin-dns-<pid>`; root needed),
with its own /etc/resolv.conf and /etc/hosts (`ip netns exec` bind-mounts
/etc/netns/<ns>/resolv.conf and hosts over /etc's), so ws-lb resolves through the system
resolver (getaddrinfo) exactly as on a VM, against a DNS server on 127.0.0.250:53 in the
namespace (a UDP server written here with dnslib's wire format). Shards are real ws-shard
processes with the demo feed, one per loopback address 127.0.0.11-14, all on port 7000; the
name `shards.odin.test` resolves to some of them.

1. The name answers 3 A records: ws-lb starts with those 3 shards. 240 clients are held
   through ws-lb (subscribed to a demo channel) and ~100 new connections per second arrive
   (connect, subscribe, close) until the end.
2. It answers 4: the 4th address is listed `pending` while nothing listens there and gets no
   client; once its ws-shard is started and healthy it is admitted, and its share of new
   connections per second is reported and must reach 80 % of its fair share (1/4) within the
   slow start (+ a margin).
3. It answers 2: the two removed shards get no new client, their held clients are not
   touched (each shard still holds exactly what it held) and keep receiving messages.
4. The server goes silent: each interval is a `dns_timeout`, the last good set stays, and at
   most one lookup is in flight (the resolver's timeout is 2 s, the interval 300 ms: the DNS
   server sees at most one lookup's queries per 2 s).
5. It answers NXDOMAIN, then NOERROR with no address: each counted as `empty`, the set stays.
6. It answers the 2 again: nothing changes (`ws_lb_membership_updates_total` did not move
   since step 3).
No arrival failed; no held client was closed.

Usage: membership_dns_e2e.py <ws-shard> <ws-lb>. Bounded (120 s for the whole run); the
namespace and every process in it are removed on exit, on an exception and on SIGTERM/SIGINT.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402
from odin import metric  # noqa: E402

NAME = "shards.odin.test"
DNS_IP = "127.0.0.250"
SHARD_IPS = {f"s{i}": f"127.0.0.{11 + i}" for i in range(4)}
SHARD_PORT = 7000
LB_PORT, LB_ADMIN = 7001, 9101
# The resolver gives up on a silent server after RESOLVER_TIMEOUT (one attempt); ws-lb's
# lookup limit is its membership interval, shorter.
RESOLVER_TIMEOUT = 2
INTERVAL = 0.3
SLOW_START = 4.0
HELD = 240
ARRIVAL_RATE = 100
CHANNELS = ["trades.BTC-USD", "trades.ETH-USD", "trades.SOL-USD"]
LIMIT_S = 120


def ensure_dnslib():
    try:
        import dnslib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "dnslib>=0.9,<0.10"], check=True)


# ---------------------------------------------------------------------------------------
# Outside the namespace: create it, run this script inside it, always remove it.

def outside(args):
    if os.geteuid() != 0:
        raise SystemExit("membership_dns_e2e: needs root (it creates a network namespace)")
    ensure_dnslib()
    ns = f"odin-dns-{os.getpid()}"
    etc = Path("/etc/netns") / ns

    def on_signal(signum, _frame):
        raise SystemExit(f"membership_dns_e2e: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    inner = None
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS_IP}\noptions timeout:{RESOLVER_TIMEOUT} attempts:1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        inner = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", *args])
        try:
            rc = inner.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"membership_dns_e2e: not done after {LIMIT_S} s") from None
        if rc != 0:
            raise SystemExit(rc)
    finally:
        # Whatever still runs in the namespace (the inner script, shards, ws-lb).
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if inner is not None and inner.poll() is None:
            inner.kill()
            inner.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Inside the namespace.

class DnsServer:
    """Answers A queries for NAME according to `mode`: a list of addresses, "silent" (no
    reply at all), "nxdomain", or "nodata" (NOERROR, no record). AAAA: NOERROR, no record.
    Counts the queries it received."""

    def __init__(self):
        from dnslib import A, QTYPE, RCODE, RR, DNSRecord
        self._dns = (A, QTYPE, RCODE, RR, DNSRecord)
        self.mode = []
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((DNS_IP, 53))
        self.sock.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        A, QTYPE, RCODE, RR, DNSRecord = self._dns
        while not self.stopped:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            try:
                q = DNSRecord.parse(data)
            except Exception:  # noqa: BLE001 - not a DNS query: ignore it
                continue
            self.queries += 1
            mode = self.mode
            if mode == "silent":
                continue
            r = q.reply()
            if str(q.q.qname).rstrip(".") != NAME or mode == "nxdomain":
                r.header.rcode = RCODE.NXDOMAIN
            elif mode != "nodata" and q.q.qtype == QTYPE.A:
                for ip in mode:
                    r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
            self.sock.sendto(r.pack(), peer)

    def stop(self):
        self.stopped = True
        self.thread.join(2)
        self.sock.close()


def lb_page():
    return odin.http_get(f"http://127.0.0.1:{LB_ADMIN}/metrics")[1]


def source_errors(reason):
    return metric(lb_page(), "ws_lb_membership_source_errors_total", f'reason="{reason}"')


def members():
    h = odin.get_json(f"http://127.0.0.1:{LB_PORT}/health")
    return {s["url"]: s for s in h["shards"]}


def states():
    return {u: s["member"] for u, s in members().items()}


def handshakes():
    out = {}
    for line in lb_page().splitlines():
        if line.startswith("ws_handshake_success_total{"):
            sid = int(line.split('shard_id="', 1)[1].split('"', 1)[0])
            out[sid] = float(line.rsplit(" ", 1)[1])
    return out


def shard_connections(name):
    return odin.get_json(f"http://{SHARD_IPS[name]}:{SHARD_PORT}/health")["connections"]


def url(name):
    return f"ws://{SHARD_IPS[name]}:{SHARD_PORT}/ws"


class Held:
    """A client held through ws-lb, subscribed to one channel, counting messages."""

    def __init__(self, channel):
        self.channel = channel
        self.messages = 0
        self.closed = None
        self.ws = None

    async def open(self, lb_url):
        import websockets
        self.ws = await websockets.connect(lb_url, max_queue=None, open_timeout=20)
        await self.ws.send(json.dumps({"type": "subscribe", "channels": [self.channel]}))
        while json.loads(await asyncio.wait_for(self.ws.recv(), 20))["type"] != "subscribed":
            pass

    async def run(self):
        import websockets
        try:
            async for raw in self.ws:
                if json.loads(raw)["type"] == "message":
                    self.messages += 1
        except websockets.exceptions.ConnectionClosed as e:
            self.closed = e.rcvd.code if e.rcvd else None
            return
        self.closed = "ended"


async def inside(shard_bin, lb_bin):
    procs = odin.Procs("membership-dns", stop_signal=signal.SIGKILL)
    dns = DnsServer()
    held_tasks = []
    arr_task = None
    try:
        def start_shard(name):
            ip = SHARD_IPS[name]
            procs.start(name, [shard_bin, "--shards", "1", "--bind", ip, "--base-port", SHARD_PORT,
                               "--admin-addr", f"{ip}:9102", "--demo-feed", "--demo-rate", "5",
                               "--client-rate", "0", "--max-connections", "2000", "--drain-window", "2s"])

        first = ["s0", "s1", "s2"]
        dns.mode = [SHARD_IPS[n] for n in first]
        for n in first:
            start_shard(n)
        for n in first:
            await odin.until(lambda n=n: odin.get_json(f"http://{SHARD_IPS[n]}:{SHARD_PORT}/health")["status"] == "ok",
                        30, f"{n} healthy")
        procs.start("lb", [lb_bin, "--listen", f"127.0.0.1:{LB_PORT}", "--admin-addr", f"127.0.0.1:{LB_ADMIN}",
                           "--backend-dns", f"ws://{NAME}:{SHARD_PORT}/ws",
                           "--membership-interval", f"{int(INTERVAL * 1000)}ms",
                           "--slow-start", f"{SLOW_START}s", "--health-interval", "300ms",
                           "--per-ip-rate", "0", "--handshake-deadline", "10s"])
        await odin.until(lambda: set(states().values()) == {"active"} and set(states()) == {url(n) for n in first},
                    30, "ws-lb up with the 3 shards of the DNS answer")
        sid = {u: s["shard_id"] for u, s in (await asyncio.to_thread(members)).items()}
        print(f"ok: {NAME} answered 3 A records; ws-lb started with {sorted(sid)}")

        # 1. Held clients, then arrivals for the rest of the run.
        lb_url = f"ws://127.0.0.1:{LB_PORT}/ws"
        held = [Held(CHANNELS[i % len(CHANNELS)]) for i in range(HELD)]
        for i in range(0, HELD, 40):
            await asyncio.gather(*(h.open(lb_url) for h in held[i:i + 40]))
        held_tasks = [asyncio.create_task(h.run()) for h in held]
        held_on = {n: await asyncio.to_thread(shard_connections, n) for n in first}
        assert sum(held_on.values()) == HELD and min(held_on.values()) > 0, held_on
        print(f"ok: {HELD} clients held through ws-lb: {held_on}")
        arrivals = odin.Arrivals(lb_url, ARRIVAL_RATE, CHANNELS)
        arr_task = asyncio.create_task(arrivals.run())
        await arrivals.pass_(ARRIVAL_RATE // 2)

        # 2. A fourth address, before its shard runs: pending, no client.
        dns.mode = [SHARD_IPS[n] for n in ("s0", "s1", "s2", "s3")]
        await odin.until(lambda: states().get(url("s3")) == "pending", 10, "s3 listed pending")
        s3 = (await asyncio.to_thread(members))[url("s3")]["shard_id"]
        ok0 = arrivals.ok
        await arrivals.pass_(ARRIVAL_RATE)
        assert (await asyncio.to_thread(states))[url("s3")] == "pending", "s3 admitted while nothing listens there"
        assert (await asyncio.to_thread(handshakes)).get(s3, 0) == 0, "a pending shard got a client"
        print(f"ok: 4 A records: s3 listed pending while nothing listens there; "
              f"0 of {arrivals.ok - ok0} arrivals went to it")
        start_shard("s3")
        await odin.until(lambda: states()[url("s3")] in ("warming", "active"), 30, "s3 admitted once healthy")
        admitted = time.monotonic()
        shares, fair_at = [], None
        prev = await asyncio.to_thread(handshakes)
        while time.monotonic() < admitted + SLOW_START + 4 and fair_at is None:
            await asyncio.sleep(1.0)
            cur = await asyncio.to_thread(handshakes)
            delta = {k: cur.get(k, 0) - prev.get(k, 0) for k in cur}
            prev = cur
            total = sum(delta.values())
            share = delta.get(s3, 0) / total if total else 0.0
            shares.append(round(share, 2))
            if share >= 0.8 / 4:
                fair_at = time.monotonic() - admitted
        print(f"ok: s3 admitted once healthy; its share of new connections per second: {shares}")
        assert fair_at is not None, f"s3 did not reach 80 % of its fair share within {SLOW_START + 4:.0f} s: {shares}"
        print(f"ok: s3 reached its fair share (1/4) {fair_at:.1f} s after admission (slow start {SLOW_START:.0f} s)")

        # 3. Two addresses: s1 and s2 leave.
        dns.mode = [SHARD_IPS[n] for n in ("s0", "s3")]
        await odin.until(lambda: states()[url("s1")] == states()[url("s2")] == "removed", 10, "s1, s2 removed")
        gone = {n: sid[url(n)] for n in ("s1", "s2")}
        await arrivals.settle()  # handshakes begun before the removal have ended
        before = await asyncio.to_thread(handshakes)
        counts = [h.messages for h in held]
        ok0 = arrivals.ok
        await arrivals.pass_(2 * ARRIVAL_RATE)
        after = await asyncio.to_thread(handshakes)
        for n, i in gone.items():
            assert after.get(i, 0) == before.get(i, 0), f"removed {n} got new clients"
        for n in gone:
            await odin.until(lambda n=n: shard_connections(n) == held_on[n], 10,
                        f"removed {n} to hold exactly its {held_on[n]} held clients")
        await odin.until(lambda: all(h.messages > c for h, c in zip(held, counts)), 15,
                    "every held client to receive messages after the removal")
        assert all(h.closed is None for h in held), "a held client was closed"
        print(f"ok: 2 A records: s1, s2 removed; 0 of {arrivals.ok - ok0} arrivals went to them; their "
              f"{held_on['s1'] + held_on['s2']} held clients untouched and still receiving")
        # s3's slow start ends on its own clock (warming -> active): let it end first, so
        # that `listed` is a set no DNS answer or failure should change from here on.
        await odin.until(lambda: "warming" not in states().values(), SLOW_START + 15, "no member warming")
        updates = metric(await asyncio.to_thread(lb_page), "ws_lb_membership_updates_total")
        listed = await asyncio.to_thread(states)

        # 4. Silence: dns_timeout, last good set, one lookup at a time.
        t0 = await asyncio.to_thread(source_errors, "dns_timeout")
        dns.mode = "silent"
        q0, since = dns.queries, time.monotonic()
        ok0 = arrivals.ok
        await odin.until(lambda: source_errors("dns_timeout") >= t0 + 8, 30, "dns_timeout counted")
        await arrivals.pass_(ARRIVAL_RATE)
        silent_for, queries = time.monotonic() - since, dns.queries - q0
        # One lookup (an A and an AAAA query) per resolver timeout at most, plus the one
        # that was starting when the silence began.
        most = 2 * (int(silent_for / RESOLVER_TIMEOUT) + 2)
        assert queries <= most, f"{queries} DNS queries in {silent_for:.1f} s of silence: lookups pile up (at most {most})"
        assert await asyncio.to_thread(states) == listed, "the set changed while DNS was silent"
        timeouts = await asyncio.to_thread(source_errors, "dns_timeout")
        print(f"ok: DNS silent {silent_for:.1f} s: dns_timeout +{timeouts - t0:.0f}, {queries} queries "
              f"(<= {most}: one lookup at a time), set kept, {arrivals.ok - ok0} arrivals ok")

        # 5. NXDOMAIN, then no address.
        for mode in ("nxdomain", "nodata"):
            e0 = await asyncio.to_thread(source_errors, "empty")
            dns.mode = mode
            await odin.until(lambda e0=e0: source_errors("empty") >= e0 + 2, RESOLVER_TIMEOUT + 15, f"{mode} counted as empty")
            assert await asyncio.to_thread(states) == listed, f"the set changed on {mode}"
            await arrivals.pass_(ARRIVAL_RATE // 2)
            print(f"ok: {mode}: counted as empty; set kept; arrivals ok")

        # 6. The good answer again: nothing to change.
        last = metric(await asyncio.to_thread(lb_page), "ws_lb_membership_last_update_timestamp_seconds")
        dns.mode = [SHARD_IPS[n] for n in ("s0", "s3")]
        await odin.until(lambda: metric(lb_page(), "ws_lb_membership_last_update_timestamp_seconds") > last, 15,
                    "the source good again")
        page = await asyncio.to_thread(lb_page)
        assert metric(page, "ws_lb_membership_updates_total") == updates, "a failure changed the set"
        assert metric(page, "ws_lb_membership_source_errors_total", 'reason="dns_error"') == 0, \
            "a failure was not classified (dns_error)"
        assert await asyncio.to_thread(states) == listed

        arrivals.stop = True
        await asyncio.wait_for(arr_task, 40)
        assert not arrivals.failed, f"{len(arrivals.failed)} arrivals failed: {arrivals.failed[:5]}"
        closed = [h.closed for h in held if h.closed is not None]
        assert not closed, f"held clients closed: {closed[:5]}"
        assert procs.exited() == {}, f"processes exited: {procs.exited()}"
        print(f"ok: {arrivals.ok} arrivals at ~{ARRIVAL_RATE}/s, none failed; all {HELD} held clients open; "
              f"membership updates {updates:.0f}, none from a failing source")
    finally:
        if arr_task is not None:
            arr_task.cancel()
        for t in held_tasks:
            t.cancel()
        procs.stop()
        dns.stop()


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--inside":
        shard_bin, lb_bin = sys.argv[2:4]
        asyncio.run(asyncio.wait_for(inside(shard_bin, lb_bin), LIMIT_S - 10))
    else:
        outside([os.path.abspath(a) for a in sys.argv[1:3]])


if __name__ == "__main__":
    main()
