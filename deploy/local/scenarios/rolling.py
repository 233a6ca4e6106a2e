"""Rolling restarts of both tiers with the deploy's procedures, under subscribed clients
(full: 6,000; short: 1,500; `--reconnect`) and the Kafka producer.

LB tier (the instance group's update policy, lb-tier.tf: surge `max_surge_fixed` new VMs,
`max_unavailable` 0): per batch of `max_surge` old VMs, new VMs are created and join the
group; once the front sees them up, the old ones leave the group (the backend service stops
sending them new connections: connection draining) and get the shutdown script's SIGTERM,
on which ws-lb closes its clients with 1012 spread over `drain_window` and exits. Full: the
whole tier; short: one batch.

Shard tier (docs/runbook.md, "Rolling a shard"): one VM at a time, SIGTERM, wait for the
exit, start again (same address), wait until every shard of the VM answers /health 200 and
consumes, next. Full: every VM; short: two.

Checks: clients saw only 1012 closes; the probes of each rolled batch were closed over the
drain window, not at once (spread >= half of it, none later than the window + 2 s); nothing
lost, nothing duplicated, no recovered:false; every client back; the front answered no
HTTP 5xx; no VM recreated by the autohealer."""

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402


def drain_window_s(args):
    v = args[args.index("--drain-window") + 1] if "--drain-window" in args else "10s"
    return float(v.rstrip("s"))


def spread(closed, t0, window):
    ds = [t - t0 for t, code, _ in closed if t0 <= t <= t0 + window + 5]
    codes = sorted({code for t, code, _ in closed if t0 <= t <= t0 + window + 5}, key=str)
    return {"closed": len(ds), "codes": codes, "first_s": round(min(ds), 2) if ds else None,
            "last_s": round(max(ds), 2) if ds else None, "spread_s": round(max(ds) - min(ds), 2) if ds else None}


def roll_lbs(c, batches, window, probes):
    out = []
    for batch in batches:
        free = [n for n in c.lb_slots if n not in c.members and not (n in c.procs and c.procs[n].alive())]
        new = free[:len(batch)]
        for n in new:
            c.start_lb(n)
        for n in new:
            c.wait_lb(n)
            c.members.append(n)
            c.autohealer.started(n)
            c.front.set_state(n, "ready")
        cl.wait(lambda: set(new) <= c.front_up(), 60, f"the front to see {new} up")
        t0 = time.time()
        for n in batch:
            c.members.remove(n)
            c.front.set_state(n, "drain")
            c.procs[n].signal(signal.SIGTERM)
        exits = {}
        for n in batch:
            exits[n] = c.procs[n].wait(45)
            if exits[n] is None:
                c.procs[n].kill()
            c.front.set_state(n, "maint")
        out.append({"old": batch, "new": new, "exit_codes": exits, "exited_after_s": round(time.time() - t0, 1),
                    "probes": spread(probes.closed, t0, window)})
    return out


def roll_shards(c, vms, window, probes):
    out = []
    for j in vms:
        name = f"shard-{j}"
        t0 = time.time()
        c.procs[name].signal(signal.SIGTERM)
        code = c.procs[name].wait(45)
        if code is None:
            c.procs[name].kill()
        stopped = time.time() - t0
        c.start_shard(j)
        c.wait_shard(j)
        out.append({"vm": name, "exit_code": code, "exited_after_s": round(stopped, 1),
                    "back_after_s": round(time.time() - t0, 1), "probes": spread(probes.closed, t0, window)})
    return out


def run(c, full):
    conns, rate = (6000, 1000) if full else (1000, 250)
    started = time.time()
    lb_window, shard_window = drain_window_s(c.pv.lb_args), drain_window_s(c.pv.shard_args)
    old = list(c.members)
    surge = c.values.max_surge
    batches = [old[i:i + surge] for i in range(0, len(old), surge)]
    if not full:
        batches = batches[:1]
    shard_vms = list(range(c.a.shards)) if full else [0, 1]
    producer = common.Producer(c.a.partitions, 20)
    producer.start()
    front_before = c.front.totals()
    est = (len(batches) * (lb_window + 25) + len(shard_vms) * (shard_window + 15)) * 1.5
    lt = common.Loadtest(c, "rolling", conns, rate, round(conns / rate + est + 20), reconnect=True)
    try:
        cl.wait(lambda: c.lb_active() >= conns, 60, "the clients connected")
        probes = common.Probes(c, 100 if full else 60, channel="trades.K2", source_ip=cl.HOST_CLIENT_IPS[3])
        lbs = roll_lbs(c, batches, lb_window, probes)
        probes.close()
        probes = common.Probes(c, 100 if full else 60, channel="trades.K3", source_ip=cl.HOST_CLIENT_IPS[4])
        shards = roll_shards(c, shard_vms, shard_window, probes)
        probes.close()
        back = common.wait_for(lambda: c.lb_active() >= conns, 60, interval=0.5)
        rep = lt.finish()
    finally:
        lt.kill()
        producer.stop()
    s = common.summary(rep)
    http_5xx = c.front.totals().get("hrsp_5xx", 0) - front_before.get("hrsp_5xx", 0)
    recycled = [(round(t - started, 1), n) for t, n in c.autohealer.recreated(since=started)]
    bare = {k: v for k, v in s["disconnects"].items() if k != "close_1012"}
    figures = {"lb_batches": lbs, "shard_vms": shards, "lb_drain_window_s": lb_window, "shard_drain_window_s": shard_window,
               "loadtest": s, "front_http_5xx": http_5xx, "recreated": recycled, "producer": producer.figures(),
               "members_after": list(c.members)}

    def spread_ok(p, window):
        return (p["closed"] > 0 and p["codes"] == [1012] and p["spread_s"] >= window / 2
                and p["last_s"] <= window + 2)
    checks = [
        (f"clients saw only 1012 ({s['disconnects']})", not bare and s["disconnects"].get("close_1012", 0) > 0),
        (f"LB batches: probes closed with 1012 over the drain window ({[b['probes'] for b in lbs]})",
         all(spread_ok(b["probes"], lb_window) for b in lbs)),
        (f"shard VMs: probes closed with 1012 over the drain window ({[v['probes'] for v in shards]})",
         all(spread_ok(v["probes"], shard_window) for v in shards)),
        ("every drained process exited by itself", all(x == 0 for b in lbs for x in b["exit_codes"].values())
         and all(v["exit_code"] == 0 for v in shards)),
        ("nothing lost, nothing duplicated, no recovered:false",
         s["gaps"] == 0 and s["duplicates"] == 0 and s["recovered_false"] == 0),
        (f"every client back ({s['active_end_of_hold']}/{conns})", back is not None and s["active_end_of_hold"] == conns),
        (f"the front answered no HTTP 5xx ({http_5xx})", http_5xx == 0),
        (f"no VM recreated by the autohealer ({recycled})", not recycled),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("rolling")
