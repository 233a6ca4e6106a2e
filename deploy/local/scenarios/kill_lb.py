"""The plan's Test 4: SIGKILL one LB VM's ws-lb a third into a 1,000/s ramp of subscribed
clients (full: 12,000; short: 1,500 at 250/s) with `--reconnect` and the Kafka producer.

Measured: how long until every front process has taken the VM out (its backend health
check: 2 failures 5 s apart); how many clients failed meanwhile (handshakes in flight on
the killed VM die with it; the front retries only connections it could not open); then a
second ramp of new clients once the front has reacted (full: 3,000 at 1,000/s; short: 500
at 250/s); the killed VM's clients reconnecting elsewhere with `since`; the autohealer
recreating the VM after the autohealing check's 6 failures 10 s apart, and the front taking
it back after 2 successes.

Checks: the front took the VM out; new connections after that >= 99.9 %; every client the
kill disconnected reconnected, with no gap, no duplicate and no recovered:false, and every
established client was connected at the end; the autohealer recreated the VM, the front took
it back, and no other VM was recycled."""

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402


def run(c, full):
    conns, rate = (12000, 1000) if full else (1500, 250)
    after_conns, after_rate = (3000, 1000) if full else (500, 250)
    conns, after_conns = common.clients(c, conns), common.clients(c, after_conns)
    rate, after_rate = common.capped(c, rate), common.capped(c, after_rate)
    victim = c.members[len(c.members) // 2]
    # The instance group ignores a VM's checks for `initial_delay_sec` after it (re)started: a
    # VM killed inside that window is not recreated until it ends, later than this scenario
    # waits. On a freshly started cluster (the scenario run alone) wait for it to pass first.
    quiet_until = c.autohealer.quiet_until.get(victim, 0.0)
    if quiet_until > time.time():
        c.log(f"kill-lb: waiting {quiet_until - time.time():.0f} s for {victim}'s autoheal initial delay to end")
        if common.wait_for(lambda: time.time() >= quiet_until, quiet_until - time.time() + 5) is None:
            raise RuntimeError(f"{victim} still inside the autoheal initial delay")
    producer = common.Producer(c.a.partitions, common.producer_rate(c, 20))
    producer.start()
    started = time.time()
    hc, ah = c.values.backend_check, c.values.autoheal_check
    # Held until after the autohealer acted: 6 checks 10 s apart after the kill, the
    # restart, the front's 2 successes 5 s apart.
    hold = ah.interval_s * (ah.unhealthy + 1) + hc.interval_s * (hc.healthy + 1) + 5
    lt = common.Loadtest(c, "kill-lb", conns, rate, round(hold), reconnect=True)
    second = None
    try:
        time.sleep(conns / rate / 3)
        victim_clients = cl.metric(c.lb_metrics(victim), "ws_lb_active_connections") or 0
        killed_at = time.time()
        c.procs[victim].signal(signal.SIGKILL)
        c.procs[victim].wait(10)
        out_at = common.wait_for(
            lambda: victim not in {n for n, sts in c.front.status().items() if any(s.startswith("UP") for s in sts)}, 60)
        if out_at:
            second = common.Loadtest(c, "kill-lb-after", after_conns, after_rate, 2,
                                     source_ips=f"{cl.client_ips(c.a.client_ips)[-16]}-{cl.client_ips(c.a.client_ips)[-1]}")
            second_rep = second.finish()
        common.wait_for(lambda: c.autohealer.recreated(since=killed_at), ah.interval_s * (ah.unhealthy + 3))
        healed = c.autohealer.recreated(since=killed_at)
        healed_at = healed[0][0] if healed else None
        back_at = common.wait_for(lambda: victim in c.front_up(), hc.interval_s * (hc.healthy + 3) + 30) if healed else None
        rep = lt.finish()
    finally:
        lt.kill()
        if second is not None:
            second.kill()
        producer.stop()
    s = common.summary(rep)
    t0 = rep["started_unix_ms"] / 1000
    window = [p for p in rep["timeline"] if killed_at - 1 <= t0 + p["second"] <= (out_at or killed_at + 60) + 1]
    refused_meanwhile = sum(p["failures"] for p in window)
    s2 = common.summary(second_rep) if out_at else None
    recycled = [(round(t - started, 1), n) for t, n in c.autohealer.recreated(since=started)]
    react_s = round(out_at - killed_at, 2) if out_at else None
    dropped = sum(s["disconnects"].values())
    figures = {
        "victim": victim, "victim_clients_at_kill": victim_clients, "front_reaction_s": react_s,
        "clients_failed_until_the_front_reacted": refused_meanwhile, "first_ramp": s, "ramp_after_reaction": s2,
        "autoheal_recreated_after_s": round(healed_at - killed_at, 1) if healed_at else None,
        "front_took_it_back_after_s": round(back_at - killed_at, 1) if back_at else None,
        "recreated": recycled, "producer": producer.figures(),
    }
    checks = [
        (f"the front took {victim} out ({react_s} s after the kill; {refused_meanwhile} clients failed meanwhile)",
         react_s is not None),
        (f"new connections once the front reacted >= 99.9 % ({s2['success_pct'] if s2 else None} %)",
         s2 is not None and s2["success_pct"] >= 99.9),
        (f"{victim}'s clients saw the disconnect ({s['disconnects']}) and all reconnected ({s['reconnects']})",
         dropped > 0 and s["reconnects"] >= dropped),
        ("nothing lost, nothing duplicated, no recovered:false",
         s["gaps"] == 0 and s["duplicates"] == 0 and s["recovered_false"] == 0),
        (f"every established client connected at the end ({s['active_end_of_hold']}/{s['established']})",
         s["active_end_of_hold"] == s["established"]),
        (f"the autohealer recreated {victim} ({figures['autoheal_recreated_after_s']} s after the kill)", healed_at is not None),
        (f"the front took it back ({figures['front_took_it_back_after_s']} s after the kill)", back_at is not None),
        (f"no other VM recycled ({recycled})", [n for _, n in recycled] == [victim]),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("kill-lb")
