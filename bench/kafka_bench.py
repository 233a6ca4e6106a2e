#!/usr/bin/env python3
"""Produce-to-client latency through the Kafka source, and the ingest rate of one shard.

  latency  a broker (1 topic, 3 partitions; `--broker mock`, the default: librdkafka's mock
           cluster run by `loadtest kafka-broker`; `--broker tansu`), one ws-shard process consuming it, one ws-lb, 1,000
           WebSocket subscribers (the loadtest tool) through ws-lb, one per channel
           (`md.k0` .. `md.k999`), and in the same run a plain Kafka consumer
           (`loadtest kafka-consume`: librdkafka, every partition, fetch wait as the shard's)
           as the broker's own reference. The producer (`loadtest kafka-produce`, librdkafka
           with its default linger of 5 ms) stamps each record with `ts_us` before the linger; the WebSocket clients and the reference
           consumer each measure receive time minus `ts_us` (same machine, same clock).
           Phases: (a) idle, 1 record/s for 60 s; (b) 1,000 records/s for 30 s; (c) 10,000
           records/s for 20 s; subscribers stay 10-90 s after the last record, and a phase
           starts only once the shard has consumed every record produced before it.
           Completeness: each channel's deliveries must equal the records produced for its
           key, with no duplicate. `--rounds` (3) rounds of the three phases. With the mock
           broker every phase runs on fresh servers (the mock slows down as its log grows),
           so every row is a first run after a start; with tansu the servers stay up and
           round 1 is the first after the start, reported apart from the rest.
  ingest   one ws-shard process (defaults: 3 shards) with 5,000 clients subscribed directly
           (5 per channel over 1,000 channels). The consumer child is paused (SIGSTOP) while a
           backlog is produced, then resumed: the rate at which the shard takes the backlog
           (records/s, deliveries/s) and the CPU of the shard, its consumer child and the
           clients over that interval; a second pass without subscribers separates ingest from
           fan-out; `perf record` (software clock) of the shard, when available, says where
           the time goes.

Every process gets the documented defaults except where it must be placed (ports, brokers,
topics); the result JSON records the commit, the machine and every flag of every process.
Results: bench/results/kafka-<mode>-<timestamp>.json and a markdown table on stdout.

Usage: kafka_bench.py latency|ingest [--broker mock|tansu] [--tansu PATH]. Every wait is bounded.
"""

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (machine(), commit_of(), save(), proc_cpu_s())
from odin import Procs, free_port, port_free, wait_port, wait_http, http_get, wait_for  # noqa: E402
import odin  # noqa: E402

REPO = bench.REPO
BIN = bench.BIN
TOPIC = "md"
KEYS = 1000


def percentiles(values):
    if not values:
        return {"count": 0}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"count": len(v), "p50": pick(0.50), "p99": pick(0.99), "max": v[-1]}


