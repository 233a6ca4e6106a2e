#!/usr/bin/env python3
"""odin-ws capacity benchmarks on this machine, load generator co-located.

Subcommands (all start and stop their own servers on 127.0.0.x and bound their duration):

  capacity   the capacity table (docs/benchmarks.md): 12,000 connections through ws-lb at 50, 100, 1000 conn/s:
             success, active, handshake p50/p99, generator lag, LB and shard peak RSS and
             RSS per held connection
  builds     the capacity ramp on two builds of ws-shard + ws-lb (--a DIR, --b DIR), alternating
             A/B with the same loadtest; first pair apart, medians and B/A ratios of the rest
             (e.g. a base commit's target/release against this one: "not worse")
  compare    the same ramp, same shards, through ws-lb, nginx, HAProxy and directly to one
             shard; plus find-max per target; ratio table (conn/s at >= 99.9 %, p99, proxy
             CPU seconds and RSS per connection)
  fanout     N subscribers through ws-lb, publisher at rate R: deliveries/s, delivery p50/p99
  hold       as many connections as this box holds, the way production scales out: several
             ws-lb processes sharing the port (SO_REUSEPORT), several ws-shard processes,
             loadtest workers over many source addresses

Results: bench/results/<name>-<timestamp>.json (raw loadtest reports included) and a
markdown table on stdout. Use `--runs N` to repeat and report medians.
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pylib"))
import odin  # noqa: E402
from odin import free_port, port_free, wait_port  # noqa: E402

REPO = odin.REPO
BIN = odin.release_bin()
RESULTS = REPO / "bench" / "results"
# The load generator: $ODIN_LOADTEST, else the one next to the binaries measured. Set it when
# comparing two builds of the servers ($ODIN_BIN) so that both are driven by the same client.
LT = Path(os.environ.get("ODIN_LOADTEST") or BIN / "loadtest")


def wait_http(url: str, timeout=30.0):
    odin.wait_http(url, timeout)


def proc_rss_kb(pid: int) -> tuple:
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_pids(pid: int) -> list:
    """pid and its descendants (nginx/haproxy workers)."""
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += tree_pids(int(child))
    except OSError:
        pass
    return out


# Flags every bench server gets besides its placement (ports, backends), unless `defaults=True`:
# quiet logs and a 1 s drain (teardown only). The shard's per-client message limit and ws-lb's
# per-IP limit and pacing are off or raised here for the comparisons, where ws-lb must not be
# the one proxy that rate-limits; `defaults=True` (the capacity ramp) keeps every documented
# default but the drain window and log level, and the result records every flag.
SHARD_BENCH_FLAGS_OFF = ["--client-rate", "0"]
LB_BENCH_FLAGS_OFF = ["--per-ip-rate", "0", "--admission-rate", "20000", "--admission-burst", "2000"]
# Source addresses of the generator: 512, so that the per-IP limit at its default (100/s,
# burst 200) never binds below 51,200 connections/s.
SOURCE_IPS = "127.0.1.0-127.0.2.255"


def start_shards(procs, shards=3, max_conn=6000, extra=(), bin_dir=None, defaults=False):
    base, admin = free_port(), free_port()
    while any(not port_free(base + i) for i in range(shards)):
        base = free_port()
    p = procs.start("shard", [str((bin_dir or BIN) / "ws-shard"), "--shards", str(shards), "--base-port", str(base),
                              "--admin-addr", f"127.0.0.1:{admin}", "--max-connections", str(max_conn),
                              "--log-level", "warn", "--drain-window", "1s",
                              *([] if defaults else SHARD_BENCH_FLAGS_OFF), *extra])
    for i in range(shards):
        wait_http(f"http://127.0.0.1:{base + i}/health")
    return p, [base + i for i in range(shards)], admin


def start_lb(procs, shard_ports, name="lb", port=None, admin=None, extra=(), bin_dir=None, defaults=False, env=None,
             preexec_fn=None):
    port = port or free_port()
    admin = admin or free_port()
    urls = ",".join(f"ws://127.0.0.1:{p}/ws" for p in shard_ports)
    p = procs.start(name, [str((bin_dir or BIN) / "ws-lb"), "--listen", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
                           "--backend-urls", urls, *([] if defaults else LB_BENCH_FLAGS_OFF),
                           "--log-level", "warn", "--drain-window", "1s", *extra],
                    **({"env": {**os.environ, **env}} if env else {}), preexec_fn=preexec_fn)
    wait_http(f"http://127.0.0.1:{port}/health")
    return p, port, admin


def loadtest(url, connections, rate, hold, extra=(), name="run", source_ips="127.0.0.2-127.0.0.9"):
    out = Path(tempfile.mkdtemp()) / "report.json"
    args = [str(LT), "--url", url, "--connections", str(connections), "--rate", str(rate), "--hold", str(hold),
            "--source-ips", source_ips, "--json", str(out), "--quiet", *extra]
    r = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit(f"loadtest produced no report ({name})")
    return json.loads(out.read_text())


def summarize(rep):
    c = rep["counts"]
    hs = rep["handshake_us"]
    sched = rep["schedule"]
    return {
        "attempted": c["attempted"],
        "established": c["established"],
        "success_pct": 100.0 * c["established"] / max(c["attempted"], 1),
        "active_end_of_ramp": c["active_end_of_ramp"],
        "active_end_of_hold": c["active_end_of_hold"],
        "failures": rep.get("failures", {}),
        "handshake_p50_ms": hs["p50"] / 1000,
        "handshake_p99_ms": hs["p99"] / 1000,
        "handshake_max_ms": hs["max"] / 1000,
        "achieved_rate": sched["achieved_rate"],
        "lag_p99_ms": sched["lag_us"]["p99"] / 1000,
        "generator_behind": sched["generator_behind"],
    }


class Sampler:
    """Samples RSS of processes during a run (peak and at given moments)."""

    def __init__(self, pids):
        self.pids = pids

    def rss(self):
        return sum(proc_rss_kb(p)[0] for pid in self.pids for p in tree_pids(pid))

    def hwm(self):
        return sum(proc_rss_kb(p)[1] for pid in self.pids for p in tree_pids(pid))

    def cpu(self):
        return sum(proc_cpu_s(p) for pid in self.pids for p in tree_pids(pid))


def machine():
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nofile": subprocess.run(["bash", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip(),
        "loadavg_at_start": load(),
        "activity_at_start": activity(),
    }


def load():
    """The 1, 5 and 15 minute load averages (the box is shared: numbers taken under load say so)."""
    return [round(x, 2) for x in os.getloadavg()]


def activity(top=8):
    """Who else is on the box (other agents' builds and tests): the processes with the highest
    `ps` %CPU (CPU time over each process's lifetime, so a long-lived idle process ranks low
    and a fresh busy one high), name and %CPU."""
    out = subprocess.run(["ps", "-eo", "pcpu=,comm=", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = [line.split(None, 1) for line in out.splitlines()[:top] if line.strip()]
    return [{"cpu_pct": float(c), "comm": n.strip()} for c, n in rows]


def commit_of(path: Path) -> str:
    """The commit checked out where `path` lives (with "+dirty" for uncommitted changes)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def save(name, data):
    """Writes bench/results/<name>-<time>.json with the commit of the binaries measured (and
    of this script, when they differ: $ODIN_BIN pointing at another build)."""
    data.setdefault("binaries", {"dir": str(BIN), "commit": commit_of(BIN if BIN.exists() else REPO),
                                 "loadtest": str(LT), "loadtest_commit": commit_of(LT.parent if LT.exists() else REPO)})
    data.setdefault("loadavg_at_end", load())
    data.setdefault("script_commit", commit_of(REPO))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"\nraw results: {path.relative_to(REPO)}")


