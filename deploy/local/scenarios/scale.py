"""The shard tier scales out and back in under load, the way the autoscaled shard group does
it on GCP (deploy/README.md, "How ws-lb follows the autoscaled shard group"): 7 -> 9 -> 7
shard VMs while clients are held and new ones keep arriving through the front.

Load: 1,000 subscribed clients held with `--reconnect` (loadtest on the clients VM, ramped
at 250/s; short: 300 at 150/s), the Kafka producer at 20 records/s, and ~200 new
connections per second (short: 100/s) arriving through the front for the whole run
(loadtest runs of 5 s back to back on the clients VM: TLS, upgrade, subscribe; closed at
the end of their run).

1. Scale-out 7 -> 9: two shard VMs are created. They are RUNNING in the group at once, so
   every LB VM's member updater lists them within its 10 s period, before or after ws-shard
   answers; ws-lb keeps them pending until their /health is ok, then ramps their share of
   new connections over `slow_start`. Reported: each new VM's share of all LBs' new
   connections, per second, from its admission on every LB.
2. Scale-in 9 -> 7: two of the original VMs (they hold the held clients) are deleted:
   STOPPING at once (out of the listing), the shutdown script's SIGTERM (1012 spread over
   the shard's drain window), then gone.

Checks: no arrival failed; each new VM reached 80 % of its fair share (1/9) of new
connections within `slow_start` of being admitted by every LB; no LB sent a new client
to a removed VM once it had removed it; the removed VMs' ws-shard drained and exited by
itself; the held clients saw only 1012 closes, reconnected and recovered with `since`: no
gap, no duplicate, no recovered:false, every client back; no membership source error on any
LB, and every LB ends with the 7 VMs' shards active and the 2 removed ones `removed`; the
front answered no HTTP 5xx.

Bench only (`make cluster-bench`, or `cluster.py test scale` for the short size): it takes
~3 minutes, which `make cluster-test` (part of `make test`) does not have.
"""

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402

UPDATER_PERIOD_S = 10      # ws-lb-startup.sh update_shard_members: `sleep 10`


class Arrivals(threading.Thread):
    """~`rate` new clients per second through the front, from the clients VM: back-to-back
    runs of loadtest, each `batch_s` seconds of arrivals (TLS, upgrade, subscribe) closed
    at the end of its run (`--hold 0`), so that new connections keep arriving without piling
    up. (A Python client in the harness process could not keep 100/s over TLS on this
    2-core machine under load.)"""

    def __init__(self, c, rate, batch_s=5):
        super().__init__(daemon=True, name="arrivals")
        self.c, self.rate, self.batch_s = c, rate, batch_s
        self.runs = []
        self.errors = []
        self.stop_event = threading.Event()
        self.current = None

    def run(self):
        while not self.stop_event.is_set():
            lt = common.Loadtest(self.c, "arrivals", self.rate * self.batch_s, self.rate, 0)
            self.current = lt
            try:
                r = common.summary(lt.finish(timeout=self.batch_s + 120))
                r["started_unix"] = round(lt.t0, 1)
                self.runs.append(r)
            except Exception as e:  # noqa: BLE001 - a run that did not report is a failure
                self.errors.append(repr(e)[:300])
            finally:
                lt.kill()

    def stop(self):
        self.stop_event.set()
        self.join(timeout=180)

    @property
    def ok(self):
        return sum(r["established"] for r in self.runs)

    @property
    def attempted(self):
        return sum(r["attempted"] for r in self.runs)

    @property
    def failed(self):
        out = {}
        for r in self.runs:
            for k, v in r["failures"].items():
                out[k] = out.get(k, 0) + v
        return out


