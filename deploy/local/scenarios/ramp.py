"""The plan's Tests 1-3 through the front over wss://: 12,000 subscribed clients at 100/s and
at 1,000/s (short: 1,000 at 250/s and 300 at 100/s). Each cluster run is paired with a
loopback run of the same ramp (ws-lb and ws-shard on 127.0.0.1, plain ws://, the deploy's
settings), alternating; the first run after the cluster started is reported apart.

Checks: success >= 99.9 % on every cluster run; the front answered no HTTP 5xx; every LB VM
took clients; no client was refused by the per-IP limit (64 client addresses behind one
front address: ws-lb keys the limit on X-Forwarded-For)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402
import topo  # noqa: E402


class Loopback:
    """ws-lb x2 (SO_REUSEPORT: one process relays at most ~10,000 clients here) and one
    ws-shard process with the shard VM's shard count, on 127.0.0.1, with the deploy's
    settings except addresses and Kafka (the embedded bus)."""

    def __init__(self, c):
        self.c = c
        self.procs = []
        base, admin = 23002, 29102
        shard_args = [x for x in c.pv.shard_args]
        shard_args = drop(shard_args, "--kafka-brokers", "--kafka-topics", "--base-port", "--bind", "--admin-addr")
        shard_args += ["--base-port", str(base), "--bind", "127.0.0.1", "--admin-addr", f"127.0.0.1:{admin}"]
        self.start("loopback-shard", [str(c.bin / "ws-shard"), *shard_args])
        urls = ",".join(f"ws://127.0.0.1:{base + k}/ws" for k in range(c.pv.shards_per_vm))
        # The shard list is fixed here (one local process): the VMs' member file is not used.
        lb_args = drop(c.pv.lb_args, "--listen", "--admin-addr", "--trust-forwarded-for", "--backend-file")
        lb_args = [x for x in lb_args if not x.startswith("--backend-urls=")]
        self.port = 23001
        for i in range(2):
            self.start(f"loopback-lb{i}", [str(c.bin / "ws-lb"), *lb_args, "--listen", f"127.0.0.1:{self.port}",
                                           "--admin-addr", f"127.0.0.1:{29101 + i * 10}", f"--backend-urls={urls}",
                                           "--reuse-port"], env=c.pv.lb_env)
        cl.wait(lambda: all(cl.get_any(f"http://127.0.0.1:{base + k}/health")[0] == 200
                            for k in range(c.pv.shards_per_vm)), 30, "loopback shards")
        cl.wait(lambda: cl.get_any(f"http://127.0.0.1:{self.port}/health")[0] == 200, 30, "loopback ws-lb")

    def start(self, name, argv, env=None):
        log = open(self.c.run_dir / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env={**self.c.env(), **(env or {})},
                                           start_new_session=True))

    def url(self):
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def drop(args, *flags):
    """`args` without the given flags and their values."""
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
            continue
        if x in flags:
            skip = x not in ("--trust-forwarded-for",)
            continue
        out.append(x)
    return out


def lb_spread(c):
    relayed = {n: cl.metric(c.lb_metrics(n), "ws_lb_client_connections_total", 'result="relayed"') or 0
               for n in c.members}
    return relayed


def run(c, full):
    plan = [(1000, 12000), (100, 12000)] if full else [(250, 1000), (100, 300)]
    plan = [(common.capped(c, r), common.clients(c, n)) for r, n in plan]
    rounds = 2 if full else 1
    hold = 30 if full else 2
    loop = Loopback(c)
    runs, checks = [], []
    before = c.front.totals()
    relayed_before = lb_spread(c)
    try:
        first = True
        for rate, conns in plan:
            for r in range(rounds if rate >= 1000 else 1):
                for where in ("cluster", "loopback"):
                    if where == "cluster":
                        cpu0 = (c.front.cpu_s(), c.net.lines_cpu_s(), topo.busy_cpu_s())
                        lt = common.Loadtest(c, f"ramp-{rate}-{r}", conns, rate, hold)
                        rep = lt.finish()
                        cl.wait(lambda: c.lb_active() == 0, 60, "clients gone")
                        # Where the machine's CPU went during this run: the two TLS ends (the
                        # front's HAProxy processes, the generator) beside the delay lines.
                        cpu = {"front": round(c.front.cpu_s() - cpu0[0], 1), "generator": lt.cpu_s,
                               "delay_lines": round(c.net.lines_cpu_s() - cpu0[1], 1),
                               "machine_busy": round(topo.busy_cpu_s() - cpu0[2], 1)}
                    else:
                        rep = common.loopback_loadtest(c.bin, loop.url(), conns, rate, hold, c.run_dir,
                                                       f"ramp-loopback-{rate}-{r}")
                        time.sleep(1)
                        cpu = None
                    s = common.summary(rep)
                    s.update({"where": where, "rate": rate, "connections": conns, "cpu_s": cpu,
                              "first_after_start": first if where == "cluster" else (r == 0 and rate == plan[0][0])})
                    runs.append(s)
                    if where == "cluster":
                        first = False
    finally:
        loop.stop()
    after = c.front.totals()
    spread = {k: v - relayed_before.get(k, 0) for k, v in lb_spread(c).items()}
    cluster_runs = [x for x in runs if x["where"] == "cluster"]
    for x in cluster_runs:
        tag = f"{x['connections']} at {x['rate']}/s{' (first run after start)' if x['first_after_start'] else ''}"
        checks.append((f"cluster {tag}: success >= 99.9 % ({x['success_pct']} %)", x["success_pct"] >= 99.9))
    http_5xx = after.get("hrsp_5xx", 0) - before.get("hrsp_5xx", 0)
    checks.append((f"front answered no HTTP 5xx ({http_5xx})", http_5xx == 0))
    checks.append(("every LB VM took clients", all(v > 0 for v in spread.values())))
    per_ip = sum(x["failures"].get("http_429", 0) for x in cluster_runs)
    checks.append((f"no client refused by the per-IP limit ({per_ip})", per_ip == 0))

    def p99(where, rate, warm_only):
        xs = [x["handshake_ms"]["p99"] for x in runs if x["where"] == where and x["rate"] == rate
              and not (warm_only and x["first_after_start"])]
        return sorted(xs)[len(xs) // 2] if xs else None
    table = []
    for rate, conns in plan:
        cp, lp = p99("cluster", rate, rate >= 1000 and full), p99("loopback", rate, rate >= 1000 and full)
        table.append({"rate": rate, "connections": conns, "cluster_p99_ms": cp, "loopback_p99_ms": lp,
                      "ratio": round(cp / lp, 2) if cp and lp else None})
    figures = {"runs": runs, "p99_table": table, "relayed_per_lb": spread,
               "front": {k: after.get(k, 0) - before.get(k, 0) for k in after}}
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("ramp")
