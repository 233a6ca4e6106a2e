"""The whole shard tier stopped (every shard VM's ws-shard SIGKILLed) for 60 s (short: 20 s)
while clients are connected (full: 6,000, short: 1,000 at 250/s, subscribed, `--reconnect`) and new
clients keep arriving through the front (a probe every 200 ms), then started again.

Checks: every new client during the outage opened a WebSocket through the front and was
closed with 1012 and a reason (no HTTP 5xx from the front, no failed TLS or upgrade); no LB
VM left the front (its /health stays 200: liveness) and none was recreated by the
autohealer; every LB reported `no_shard_available` and `ws_lb_shards_available` 0 once its
health polls alone must have opened every breaker (`circuit_breaker_failure_threshold` ×
`health_interval` + 5 s after the kill; before that an LB that has not yet seen enough
failures rightly still says `ok`, and the time each LB first said so is recorded); after
the shards' return every client was back within 30 s, with no gap, duplicate or
recovered:false."""

import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402


class NewClients(threading.Thread):
    """A new client through the front every `every` seconds, recording what it got."""

    def __init__(self, c, every=0.2):
        super().__init__(daemon=True, name="new-clients")
        self.c, self.every = c, every
        self.results = []
        self.stop_event = threading.Event()

    def run(self):
        ctx = common.ssl_context(self.c)

        async def loop():
            pending = set()
            while not self.stop_event.is_set():
                pending.add(asyncio.ensure_future(common.new_client(self.c, ctx, timeout=10)))
                done = {f for f in pending if f.done()}
                self.results += [f.result() for f in done]
                pending -= done
                await asyncio.sleep(self.every)
            if pending:
                self.results += list(await asyncio.gather(*pending))
        asyncio.run(loop())


def detection_bound_s(c):
    """Seconds after which ws-lb's health polls alone (one per `health_interval`, each
    refused connect counting against the breaker) have opened a dead shard's breaker, plus
    5 s for a loaded machine; from the LB arguments and environment the deploy gives."""
    args = c.pv.lb_args
    threshold = int(c.pv.lb_env.get("CIRCUIT_BREAKER_FAILURE_THRESHOLD",
                                    common.arg(args, "--circuit-breaker-failure-threshold", "10")))
    return threshold * common.seconds(common.arg(args, "--health-interval", "1s")) + 5


def run(c, full):
    conns, rate = (6000, 1000) if full else (1000, 250)
    conns = common.clients(c, conns)
    rate = common.capped(c, rate)
    outage = 60 if full else 20
    producer = common.Producer(c.a.partitions, common.producer_rate(c, 20))
    producer.start()
    started = time.time()
    front_before = c.front.totals()
    lt = common.Loadtest(c, "shard-outage", conns, rate, conns / rate + outage + 40, reconnect=True)
    samples = []          # (t, lbs UP in every front process, [(lb, status, body status, available)])
    try:
        connected = common.ramp_done(c, conns, rate)
        probes = NewClients(c)
        probes.start()
        time.sleep(2)
        stopped_at = time.time()
        for j in range(c.a.shards):
            c.procs[f"shard-{j}"].kill()
        while time.time() < stopped_at + outage:
            health = [(n, *c.lb_health(n)) for n in c.members]
            samples.append((time.time(), c.front_up(),
                            [(n, st, (b or {}).get("status"), (b or {}).get("shards_available")) for n, st, b in health]))
            time.sleep(2)
        gauges = {n: cl.metric(c.lb_metrics(n), "ws_lb_shards_available") for n in c.members}
        probes.stop_event.set()
        probes.join(timeout=30)
        for j in range(c.a.shards):
            c.start_shard(j)
        for j in range(c.a.shards):
            c.wait_shard(j)
        returned_at = time.time()
        back_at = common.wait_for(lambda: c.lb_active() >= connected, 90, interval=0.5)
        rep = lt.finish()
    finally:
        lt.kill()
        producer.stop()
    s = common.summary(rep)
    during = [r for r in probes.results if stopped_at + 3 <= r["t"] <= stopped_at + outage]
    outcomes = {}
    for r in during:
        key = f"http_{r['http']}" + (f"_close_{r.get('close')}" if r.get("http") == 101 else "") + \
            (f"_{r['error']}" if r.get("error") else "")
        outcomes[key] = outcomes.get(key, 0) + 1
    reasons = sorted({r.get("reason") for r in during if r.get("close") == 1012})
    front_after = c.front.totals()
    http_5xx = front_after.get("hrsp_5xx", 0) - front_before.get("hrsp_5xx", 0)
    left_front = sorted({n for _, up, _ in samples for n in c.members if n not in up})
    not_live = sorted({n for _, _, hs in samples for n, st, _, _ in hs if st != 200})
    detect = detection_bound_s(c)
    statuses = sorted({bs for t, _, hs in samples if t >= stopped_at + detect for _, _, bs, _ in hs}, key=str)
    first_said = {n: next((round(t - stopped_at, 1) for t, _, hs in samples
                           for m, _, bs, _ in hs if m == n and bs == "no_shard_available"), None) for n in c.members}
    recycled = [(round(t - started, 1), n) for t, n in c.autohealer.recreated(since=started)]
    figures = {
        "clients": conns, "connected_before_the_outage": connected, "outage_s": outage, "new_clients_during_outage": len(during), "outcomes": outcomes,
        "close_reasons": reasons, "front_http_5xx": http_5xx, "lbs_that_left_the_front": left_front,
        "lbs_not_200": not_live, "lb_health_statuses_after_detection_bound": statuses,
        "detection_bound_s": detect, "first_no_shard_available_s": first_said,
        "ws_lb_shards_available_during_outage": gauges, "recreated": recycled,
        "all_back_after_return_s": round(back_at - returned_at, 1) if back_at else None,
        "loadtest": s, "producer": producer.figures(),
    }
    checks = [
        (f"every new client during the outage got a WebSocket closed with 1012 ({outcomes})",
         bool(during) and set(outcomes) == {"http_101_close_1012"}),
        (f"... with a reason ({reasons})", bool(reasons) and None not in reasons and "" not in reasons),
        (f"the front answered no HTTP 5xx ({http_5xx})", http_5xx == 0),
        (f"no LB VM left the front ({left_front})", not left_front),
        (f"every LB's /health stayed 200 ({not_live})", not not_live),
        (f"... saying no_shard_available from {detect:.0f} s after the kill on ({statuses}; first at "
         f"{sorted(set(first_said.values()), key=str)} s)", statuses == ["no_shard_available"]),
        (f"ws_lb_shards_available was 0 on every LB ({sorted(set(gauges.values()))})", set(gauges.values()) == {0.0}),
        (f"no LB VM recreated by the autohealer ({recycled})", not recycled),
        (f"all clients back within 30 s of the shards' return ({figures['all_back_after_return_s']} s)",
         back_at is not None and back_at - returned_at <= 30),
        ("nothing lost, nothing duplicated, no recovered:false",
         s["gaps"] == 0 and s["duplicates"] == 0 and s["recovered_false"] == 0),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("shard-outage")
