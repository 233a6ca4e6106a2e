#!/usr/bin/env python3
"""CPU the front (the HAProxy stand-in for the GCP load balancer) spends per new client.

The front's configuration is the one `front.py` generates from the Terraform values, run as
one HAProxy process on 127.0.0.1 (no namespaces, no cluster: nothing else shares its
numbers) in front of one ws-lb and one ws-shard. Per variant it measures the HAProxy
process's CPU seconds (utime + stime from /proc) across

- `wss`: N new WebSocket clients through it (loadtest, TLS 1.3, X25519, ECDSA P-256
  certificate from a CA made here, each client subscribes and holds 2 s): the whole cost of
  a client, TLS handshake, HTTP upgrade, backend connection, relay, close;
- `tls`: `openssl s_time -new` for a few seconds: full TLS handshakes only, nothing after.

Each row also has the client's CPU per client (`client_ms_per_client`: loadtest's or
s_time's own user + system time): on one machine the generator's TLS shares the cores with
the front's. `--openssl-baseline` adds a row per round for the TLS library alone: `openssl
s_server` (no HAProxy) with the same certificate under the same `s_time -new`, so what the
front spends beyond OpenSSL's own handshake shows.

Variants (one config line each, added to `global`) are measured alternately, `--rounds`
times, so the machine's load hits them alike. Writes bench/results/front-tls-cost-<time>.json.

`--haproxy-root DIR` (repeatable) adds another HAProxy build: a Debian package tree with
`usr/sbin/haproxy` and its libraries in `usr/lib/x86_64-linux-gnu` (run with
LD_LIBRARY_PATH there), measured alternately with the installed one on every variant.
`fetch_old_haproxy.sh DIR` makes such a tree from Debian 11's HAProxy 2.2 and OpenSSL 1.1.1w,
to see what the TLS stack costs (docs/topology.md, "OpenSSL 1.1.1 is not the fix").

    python3 deploy/local/front_cost.py --bin-dir target/debug [--connections 1000 --rate 200 --rounds 2]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "bench"))

import bench  # noqa: E402
import deploy_values  # noqa: E402
import front  # noqa: E402

PORT, LB_PORT, SHARD_PORT = 18443, 24001, 24002

VARIANTS = {
    "as generated": [],
    "curves X25519:P-256": ["ssl-default-bind-curves X25519:P-256"],
    "no logging": ["#nolog"],
    "no TLS tickets": ["ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets"],
    "nbthread 2": ["nbthread 2"],
}


def config(base, lines):
    cfg = base
    for line in lines:
        if line == "#nolog":
            cfg = cfg.replace("  log global\n", "  no log\n")
        elif line.startswith(("nbthread", "ssl-default-bind-options")):
            key = line.split()[0]
            cfg = "\n".join(f"  {line}" if x.strip().startswith(key + " ") else x for x in cfg.splitlines()) + "\n"
        else:
            cfg = cfg.replace("global\n", f"global\n  {line}\n", 1)
    return cfg


def listening(port):
    r = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


def wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def builds(roots):
    """[(label, argv0, env)]: the installed HAProxy, then one per package tree."""
    out = [("installed", "haproxy", None)]
    for root in roots:
        root = Path(root).resolve()
        binary = root / "usr/sbin/haproxy"
        if not binary.is_file():
            raise SystemExit(f"--haproxy-root {root}: no usr/sbin/haproxy in it")
        out.append((str(root), str(binary), {**os.environ, "LD_LIBRARY_PATH": str(root / "usr/lib/x86_64-linux-gnu")}))
    return out


def version(build):
    _, argv0, env = build
    vv = subprocess.run([argv0, "-vv"], capture_output=True, text=True, env=env).stdout.splitlines()
    ssl = next((x.split(":", 1)[1].strip() for x in vv if x.startswith("Running on OpenSSL version")), "?")
    return f"{vv[0] if vv else '?'} / {ssl}"


def measure(cfg_path, mode, a, tmp, build):
    """HAProxy with `cfg_path` under the clients of `mode` (wss: loadtest; tls: s_time)."""
    argv = [build[1], "-f", str(cfg_path), "-db"]
    clients = (lambda: loadtest_run(a, tmp)) if mode == "wss" else (lambda: s_time(a))
    # Measured from the front's first completed check of the LB on (its stats socket, read
    # as the cluster's front reads it): the start's own work stays out of the window.
    fr = front.Front(None, None, [], tmp, 1, 0)

    def checked():
        try:
            return any(r.get("check_status", "").startswith("L7") for r in fr.stats()[0].values())
        except OSError:  # its stats socket is not there yet
            return False
    return server_run(argv, "haproxy", clients, env=build[2], log=tmp / "haproxy.log", ready=checked)


def measure_openssl(a, tmp):
    """The TLS library alone: `openssl s_server` with the front's certificate and key, the
    same `s_time -new` against it."""
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{PORT}", "-cert", str(tmp / "front.crt"),
            "-key", str(tmp / "front.key"), "-quiet", "-naccept", "1000000"]
    return server_run(argv, "openssl s_server", lambda: s_time(a))


def server_run(argv, what, clients, env=None, log=None, ready=None):
    """Starts the server `argv` on PORT, runs `clients()` (returns how many it completed) and
    reads the CPU seconds the server and the clients spent meanwhile."""
    if listening(PORT):
        raise RuntimeError(f"port {PORT} is already in use")
    out = open(log, "a") if log else subprocess.DEVNULL
    srv = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True, env=env)
    try:
        wait(lambda: listening(PORT), 10, what)
        if ready:
            wait(ready, 10, f"{what} ready")
        t0, c0 = bench.proc_cpu_s(srv.pid), children_cpu_s()
        n = clients()
        cpu, client = bench.proc_cpu_s(srv.pid) - t0, children_cpu_s() - c0
    finally:
        srv.send_signal(signal.SIGKILL)
        srv.wait()
    return {"clients": n, "cpu_s": round(cpu, 2), "ms_per_client": round(cpu / max(n, 1) * 1000, 3),
            "client_ms_per_client": round(client / max(n, 1) * 1000, 3), "loadavg": round(os.getloadavg()[0], 1)}


def children_cpu_s():
    """User + system seconds of this script's waited-for children (the clients)."""
    t = os.times()
    return t.children_user + t.children_system