def median(values):
    return statistics.median(values) if values else None


def held_run(target_url, lb_pid, shard_pid, connections, rate, hold, extra=(), source_ips="127.0.0.2-127.0.0.9"):
    """One ramp with RSS measured before and after (per held connection). `lb_pid` may be a
    list (several ws-lb processes sharing the port)."""
    lb_pids = lb_pid if isinstance(lb_pid, list) else ([lb_pid] if lb_pid else [])
    s_lb = Sampler(lb_pids) if lb_pids else None
    s_sh = Sampler([shard_pid])
    base_lb = s_lb.rss() if s_lb else 0
    base_sh = s_sh.rss()
    cpu0 = s_lb.cpu() if s_lb else 0
    # Run the loadtest in the background so RSS can be read while connections are held.
    out = Path(tempfile.mkdtemp()) / "report.json"
    args = [str(LT), "--url", target_url, "--connections", str(connections), "--rate", str(rate),
            "--hold", str(hold), "--source-ips", source_ips, "--json", str(out), "--quiet", *extra]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ramp = connections / rate
    time.sleep(ramp + min(hold / 2, 5) + 1)
    held_lb = s_lb.rss() if s_lb else 0
    held_sh = s_sh.rss()
    p.communicate(timeout=3600)
    rep = json.loads(out.read_text())
    row = summarize(rep)
    active = max(rep["counts"]["active_end_of_hold"], 1)
    row.update({
        "loadavg": load(),
        "lb_rss_base_kib": base_lb, "lb_rss_held_kib": held_lb, "lb_peak_rss_kib": s_lb.hwm() if s_lb else None,
        "lb_kib_per_conn": (held_lb - base_lb) / active if s_lb else None,
        "shard_rss_base_kib": base_sh, "shard_rss_held_kib": held_sh, "shard_peak_rss_kib": s_sh.hwm(),
        "shard_kib_per_conn": (held_sh - base_sh) / active,
        "lb_cpu_s": (s_lb.cpu() - cpu0) if s_lb else None,
    })
    return row, rep


