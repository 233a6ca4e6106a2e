"""What the scenarios share: the load generator on the clients VM, a Kafka producer,
WebSocket probes that record how they were closed, results in bench/results/."""

import asyncio
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import cluster as cl

CHANNELS = "trades.K{0..9}"



def _cap(value, limit):
    """`value` lowered to a `--max-*` limit (0 = no limit); never raised. Every limit given is
    recorded with the other non-default flags in every result."""
    return min(value, limit) if limit else value


def capped(c, rate):
    """A scenario's connection rate under `--max-rate`."""
    return _cap(rate, c.a.max_rate)


def clients(c, n):
    """A scenario's client count under `--max-clients`."""
    return _cap(n, c.a.max_clients)


def producer_rate(c, rate):
    """A scenario's Kafka producer rate under `--producer-rate`."""
    return _cap(rate, c.a.producer_rate)


def backoff_args(backoff):
    """loadtest's flags for `--client-backoff` "MIN,MAX" (none when it is not given)."""
    if not backoff:
        return []
    lo, hi = backoff.split(",")
    return ["--reconnect-min-delay", lo, "--reconnect-max-delay", hi]


def arg(args, flag, default):
    """The value of `flag` in a process's arguments as the deploy gives them (`c.pv.lb_args`,
    `c.pv.shard_args`), else `default` (the binary's own default)."""
    return args[args.index(flag) + 1] if flag in args else default


def seconds(text):
    """A duration as the deploy and the binaries write them ("10s", "200ms", "2m"), in
    seconds."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * factor
    return float(text)

def channels_for(partitions):
    """The channels the clients subscribe to: one per partition that the producer feeds
    (`Producer` writes key K<i> to partition i), at most ten. A channel beyond the partition
    count would never get a record, and its clients, holding only the subscribe reply's
    placeholder position, would get `recovered: false` from any other shard process."""
    return f"trades.K{{0..{max(1, min(partitions, 10)) - 1}}}"

TOPIC = "trades"
# The load generator's handshake deadline; None = loadtest's default (5 s), used at full
# size, which measures capacity. The short versions (`make cluster-test`, part of `make
# test`) check behaviour and must pass on a loaded machine: `run_one` sets 30 s for them, so
# a handshake that a busy box (a TLS front, 17 VMs and a build on 2 cores) slows down is not
# counted as refused. Recorded in every result (`loadtest_handshake_timeout`).
HANDSHAKE_TIMEOUT = None


def wait_for(cond, timeout, interval=0.25):
    """The time `cond()` first held, or None if it did not within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return time.time()
        except Exception:  # not answering yet counts as "not yet"
            pass
        time.sleep(interval)
    return None


def ramp_done(c, conns, rate):
    """The number of clients connected once a ramp of `conns` at `rate`/s is over: all
    `conns`, or as many as there are when the count has not grown for 5 s, or at the latest
    the ramp's own length + 60 s after the start (on a saturated machine the count keeps
    moving: handshakes time out while reconnects land). Clients that did not connect are
    the load generator's to report; the scenario then judges the ones that did. Fails only
    if none connected."""
    timeout = conns / rate + 60
    deadline = time.time() + timeout
    last, changed = -1, time.time()
    while time.time() < deadline:
        n = c.lb_active()
        if n >= conns:
            return n
        if n != last:
            last, changed = n, time.time()
        elif n > 0 and time.time() - changed >= 5:
            return n
        time.sleep(0.5)
    if last > 0:
        c.log(f"the ramp of {conns} clients did not settle within {timeout:.0f} s; going on with {last} connected")
        return last
    raise RuntimeError(f"no client of a ramp of {conns} connected within {timeout:.0f} s")


# ---- the load generator ----------------------------------------------------------------