def loadtest_run(a, tmp):
    """`a.connections` WebSocket clients through the front: how many were established."""
    out = tmp / "lt.json"
    subprocess.run([str(a.bin / "loadtest"), "--url", f"wss://127.0.0.1:{PORT}/ws", "--ca-file", str(tmp / "ca.pem"),
                    "--connections", str(a.connections), "--rate", str(a.rate), "--hold", "2",
                    "--source-ips", "127.0.0.2-127.0.0.65", "--json", str(out), "--quiet"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return json.loads(out.read_text())["counts"]["established"]


def s_time(a):
    """`openssl s_time -new` against the port for `--tls-seconds`: full handshakes made."""
    r = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{PORT}", "-new", "-time", str(a.tls_seconds)],
                       capture_output=True, text=True, timeout=120)
    line = next(x for x in r.stdout.splitlines() if "connections in" in x)
    return int(line.split()[0])


def show(r, k, mode, m):
    print(f"round {r + 1} {k:22s} {mode}: {m['clients']:5d} clients, {m['cpu_s']:5.2f} CPU-s, "
          f"{m['ms_per_client']:.3f} ms each, client {m['client_ms_per_client']:.3f} ms each (load {m['loadavg']})",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", default="target/debug")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--tls-seconds", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--haproxy-root", action="append", default=[], metavar="DIR",
                   help="another HAProxy build to measure beside the installed one (a Debian package tree)")
    p.add_argument("--openssl-baseline", action="store_true",
                   help="also measure `openssl s_server` alone under the same s_time, each round")
    a = p.parse_args()
    hps = builds(a.haproxy_root)
    a.bin = Path(a.bin_dir).resolve()
    names = [v for v in a.variants.split(",") if v]
    tmp = Path(tempfile.mkdtemp(prefix="odin-front-cost-"))
    procs = []
    started = time.time()
    load0 = bench.machine()
    try:
        front.make_cert(tmp, "127.0.0.1")
        front.make_ticket_keys(tmp)
        v = deploy_values.front_values()
        base = front.haproxy_config(v, "127.0.0.1", [("lb-0", "127.0.0.1")], tmp, 0, 9000)
        base = base.replace(f"127.0.0.1:{v.https_port} ", f"127.0.0.1:{PORT} ")
        base = base.replace(f"127.0.0.1:{v.backend_check.port} check", f"127.0.0.1:{LB_PORT} check")
        for argv, log in (
            ([str(a.bin / "ws-shard"), "--shards", "1", "--base-port", str(SHARD_PORT), "--admin-addr", "127.0.0.1:24102"], "shard"),
            ([str(a.bin / "ws-lb"), "--listen", f"127.0.0.1:{LB_PORT}", "--admin-addr", "127.0.0.1:24101",
              "--backend-urls", f"ws://127.0.0.1:{SHARD_PORT}/ws", "--trust-forwarded-for"], "lb"),
        ):
            procs.append(subprocess.Popen(argv, stdout=open(tmp / f"{log}.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        wait(lambda: listening(LB_PORT) and listening(SHARD_PORT), 30, "ws-lb and ws-shard")
        # One result key per variant and build: the variant's name alone for the installed
        # HAProxy (as before), "<variant> @ <root>" for another build.
        keys = [(n, b, n if b[0] == "installed" else f"{n} @ {b[0]}") for n in names for b in hps]
        results = {k: {"wss": [], "tls": []} for _, _, k in keys}
        for r in range(a.rounds):
            for n, b, k in keys:
                path = tmp / f"haproxy-{names.index(n)}.cfg"
                text = config(base, VARIANTS[n])
                if b[0] != "installed":  # HAProxy before 2.3 has no "iso" log format
                    text = text.replace(" format iso ", " format raw ")
                path.write_text(text)
                for mode in ("wss", "tls"):
                    m = measure(path, mode, a, tmp, b)
                    results[k][mode].append(m)
                    show(r, k, mode, m)
            if a.openssl_baseline:
                m = measure_openssl(a, tmp)
                results.setdefault("openssl s_server alone", {"tls": []})["tls"].append(m)
                show(r, "openssl s_server alone", "tls", m)
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGKILL)
            pr.wait()
    hv = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    ov = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.RESULTS / f"front-tls-cost-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "what": "HAProxy front CPU per new client (wss: whole WebSocket client; tls: TLS handshake only; "
                "client_ms_per_client: the client's own CPU)",
        "commit": bench.commit_of(bench.REPO), "machine": load0, "loadavg_at_end": bench.load(),
        "haproxy": hv, "openssl": ov, "haproxy_builds": {b[0]: version(b) for b in hps}, "bin_dir": str(a.bin), "flags": {"connections": a.connections, "rate": a.rate,
                                                                        "tls_seconds": a.tls_seconds, "rounds": a.rounds,
                                                                        "openssl_baseline": a.openssl_baseline},
        "variants": {n: VARIANTS[n] for n in names}, "results": results, "seconds": round(time.time() - started, 1),
    }, indent=1))
    print(f"wrote {out}")
    subprocess.run(["rm", "-rf", str(tmp)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
