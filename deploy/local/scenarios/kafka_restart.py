"""The Kafka VM restarted under subscribed clients (full: 6,000; short: 1,000 at 250/s) and a
producer (50 records/s): the broker gets SIGTERM, stays down 10 s (short: 5 s), and boots
again on its storage (s3 on the VM's object store, or sqlite: the log survives, as on a VM's
disk; only the broker process restarts, the store process stays up).

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


def runs_of(offsets):
    """Consecutive runs in a sorted list of offsets: [3, 4, 9] -> [[3, 4], [9]]."""
    runs = []
    for o in offsets:
        if runs and o == runs[-1][-1] + 1:
            runs[-1].append(o)
        else:
            runs.append([o])
    return runs


def trades_records(c):
    return [cl.metric(c.shard_metrics(j), "ws_kafka_records_total", 'topic="trades"') or 0 for j in range(c.a.shards)]


def run(c, full):
    conns, rate = (6000, 1000) if full else (1000, 250)
    conns = common.clients(c, conns)
    rate = common.capped(c, rate)
    down = 10 if full else 5
    producer = common.Producer(c.a.partitions, common.producer_rate(c, 50))
    producer.start()
    # The topics start empty. A channel whose partition has no record yet has no generation
    # (epoch) yet, and a client subscribed then sees the epoch set by the first record: an
    # epoch change that has nothing to do with the restart. So the clients come once every
    # shard VM has read records of every partition (three rounds of the producer's).
    warm = 3 * c.a.partitions
    if not common.wait_for(lambda: producer.acked >= warm and min(trades_records(c)) >= warm, 60):
        raise RuntimeError(f"the shards did not read {warm} records within 60 s: {trades_records(c)}")
    lt = common.Loadtest(c, "kafka-restart", conns, rate, conns / rate + down + 30, reconnect=True)
    try:
        common.ramp_done(c, conns, rate)
        # Every client in (the ramp's end does not wait for the slowest handshakes).
        all_in = common.wait_for(lambda: c.lb_active() >= conns, 60)
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
    audit = common.audit_log(producer, c.a.partitions)
    # An offset the broker's log does not have (tansu leaves one when a restart cuts a
    # produce short between assigning the offset and storing the record; the producer's
    # retry lands on the next one) is a jump in `seq` for every subscriber of that channel
    # though no record is lost: the protocol's seq is the offset, not contiguous. Each
    # channel (one partition) has connections / partitions subscribers (the load generator
    # spreads them evenly); a client still connecting when the hole was made does not see it,
    # so these are upper bounds. Any other gap (a record lost between broker and client)
    # exceeds them.
    per_channel = conns // c.a.partitions
    gaps_expected = per_channel * sum(len(runs_of(h)) for h in audit["offset_holes"].values())
    gap_messages_expected = per_channel * sum(len(h) for h in audit["offset_holes"].values())
    tl = common.timeline_since(rep, back_at + 5)
    delivered_after = sum(x["deliveries"] for x in tl)
    figures = {"storage": c.kafka_storage, "down_s": down, "restart_took_s": round(back_at - restarted_at, 1),
               "shards_reconnected_after_s": round(reconnected - back_at, 1) if reconnected else None,
               "producer": p, "broker_log": audit, "gaps_expected_from_holes": gaps_expected,
               "all_clients_in_before_restart": all_in is not None, "acked_before_restart": sent_before, "deliveries_after_restart": delivered_after,
               "loadtest": s}
    checks = [
        (f"the broker kept its log across the restart (storage {c.kafka_storage})", c.kafka_storage in ("s3", "sqlite")),
        (f"every shard VM reconnected to the broker ({figures['shards_reconnected_after_s']} s after it was back)",
         reconnected is not None),
        (f"the producer's records were all acknowledged ({p['acked']}/{p['sent']}, {p['errors']} errors)",
         p["errors"] == 0 and p["acked"] == p["sent"]),
        (f"the broker's log holds every acknowledged record where it was acknowledged "
         f"({audit['acked_missing_or_moved_count']} missing or moved; also {audit['stored_twice_count']} stored twice "
         f"(a retried send whose ack was lost), offsets without a record {audit['offset_holes'] or 'none'})",
         audit["acked_missing_or_moved_count"] == 0),
        (f"clients saw no disconnect ({s['disconnects']})", not s["disconnects"]),
        (f"nothing lost, nothing duplicated, no epoch change (gaps {s['gaps']} of {s['gap_messages']} messages, each "
         f"an offset the broker's log does not have: at most {gaps_expected} of {gap_messages_expected}; "
         f"duplicates {s['duplicates']}, epoch changes {s['epoch_changes']})",
         s["gaps"] <= gaps_expected and s["gap_messages"] <= gap_messages_expected and s["duplicates"] == 0
         and s["epoch_changes"] == 0),
        (f"deliveries went on after the restart ({delivered_after})", delivered_after > 0),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("kafka-restart")