class Loadtest:
    """`loadtest` on the clients VM against the front, over wss://, spread over the VM's
    source addresses."""

    def __init__(self, c, name, connections, rate, hold, channels=True, reconnect=False, extra=(), url=None,
                 source_ips=None, ca=True):
        self.c, self.name = c, name
        self.out = Path(tempfile.mkdtemp(prefix=f"odinc-{name}-")) / "report.json"
        ips = source_ips or f"{cl.client_ips(c.a.client_ips)[0]}-{cl.client_ips(c.a.client_ips)[-1]}"
        self.args = [str(c.bin / "loadtest"), "--url", url or c.url(), "--connections", str(connections),
                     "--rate", str(rate), "--hold", str(hold), "--source-ips", ips, "--json", str(self.out), "--quiet",
                     *(["--ca-file", str(c.front.ca)] if ca else []),
                     *(["--channels", channels_for(c.a.partitions)] if channels else []),
                     *(["--reconnect"] if reconnect else []),
                     *(backoff_args(c.a.client_backoff) if reconnect else []),
                     *(["--handshake-timeout", HANDSHAKE_TIMEOUT] if HANDSHAKE_TIMEOUT else []), *extra]
        self.log = open(c.run_dir / f"loadtest-{name}.log", "w")
        self.p = subprocess.Popen(["ip", "netns", "exec", c.net.vms["clients"].ns, *self.args],
                                  stdout=self.log, stderr=self.log, start_new_session=True)
        self.t0 = time.time()

    def finish(self, timeout=900):
        """Waits for the generator (polling, up to `timeout`) and returns its report;
        `self.cpu_s` is then its own CPU seconds (user + system, from `wait4`; `ip netns exec`
        runs it in place), or None where it was already reaped."""
        self.cpu_s = None
        deadline = time.time() + timeout
        while self.p.returncode is None:
            try:
                pid, status, usage = os.wait4(self.p.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (`poll`): no usage to read
                self.p.wait()
                break
            if pid:
                self.p.returncode = os.waitstatus_to_exitcode(status)
                self.cpu_s = round(usage.ru_utime + usage.ru_stime, 2)
                break
            if time.time() > deadline:
                self.p.kill()
                self.p.wait()
                raise RuntimeError(f"loadtest {self.name} did not finish within {timeout} s")
            time.sleep(0.1)
        if not self.out.exists():
            raise RuntimeError(f"loadtest {self.name} wrote no report (exit {self.p.returncode}; see {self.log.name})")
        return json.loads(self.out.read_text())

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def loopback_loadtest(bin_dir, url, connections, rate, hold, run_dir, name, channels=True):
    out = Path(tempfile.mkdtemp(prefix=f"odinc-{name}-")) / "report.json"
    args = [str(bin_dir / "loadtest"), "--url", url, "--connections", str(connections), "--rate", str(rate),
            "--hold", str(hold), "--source-ips", "127.0.0.2-127.0.0.65", "--json", str(out), "--quiet",
            *(["--channels", CHANNELS] if channels else []),
            *(["--handshake-timeout", HANDSHAKE_TIMEOUT] if HANDSHAKE_TIMEOUT else [])]
    with open(run_dir / f"loadtest-{name}.log", "w") as log:
        subprocess.run(args, stdout=log, stderr=log, timeout=900)
    return json.loads(out.read_text())


def summary(rep):
    """The figures of a loadtest report every scenario quotes."""
    c = rep["counts"]
    return {
        "attempted": c["attempted"], "established": c["established"],
        "success_pct": round(100 * c["established"] / max(c["attempted"], 1), 3),
        "failures": rep["failures"], "disconnects": rep["disconnects"],
        "reconnects": c["reconnects"], "reconnect_failures": rep.get("reconnect_failures", {}),
        "recovered_false": c["recovered_false"], "gaps": c["gaps"], "gap_messages": c["gap_messages"],
        "duplicates": c["duplicates"], "epoch_changes": c["epoch_changes"], "deliveries": c["deliveries"],
        "active_end_of_hold": c["active_end_of_hold"],
        # wss:// handshakes: full, or a re-dial resuming the client's own session.
        "tls_handshakes": {"full": c.get("tls_full_handshakes", 0), "resumed": c.get("tls_resumed_handshakes", 0)},
        "handshake_ms": {k: round(rep["handshake_us"][k] / 1000, 2) for k in ("p50", "p99", "p999", "max")},
        "generator": {"behind": rep["schedule"]["generator_behind"], "achieved_rate": round(rep["schedule"]["achieved_rate"], 1),
                      "lag_p99_ms": round(rep["schedule"]["lag_us"]["p99"] / 1000, 2)},
    }


def timeline_since(rep, t_unix):
    """Timeline entries (one per second) from wall-clock time `t_unix` on."""
    start = rep["started_unix_ms"] / 1000
    return [p for p in rep["timeline"] if start + p["second"] >= t_unix]


# ---- Kafka producer --------------------------------------------------------------------

class Producer(threading.Thread):
    """Records on topic `trades` at `rate`/s, key K<i> on partition i (each channel is one
    partition, so its offsets are contiguous and a client can see gaps). Keeps retrying
    through a broker outage; acks are counted. The first record of every partition goes at
    once, then the rate applies: no channel stays empty for the first seconds of a run (at
    2/s a tenth partition would wait 4.5 s), as a production topic is not empty. A client
    that subscribed to a channel before its first record and resumes after it gets
    `recovered:false` (the placeholder epoch is replaced, docs/protocol.md); that is the
    protocol's, and not what these scenarios measure."""

    def __init__(self, partitions, rate):
        super().__init__(daemon=True, name="producer")
        from kafka import KafkaProducer
        self.p = KafkaProducer(bootstrap_servers=f"{cl.KAFKA_IP}:{cl.KAFKA_PORT}", linger_ms=2, acks=1,
                               retries=2**31 - 1, retry_backoff_ms=200, max_in_flight_requests_per_connection=1,
                               request_timeout_ms=30000, delivery_timeout_ms=600000, reconnect_backoff_ms=100, reconnect_backoff_max_ms=1000,
                               max_block_ms=120000)
        self.partitions, self.rate = partitions, rate
        self.stop_event = threading.Event()
        self.sent = self.acked = self.errors = 0
        self.close_error = None
        self.positions = {}     # n -> (partition, offset) the broker acknowledged

    def ok(self, n, md):
        self.acked += 1
        self.positions[n] = (md.partition, md.offset)

    def err(self, _):
        self.errors += 1

    def run(self):
        t0 = time.time()
        while not self.stop_event.is_set():
            delay = t0 + max(0, self.sent - self.partitions + 1) / self.rate - time.time()
            if delay > 0:
                self.stop_event.wait(delay)
                continue
            i = self.sent % self.partitions
            try:
                f = self.p.send(TOPIC, key=f"K{i}".encode(), partition=i,
                                value=json.dumps({"n": self.sent, "ts_us": int(time.time() * 1e6)}).encode())
                f.add_callback(self.ok, self.sent)
                f.add_errback(self.err)
                self.sent += 1
            except Exception:  # buffer full or metadata unavailable for max_block_ms
                self.errors += 1
        self.p.flush(timeout=120)

    def stop(self):
        self.stop_event.set()
        self.join(timeout=150)
        try:
            self.p.close(timeout=10)
        except Exception as e:  # a slow broker: what was acked is counted, the rest is not
            self.close_error = repr(e)

    def figures(self):
        return {"rate": self.rate, "sent": self.sent, "acked": self.acked, "errors": self.errors,
                "close_error": self.close_error}


def audit_log(producer, partitions, timeout=90):
    """What the broker's log holds of the producer's records, read back from the start of
    every partition: acknowledged records missing or at another offset than acknowledged,
    records stored twice (a producer retry after a lost ack), offsets missing inside a log.
    Tells a broker that lost or duplicated records apart from a consumer that did."""
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=f"{cl.KAFKA_IP}:{cl.KAFKA_PORT}", enable_auto_commit=False,
                      auto_offset_reset="earliest", consumer_timeout_ms=1000)
    try:
        tps = [TopicPartition(TOPIC, i) for i in range(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        wanted = {}
        for n, (part, off) in producer.positions.items():
            wanted[part] = max(wanted.get(part, -1), off)
        log = {}                   # (partition, offset) -> n
        deadline = time.time() + timeout
        quiet_since = time.time()
        while time.time() < deadline:
            got = c.poll(500)
            for tp, msgs in got.items():
                for m in msgs:
                    try:
                        log[(m.partition, m.offset)] = json.loads(m.value)["n"]
                    except (ValueError, KeyError, TypeError):
                        log[(m.partition, m.offset)] = None
            if got:
                quiet_since = time.time()
            done = all(any(k == (p, o) for k in log) for p, o in wanted.items())
            if done and time.time() - quiet_since > 2:
                break
    finally:
        c.close()
    missing = sorted(n for n, pos in producer.positions.items() if log.get(pos) != n)
    seen = {}
    for pos, n in log.items():
        seen.setdefault(n, []).append(pos)
    twice = {n: sorted(v) for n, v in seen.items() if n is not None and len(v) > 1}
    holes = {}
    for part in range(partitions):
        offs = sorted(o for p, o in log if p == part)
        h = [o for a, b in zip(offs, offs[1:]) for o in range(a + 1, b)]
        if h:
            holes[part] = h[:20]
    return {"records_read": len(log), "acked": len(producer.positions),
            "acked_missing_or_moved": missing[:20], "acked_missing_or_moved_count": len(missing),
            "stored_twice": dict(list(twice.items())[:20]), "stored_twice_count": len(twice),
            "offset_holes": holes}


# ---- probes ----------------------------------------------------------------------------

def close_info(ws):
    """(code, reason) of the close frame the server sent, or (None, None)."""
    rcvd = getattr(ws, "close_rcvd", None) or getattr(getattr(ws, "protocol", None), "close_rcvd", None)
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


def ssl_context(c):
    ctx = ssl.create_default_context(cafile=str(c.front.ca))
    return ctx


class Probes:
    """Subscribed WebSocket clients through the front, each recording when and how it was
    closed: [(time, code, reason)] in `closed`."""

    def __init__(self, c, n, channel="trades.K0", source_ip=None):
        import websockets
        self.ws_mod = websockets
        self.url, self.ctx, self.channel, self.source = c.url(), ssl_context(c), channel, source_ip
        self.closed, self.conns, self.connect_failures = [], [], []
        self.wanted, self.gave_up = n, 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="probes").start()
        t0 = time.time()
        asyncio.run_coroutine_threadsafe(self.connect_all(n), self.loop).result(timeout=max(120, n / 2))
        self.open_s = round(time.time() - t0, 1)

    async def one(self):
        kw = {"ssl": self.ctx, "open_timeout": 10}
        if self.source:
            kw["local_addr"] = (self.source, 0)
        ws = await self.ws_mod.connect(self.url, **kw)
        try:
            await ws.send(json.dumps({"type": "subscribe", "channels": [self.channel]}))
            await asyncio.wait_for(ws.recv(), 10)
        except BaseException:
            await ws.close()
            raise
        self.conns.append(ws)

        async def watch():
            try:
                async for _ in ws:
                    pass
            except self.ws_mod.exceptions.ConnectionClosed:
                pass
            self.closed.append((time.time(), *close_info(ws)))
        asyncio.ensure_future(watch())

    async def connect_all(self, n, parallel=16):
        # A probe whose connect fails (on a loaded machine a TLS handshake through the front
        # can take over `open_timeout`) is tried again, up to 3 times; the failures are kept.
        # A probe that fails all 3 is left out and counted (`gave_up`): probes measure how
        # the servers close clients, and at full size the saturated front made one of 400
        # miss 3 x 10 s, which used to end the whole scenario. Scenarios check `opened_ok`.
        # `parallel` at a time: one by one, 400 probes took over 200 s through a front busy
        # with a reconnect burst (each handshake's latency, not the front's throughput).
        gate = asyncio.Semaphore(parallel)

        async def with_retries():
            async with gate:
                for attempt in range(3):
                    try:
                        await self.one()
                        return
                    except (OSError, asyncio.TimeoutError, self.ws_mod.exceptions.WebSocketException) as e:
                        self.connect_failures.append(repr(e)[:200])
                        if attempt == 2:
                            self.gave_up += 1
                            return
                        await asyncio.sleep(1)
        await asyncio.gather(*(with_retries() for _ in range(n)))

    def opened_ok(self):
        """At least 95 % of the probes opened (3 tries each): fewer means the front could not
        take new clients, which no scenario's other checks would show."""
        return len(self.conns) >= 0.95 * self.wanted

    def figures(self):
        return {"wanted": self.wanted, "opened": len(self.conns), "gave_up": self.gave_up,
                "open_s": self.open_s, "connect_failures": len(self.connect_failures)}

    def close(self):
        async def close_all():
            await asyncio.gather(*(ws.close() for ws in self.conns), return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


async def new_client(c, ctx, timeout=10):
    """One new client through the front: what it got. {'http': status} when the upgrade
    was refused, else {'http': 101, 'close': code, 'reason': text} (close None = a message
    arrived and the connection stayed)."""
    import websockets
    t = time.time()
    try:
        async with websockets.connect(c.url(), ssl=ctx, open_timeout=timeout, close_timeout=2) as ws:
            try:
                # The close may arrive before the subscribe is even sent.
                await ws.send(json.dumps({"type": "subscribe", "channels": ["trades.K0"]}))
                await asyncio.wait_for(ws.recv(), timeout)
                return {"t": t, "http": 101, "close": None}
            except websockets.exceptions.ConnectionClosed:
                code, reason = close_info(ws)
                return {"t": t, "http": 101, "close": code, "reason": reason}
    except websockets.exceptions.InvalidStatus as e:
        return {"t": t, "http": e.response.status_code}
    except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as e:
        return {"t": t, "http": None, "error": type(e).__name__}


def touch(c, n, source_ip=None):
    """n short-lived clients through the front (subscribe, close): half-open breakers take
    their trials from new clients."""
    async def go():
        ctx = ssl_context(c)
        out = []
        for _ in range(n):
            out.append(await new_client(c, ctx, timeout=5))
        return out
    return asyncio.run(go())


# ---- results ---------------------------------------------------------------------------

def save(name, c, full, figures, checks, started, extra=None):
    cl.RESULTS.mkdir(parents=True, exist_ok=True)
    path = cl.RESULTS / f"cluster-{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    ok = all(v for _, v in checks)
    doc = {
        "scenario": name, "size": "full" if full else "short", "pass": ok,
        "checks": [[label, bool(v)] for label, v in checks], "figures": figures,
        "runtime_metrics": c.watcher.summary(since=started) if c.watcher else None,
        "commit": cl.bench.commit_of(cl.REPO), "machine": cl.bench.machine(), "non_default_flags": cl.non_default_flags(c.a),
        "topology": c.describe(), "started_unix": round(started, 3), "seconds": round(time.time() - started, 1),
        "loadtest_handshake_timeout": HANDSHAKE_TIMEOUT or "5s (loadtest default)",
    }
    doc.update(extra or {})
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path, ok