class Sampler(threading.Thread):
    """Every second, from every LB VM: its shards' membership state and its handshakes per
    shard, summed per shard VM (address)."""

    def __init__(self, c):
        super().__init__(daemon=True, name="membership-sampler")
        self.c = c
        self.rows = []       # (t, {vm_ip: handshakes summed over LBs}, {lb: {url: member}})
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def sample(self):
        per_vm, states = {}, {}
        for lb in list(self.c.members):
            _, health = self.c.lb_health(lb)
            page = self.c.lb_metrics(lb)
            if not health or not page:
                continue
            url_of = {s["shard_id"]: s["url"] for s in health["shards"]}
            states[lb] = {s["url"]: s["member"] for s in health["shards"]}
            for line in page.splitlines():
                if line.startswith("ws_handshake_success_total{") and 'shard_id="' in line:
                    sid = int(line.split('shard_id="', 1)[1].split('"', 1)[0])
                    ip = url_of.get(sid, "?").split("//", 1)[-1].split(":", 1)[0]
                    per_vm[ip] = per_vm.get(ip, 0) + float(line.rsplit(" ", 1)[1])
        with self.lock:
            self.rows.append((time.time(), per_vm, states))

    def run(self):
        while not self.stop_event.is_set():
            t = time.time()
            self.sample()
            self.stop_event.wait(max(0.0, 1.0 - (time.time() - t)))

    def stop(self):
        self.stop_event.set()
        self.join(timeout=30)

    def latest(self):
        with self.lock:
            return self.rows[-1] if self.rows else (0, {}, {})

    def when(self, cond, timeout):
        """The time of the first sample (from now on) for which cond(states) holds."""
        deadline = time.time() + timeout
        seen = len(self.rows)
        while time.time() < deadline:
            with self.lock:
                rows = self.rows[seen:]
                seen = len(self.rows)
            for t, _, states in rows:
                if states and cond(states):
                    return t
            time.sleep(0.2)
        return None

    def shares(self, ips, since, until=None):
        """Per second from `since`: each VM's share of all new connections (over every LB)."""
        with self.lock:
            rows = [r for r in self.rows if r[0] >= since - 1.5 and (until is None or r[0] <= until)]
        out = []
        for (t0, a, _), (t1, b, _) in zip(rows, rows[1:]):
            if t1 < since:
                continue
            delta = {ip: b.get(ip, 0) - a.get(ip, 0) for ip in b}
            total = sum(delta.values())
            out.append({"t": round(t1 - since, 1), "new": int(total),
                        **{ip: round(delta.get(ip, 0) / total, 3) if total else 0.0 for ip in ips}})
        return out

    def handshakes(self, ip, at):
        """Handshakes summed over LBs to VM `ip` at the first sample at or after `at`."""
        with self.lock:
            for t, per_vm, _ in self.rows:
                if t >= at:
                    return per_vm.get(ip, 0)
            return self.rows[-1][1].get(ip, 0) if self.rows else 0