class Broker:
    """tansu (the tests' broker), or librdkafka's mock cluster (`loadtest kafka-broker`): a
    Kafka-protocol broker in C with its log in memory. tansu delivers to a plain consumer at
    a p99 of 3.4 s at 1,000 records/s on this machine, too slow to measure a gateway's 2 ms against."""

    def __init__(self, procs, kind, tansu):
        self.kind = kind
        if kind == "mock":
            self.args = [str(BIN / "loadtest"), "kafka-broker", "--topic", TOPIC, "--partitions", "3"]
            p = procs.start("kafka-mock", self.args, stdout=subprocess.PIPE)
            buf, deadline = b"", time.monotonic() + 30
            while b"ready\n" not in buf and time.monotonic() < deadline:
                if select.select([p.stdout], [], [], 1)[0]:
                    chunk = os.read(p.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    buf += chunk
            lines = buf.decode(errors="replace").splitlines()
            if len(lines) != 2 or not lines[0].startswith("bootstrap ") or lines[1] != "ready":
                raise SystemExit(f"loadtest kafka-broker did not start: {lines}")
            self.addr = lines[0].split(" ", 1)[1]
            return
        self.port = free_port()
        self.args = [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                     "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                     "--storage-engine", "memory://tansu/"]
        procs.start("tansu", self.args)
        wait_port(self.port)
        out = subprocess.run([tansu, "topic", "create", TOPIC, "--partitions", "3",
                              "--broker", f"tcp://127.0.0.1:{self.port}"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        self.addr = f"127.0.0.1:{self.port}"


def start_shard(procs, broker):
    base = free_port()
    while any(not port_free(base + i) for i in range(3)):
        base = free_port()
    admin = free_port()
    args = [str(BIN / "ws-shard"), "--base-port", str(base), "--admin-addr", f"127.0.0.1:{admin}",
            "--kafka-brokers", broker.addr, "--kafka-topics", TOPIC]
    p = procs.start("shard", args)
    wait_http(f"http://127.0.0.1:{base}/health", 60,
              ready=lambda status, body: json.loads(body)["source"]["connected"])
    return p, [base, base + 1, base + 2], admin, args


def consumer_child(shard_pid, timeout=30):
    """The shard's consumer child. It is spawned by whichever runtime thread runs the source,
    so every thread's children are searched, until it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{shard_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"kafka-consumer" in cmd:
                    return int(child)
        time.sleep(0.1)
    raise SystemExit(f"no kafka-consumer child process of {shard_pid} within {timeout} s")


def metric(admin, name):
    return odin.metric(http_get(f"http://127.0.0.1:{admin}/metrics")[1], name)


LT = BIN / "loadtest"


def produce(broker, rate, seconds, keys=KEYS):
    """`loadtest kafka-produce`; returns its report."""
    out = Path(tempfile.mkdtemp()) / "produce.json"
    args = [str(LT), "kafka-produce", "--brokers", broker.addr, "--topic", TOPIC, "--rate", str(rate),
            "--duration", f"{seconds}s", "--keys", str(keys), "--json", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"kafka-produce failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    rep = json.loads(out.read_text())
    rep["args"] = args
    return rep


class Reference:
    """`loadtest kafka-consume`: a plain consumer on the same broker, the reference."""

    def __init__(self, broker, seconds):
        self.out = Path(tempfile.mkdtemp()) / "consume.json"
        self.args = [str(LT), "kafka-consume", "--brokers", broker.addr, "--topic", TOPIC,
                     "--duration", f"{seconds}s", "--json", str(self.out)]
        self.p = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"kafka-consume did not start: {line} {self.p.stderr.read()[-2000:]}")

    def result(self, timeout):
        self.p.communicate(timeout=timeout)
        rep = json.loads(self.out.read_text())
        rep["args"] = self.args
        return rep


def loadtest_subscribers(url, connections, hold_s, channels, name):
    out = Path(tempfile.mkdtemp()) / f"{name}.json"
    args = [str(BIN / "loadtest"), "--url", url, "--connections", str(connections), "--rate", "250",
            "--hold", f"{hold_s}s", "--channels", channels, "--source-ips", "127.0.0.2-127.0.0.9",
            "--json", str(out), "--quiet"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out, args


def wait_metric(admin, name, want, timeout, what):
    wait_for(lambda: metric(admin, name) >= want, timeout, what)


def wait_below(admin, name, limit, timeout, what):
    wait_for(lambda: metric(admin, name) < limit, timeout, what)


# (name, records/s, seconds, tail): subscribers stay `tail` seconds after the last record, so a
# record the broker itself delivers late is still counted (tansu on a busy 2-core box can fall
# tens of seconds behind at 10,000/s; the reference consumer shows how far).
PHASES = [("a_idle", 1, 60, 10), ("b_1k", 1000, 30, 60), ("c_10k", 10000, 20, 90)]
# The mock broker keeps up with every phase: 10 s after the last record is plenty.
MOCK_TAIL = 10


def cmd_latency(a):
    procs = Procs("kafka-bench")
    result = {"commit": bench.commit_of(REPO), "machine": bench.machine(), "command": " ".join(sys.argv),
              "load_avg_at_start": os.getloadavg(),
              "subscribers": 1000, "channels": KEYS, "partitions": 3, "rounds": []}
    # The mock broker finds a fetch's position by walking the partition's whole log (librdkafka
    # 2.12 rdkafka_mock.c, rd_kafka_mock_msgset_find: "FIXME: Maintain an index"), so it gets
    # slower with every record kept: after phase (c)'s 200,000 records a plain consumer's p99
    # at 1,000 records/s went from 28 ms to 0.7 s. With it every phase runs on fresh servers
    # (broker, ws-shard, ws-lb): each is a first run after a start, and round 2 repeats round 1.
    fresh = a.broker == "mock"
    result["fresh_servers_per_phase"] = fresh
    result["broker"] = a.broker

    def start_all():
        broker = Broker(procs, a.broker, a.tansu)
        _, ports, shard_admin, shard_args = start_shard(procs, broker)
        lb_port, lb_admin = free_port(), free_port()
        lb_args = [str(BIN / "ws-lb"), "--listen", f"127.0.0.1:{lb_port}", "--admin-addr", f"127.0.0.1:{lb_admin}",
                   "--backend-urls", ",".join(f"ws://127.0.0.1:{p}/ws" for p in ports)]
        procs.start("lb", lb_args)
        wait_http(f"http://127.0.0.1:{lb_port}/health")
        result["processes"] = {"broker": broker.args, "ws-shard": shard_args, "ws-lb": lb_args}
        return broker, shard_admin, lb_port

    try:
        broker, shard_admin, lb_port = start_all()
        produced_total = 0
        for rnd in range(1, a.rounds + 1):
            rows = {}
            for i, (name, rate, seconds, tail) in enumerate(PHASES):
                tail = MOCK_TAIL if a.broker == "mock" else tail
                if fresh and (rnd, i) != (1, 0):
                    procs.stop()
                    broker, shard_admin, lb_port = start_all()
                    produced_total = 0
                wait_below(shard_admin, "ws_shard_subscriptions", 1, 60, "the previous phase's clients to leave")
                lt, out, lt_args = loadtest_subscribers(f"ws://127.0.0.1:{lb_port}/ws", 1000, seconds + tail + 5,
                                                        f"{TOPIC}.k{{0..{KEYS - 1}}}", name)
                wait_metric(shard_admin, "ws_shard_subscriptions", 1000, 60, "1,000 subscriptions")
                ref = Reference(broker, seconds + tail)
                prod = produce(broker, rate, seconds)
                refrep = ref.result(timeout=seconds + tail + 60)
                lt.communicate(timeout=seconds + tail + 120)
                rep = json.loads(out.read_text())
                produced = {f"{TOPIC}.{k}": n for k, n in prod["per_key"].items()}
                got = rep.get("per_channel", {})
                short = {c: (got.get(c, 0), n) for c, n in produced.items() if got.get(c, 0) != n}
                d, r = rep["delivery_us"], refrep["latency_us"]
                row = {
                    "rate": rate, "seconds": seconds, "records": prod["records"], "producer_failed": prod["failed"],
                    "producer_behind_s": round(prod["behind_s"], 3),
                    "gateway_us": {k: d[k] for k in ("count", "p50", "p99", "max")},
                    "reference_us": {k: r[k] for k in ("count", "p50", "p99", "max")},
                    "reference_records": refrep["records"],
                    "added_p99_ms": (d["p99"] - r["p99"]) / 1000,
                    "complete": not short and rep["counts"]["duplicates"] == 0 and prod["failed"] == 0,
                    "channels_short": dict(list(short.items())[:10]),
                    "duplicates": rep["counts"]["duplicates"],
                    "established": rep["counts"]["established"],
                    "generator": {"lag_p99_ms": rep["schedule"]["lag_us"]["p99"] / 1000},
                    "args": {"loadtest": lt_args, "producer": prod["args"], "reference": refrep["args"]},
                }
                rows[name] = row
                # The next phase starts once the shard has taken in every record produced so
                # far (a broker still working through a backlog would skew the next phase).
                produced_total += prod["records"]
                wait_metric(shard_admin, "ws_kafka_records_total", produced_total, 300,
                            "the shard to consume every record produced so far")
                print(f"round {rnd} {name}: {prod['records']} records; gateway p50/p99/max "
                      f"{d['p50']/1000:.2f}/{d['p99']/1000:.2f}/{d['max']/1000:.2f} ms; plain consumer "
                      f"{r['p50']/1000:.2f}/{r['p99']/1000:.2f}/{r['max']/1000:.2f} ms; "
                      f"complete={row['complete']}", flush=True)
            result["rounds"].append(rows)
    finally:
        procs.stop()
    save_and_table("kafka-latency", result)


def save_and_table(name, result):
    result["load_avg_at_end"] = os.getloadavg()
    bench.save(name, result)
    if name == "kafka-latency":
        print("\n| round | phase | records | gateway p50 / p99 / max (ms) | plain consumer p50 / p99 / max (ms) | added p99 | complete |")
        print("|---|---|---|---|---|---|---|")
        for i, rows in enumerate(result["rounds"], 1):
            for name, r in rows.items():
                g, ref = r["gateway_us"], r["reference_us"]
                print(f"| {i} | {name} | {r['records']} | {g['p50']/1000:.2f} / {g['p99']/1000:.2f} / {g['max']/1000:.2f} | "
                      f"{ref.get('p50', 0)/1000:.2f} / {ref.get('p99', 0)/1000:.2f} / {ref.get('max', 0)/1000:.2f} | "
                      f"{r['added_p99_ms']:+.2f} ms | {r['complete']} |")
        print("\n| phase | added p50 per round (ms) | added p99 per round (ms) | median added p99 | every round complete |")
        print("|---|---|---|---|---|")
        for name, *_ in PHASES:
            rows = [rr[name] for rr in result["rounds"] if name in rr]
            p50 = [(r["gateway_us"]["p50"] - r["reference_us"].get("p50", 0)) / 1000 for r in rows]
            p99 = [r["added_p99_ms"] for r in rows]
            print(f"| {name} | {', '.join(f'{x:+.2f}' for x in p50)} | {', '.join(f'{x:+.2f}' for x in p99)} | "
                  f"{bench.median(p99):+.2f} ms | {all(r['complete'] for r in rows)} |")


def ingest_pass(procs, broker, shard_admin, child, shard_pid, backlog, subscribers_pids):
    """Pause the consumer, produce `backlog` records, resume, time the catch-up."""
    start_count = metric(shard_admin, "ws_kafka_records_total")
    os.kill(child, signal.SIGSTOP)
    try:
        t = time.monotonic()
        prod = produce(broker, 100_000, backlog / 100_000)  # as fast as this box allows
        produce_s = time.monotonic() - t
        assert prod["failed"] == 0, prod
    finally:
        os.kill(child, signal.SIGCONT)
    cpu0 = {"shard": bench.proc_cpu_s(shard_pid), "consumer": bench.proc_cpu_s(child),
            "clients": sum(bench.proc_cpu_s(p) for p in subscribers_pids)}
    t0 = time.monotonic()
    target = start_count + backlog
    deadline = t0 + 600
    while time.monotonic() < deadline and metric(shard_admin, "ws_kafka_records_total") < target:
        time.sleep(0.05)
    took = time.monotonic() - t0
    done = metric(shard_admin, "ws_kafka_records_total") - start_count
    cpu = {"shard": bench.proc_cpu_s(shard_pid) - cpu0["shard"], "consumer": bench.proc_cpu_s(child) - cpu0["consumer"],
           "clients": sum(bench.proc_cpu_s(p) for p in subscribers_pids) - cpu0["clients"]}
    return {"backlog": backlog, "ingested": done, "seconds": round(took, 3), "records_per_s": round(done / took),
            "produce_s": round(produce_s, 1),
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_cores": {k: round(v / took, 2) for k, v in cpu.items()}}


def cmd_ingest(a):
    procs = Procs("kafka-bench")
    result = {"commit": bench.commit_of(REPO), "machine": bench.machine(), "command": " ".join(sys.argv),
              "load_avg_at_start": os.getloadavg(), "passes": {}}
    lts = []
    try:
        broker = Broker(procs, a.broker, a.tansu)
        shard, ports, shard_admin, shard_args = start_shard(procs, broker)
        child = consumer_child(shard.pid)
        result["broker"] = a.broker
        result["processes"] = {"broker": broker.args, "ws-shard": shard_args}
        result["passes"]["no_subscribers"] = ingest_pass(procs, broker, shard_admin, child, shard.pid, a.backlog, [])
        print("no subscribers:", result["passes"]["no_subscribers"], flush=True)
        # 5,000 subscribers, one loadtest per shard port (5 per channel over 1,000 channels).
        per = [1667, 1667, 1666]
        for port, n in zip(ports, per):
            lts.append(loadtest_subscribers(f"ws://127.0.0.1:{port}/ws", n, 600, f"{TOPIC}.k{{0..{KEYS - 1}}}", f"ingest-{port}"))
        wait_metric(shard_admin, "ws_shard_subscriptions", 5000, 120, "5,000 subscriptions")
        perf_out = None
        if shutil.which("perf"):
            perf_out = Path(tempfile.mkdtemp()) / "perf.data"
            perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", str(perf_out),
                                     "-p", f"{shard.pid},{child}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        row = ingest_pass(procs, broker, shard_admin, child, shard.pid, a.backlog, [p.pid for p, _, _ in lts])
        row["subscribers"] = 5000
        row["deliveries_per_s"] = row["records_per_s"] * 5
        result["passes"]["5000_subscribers"] = row
        print("5,000 subscribers:", row, flush=True)
        if perf_out:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
            rep = subprocess.run(["perf", "report", "-i", str(perf_out), "--no-children", "--sort", "comm,dso,symbol",
                                  "--stdio", "--percent-limit", "1.5", "-g", "none"], capture_output=True, text=True)
            result["perf_top"] = [l for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")][:40]
            print("\n".join(result["perf_top"]))
        result["loadtest_args"] = [args for _, _, args in lts]
    finally:
        for p, _, _ in lts:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, _, _ in lts:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        procs.stop()
    result["load_avg_at_end"] = os.getloadavg()
    bench.save("kafka-ingest", result)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["latency", "ingest"])
    ap.add_argument("--rounds", type=int, default=3, help="latency: rounds of the three phases")
    ap.add_argument("--broker", choices=["mock", "tansu"],
                    help="mock: librdkafka's mock cluster (`loadtest kafka-broker`; the default of latency); "
                         "tansu: the tests' broker (the default of ingest)")
    ap.add_argument("--tansu", default=shutil.which("tansu") or os.path.expanduser("~/.cargo/bin/tansu"))
    ap.add_argument("--backlog", type=int, default=300_000, help="ingest: records in the paused backlog")
    a = ap.parse_args()
    a.broker = a.broker or ("mock" if a.mode == "latency" else "tansu")
    {"latency": cmd_latency, "ingest": cmd_ingest}[a.mode](a)


if __name__ == "__main__":
    main()