def capacity_run(connections, rate, hold, lb_procs, bin_dir=None, lb_flags=()):
    """One capacity ramp on fresh servers (3 shards in one process, `lb_procs` ws-lb processes
    sharing the port) built from `bin_dir` (default: the binaries measured)."""
    procs = odin.Procs("bench")
    try:
        shard, shard_ports, _ = start_shards(procs, bin_dir=bin_dir, defaults=True)
        # One ws-lb relays at most ~10,000 clients (two descriptors each, 20,000 per
        # process here), so 12,000 need two processes sharing the port.
        lb_port, lb_pids = free_port(), []
        for i in range(lb_procs):
            lb, _, _ = start_lb(procs, shard_ports, name=f"lb{i}", port=lb_port,
                                extra=(["--reuse-port"] if lb_procs > 1 else []) + list(lb_flags),
                                bin_dir=bin_dir, defaults=True)
            lb_pids.append(lb.pid)
        row, rep = held_run(f"ws://127.0.0.1:{lb_port}/ws", lb_pids, shard.pid, connections, rate, hold,
                            source_ips=SOURCE_IPS)
        row["report"] = rep
        row["processes"] = [[str(x) for x in p.args] for p in procs.started]
        return row
    finally:
        procs.stop()


def cmd_capacity(a):
    results = {"machine": machine(), "command": " ".join(sys.argv), "runs": {}}
    for rate in a.rates:
        rows = []
        for run in range(a.runs if rate >= 1000 else 1):
            row = capacity_run(a.connections, rate, a.hold, a.lb_procs, lb_flags=shlex.split(a.lb_flags))
            rows.append(row)
            print(f"rate {rate}/s run {run + 1}: {row['success_pct']:.3f}% p99 {row['handshake_p99_ms']:.2f} ms "
                  f"lb {row['lb_kib_per_conn']:.2f} KiB/conn shard {row['shard_kib_per_conn']:.2f} KiB/conn", flush=True)
        results["runs"][str(rate)] = rows
    print(f"\n| ramp | runs | success | active (end of ramp / hold) | handshake p50 | p99 | generator lag p99 | LB peak RSS | LB KiB/conn | shard peak RSS | shard KiB/conn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rate, rows in results["runs"].items():
        m = lambda k: median([r[k] for r in rows])
        print(f"| {rate}/s | {len(rows)} | {m('success_pct'):.3f}% | {int(m('active_end_of_ramp'))} / {int(m('active_end_of_hold'))} | "
              f"{m('handshake_p50_ms'):.2f} ms | {m('handshake_p99_ms'):.2f} ms | {m('lag_p99_ms'):.2f} ms | "
              f"{m('lb_peak_rss_kib') / 1024:.1f} MiB | {m('lb_kib_per_conn'):.2f} | {m('shard_peak_rss_kib') / 1024:.1f} MiB | "
              f"{m('shard_kib_per_conn'):.2f} |")
    save("capacity", results)


BUILD_KEYS = ["success_pct", "handshake_p50_ms", "handshake_p99_ms", "lag_p99_ms", "lb_kib_per_conn",
              "shard_kib_per_conn", "lb_peak_rss_kib", "shard_peak_rss_kib", "lb_cpu_s"]


def cmd_builds(a):
    """The capacity ramp on two builds, alternating A, B, A, B, ... with the same load generator;
    the first pair is reported apart (cold caches), medians and B/A ratios over the rest."""
    builds = {"A": Path(a.a).resolve(), "B": Path(a.b).resolve()}
    results = {"machine": machine(), "command": " ".join(sys.argv),
               "builds": {k: {"dir": str(d), "commit": commit_of(d)} for k, d in builds.items()},
               "connections": a.connections, "rate": a.rate, "hold": a.hold, "lb_procs": a.lb_procs,
               "pairs": []}
    for pair in range(a.pairs):
        runs = {}
        for k in (["A", "B"] if pair % 2 == 0 else ["B", "A"]):
            row = capacity_run(a.connections, a.rate, a.hold, a.lb_procs, bin_dir=builds[k])
            if not a.keep_reports:
                row.pop("report", None)
            runs[k] = row
            print(f"pair {pair + 1} {k}: {row['success_pct']:.3f}% p99 {row['handshake_p99_ms']:.2f} ms "
                  f"lb {row['lb_kib_per_conn']:.2f} KiB/conn shard {row['shard_kib_per_conn']:.2f} KiB/conn "
                  f"lb cpu {row['lb_cpu_s']:.2f} s load {row['loadavg'][0]}", flush=True)
        results["pairs"].append(runs)

    def table(pairs, title):
        print(f"\n{title}\n\n| metric | A median | B median | B / A |\n|---|---|---|---|")
        out = {}
        for key in BUILD_KEYS:
            ma = median([p["A"][key] for p in pairs])
            mb = median([p["B"][key] for p in pairs])
            ratio = mb / ma if ma else None
            out[key] = {"A": ma, "B": mb, "ratio": ratio}
            print(f"| {key} | {ma:.3f} | {mb:.3f} | {'' if ratio is None else f'{ratio:.3f}'} |")
        return out

    results["first_pair"] = table(results["pairs"][:1], "First pair (cold):")
    if len(results["pairs"]) > 1:
        results["warm"] = table(results["pairs"][1:], f"Warm pairs 2-{len(results['pairs'])} (medians):")
    save("builds", results)


NGINX_CONF = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; multi_accept on; }}
http {{
  access_log off;
  upstream shards {{ {servers} }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096 reuseport;
    location /ws {{
      proxy_pass http://shards;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_next_upstream error timeout http_503;
    }}
  }}
}}
"""

HAPROXY_CONF = """
global
  # HAProxy reserves two descriptors per connection up front: 2 x 9,900 + margin stays
  # under the 20,000 descriptors a process may open here.
  maxconn 9900
  nbthread {workers}
  pidfile {dir}/haproxy.pid
