"""What the deploy artefacts give the VMs and the load balancer, read from the artefacts
themselves so that the local topology cannot drift from them:

- the process arguments and environment: deploy/gcp/lib.sh `load_config` (SHARD_ARGS,
  LB_ARGS, LB_ENV), the same values the gcloud scripts put into instance metadata
  (odin-args, odin-env) and that deploy/tests check against Terraform's locals;
- the health checks, backend timeout and autohealing values: deploy/terraform/*.tf;
- the kernel settings: the sysctl block of deploy/startup/ws-lb-startup.sh.
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hcl2

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@dataclass
class HealthCheck:
    path: str
    port: int
    interval_s: float
    timeout_s: float
    healthy: int
    unhealthy: int


@dataclass
class FrontValues:
    """The global external Application Load Balancer as Terraform defines it."""
    backend_check: HealthCheck
    autoheal_check: HealthCheck
    autoheal_initial_delay_s: float
    backend_timeout_s: int
    draining_timeout_s: int
    max_surge: int          # LB MIG update policy: VMs created before old ones go
    https_port: int


def _unquote(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def _resources():
    out = {}
    for tf in sorted((DEPLOY / "terraform").glob("*.tf")):
        doc = hcl2.load(tf.open())
        for item in doc.get("resource", []):
            for rtype, by_name in item.items():
                for name, body in by_name.items():
                    out[(_unquote(rtype), _unquote(name))] = body
    return out


def _locals():
    out = {}
    for tf in sorted((DEPLOY / "terraform").glob("*.tf")):
        for item in hcl2.load(tf.open()).get("locals", []):
            out.update({k: _unquote(v) for k, v in item.items()})
    return out


def _variables():
    out = {}
    for tf in sorted((DEPLOY / "terraform").glob("*.tf")):
        for item in hcl2.load(tf.open()).get("variable", []):
            for name, body in item.items():
                out[_unquote(name)] = body.get("default")
    return out


def _block(body, name):
    b = body.get(name)
    return b[0] if isinstance(b, list) and b else (b or {})


def _int(v, env):
    """A number, or a `${local.x}` / `${var.x}` / `${length(var.zones)}` reference."""
    if isinstance(v, (int, float)):
        return v
    m = re.fullmatch(r"\$\{(local|var)\.(\w+)\}", str(v))
    if m:
        return _int(env[m.group(1)][m.group(2)], env)
    m = re.fullmatch(r"\$\{length\(var\.(\w+)\)\}", str(v))
    if m:
        return len(env["var"][m.group(1)])
    return int(_unquote(v))


def front_values() -> FrontValues:
    res = _resources()
    env = {"local": _locals(), "var": _variables()}

    def check(name):
        body = res[("google_compute_health_check", name)]
        http = _block(body, "http_health_check")
        return HealthCheck(path=_unquote(http["request_path"]), port=_int(http["port"], env),
                           interval_s=_int(body["check_interval_sec"], env), timeout_s=_int(body["timeout_sec"], env),
                           healthy=_int(body["healthy_threshold"], env), unhealthy=_int(body["unhealthy_threshold"], env))

    backend = res[("google_compute_backend_service", "lb")]
    mig = res[("google_compute_region_instance_group_manager", "lb")]
    fwd = res[("google_compute_global_forwarding_rule", "https")]
    return FrontValues(
        backend_check=check("lb_backend"),
        autoheal_check=check("lb_autoheal"),
        autoheal_initial_delay_s=_int(_block(mig, "auto_healing_policies")["initial_delay_sec"], env),
        backend_timeout_s=_int(backend["timeout_sec"], env),
        draining_timeout_s=_int(backend["connection_draining_timeout_sec"], env),
        max_surge=_int(_block(mig, "update_policy")["max_surge_fixed"], env),
        https_port=int(_unquote(fwd["port_range"])),
    )


@dataclass
class ProcessValues:
    shard_args: list
    lb_args: list
    lb_env: dict
    shards_per_vm: int
    shard_base_port: int
    lb_port: int
    lb_admin_port: int
    shard_admin_port: int
    kafka_topics: list
    # Group membership (SHARD_MEMBERSHIP=group): ws-lb follows the member file that
    # ws-lb-startup.sh's updater keeps equal to the shard group's RUNNING VMs; the metadata
    # the LB VMs get (odin-shard-group, odin-shard-ports FIRST:LAST) and the group's bounds.
    members_file: str
    shard_group: str
    shard_ports: str
    shard_min_replicas: int
    shard_max_replicas: int


def process_values(shard_ips, kafka_brokers) -> ProcessValues:
    """The arguments and environment deploy/gcp/lib.sh computes for these shard addresses."""
    script = ('source deploy/gcp/config.sh && source deploy/gcp/lib.sh && load_config && '
              'printf "%s\\n" "$SHARD_ARGS" "$LB_ARGS" "$LB_ENV" "$SHARDS_PER_VM" "$SHARD_BASE_PORT" '
              '"$LB_PORT" "$LB_ADMIN_PORT" "$SHARD_ADMIN_PORT" "$KAFKA_TOPICS" "$SHARD_GROUP" '
              '"$SHARD_BASE_PORT:$SHARD_LAST_PORT" "$SHARD_MIN_REPLICAS" "$SHARD_MAX_REPLICAS"')
    # The deploy's default: the LB VMs follow the shard group through a member file
    # (deploy/local/members.py runs the same updater against a stand-in Compute API).
    env = {"PATH": "/usr/bin:/bin", "PROJECT": "odin-local", "SHARD_MEMBERSHIP": "group",
           "SHARD_COUNT": str(len(shard_ips)),
           "SHARD_IPS": " ".join(shard_ips), "KAFKA_BROKERS": kafka_brokers}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"deploy/gcp/lib.sh refused the topology: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    shard_args, lb_args, lb_env, per_vm, base, lb_port, lb_admin, shard_admin, topics = lines[:9]
    group, ports, min_r, max_r = lines[9:13]
    lb_argv = lb_args.split()
    if "--backend-file" not in lb_argv or not group:
        raise SystemExit(f"deploy/gcp/lib.sh gave ws-lb no member file with SHARD_MEMBERSHIP=group: {lb_args}")
    return ProcessValues(
        shard_args=shard_args.split(), lb_args=lb_argv,
        lb_env=dict(kv.split("=", 1) for kv in lb_env.split()),
        shards_per_vm=int(per_vm), shard_base_port=int(base), lb_port=int(lb_port),
        lb_admin_port=int(lb_admin), shard_admin_port=int(shard_admin), kafka_topics=topics.split(","),
        members_file=lb_argv[lb_argv.index("--backend-file") + 1], shard_group=group, shard_ports=ports,
        shard_min_replicas=int(min_r), shard_max_replicas=int(max_r))


def startup_sysctls() -> dict:
    """The kernel settings the startup scripts write (both scripts share the block)."""
    text = (DEPLOY / "startup" / "ws-lb-startup.sh").read_text()
    block = text[text.index("<<'SYSCTL'") + len("<<'SYSCTL'"):text.index("\nSYSCTL\n")]
    out = {}
    for line in block.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def unit_limit_nofile(unit="ws-lb") -> int:
    text = (DEPLOY / "systemd" / f"{unit}.service").read_text()
    return int(re.search(r"^LimitNOFILE=(\d+)$", text, re.M).group(1))
