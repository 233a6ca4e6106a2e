#!/usr/bin/env python3
"""Offline checks of deploy/local (the topology on one machine), without root or
namespaces: the values it reads from the deploy artefacts are the ones they hold, and the
HAProxy configuration it generates for the front carries them (and passes `haproxy -c`
where haproxy is installed).

Run: python3 deploy/tests/test_local.py   (exit 0 = all passed)
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(DEPLOY / "local"))
sys.path.insert(0, str(DEPLOY.parent / "tests" / "pylib"))

import deploy_values  # noqa: E402
import front  # noqa: E402
import odin  # noqa: E402
import topo  # noqa: E402
from checks import check, eq, run  # noqa: E402


def test_values():
    v = deploy_values.front_values()
    eq("backend check", (v.backend_check.path, v.backend_check.port, v.backend_check.interval_s,
                         v.backend_check.timeout_s, v.backend_check.healthy, v.backend_check.unhealthy),
       ("/health", 3001, 5, 5, 2, 2))
    eq("autoheal check", (v.autoheal_check.interval_s, v.autoheal_check.unhealthy), (10, 6))
    eq("autoheal initial delay", v.autoheal_initial_delay_s, 120)
    eq("backend timeout / draining", (v.backend_timeout_s, v.draining_timeout_s), (86400, 300))
    eq("surge (one VM per zone)", v.max_surge, 3)
    eq("https port", v.https_port, 443)
    p = deploy_values.process_values([f"10.213.2.{10 + j}" for j in range(7)], "10.213.0.20:9092")
    eq("shards per VM", p.shards_per_vm, 4)
    # Group membership, as the deploy's default: the LB VMs follow a member file.
    eq("LB follows the member file", p.lb_args[p.lb_args.index("--backend-file") + 1], "/var/lib/odin-ws/shards")
    check("LB args list no fixed shard", not any("ws://" in a for a in p.lb_args), p.lb_args)
    eq("shard group metadata", (p.shard_group, p.shard_ports), ("odin-ws-shard", "3002:3005"))
    eq("shard group bounds", (p.shard_min_replicas, p.shard_max_replicas), (7, 10))
    check("LB trusts X-Forwarded-For", "--trust-forwarded-for" in p.lb_args)
    check("shard args consume the Kafka VM and warm history",
          "10.213.0.20:9092" in p.shard_args and "--kafka-start" in p.shard_args, p.shard_args)
    eq("LB env", sorted(p.lb_env), ["CIRCUIT_BREAKER_FAILURE_THRESHOLD", "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS",
                                    "CIRCUIT_BREAKER_TIMEOUT"])
    s = deploy_values.startup_sysctls()
    eq("somaxconn from the startup scripts", s.get("net.core.somaxconn"), "65535")


def test_haproxy_config():
    v = deploy_values.front_values()
    vm = topo.Vm("front", "10.213.0.10")
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        cfg = front.haproxy_config(v, vm.ip, [("lb-0", "10.213.1.10"), ("lb-1", "10.213.1.11")], run, 0, 9500)
        for needle in ("bind 10.213.0.10:443 ssl crt", "inter 5s fall 2 rise 2", "timeout check 5s",
                       "timeout tunnel 86400s", "http-check send meth GET uri /health",
                       "http-check expect status 200", '"%[src],%[dst]"', "option redispatch",
                       f"tls-ticket-keys {run}/tickets.key"):
            check(f"haproxy config has {needle!r}", needle in cfg)
        check("per-process ticket keys leave the key file out",
              "tls-ticket-keys" not in front.haproxy_config(v, vm.ip, [("lb-0", "10.213.1.10")], run, 0, 9500,
                                                            shared_tickets=False))
        if shutil.which("haproxy") and shutil.which("openssl"):
            front.make_cert(run, vm.ip)
            front.make_ticket_keys(run)
            (run / "h.cfg").write_text(cfg)
            r = subprocess.run(["haproxy", "-c", "-q", "-f", str(run / "h.cfg")], capture_output=True, text=True)
            eq("haproxy -c accepts the generated configuration", (r.returncode, r.stderr.strip()), (0, ""))
            r = subprocess.run(["openssl", "verify", "-CAfile", str(run / "ca.pem"), str(run / "front.crt")],
                               capture_output=True, text=True)
            eq("the front's certificate verifies against the CA clients get", r.returncode, 0)


def test_front_processes_resume_each_others_sessions():
    """The front's processes share their session-ticket keys (one address, one TLS endpoint): a
    session one process handed out resumes on another. One process at a time on the same
    port, so which one answers is not up to the kernel's SO_REUSEPORT choice."""
    if not (shutil.which("haproxy") and shutil.which("openssl")):
        print("  (skipped: haproxy or openssl not installed)")
        return
    import socket
    import ssl
    v = deploy_values.front_values()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        front.make_cert(run, "127.0.0.1")
        front.make_ticket_keys(run)

        def serve(index, shared):
            cfg = front.haproxy_config(v, "127.0.0.1", [("lb-0", "127.0.0.1")], run, index, 100, shared)
            cfg = cfg.replace(f"127.0.0.1:{v.https_port} ", f"127.0.0.1:{port} ")
            (run / f"h{index}.cfg").write_text(cfg)
            p = subprocess.Popen(["haproxy", "-db", "-f", str(run / f"h{index}.cfg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                odin.wait_port(port, timeout=10)
            except SystemExit as e:     # odin ends a script; here it is this group's failure
                p.kill()
                p.wait()
                raise RuntimeError(f"haproxy: {e}") from None
            return p

        ctx = ssl.create_default_context(cafile=str(run / "ca.pem"))   # a session resumes in its own context

        def hello(session=None):
            """One request through the front: (the session it leaves, whether it resumed).
            The answer (a 503 where no LB listens) is read before the session is taken, so
            the TLS 1.3 tickets, sent right after the handshake, have arrived by then."""
            with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as t:
                    t.sendall(b"GET /ws HTTP/1.0\r\nHost: front\r\n\r\n")
                    check("the front answers", t.recv(64).startswith(b"HTTP/1."))
                    return t.session, t.session_reused

        for shared in (True, False):
            first = serve(0, shared)
            try:
                session, _ = hello()
            finally:
                first.kill()
                first.wait()
            check("the first process handed out a session ticket", session is not None and session.has_ticket)
            second = serve(1, shared)
            try:
                _, resumed = hello(session)
            finally:
                second.kill()
                second.wait()
            eq(f"a session of one process resumes on another ({'shared' if shared else 'per-process'} keys)",
               resumed, shared)


def test_member_updater_against_the_stand_in():
    """The LB VMs' updater (ws-lb-startup.sh update-shard-members), unchanged, against
    members.py's metadata server and Compute API: RUNNING VMs x ports are written, a
    STOPPING VM leaves the file, a listing with no VM keeps it."""
    import socket
    import members
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = members.ComputeApi("127.0.0.1", port, "odin-ws-shard")
    api.start()
    try:
        with tempfile.TemporaryDirectory() as d:
            env = {"PATH": "/usr/bin:/bin", "ODIN_ROOT": d, "ODIN_MEMBERS_ONCE": "1",
                   "ODIN_METADATA_URL": f"http://127.0.0.1:{port}/computeMetadata/v1",
                   "ODIN_COMPUTE_URL": f"http://127.0.0.1:{port}/compute/v1"}
            argv = ["bash", str(DEPLOY / "startup" / "ws-lb-startup.sh"), "update-shard-members", "odin-ws-shard", "3002:3003"]
            f = Path(d) / "var/lib/odin-ws/shards"

            def listed():
                subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
                return [x for x in f.read_text().splitlines() if not x.startswith("#")] if f.exists() else None
            api.set("shard-0", "10.213.2.10", "RUNNING")
            api.set("shard-1", "10.213.2.11", "RUNNING")
            eq("running VMs x ports", listed(), [f"ws://10.213.2.1{j}:{p}/ws" for j in (0, 1) for p in (3002, 3003)])
            api.set("shard-1", "10.213.2.11", "STOPPING")
            eq("a STOPPING VM leaves the file", listed(), ["ws://10.213.2.10:3002/ws", "ws://10.213.2.10:3003/ws"])
            api.set("shard-0", "10.213.2.10", None)
            eq("no VM at all keeps the last file", listed(), ["ws://10.213.2.10:3002/ws", "ws://10.213.2.10:3003/ws"])
            check("the updater listed through the stand-in", api.listings == 3, api.listings)
    finally:
        api.stop()


def test_delay_choice_offline():
    """What the topology does with a delay before it touches the kernel: no delay needs no
    mechanism; `--delay-mode delayline` without the binary is one clear error; VMs' MAC
    addresses (the bridge's static entries, the delay line's filter) follow their address."""
    eq("delay 0: no mechanism", topo.Network(0)._choose_mechanism(), "none")
    try:
        topo.Network(0.25, "delayline", "/nonexistent/delayline")._choose_mechanism()
        check("a missing delayline binary is an error", False)
    except topo.TopologyError as e:
        check("a missing delayline binary is an error naming it and the way out",
              "/nonexistent/delayline" in str(e) and "--delay-ms 0" in str(e) and "netem (not" not in str(e), str(e))
    eq("a VM's MAC follows its address", topo.vm_mac("10.213.1.10"), "02:00:0a:d5:01:0a")
    eq("distinct VMs, distinct MACs", len({topo.vm_mac(f"10.213.2.{i}") for i in range(10, 20)}), 10)


def test_caps_are_recorded():
    """`--max-rate` / `--max-clients` cap what a scenario asks for, never raise it, and every
    result records them (`non_default_flags`); the defaults leave the scenarios' own sizes."""
    sys.path.insert(0, str(DEPLOY / "local" / "scenarios"))
    import cluster
    import common

    class C:
        def __init__(self, argv):
            self.a = cluster.parser().parse_args(["bench", *argv])
    default, capped = C([]), C(["--max-clients", "3000", "--max-rate", "100"])
    eq("defaults: the scenario's own", (common.clients(default, 6000), common.capped(default, 1000)), (6000, 1000))
    eq("caps lower", (common.clients(capped, 6000), common.capped(capped, 1000)), (3000, 100))
    eq("caps never raise", (common.clients(capped, 1000), common.capped(capped, 50)), (1000, 50))
    eq("recorded", cluster.non_default_flags(capped.a), {"max_clients": 3000, "max_rate": 100})
    eq("defaults record nothing", cluster.non_default_flags(default.a), {})


def main():
    return run("test_local", (test_values, test_haproxy_config, test_front_processes_resume_each_others_sessions,
                              test_member_updater_against_the_stand_in,
                              test_delay_choice_offline, test_caps_are_recorded))


if __name__ == "__main__":
    sys.exit(main())