def run(c, full):
    held, ramp_rate, arrival_rate = (1000, 250, 200) if full else (300, 150, 100)
    ramp_rate, arrival_rate = common.capped(c, ramp_rate), common.capped(c, arrival_rate)
    held = common.clients(c, held)
    before = sorted(c.shard_vms)
    assert len(before) == 7, f"scale needs the 7-VM shard tier (has {before})"
    new = [max(before) + 1, max(before) + 2]
    victims = before[-2:]          # two original VMs, holding their share of the held clients
    per_vm = c.pv.shards_per_vm
    ports = c.shard_ports()
    slow_start = common.seconds(common.arg(c.pv.lb_args, "--slow-start", "30s"))
    drain = common.seconds(common.arg(c.pv.shard_args, "--drain-window", "10s"))
    urls = {j: [f"ws://{cl.shard_ip(j)}:{p}/ws" for p in ports] for j in range(max(new) + 1)}
    started = time.time()
    # Scale-out (VM start, listing, admission, slow start) and scale-in (listing, drain).
    est = 20 + UPDATER_PERIOD_S + slow_start + 8 + drain + UPDATER_PERIOD_S + 25
    hold = round(est * 1.3 + 20)
    errors_before = {lb: cl.metric(c.lb_metrics(lb), "ws_lb_membership_source_errors_total") or 0 for lb in c.members}
    front_before = c.front.totals()
    producer = common.Producer(c.a.partitions, common.producer_rate(c, 20))
    producer.start()
    lt = common.Loadtest(c, "scale", held, ramp_rate, hold, reconnect=True)
    arrivals, sampler = Arrivals(c, arrival_rate), Sampler(c)
    events = {}
    try:
        connected = common.ramp_done(c, held, ramp_rate)
        arrivals.start()
        sampler.start()
        time.sleep(3)  # a few seconds of the 7-VM tier in the per-second record
        events["scale_out"] = t_out = time.time()

        # 1. Scale-out: 7 -> 9.
        for j in new:
            c.create_shard_vm(j)
        for j in new:
            c.wait_shard(j)
        events["new_vms_healthy"] = time.time()
        new_urls = [u for j in new for u in urls[j]]
        t_adm = sampler.when(lambda st: len(st) == len(c.members) and all(
            all(s.get(u) in ("warming", "active") for u in new_urls) for s in st.values()), UPDATER_PERIOD_S + 60)
        if t_adm is None:
            raise RuntimeError("the new shard VMs were not admitted by every LB within the updater period + 60 s")
        events["admitted_by_every_lb"] = t_adm
        time.sleep(max(0.0, t_adm + slow_start + 6 - time.time()))
        new_ips = [cl.shard_ip(j) for j in new]
        shares_out = sampler.shares(new_ips, t_out)
        fair = 1 / 9

        def reached(ip):
            for row in shares_out:
                if row["t"] >= t_adm - t_out and row[ip] >= 0.8 * fair:
                    return round(row["t"] - (t_adm - t_out), 1)
            return None
        fair_after = {ip: reached(ip) for ip in new_ips}

        # 2. Scale-in: 9 -> 7 (two original VMs).
        held_on = {}
        for j in victims:
            n = 0
            for p in ports:
                status, body = cl.get_any(f"http://{cl.shard_ip(j)}:{p}/health", 2)
                n += json.loads(body)["connections"] if status in (200, 503) else 0
            held_on[f"shard-{j}"] = n
        events["scale_in"] = t_in = time.time()
        exit_codes = {}
        threads = [threading.Thread(target=lambda j=j: exit_codes.__setitem__(f"shard-{j}", c.remove_shard_vm(j)))
                   for j in victims]
        for t in threads:
            t.start()
        gone_urls = [u for j in victims for u in urls[j]]
        t_rm = sampler.when(lambda st: len(st) == len(c.members) and all(
            all(s.get(u) == "removed" for u in gone_urls) for s in st.values()), UPDATER_PERIOD_S + 60)
        for t in threads:
            t.join(timeout=90)
        events["removed_by_every_lb"] = t_rm
        events["victims_gone"] = time.time()
        back = common.wait_for(lambda: c.lb_active() >= connected, 90, interval=0.5)
        events["clients_back"] = back
        time.sleep(3)
        events["end_of_changes"] = t_end = time.time()
        victim_ips = [cl.shard_ip(j) for j in victims]
        after_removal = {ip: (sampler.handshakes(ip, t_end) - sampler.handshakes(ip, t_rm)) if t_rm else None
                         for ip in victim_ips}
        shares_in = sampler.shares(victim_ips + new_ips, t_in, t_end)
        states_end = sampler.latest()[2]
        rep = lt.finish(timeout=hold + 120)
    finally:
        for t in (arrivals, sampler):
            if t.is_alive():
                t.stop()
        lt.kill()
        producer.stop()
    s = common.summary(rep)
    page_errors = {lb: (cl.metric(c.lb_metrics(lb), "ws_lb_membership_source_errors_total") or 0) - errors_before.get(lb, 0)
                   for lb in c.members}
    http_5xx = c.front.totals().get("hrsp_5xx", 0) - front_before.get("hrsp_5xx", 0)
    bare = {k: v for k, v in s["disconnects"].items() if k != "close_1012"}
    end_ok = all(
        sum(1 for u in sum(urls.values(), []) if st.get(u) == "active") == 7 * per_vm
        and all(st.get(u) == "removed" for u in gone_urls) for st in states_end.values()) and len(states_end) == len(c.members)
    rel = {k: (round(v - started, 1) if v else None) for k, v in events.items()}
    figures = {
        "held_clients": held, "ramp_rate": ramp_rate, "arrival_rate_asked": arrival_rate,
        "arrivals": {"attempted": arrivals.attempted, "established": arrivals.ok, "failures": arrivals.failed,
                     "runs_without_report": arrivals.errors,
                     "achieved_rate_per_run": [r["generator"]["achieved_rate"] for r in arrivals.runs],
                     "handshake_ms_p99_per_run": [r["handshake_ms"]["p99"] for r in arrivals.runs],
                     # When each run started (s from the scenario's start; compare events_s) and what failed.
                     "per_run": [{"t": round(r["started_unix"] - started, 1), "attempted": r["attempted"],
                                  "established": r["established"], "failures": r["failures"],
                                  "handshake_ms_p50": r["handshake_ms"]["p50"]} for r in arrivals.runs]},
        "shard_vms_before": before, "added": new, "removed": victims, "shards_per_vm": per_vm,
        "slow_start_s": slow_start, "shard_drain_window_s": drain, "updater_period_s": UPDATER_PERIOD_S,
        "events_s": rel,
        "new_vm_share_per_second_from_scale_out": shares_out,
        "fair_share": round(fair, 4), "fair_share_reached_after_admission_s": fair_after,
        "share_per_second_from_scale_in": shares_in,
        "connections_on_removed_vms_at_scale_in": held_on, "removed_vm_exit_codes": exit_codes,
        "new_clients_on_removed_vms_after_removal": after_removal,
        "membership_source_errors": page_errors, "listings_served": c.compute.listings,
        "loadtest": s, "front_http_5xx": http_5xx, "producer": producer.figures(),
        "bin_dir": str(c.bin), "connected_before": connected,
    }
    checks = [
        (f"no arrival failed ({arrivals.ok} of {arrivals.attempted} established in {len(arrivals.runs)} runs at "
         f"{arrival_rate}/s asked; failures {arrivals.failed}, runs without report {len(arrivals.errors)})",
         not arrivals.failed and not arrivals.errors and arrivals.ok == arrivals.attempted > 0),
        (f"held clients all established ({s['established']}/{held}, failures {s['failures']})",
         s["established"] == held and not s["failures"]),
        (f"each new VM reached 80 % of its fair share (1/9) within slow_start ({slow_start:.0f} s, + 1 s of "
         f"sampling) of admission by every LB (seconds: {fair_after})",
         all(v is not None and v <= slow_start + 1 for v in fair_after.values())),
        (f"no new client on a removed VM once every LB removed it ({after_removal})",
         t_rm is not None and all(v == 0 for v in after_removal.values())),
        (f"removed VMs drained and exited by themselves ({exit_codes})", all(v == 0 for v in exit_codes.values())
         and len(exit_codes) == len(victims)),
        (f"held clients saw only 1012 ({s['disconnects']}; {sum(held_on.values())} connections on the removed VMs "
         f"at scale-in, arrivals included)",
         not bare and s["disconnects"].get("close_1012", 0) >= 1),
        ("nothing lost, nothing duplicated, no recovered:false",
         s["gaps"] == 0 and s["duplicates"] == 0 and s["recovered_false"] == 0),
        (f"every client back ({s['active_end_of_hold']}/{s['established']})",
         back is not None and s["active_end_of_hold"] == s["established"]),
        (f"no membership source error on any LB ({sum(page_errors.values()):.0f})", not any(page_errors.values())),
        ("every LB ends with the 7 VMs' shards active and the removed ones removed", end_ok),
        (f"the front answered no HTTP 5xx ({http_5xx})", http_5xx == 0),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("scale")
