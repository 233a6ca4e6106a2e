"""The Kafka VM restarted under subscribed clients (full: 6,000; short: 1,000 at 250/s) and a
producer (50 records/s): the broker gets SIGTERM, stays down 10 s (short: 5 s), and boots
again on its storage (sqlite: the log survives, as on a VM's disk).

Checks: the shards reconnected to the broker by themselves; the producer lost nothing
(every record acknowledged); clients saw no disconnect and received every record: no gap,
no duplicate, no epoch change; deliveries went on after the restart."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402


def kafka_connected(c):
    return [cl.metric(c.shard_metrics(j), "ws_kafka_connected") for j in range(c.a.shards)]


def run(c, full):
    conns, rate = (6000, 1000) if full else (1000, 250)
    down = 10 if full else 5
    producer = common.Producer(c.a.partitions, 50)
    producer.start()
    lt = common.Loadtest(c, "kafka-restart", conns, rate, conns / rate + down + 30, reconnect=True)
    try:
        common.ramp_done(c, conns)
        time.sleep(3)
        sent_before = producer.acked
        restarted_at = time.time()
        c.restart_kafka(down)
        back_at = time.time()
        reconnected = common.wait_for(lambda: all(v == 1 for v in kafka_connected(c)), 60)
        # Records produced after the restart reach the clients.
        time.sleep(10)
        rep = lt.finish()
    finally:
        lt.kill()
        producer.stop()
    s = common.summary(rep)
    p = producer.figures()
    tl = common.timeline_since(rep, back_at + 5)
    delivered_after = sum(x["deliveries"] for x in tl)
    figures = {"storage": c.kafka_storage, "down_s": down, "restart_took_s": round(back_at - restarted_at, 1),
               "shards_reconnected_after_s": round(reconnected - back_at, 1) if reconnected else None,
               "producer": p, "acked_before_restart": sent_before, "deliveries_after_restart": delivered_after,
               "loadtest": s}
    checks = [
        (f"the broker kept its log across the restart (storage {c.kafka_storage})", c.kafka_storage == "sqlite"),
        (f"every shard VM reconnected to the broker ({figures['shards_reconnected_after_s']} s after it was back)",
         reconnected is not None),
        (f"the producer's records were all acknowledged ({p['acked']}/{p['sent']}, {p['errors']} errors)",
         p["errors"] == 0 and p["acked"] == p["sent"]),
        (f"clients saw no disconnect ({s['disconnects']})", not s["disconnects"]),
        (f"nothing lost, nothing duplicated, no epoch change (gaps {s['gaps']}, duplicates {s['duplicates']}, "
         f"epoch changes {s['epoch_changes']})", s["gaps"] == 0 and s["duplicates"] == 0 and s["epoch_changes"] == 0),
        (f"deliveries went on after the restart ({delivered_after})", delivered_after > 0),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("kafka-restart")
