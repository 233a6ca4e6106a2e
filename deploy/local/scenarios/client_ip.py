"""ws-lb sees each client's own address through the front (X-Forwarded-For), so the per-IP
limit works per client: one address sends a burst of `GET /ws` requests through the front
far above what one LB allows one address (`per_ip_rate` 100/s after a burst of 200), while
a second address sends a few at the same time. The requests carry no upgrade headers, so
each is answered at once: 429 by the per-IP limit, 426 (upgrade required) when it passed.

Ten LBs allow one address 1,000/s after a burst of 2,000, more than this 2-core machine can
send through TLS, so for the burst the instance group is one VM: the other LB VMs are out
of the front's rotation (HAProxy `maint`, as if the group were scaled to one) and come back
afterwards.

Checks: the flooding address got 429s and no more 426s than the tier allows it; the other
address, behind the same front address, got no 429; the LBs counted the per-IP rejections
(`ws_lb_admission_rejections_total{reason="per_ip"}`)."""

import re
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster as cl  # noqa: E402
import common  # noqa: E402

STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def burst(c, source_ip, requests, connections, out, key):
    """`requests` pipelined GET /ws over `connections` TLS connections from `source_ip`."""
    ctx = common.ssl_context(c)
    per = requests // connections
    counts = {}
    threads = []

    def one():
        raw = socket.create_connection((cl.FRONT_IP, c.values.https_port), timeout=30,
                                       source_address=(source_ip, 0))
        with ctx.wrap_socket(raw, server_hostname=cl.FRONT_IP) as s:
            req = b"GET /ws HTTP/1.1\r\nHost: md.example.com\r\n\r\n"
            last = b"GET /ws HTTP/1.1\r\nHost: md.example.com\r\nConnection: close\r\n\r\n"
            s.sendall(req * (per - 1) + last)
            data = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                data += chunk
        for code in STATUS.findall(data):
            counts[code.decode()] = counts.get(code.decode(), 0) + 1
    for _ in range(connections):
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=120)
    out[key] = counts


def per_ip_rejections(c, members=None):
    return sum(cl.metric(c.lb_metrics(n), "ws_lb_admission_rejections_total", 'reason="per_ip"') or 0
               for n in members or c.members)


def lb_limits(c):
    args = c.pv.lb_args
    rate = int(common.arg(args, "--per-ip-rate", "100"))
    burst_ = int(common.arg(args, "--per-ip-burst", "200"))
    return rate, burst_


def run(c, full):
    n = common.clients(c, 6000 if full else 3000)
    rate, allowance = lb_limits(c)
    before = per_ip_rejections(c)
    out = {}
    flood_ip, quiet_ip = cl.HOST_CLIENT_IPS[0], cl.HOST_CLIENT_IPS[1]
    serving, resting = c.members[0], c.members[1:]
    serving_before = per_ip_rejections(c, [serving])
    for name in resting:
        c.front.set_state(name, "maint")
    try:
        t0 = time.time()
        flood = threading.Thread(target=burst, args=(c, flood_ip, n, 10, out, "flood"))
        flood.start()
        # The second address shows the limit is per client only if it is sent while the
        # flooding address is being refused (were both one key, it would be refused too): wait
        # for the serving LB's first per-IP rejection rather than for a fixed time, which a
        # loaded machine can spend before the flood's TLS handshakes are done.
        refusing = common.wait_for(lambda: per_ip_rejections(c, [serving]) > serving_before
                                   or not flood.is_alive(), 60, interval=0.02)
        during_flood = refusing is not None and flood.is_alive()
        burst(c, quiet_ip, 40, 1, out, "quiet")
        flood.join(timeout=300)
        took = time.time() - t0
    finally:
        for name in resting:
            c.front.set_state(name, "ready")
    rejected = per_ip_rejections(c) - before
    f, q = out.get("flood", {}), out.get("quiet", {})
    lbs = 1
    # What one LB lets one address through in `took` seconds: its burst plus its rate.
    most_passing = lbs * (allowance + rate * took)
    figures = {"serving_lb": serving, "flood_requests": n, "quiet_sent_while_flood_refused": during_flood,
               "flood_statuses": f, "quiet_statuses": q, "seconds": round(took, 2),
               "lb_per_ip_rejections": rejected, "tier_allowance_for_one_address": round(most_passing),
               "per_ip_rate": rate, "per_ip_burst": allowance}
    checks = [
        (f"the flooding address was limited ({f.get('429', 0)} x 429)", f.get("429", 0) > 0),
        (f"... and passed no more than one LB allows one address ({f.get('426', 0)} <= {round(most_passing)})",
         f.get("426", 0) <= most_passing),
        ("the other address was sent while the flooding one was being refused", during_flood),
        (f"the other address, at the same time, was not limited ({q})", q.get("429", 0) == 0 and q.get("426", 0) == 40),
        (f"the LBs counted the per-IP rejections ({rejected:.0f} = {f.get('429', 0)})", rejected == f.get("429", 0)),
        ("every flood request was answered", sum(f.values()) == n),
    ]
    return figures, checks


if __name__ == "__main__":
    import scenarios
    scenarios.main_single("client-ip")