defaults
  mode http
  timeout connect 2s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
  retries 2
  option redispatch
frontend ws
  bind 127.0.0.1:{port}
  maxconn 9900
  default_backend shards
backend shards
  balance leastconn
{servers}
"""


def start_nginx(procs, shard_ports, workers=2):
    d = Path(tempfile.mkdtemp())
    port = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(
        workers=workers, dir=d, port=port, servers=" ".join(f"server 127.0.0.1:{p};" for p in shard_ports)))
    (d / "logs").mkdir()
    p = procs.start("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"])
    wait_port(port)
    return p, port


def start_haproxy(procs, shard_ports, workers=2):
    d = Path(tempfile.mkdtemp())
    port = free_port()
    servers = "\n".join(f"  server s{i} 127.0.0.1:{p} maxconn 9900" for i, p in enumerate(shard_ports))
    (d / "haproxy.cfg").write_text(HAPROXY_CONF.format(workers=workers, dir=d, port=port, servers=servers))
    p = procs.start("haproxy", ["haproxy", "-db", "-f", str(d / "haproxy.cfg")])
    wait_port(port)
    return p, port


X2_ENV = {"TOKIO_WORKER_THREADS": "1"}


def start_target(procs, target):
    """Fresh shards (3, one process, documented defaults) and, in front, `target`: ws-lb with
    its documented defaults, ws-lb with pacing off (`ws-lb-unpaced`), two ws-lb processes
    (`ws-lb-x2`), nginx (2 workers), HAProxy (2 threads; ws-lb runs 2 runtime threads) or
    none (`direct`, the shards' ports). Returns (shard process, the proxy's processes, url)."""
    shard, shard_ports, _ = start_shards(procs, shards=3, max_conn=20000, defaults=True)
    if target == "ws-lb":
        lb, port, _ = start_lb(procs, shard_ports, defaults=True)
        proxies = [lb]
    elif target == "ws-lb-mux":
        # The tier link (--tier-mux): one connection per shard carries every client.
        lb, port, _ = start_lb(procs, shard_ports, defaults=True, extra=["--tier-mux"])
        proxies = [lb]
    elif target == "ws-lb-unpaced":
        lb, port, _ = start_lb(procs, shard_ports, defaults=True, extra=["--admission-rate", "0"])
        proxies = [lb]
    elif target in ("ws-lb-x2", "ws-lb-x2-half"):
        # nginx's shape: two processes, one thread each, sharing the port (SO_REUSEPORT), each
        # with its own descriptor limit. Not the "one ws-lb process": it shows what
        # the per-process descriptor limit (20,000 here, hard) costs one process at 5,000/s.
        # `-half`: each process limited to 10,000 descriptors, the one process's budget in
        # total (same shape, same descriptors as `ws-lb`).
        port = free_port()
        limit = {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (10000, 10000))} \
            if target.endswith("-half") else {}
        proxies = [start_lb(procs, shard_ports, name=f"lb{i}", port=port, defaults=True, extra=["--reuse-port"],
                          env=X2_ENV, **limit)[0] for i in range(2)]
    elif target == "nginx":
        nginx, port = start_nginx(procs, shard_ports)
        proxies = [nginx]
    elif target == "haproxy":
        haproxy, port = start_haproxy(procs, shard_ports)
        proxies = [haproxy]
    elif target == "direct":
        return shard, [], ",".join(f"ws://127.0.0.1:{p}/ws" for p in shard_ports)
    else:
        raise SystemExit(f"unknown target {target}")
    return shard, proxies, f"ws://127.0.0.1:{port}/ws"


def perf_stat(pids):
    """`perf stat` counting every syscall (and context switches) of `pids` and their threads,
    from when it has attached to every thread (its control FIFO acknowledges `enable`) until
    `counts()` is called."""
    tmp = Path(tempfile.mkdtemp())
    out, ctl, ack = tmp / "perf.csv", tmp / "ctl", tmp / "ack"
    os.mkfifo(ctl)
    os.mkfifo(ack)
    proc = subprocess.Popen(["perf", "stat", "-x,", "-o", str(out), "-D", "-1", "--control", f"fifo:{ctl},{ack}",
                             "-e", "syscalls:sys_enter_*,context-switches,cpu-migrations",
                             "-p", ",".join(str(p) for p in pids)], stderr=subprocess.DEVNULL)
    # perf opens its control FIFO once it is attached; until then opening the write end fails.
    deadline = time.time() + 30
    while True:
        try:
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("perf stat did not start (perf_event_paranoid? missing tracepoints?)")
            time.sleep(0.01)
    os.write(fd, b"enable\n")
    with open(ack, "rb") as a:
        a.readline()

    def counts():
        os.close(fd)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        found = {}
        for line in out.read_text().splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].replace(".", "", 1).isdigit():
                found[f[2].replace("syscalls:sys_enter_", "")] = float(f[0])
        return found
    return counts


def cpu_run(url, proxies, connections, rate, lifetime, hold=0, syscalls=False, shard=None):
    """One ramp (each connection closes itself after `lifetime`; 0: held until the end) with
    the proxy's CPU seconds (user + system, every process of it) over the ramp, hold and
    closes, per attempted connection. `syscalls`: also the proxy's syscalls per attempted
    connection, by name, counted by `perf stat` (whose tracing slows the proxy: such a run's
    CPU and latency are not comparable with runs without it)."""
    pids = [x.pid for x in proxies]
    # Every process of the proxy (nginx's and HAProxy's workers are the master's children).
    counts = perf_stat(sorted({q for p in pids for q in tree_pids(p)})) if syscalls and pids else None
    cpu0 = Sampler(pids).cpu() if pids else 0.0
    shard_cpu0 = Sampler([shard.pid]).cpu() if shard else 0.0
    extra = ["--lifetime", lifetime] if lifetime else []
    rep = loadtest(url, connections, rate, hold, extra, name=f"{url} at {rate}/s", source_ips=SOURCE_IPS)
    # The connections still open when the generator exits close then; give the proxy that
    # second before reading its CPU time (a measurement window, not synchronisation).
    time.sleep(1.0)
    row = summarize(rep)
    if counts:
        n = max(rep["counts"]["attempted"], 1)
        found = counts()
        row["per_conn"] = {k: round(v / n, 3) for k, v in sorted(found.items(), key=lambda kv: -kv[1]) if v}
        row["syscalls_per_conn"] = round(sum(v for k, v in found.items()
                                             if k not in ("context-switches", "cpu-migrations")) / n, 2)
    row["loadavg"] = load()
    row["proxy_cpu_us_per_conn"] = (Sampler(pids).cpu() - cpu0) * 1e6 / max(rep["counts"]["attempted"], 1) if pids else None
    # The shards' side of the same connections (what a proxy saves or costs its backends).
    row["shard_cpu_us_per_conn"] = (Sampler([shard.pid]).cpu() - shard_cpu0) * 1e6 / max(rep["counts"]["attempted"], 1) \
        if shard else None
    row["sustained"] = row["success_pct"] >= 99.9 and row["handshake_p99_ms"] <= 50.0
    return row


def cmd_compare(a):
    """Handshake cost and latency through ws-lb, nginx and HAProxy (issue 14's targets), the
    targets alternating round by round, each round on fresh servers: the first ramp after a
    start, a warm ramp, then sustained rates for `--seconds` each with 1 s connection
    lifetimes (so any rate fits the descriptor limit)."""
    results = {"machine": machine(), "command": " ".join(sys.argv), "commit": commit_of(BIN),
               "loadtest": str(LT), "rounds": []}
    for rnd in range(a.rounds):
        order = a.targets[rnd % len(a.targets):] + a.targets[:rnd % len(a.targets)]
        runs = {}
        for target in order:
            procs = odin.Procs("bench")
            try:
                shard, proxies, url = start_target(procs, target)
                row = {"processes": [[str(x) for x in p.args] for p in procs.started]}
                if target.startswith("ws-lb-x2"):
                    row["ws_lb_env"] = X2_ENV
                    row["ws_lb_nofile"] = 10000 if target.endswith("-half") else "inherited"
                row["first"] = cpu_run(url, proxies, a.connections, 1000, None, hold=1)
                row["warm"] = cpu_run(url, proxies, a.connections, 1000, None, hold=1)
                for rate in a.rates:
                    row[str(rate)] = cpu_run(url, proxies, rate * a.seconds, rate, "1s", syscalls=a.syscalls, shard=shard)
            finally:
                procs.stop()
            runs[target] = row
            def cell(r):
                x = row[str(r)]
                cpu = x["proxy_cpu_us_per_conn"]
                return (f"{r}/s {x['success_pct']:.2f}% p99 {x['handshake_p99_ms']:.1f} ms"
                        + ("" if cpu is None else f" {cpu:.0f} us/conn")
                        + f" (shards {x['shard_cpu_us_per_conn']:.0f})"
                        + (f" {x['syscalls_per_conn']} syscalls/conn" if "syscalls_per_conn" in x else ""))
            rates = ", ".join(cell(r) for r in a.rates)
            print(f"round {rnd + 1} {target}: first p50/p99 {row['first']['handshake_p50_ms']:.2f}/{row['first']['handshake_p99_ms']:.2f} ms, "
                  f"warm {row['warm']['handshake_p50_ms']:.2f}/{row['warm']['handshake_p99_ms']:.2f} ms; {rates} "
                  f"load {row[str(a.rates[-1])]['loadavg'][0]}", flush=True)
        results["rounds"].append(runs)

    def med(target, phase, key, rounds):
        vals = [r[target][phase][key] for r in rounds if r[target][phase][key] is not None]
        return median(vals) if vals else None

    def table(rounds, title):
        print(f"\n{title}\n")
        cols = ["first p50 / p99 ms", "warm p50 / p99 ms"] + [f"{r}/s success, p99 ms, CPU us/conn" for r in a.rates] + ["highest sustained"]
        print("| target | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        out = {}
        for t in a.targets:
            cells = [f"{med(t, ph, 'handshake_p50_ms', rounds):.2f} / {med(t, ph, 'handshake_p99_ms', rounds):.2f}" for ph in ("first", "warm")]
            for r in a.rates:
                cpu = med(t, str(r), "proxy_cpu_us_per_conn", rounds)
                cells.append(f"{med(t, str(r), 'success_pct', rounds):.2f} %, {med(t, str(r), 'handshake_p99_ms', rounds):.1f}, "
                             f"{'-' if cpu is None else f'{cpu:.0f}'}")
            best = [max([r for r in a.rates if rr[t][str(r)]["sustained"]] or [0]) for rr in rounds]
            cells.append(f"{median(best):.0f}/s")
            out[t] = {"cells": cells, "highest_sustained": best}
            print(f"| {t} | " + " | ".join(cells) + " |")
        return out

    results["medians_all_rounds"] = table(results["rounds"], f"Medians of {a.rounds} rounds (first = the first ramp after each fresh start):")
    if a.syscalls:
        print("\nProxy syscalls per connection, medians (perf stat slows the proxies: compare the counts, not the CPU):\n")
        results["syscalls_medians"] = {}
        for t in a.targets:
            for r in a.rates:
                rows = [rr[t][str(r)]["per_conn"] for rr in results["rounds"] if "per_conn" in rr[t][str(r)]]
                names = {k for x in rows for k in x}
                meds = {k: median([x.get(k, 0.0) for x in rows]) for k in names}
                total = median([rr[t][str(r)]["syscalls_per_conn"] for rr in results["rounds"] if "per_conn" in rr[t][str(r)]] or [0])
                results["syscalls_medians"][f"{t} {r}/s"] = {"total": total, **meds}
                top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(meds.items(), key=lambda kv: -kv[1]) if v >= 0.05)
                print(f"- {t} at {r}/s: {total:.1f} syscalls/conn: {top}")
    save("compare", results)


def cmd_fanout(a):
    """Sweeps publish rates for two shapes of subscription, through ws-lb and directly to the
    shards, and reports the highest deliveries/s whose p99 delivery latency stays under
    --max-p99 (25 ms). With --rounds N every point runs N times, the two paths alternating
    (ws-lb first in even rounds, direct first in odd ones), and a point's p99 is the median
    of its rounds: one run's p99 at a point swings 2-3x between runs on this machine."""
    shapes = {
        # Every connection on one of 10 channels: one message per delivery per wake-up. Steps
        # of 5,000 deliveries/s: with steps of 2x the ratio of the two paths could only come
        # out as 1.0, 0.5, 0.4 or 0.2.
        "wide": {"subscribers": 5000, "per_conn": 1, "rates": [20, 30, 40, 50, 60, 70, 80, 100]},
        # Every connection on all 10 channels: messages to one connection can share a write.
        "dense": {"subscribers": 1000, "per_conn": 10, "rates": [50, 100, 150, 200]},
    }
    results = {"machine": machine(), "command": " ".join(sys.argv), "rounds": a.rounds, "runs": []}

    def run_point(shape, cfg, path, rate, rnd):
        procs = odin.Procs("bench")
        try:
            shard, shard_ports, admin = start_shards(procs, extra=["--outbound-queue", "4096", *a.shard_flags])
            # Directly: the connections spread over the 3 shards, as ws-lb spreads them.
            url = ",".join(f"ws://127.0.0.1:{p}/ws" for p in shard_ports)
            if path == "ws-lb":
                _, port, _ = start_lb(procs, shard_ports, extra=a.lb_flags)
                url = f"ws://127.0.0.1:{port}/ws"
            commands = {name: p.args for name, p in procs.procs.items()}
            rep = loadtest(url, cfg["subscribers"], 2000, a.hold,
                           ["--channels", "fan.C{0..9}", "--channels-per-conn", str(cfg["per_conn"]),
                            "--publish-url", f"http://127.0.0.1:{admin}/publish", "--publish-rate", str(rate),
                            "--publish-connections", "8"], name=f"fanout {shape} {path} {rate}")
        finally:
            procs.stop()
        d = rep["delivery_us"]
        row = {"shape": shape, "path": path, "round": rnd, "subscribers": cfg["subscribers"],
               "channels_per_conn": cfg["per_conn"],
               "publish_rate": rate, "publisher_achieved": (rep.get("publisher") or {}).get("achieved_rate"),
               "deliveries_per_s": rep["deliveries_per_s"], "delivery_p50_ms": d["p50"] / 1000,
               "delivery_p99_ms": d["p99"] / 1000, "gaps": rep["counts"]["gaps"],
               "duplicates": rep["counts"]["duplicates"], "commands": commands, "loadavg": load(),
               "report": rep}
        results["runs"].append(row)
        print(f"round {rnd} {shape} {path} publish {rate}/s: {row['deliveries_per_s']:.0f} deliveries/s "
              f"p50 {row['delivery_p50_ms']:.1f} ms p99 {row['delivery_p99_ms']:.1f} ms", flush=True)

    for shape, cfg in shapes.items():
        if a.shapes and shape not in a.shapes:
            continue
        for rate in cfg["rates"]:
            for rnd in range(a.rounds):
                paths = ["ws-lb", "direct"] if rnd % 2 == 0 else ["direct", "ws-lb"]
                for path in paths:
                    run_point(shape, cfg, path, rate, rnd)
    # One row per point: medians over its rounds.
    points = {}
    for r in results["runs"]:
        points.setdefault((r["shape"], r["path"], r["publish_rate"]), []).append(r)
    summary = []
    for (shape, path, rate), rows in points.items():
        summary.append({"shape": shape, "path": path, "publish_rate": rate, "rounds": len(rows),
                        "subscribers": rows[0]["subscribers"], "channels_per_conn": rows[0]["channels_per_conn"],
                        "deliveries_per_s": median([r["deliveries_per_s"] for r in rows]),
                        "delivery_p50_ms": median([r["delivery_p50_ms"] for r in rows]),
                        "delivery_p99_ms": median([r["delivery_p99_ms"] for r in rows]),
                        "p99_per_round_ms": [round(r["delivery_p99_ms"], 1) for r in rows],
                        "gaps": sum(r["gaps"] for r in rows), "duplicates": sum(r["duplicates"] for r in rows)})
    results["points"] = summary
    print(f"\n| shape | path | subscribers x channels | publish/s | deliveries/s | delivery p50 | p99 (median) | p99 per round | gaps/dups |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(summary, key=lambda r: (r["shape"], r["path"], r["publish_rate"])):
        print(f"| {r['shape']} | {r['path']} | {r['subscribers']} x {r['channels_per_conn']} | {r['publish_rate']} | "
              f"{r['deliveries_per_s']:.0f} | {r['delivery_p50_ms']:.1f} ms | {r['delivery_p99_ms']:.1f} ms | "
              f"{', '.join(map(str, r['p99_per_round_ms']))} | {r['gaps']}/{r['duplicates']} |")
    best = {}
    for shape in sorted({r["shape"] for r in summary}):
        for path in ["ws-lb", "direct"]:
            ok = [r["deliveries_per_s"] for r in summary
                  if r["shape"] == shape and r["path"] == path and r["delivery_p99_ms"] < a.max_p99]
            best[(shape, path)] = max(ok) if ok else 0
            print(f"highest deliveries/s with p99 < {a.max_p99:.0f} ms, {shape}, {path}: {best[(shape, path)]:.0f}")
        if best[(shape, "direct")]:
            print(f"  {shape}: ws-lb / direct = {best[(shape, 'ws-lb')] / best[(shape, 'direct')]:.2f}")
    results["highest_under_bound"] = {f"{k[0]} {k[1]}": v for k, v in best.items()}
    save("fanout", results)


def cmd_hold(a):
    results = {"machine": machine(), "command": " ".join(sys.argv)}
    procs = odin.Procs("bench")
    try:
        shard_ports, shard_pids = [], []
        for i in range(a.shard_procs):
            p, ports, _ = start_shards(procs, shards=2, max_conn=a.connections // (2 * a.shard_procs) + 2000,
                                       defaults=True)
            shard_ports += ports
            shard_pids.append(p.pid)
        port, lb_pids = free_port(), []
        for i in range(a.lb_procs):
            # Documented defaults: 40 source addresses at 2,000/s is 50/s each, under the per-IP
            # limit (100/s); 2,000/s in total is under each process's pacing rate.
            p, _, _ = start_lb(procs, shard_ports, name=f"lb{i}", port=port, extra=["--reuse-port"], defaults=True)
            lb_pids.append(p.pid)
        lbs, shards = Sampler(lb_pids), Sampler(shard_pids)
        base = (lbs.rss(), shards.rss())
        out = Path(tempfile.mkdtemp()) / "report.json"
        args = [str(LT), "--url", f"ws://127.0.0.1:{port}/ws", "--connections", str(a.connections), "--rate", str(a.rate),
                "--hold", str(a.hold), "--workers", str(a.workers), "--source-ips", "127.0.0.2-127.0.0.41",
                "--json", str(out), "--quiet"]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(a.connections / a.rate + min(a.hold / 2, 10) + 2)
        held = (lbs.rss(), shards.rss())
        stdout, _ = p.communicate(timeout=7200)
        rep = json.loads(out.read_text())
        row = summarize(rep)
        active = max(rep["counts"]["active_end_of_hold"], 1)
        row.update({"lb_procs": a.lb_procs, "shard_procs": a.shard_procs, "workers": a.workers,
                    "lb_kib_per_conn": (held[0] - base[0]) / active, "shard_kib_per_conn": (held[1] - base[1]) / active,
                    "lb_rss_held_mib": held[0] / 1024, "shard_rss_held_mib": held[1] / 1024, "report": rep,
                    "processes": [[str(x) for x in p.args] for p in procs.started]})
        results["run"] = row
        print(stdout[-2500:])
        print(f"\n| target | established | active end of hold | success | handshake p99 | LB KiB/conn | shard KiB/conn |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {a.connections} | {row['established']} | {row['active_end_of_hold']} | {row['success_pct']:.3f}% | "
              f"{row['handshake_p99_ms']:.2f} ms | {row['lb_kib_per_conn']:.2f} | {row['shard_kib_per_conn']:.2f} |")
    finally:
        procs.stop()
    save("hold", results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capacity")
    c.add_argument("--connections", type=int, default=12000)
    c.add_argument("--rates", type=int, nargs="+", default=[50, 100, 1000])
    c.add_argument("--hold", type=int, default=10)
    c.add_argument("--runs", type=int, default=3, help="runs of the 1000/s ramp (50 and 100/s: one run each)")
    c.add_argument("--lb-procs", type=int, default=2, help="ws-lb processes sharing the port (SO_REUSEPORT)")
    c.add_argument("--lb-flags", default="", help="extra ws-lb flags (recorded with every process's command line)")
    c = sub.add_parser("builds", help="the capacity ramp on two builds (--a DIR --b DIR), alternating")
    c.add_argument("--a", required=True, help="directory with build A's ws-shard and ws-lb (e.g. the base)")
    c.add_argument("--b", default=str(BIN), help="directory with build B's binaries (default: $ODIN_BIN or target/release)")
    c.add_argument("--connections", type=int, default=4000)
    c.add_argument("--rate", type=int, default=1000)
    c.add_argument("--hold", type=int, default=5)
    c.add_argument("--pairs", type=int, default=5, help="A/B pairs; the first is reported apart")
    c.add_argument("--lb-procs", type=int, default=1)
    c.add_argument("--keep-reports", action="store_true", help="keep each run's raw loadtest report")
    c = sub.add_parser("compare")
    c.add_argument("--targets", nargs="+", default=["ws-lb", "nginx", "haproxy"],
                   help="of ws-lb, ws-lb-mux (--tier-mux), ws-lb-unpaced (--admission-rate 0), ws-lb-x2 (two ws-lb processes of one thread "
                        "each sharing the port, as nginx's two workers; ws-lb-x2-half: each with 10,000 descriptors), nginx, haproxy, direct")
    # 6,000 held at once: every proxy holds them in one process (two descriptors per relayed
    # client, 20,000 descriptors per process on these machines).
    c.add_argument("--connections", type=int, default=6000, help="connections of the first and the warm ramp (1,000/s)")
    c.add_argument("--rates", type=int, nargs="+", default=[3000, 5000, 7000], help="sustained rates (1 s lifetimes)")
    c.add_argument("--seconds", type=int, default=10, help="how long each sustained rate is held")
    c.add_argument("--rounds", type=int, default=3, help="rounds; the targets alternate, fresh servers each time")
    c.add_argument("--syscalls", action="store_true",
                   help="count the proxies' syscalls per connection at the sustained rates (perf stat; slows them: "
                        "CPU and latency of such a run are not comparable with runs without it)")
    c = sub.add_parser("fanout")
    c.add_argument("--shapes", nargs="*", default=[], help="wide and/or dense (default both)")
    c.add_argument("--hold", type=int, default=12)
    c.add_argument("--max-p99", type=float, default=25.0)
    c.add_argument("--rounds", type=int, default=1, help="runs per point, the paths alternating; a point's p99 is their median")
    c.add_argument("--shard-flags", type=shlex.split, default=[], help="extra ws-shard flags (recorded), e.g. '--write-delay 2ms'")
    c.add_argument("--lb-flags", type=shlex.split, default=[], help="extra ws-lb flags (recorded)")
    c = sub.add_parser("hold")
    c.add_argument("--connections", type=int, default=100000)
    c.add_argument("--rate", type=int, default=2000)
    c.add_argument("--hold", type=int, default=60)
    c.add_argument("--lb-procs", type=int, default=12)
    c.add_argument("--shard-procs", type=int, default=8)
    c.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()
    if a.cmd == "compare" and a.syscalls and not shutil.which("perf"):
        raise SystemExit("--syscalls needs perf (apt-get install -y linux-perf)")
    for tool in (["nginx", "haproxy"] if a.cmd == "compare" else []):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: make bench-compare installs it (apt-get install -y {tool})")
    {"capacity": cmd_capacity, "builds": cmd_builds, "compare": cmd_compare, "fanout": cmd_fanout, "hold": cmd_hold}[a.cmd](a)


if __name__ == "__main__":
    main()
