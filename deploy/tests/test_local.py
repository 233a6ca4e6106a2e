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

import deploy_values  # noqa: E402
import front  # noqa: E402
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
    check("LB args carry every shard", sum(a.count("ws://") for a in p.lb_args) == 28, p.lb_args)
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
                       "http-check expect status 200", '"%[src],%[dst]"', "option redispatch"):
            check(f"haproxy config has {needle!r}", needle in cfg)
        if shutil.which("haproxy") and shutil.which("openssl"):
            front.make_cert(run, vm.ip)
            (run / "h.cfg").write_text(cfg)
            r = subprocess.run(["haproxy", "-c", "-q", "-f", str(run / "h.cfg")], capture_output=True, text=True)
            eq("haproxy -c accepts the generated configuration", (r.returncode, r.stderr.strip()), (0, ""))
            r = subprocess.run(["openssl", "verify", "-CAfile", str(run / "ca.pem"), str(run / "front.crt")],
                               capture_output=True, text=True)
            eq("the front's certificate verifies against the CA clients get", r.returncode, 0)


def main():
    return run("test_local", (test_values, test_haproxy_config))


if __name__ == "__main__":
    sys.exit(main())
