"""One LB VM (lb-0) cut off from one shard VM (shard-3) (100 % loss on that path only, both directions)
while clients connect (full: 6,000 at 500/s; short: 1,000 at 200/s).

Checks: that LB's breakers opened for the cut-off VM's shards and only for them; its
clients were served by other shards (new connections >= 99.9 %); the other LBs kept
their breakers for those shards closed and kept placing clients there; the cut-off LB
stayed in the front with /health 200 and reported the shards it cannot use; after the
cut healed, its breakers closed again."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402


def state(page, sid, st):
    return cl.metric(page, "ws_circuit_breaker_state", f'shard_id="{sid}"', f'state="{st}"')


def successes(page, ids):
    return sum(cl.metric(page, "ws_handshake_success_total", f'shard_id="{sid}"') or 0 for sid in ids)


def run(c, full):
    conns, rate = (6000, 500) if full else (1000, 200)
    conns = common.clients(c, conns)
    rate = common.capped(c, rate)
    # Not shard-1: kill-shard uses it, and its recent failures still lower its score for a
    # minute (score_window), which would starve it of clients here.
    lb, j = c.members[0], 3
    per_vm = c.pv.shards_per_vm
    total = per_vm * c.a.shards
    cut_ids = list(range(j * per_vm, (j + 1) * per_vm))
    others = [n for n in c.members if n != lb]
    before = {n: successes(c.lb_metrics(n), cut_ids) for n in c.members}
    relayed_before = cl.metric(c.lb_metrics(lb), "ws_lb_client_connections_total", 'result="relayed"') or 0
    c.net.cut(lb, f"shard-{j}")
    healed = False
    try:
        lt = common.Loadtest(c, "partition", conns, rate, 5, reconnect=True)

        def all_open():
            page = c.lb_metrics(lb)
            return all(state(page, sid, "open") == 1 for sid in cut_ids)
        opened_at = common.wait_for(all_open, conns / rate + 60, interval=0.5)
        page = c.lb_metrics(lb)
        open_ids = [sid for sid in range(total) if state(page, sid, "open") == 1]
        status, body = c.lb_health(lb)
        in_front = lb in c.front_up()
        rep = lt.finish()
        others_open = {n: [sid for sid in cut_ids if state(c.lb_metrics(n), sid, "open") == 1] for n in others}
        after = {n: successes(c.lb_metrics(n), cut_ids) for n in c.members}
        relayed = (cl.metric(c.lb_metrics(lb), "ws_lb_client_connections_total", 'result="relayed"') or 0) - relayed_before
        c.net.heal(lb, f"shard-{j}")
        healed = True
        cb_timeout = common.seconds(c.pv.lb_env.get("CIRCUIT_BREAKER_TIMEOUT", "30s"))
        t_heal = time.time()

        def closed_again():
            page = c.lb_metrics(lb)
            done = all(state(page, sid, "closed") == 1 for sid in cut_ids)
            if not done and time.time() > t_heal + 5:
                common.touch(c, 40)
            return done
        closed_at = common.wait_for(closed_again, cb_timeout + 60, interval=1)
    finally:
        if not healed:
            c.net.heal(lb, f"shard-{j}")
    s = common.summary(rep)
    placed_by_others = {n: after[n] - before[n] for n in others}
    figures = {"lb": lb, "cut_from": f"shard-{j}", "cut_shard_ids": cut_ids, "open_on_cut_lb": open_ids,
               "all_open_after_s": round(opened_at - lt.t0, 1) if opened_at else None,
               "cut_lb_health": {"status": status, "body_status": (body or {}).get("status"),
                                 "shards_available": (body or {}).get("shards_available")},
               "cut_lb_relayed_clients": relayed, "others_open": others_open,
               "others_placed_on_cut_shards": placed_by_others, "loadtest": s,
               "closed_again_after_heal_s": round(closed_at - t_heal, 1) if closed_at else None}
    checks = [
        (f"{lb}'s breakers opened for the cut-off shards, only those ({open_ids})", open_ids == cut_ids),
        (f"{lb} served its clients through other shards ({relayed} relayed)", relayed > 0),
        (f"new connections >= 99.9 % ({s['success_pct']} %)", s["success_pct"] >= 99.9),
        ("other LBs kept those breakers closed", not any(others_open.values())),
        ("other LBs kept placing clients on those shards", all(v > 0 for v in placed_by_others.values())),
        (f"{lb} stayed in the front with /health 200 ({status}, in front: {in_front})", status == 200 and in_front),
        (f"... reporting {total - len(cut_ids)} of {total} shards available ({(body or {}).get('shards_available')})",
         (body or {}).get("shards_available") == total - len(cut_ids)),
        (f"its breakers closed again after the cut healed ({figures['closed_again_after_heal_s']} s)", closed_at is not None),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("partition")
