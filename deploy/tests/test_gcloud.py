#!/usr/bin/env python3
"""Checks deploy/gcp/*.sh offline.

1. Runs every script with DRY_RUN=1 and checks the printed gcloud command
   lines: one per line, shell-quoted, nothing else; the expected commands and
   flag values (sizes, autoscaling bounds and signals, /health checks and
   ports, backend-service timeouts, firewall ranges, the ws-lb backend list);
   that teardown.sh deletes everything deploy.sh creates; that bad settings
   are refused.
2. Executes every printed command with the real gcloud, for project
   odin-ws-placeholder, in an empty CLOUDSDK_CONFIG (no credentials, no
   network: the GCE metadata check is pre-answered), and requires each to get
   past gcloud's argument parsing and stop at the missing credentials:
   exit 1 and "ERROR: (gcloud.<the command we typed>) You do not currently
   have an active account selected." -- never exit 2 / "unrecognized
   arguments" / "Invalid choice" / "argument --x: ..." / "must be specified".

Run: python3 deploy/tests/test_gcloud.py   (exit 0 = all passed)
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checks import check, eq, guarded, report

DEPLOY = Path(__file__).resolve().parent.parent
GCP = DEPLOY / "gcp"
PROJECT = "odin-ws-placeholder"
BASE_ENV = {
    "PROJECT": PROJECT,
    "DOMAIN": "md.example.com",
    "CONTAINER_IMAGE": "us-central1-docker.pkg.dev/odin-ws-placeholder/odin/odin-ws:0.1.0",
    "PROMETHEUS_SOURCE_RANGES": "10.128.0.0/20",
}
STEPS = ["00-iam.sh", "10-firewall.sh", "20-shard-tier.sh", "30-lb-tier.sh", "40-global-lb.sh"]
AUTH_ERROR = re.compile(r"^ERROR: \((gcloud(?:\.[a-z0-9-]+)+)\) You do not currently have an active account selected\.$")
PARSE_ERRORS = ("unrecognized arguments", "Invalid choice", "invalid choice", "must be specified",
                "argument --", "Usage:", "Invalid value", "valid keys are", "is not a valid")


def clean_env(extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLOUDSDK_", "GOOGLE_", "DRY_RUN", "PROJECT")) and k not in BASE_ENV}
    env.update(extra)
    return env


def dry_run(script, **overrides):
    env = clean_env({**BASE_ENV, **overrides, "DRY_RUN": "1"})
    env = {k: v for k, v in env.items() if v is not None}
    p = subprocess.run(["bash", str(GCP / script)], env=env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    return p


def parse_lines(script, stdout):
    cmds = []
    for line in stdout.splitlines():
        try:
            argv = shlex.split(line)
        except ValueError as e:
            check(f"{script}: line parses as shell words", False, f"{e}: {line}")
            continue
        check(f"{script}: line is one gcloud command", argv[:1] == ["gcloud"], line)
        requote = " ".join(shlex.quote(a) for a in argv)
        check(f"{script}: line is plain shell quoting", shlex.split(requote) == argv, line)
        cmds.append(argv)
    return cmds


def flag(argv, name):
    """Value of --name VALUE or --name=VALUE (last one), None if absent,
    True for a flag without value."""
    val = None
    for i, a in enumerate(argv):
        if a == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            val = nxt if nxt is not None and not nxt.startswith("--") else True
        elif a.startswith(name + "="):
            val = a[len(name) + 1:]
    return val


def find(cmds, *words, name=None):
    out = [c for c in cmds if c[1:1 + len(words)] == list(words)
           and (name is None or (len(c) > 1 + len(words) and c[1 + len(words)] == name))]
    return out


def one(cmds, *words, name=None):
    got = find(cmds, *words, name=name)
    eq(f"exactly one `gcloud {' '.join(words)} {name or ''}`".replace("  ", " "), len(got), 1)
    return got[0] if got else []


def parse_metadata(value):
    check("metadata uses the ^#^ delimiter", isinstance(value, str) and value.startswith("^#^"), value)
    if not isinstance(value, str):
        return {}
    return dict(item.split("=", 1) for item in value[3:].split("#"))


def expected_backends(ips, ports):
    return ",".join(f"ws://{ip}:{p}/ws" for ip in ips for p in ports)


# ---------------------------------------------------------------------------

def test_dry_run():
    all_cmds, per_script = [], {}
    for script in STEPS + ["teardown.sh", "deploy.sh"]:
        p = dry_run(script)
        eq(f"{script}: DRY_RUN=1 exit code", p.returncode, 0)
        eq(f"{script}: DRY_RUN=1 prints nothing on stderr", p.stderr, "")
        cmds = parse_lines(script, p.stdout)
        check(f"{script}: prints commands", len(cmds) > 0)
        for c in cmds:
            eq(f"{script}: ends with --project {PROJECT}", c[-2:], ["--project", PROJECT])
        per_script[script] = cmds
        if script != "deploy.sh":
            all_cmds += cmds
    eq("deploy.sh prints exactly the step scripts' commands, in order",
       per_script["deploy.sh"], [c for s in STEPS for c in per_script[s]])
    create = [c for s in STEPS for c in per_script[s]]
    check_facts(create)
    check_teardown(create, per_script["teardown.sh"])
    return all_cmds


def check_facts(cmds):
    # Shard tier: an autoscaled group without reserved addresses.
    check("no shard addresses", not [c for c in find(cmds, "compute", "addresses", "create") if "--region" in c])
    mig = one(cmds, "compute", "instance-groups", "managed", "create", name="odin-ws-shard")
    eq("shard MIG starts at its minimum", flag(mig, "--size"), "7")
    eq("shard MIG not stateful", flag(mig, "--stateful-internal-ip"), None)
    eq("shard MIG health check", flag(mig, "--health-check"), "odin-ws-shard-hc")
    eq("no per-VM instances", find(cmds, "compute", "instance-groups", "managed", "create-instance"), [])
    sa = one(cmds, "compute", "instance-groups", "managed", "set-autoscaling", name="odin-ws-shard")
    eq("shard autoscaler bounds", (flag(sa, "--min-num-replicas"), flag(sa, "--max-num-replicas")), ("7", "10"))
    eq("shard autoscaler CPU signal", flag(sa, "--target-cpu-utilization"), "0.6")
    eq("shard autoscaler connections signal (70 % of 4 x 6000 per VM)", flag(sa, "--custom-metric-utilization"),
       "metric=custom.googleapis.com/ws_shard_connections,utilization-target=16800,utilization-target-type=GAUGE")
    eq("shard autoscaler cool-down", flag(sa, "--cool-down-period"), "180")
    eq("shard scale-in: one VM per 15 min", flag(sa, "--scale-in-control"), "max-scaled-in-replicas=1,time-window=900")
    tpl = one(cmds, "compute", "instance-templates", "create", name="odin-ws-shard-v1")
    md = parse_metadata(flag(tpl, "--metadata"))
    eq("shard odin-args", md.get("odin-args"),
       "--shards 4 --base-port 3002 --bind 0.0.0.0 --admin-addr 0.0.0.0:9102 --max-connections 6000 "
       "--drain-window 10s --grace 30s --log-json")
    eq("shard open ports", md.get("odin-open-ports"), "3002:3005,9102")
    eq("shard connections metric", md.get("odin-connections-metric"), "custom.googleapis.com/ws_shard_connections")
    eq("shard group label (what LB VMs list)", flag(tpl, "--labels"), "odin-ws-role=shard,odin-ws-group=odin-ws-shard")
    eq("shard template SA", flag(tpl, "--service-account"), f"odin-ws-shard@{PROJECT}.iam.gserviceaccount.com")
    check("shard template: no external IP", flag(tpl, "--no-address") is True)

    # LB tier.
    mig = one(cmds, "compute", "instance-groups", "managed", "create", name="odin-ws-lb")
    eq("LB MIG size", flag(mig, "--size"), "10")
    eq("LB MIG autohealing check", (flag(mig, "--health-check"), flag(mig, "--initial-delay")),
       ("odin-ws-lb-autoheal-hc", "120"))
    eq("LB MIG named port", flag(one(cmds, "compute", "instance-groups", "managed", "set-named-ports"), "--named-ports"),
       "ws:3001")
    sa = one(cmds, "compute", "instance-groups", "managed", "set-autoscaling", name="odin-ws-lb")
    eq("autoscaler bounds", (flag(sa, "--min-num-replicas"), flag(sa, "--max-num-replicas")), ("10", "20"))
    eq("autoscaler CPU signal", flag(sa, "--target-cpu-utilization"), "0.6")
    eq("autoscaler connections signal", flag(sa, "--custom-metric-utilization"),
       "metric=custom.googleapis.com/ws_lb_active_connections,utilization-target=20000,utilization-target-type=GAUGE")
    tpl = one(cmds, "compute", "instance-templates", "create", name="odin-ws-lb-v1")
    md = parse_metadata(flag(tpl, "--metadata"))
    eq("ws-lb odin-args", md.get("odin-args"),
       "--listen 0.0.0.0:3001 --admin-addr 0.0.0.0:9101 --backend-file /var/lib/odin-ws/shards "
       "--allowed-origins https://app.example.com --trust-forwarded-for")
    eq("ws-lb follows the shard group", (md.get("odin-shard-group"), md.get("odin-shard-ports")),
       ("odin-ws-shard", "3002:3005"))
    binds = [c for c in find(cmds, "projects", "add-iam-policy-binding") if flag(c, "--role") == "roles/compute.viewer"]
    eq("LB service account may list instances", [flag(c, "--member") for c in binds],
       [f"serviceAccount:odin-ws-lb@{PROJECT}.iam.gserviceaccount.com"])
    eq("ws-lb odin-env", md.get("odin-env"),
       "CIRCUIT_BREAKER_FAILURE_THRESHOLD=10 CIRCUIT_BREAKER_TIMEOUT=30s CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS=5")
    eq("ws-lb connections metric", md.get("odin-connections-metric"), "custom.googleapis.com/ws_lb_active_connections")
    startup_keys = set(re.findall(r"\battr\s+(odin-[a-z0-9-]+)", (DEPLOY / "startup/ws-lb-startup.sh").read_text()))
    eq("LB template odin-* metadata == keys the startup script reads",
       sorted(k for k in md if k.startswith("odin-")), sorted(startup_keys))

    for c in find(cmds, "compute", "instance-templates", "create"):
        files = dict(kv.split("=", 1) for kv in flag(c, "--metadata-from-file").split(","))
        eq(f"{c[4]}: startup/shutdown scripts", sorted(files), ["shutdown-script", "startup-script"])
        for k, path in files.items():
            check(f"{c[4]}: {k} file exists", Path(path).is_file(), path)
    role = {"odin-ws-lb-v1": "ws-lb-startup.sh", "odin-ws-shard-v1": "ws-shard-startup.sh"}
    for c in find(cmds, "compute", "instance-templates", "create"):
        check(f"{c[4]}: runs {role.get(c[4])}", f"/startup/{role.get(c[4])}," in flag(c, "--metadata-from-file"))

    # Health checks.
    hcs = {c[5]: c for c in find(cmds, "compute", "health-checks", "create", "http")}
    eq("health checks", sorted(hcs), ["odin-ws-lb-autoheal-hc", "odin-ws-lb-backend-hc", "odin-ws-shard-hc"])
    for name, port, path in (("odin-ws-lb-autoheal-hc", "3001", "/health"), ("odin-ws-lb-backend-hc", "3001", "/health"),
                             ("odin-ws-shard-hc", "3002", "/live")):
        c = hcs.get(name, [])
        eq(f"{name}: {path} on {port}", (flag(c, "--request-path"), flag(c, "--port")), (path, port))
    for name in ("odin-ws-lb-autoheal-hc", "odin-ws-lb-backend-hc"):
        d = flag(hcs.get(name, []), "--description") or ""
        check(f"{name}: described as liveness, 503 only while draining", "liveness" in d and "503 only while draining" in d, d)

    # Global LB.
    be = one(cmds, "compute", "backend-services", "create", name="odin-ws-lb-backend")
    eq("backend service", {f: flag(be, f) for f in ("--protocol", "--timeout", "--connection-draining-timeout",
                                                    "--session-affinity", "--port-name", "--health-checks",
                                                    "--load-balancing-scheme")},
       {"--protocol": "HTTP", "--timeout": "86400s", "--connection-draining-timeout": "300s",
        "--session-affinity": "NONE", "--port-name": "ws", "--health-checks": "odin-ws-lb-backend-hc",
        "--load-balancing-scheme": "EXTERNAL_MANAGED"})
    ab = one(cmds, "compute", "backend-services", "add-backend", name="odin-ws-lb-backend")
    eq("backend = LB MIG", (flag(ab, "--instance-group"), flag(ab, "--instance-group-region")), ("odin-ws-lb", "us-central1"))
    eq("managed certificate", flag(one(cmds, "compute", "ssl-certificates", "create"), "--domains"), "md.example.com")
    px = one(cmds, "compute", "target-https-proxies", "create")
    eq("HTTPS proxy", (flag(px, "--url-map"), flag(px, "--ssl-certificates")), ("odin-ws-https", "odin-ws-cert"))
    fr = {c[4]: c for c in find(cmds, "compute", "forwarding-rules", "create")}
    eq("forwarding rules", {n: (flag(c, "--ports"), flag(c, "--target-https-proxy") or flag(c, "--target-http-proxy"),
                                flag(c, "--load-balancing-scheme")) for n, c in fr.items()},
       {"odin-ws-https": ("443", "odin-ws-https-proxy", "EXTERNAL_MANAGED"),
        "odin-ws-http": ("80", "odin-ws-http-proxy", "EXTERNAL_MANAGED")})
    imp = one(cmds, "compute", "url-maps", "import", name="odin-ws-http-redirect")
    src = Path(flag(imp, "--source"))
    check("redirect URL map file exists", src.is_file(), src)
    if src.is_file():
        import yaml
        doc = yaml.safe_load(src.read_text())
        eq("redirect URL map", (doc.get("name"), doc.get("defaultUrlRedirect", {}).get("httpsRedirect")),
           ("odin-ws-http-redirect", True))

    # Firewall.
    fw = {c[4]: c for c in find(cmds, "compute", "firewall-rules", "create")}
    g = fw.get("odin-ws-allow-google-lb-hc", [])
    eq("Google ranges rule", (sorted((flag(g, "--source-ranges") or "").split(",")), flag(g, "--rules"), flag(g, "--action")),
       (sorted(["35.191.0.0/16", "130.211.0.0/22"]), "tcp:3001,tcp:3002", "ALLOW"))
    s = fw.get("odin-ws-allow-lb-to-shards", [])
    eq("LB->shard rule", (flag(s, "--rules"), flag(s, "--source-service-accounts"), flag(s, "--target-service-accounts"),
                          flag(s, "--source-ranges")),
       ("tcp:3002-3005", f"odin-ws-lb@{PROJECT}.iam.gserviceaccount.com",
        f"odin-ws-shard@{PROJECT}.iam.gserviceaccount.com", None))
    eq("Prometheus rule", flag(fw.get("odin-ws-allow-prometheus", []), "--rules"), "tcp:9101,tcp:9102")


def resource_key(c):
    """(kind, name) of a created resource, or None for non-creating commands."""
    w = c[1:]
    if w[:2] == ["iam", "service-accounts"] and w[2] == "create":
        return ("service-account", f"{w[3]}@{PROJECT}.iam.gserviceaccount.com")
    if w[:1] == ["projects"] and w[1] == "add-iam-policy-binding":
        return ("binding", (flag(c, "--member"), flag(c, "--role")))
    if w[:3] == ["compute", "instance-groups", "managed"] and w[3] == "create":
        return ("mig", w[4])
    if w[0] == "compute" and w[2] in ("create", "import"):
        scope = "global" if "--global" in c else flag(c, "--region") or "-"
        if w[1] == "health-checks":
            return ("health-checks", w[4])
        return (w[1], w[3]) if w[1] not in ("addresses",) else (w[1], w[3], scope)
    return None


def deleted_keys(cmds):
    keys = set()
    for c in cmds:
        w = c[1:]
        names = lambda start: [a for a in w[start:] if not a.startswith("-") and a not in (
            flag(c, "--region"), flag(c, "--project"), flag(c, "--member"), flag(c, "--role"), flag(c, "--condition"))]
        if w[:2] == ["iam", "service-accounts"] and w[2] == "delete":
            keys.add(("service-account", w[3]))
        elif w[:1] == ["projects"] and w[1] == "remove-iam-policy-binding":
            keys.add(("binding", (flag(c, "--member"), flag(c, "--role"))))
        elif w[:3] == ["compute", "instance-groups", "managed"] and w[3] == "delete":
            keys.update(("mig", n) for n in names(4))
        elif w[0] == "compute" and w[2] == "delete":
            scope = "global" if "--global" in c else flag(c, "--region") or "-"
            for n in names(3):
                keys.add((w[1], n, scope) if w[1] == "addresses" else (w[1], n))
    return keys


def check_teardown(create, teardown):
    created = {k for k in map(resource_key, create) if k}
    deleted = deleted_keys(teardown)
    eq("teardown.sh deletes everything deploy.sh creates", sorted(map(str, created - deleted)), [])
    eq("teardown.sh deletes nothing deploy.sh does not create", sorted(map(str, deleted - created)), [])
    check("teardown only deletes", all(("delete" in c or "remove-iam-policy-binding" in c) for c in teardown))


def test_refusals():
    cases = [
        ("SHARD_COUNT=6", {"SHARD_COUNT": "6"}, "SHARD_COUNT must be 7..10"),
        ("SHARD_COUNT=11", {"SHARD_COUNT": "11"}, "SHARD_COUNT must be 7..10"),
        ("SHARDS_PER_VM=0", {"SHARDS_PER_VM": "0"}, "SHARDS_PER_VM must be 1..10"),
        ("min > max", {"LB_MIN_REPLICAS": "25"}, "LB_MIN_REPLICAS (25) <= LB_MAX_REPLICAS (20)"),
        ("target outside bounds", {"LB_TARGET_SIZE": "5"}, "LB_TARGET_SIZE (5) must lie within [10, 20]"),
        ("no PROJECT", {"PROJECT": None}, "PROJECT is not set"),
        ("wrong number of SHARD_IPS", {"SHARD_IPS": "10.0.0.1 10.0.0.2"}, "SHARD_IPS holds 2 addresses"),
    ]
    for name, env, msg in cases:
        p = dry_run("30-lb-tier.sh", **env)
        check(f"refused: {name}", p.returncode != 0 and msg in p.stderr and p.stdout == "",
              f"rc={p.returncode} stderr={p.stderr!r} stdout={p.stdout[:80]!r}")
    p = dry_run("40-global-lb.sh", DOMAIN="")
    check("refused: no DOMAIN", p.returncode != 0 and "DOMAIN is not set" in p.stderr)
    for name, env, msg in (
            ("SHARD_MIN_REPLICAS > SHARD_MAX_REPLICAS", {"SHARD_MIN_REPLICAS": "11"}, "SHARD_MIN_REPLICAS (11) <= SHARD_MAX_REPLICAS (10)"),
            ("more shards than ws-lb's pool", {"SHARD_MAX_REPLICAS": "40"}, "at most 128"),
            ("unknown membership", {"SHARD_MEMBERSHIP": "dns"}, "SHARD_MEMBERSHIP must be group or static")):
        p = dry_run("20-shard-tier.sh", **env)
        check(f"refused: {name}", p.returncode != 0 and msg in p.stderr and p.stdout == "",
              f"rc={p.returncode} stderr={p.stderr!r}")
    # Static membership (the one-machine topology): other sizes flow through, 10 VMs x 2 shards.
    p = dry_run("30-lb-tier.sh", SHARD_MEMBERSHIP="static", SHARD_COUNT="10", SHARDS_PER_VM="2")
    cmds = [shlex.split(x) for x in p.stdout.splitlines()]
    tpl = find(cmds, "compute", "instance-templates", "create")
    md = parse_metadata(flag(tpl[0], "--metadata")) if tpl else {}
    eq("10 x 2 backend URLs", md.get("odin-args", "").split("--backend-urls=")[-1].split(" ")[0],
       expected_backends([f"10.128.0.{10 + i}" for i in range(10)], (3002, 3003)))


def run_gcloud(argv, env):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return argv, p.returncode, p.stdout, p.stderr


def test_real_gcloud(cmds):
    gcloud = shutil.which("gcloud")
    check("gcloud is installed", gcloud is not None)
    if not gcloud:
        return
    cfg = tempfile.mkdtemp(prefix="odin-gcloud-")
    try:
        # Pre-answer "are we on GCE?" so that gcloud does not probe the
        # metadata server; disable prompts, update checks and reporting.
        Path(cfg, "gce").write_text("False")
        env = clean_env({"CLOUDSDK_CONFIG": cfg, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
                         "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
                         "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
                         "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"})
        unique = list(dict.fromkeys(tuple(c) for c in cmds))
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda c: run_gcloud([gcloud, *c[1:]], env), unique))
        for argv, rc, out, err in results:
            first = err.strip().splitlines()[0] if err.strip() else ""
            label = " ".join(argv[1:6])
            m = AUTH_ERROR.match(first)
            bad = [s for s in PARSE_ERRORS if s in err]
            ok = rc == 1 and m is not None and not bad
            if ok:
                path = m.group(1).split(".")[1:]
                ok = argv[1:1 + len(path)] == path
            check(f"gcloud {label} ...: parsed, stopped at credentials", ok,
                  f"rc={rc} stderr={err.strip()[:400]!r}")
        eq("commands executed", len(results), len(unique))
    finally:
        shutil.rmtree(cfg, ignore_errors=True)


def test_kafka_args():
    """With brokers, the shard arguments consume Kafka and warm the history on a restart."""
    env = clean_env({**BASE_ENV, "KAFKA_BROKERS": "kafka-0:9092,kafka-1:9092"})
    env = {k: v for k, v in env.items() if v is not None}
    p = subprocess.run(["bash", "-c", f"source {GCP}/config.sh && source {GCP}/lib.sh && load_config && "
                        'printf "%s" "$SHARD_ARGS"'], env=env, capture_output=True, text=True, timeout=60)
    eq("shard odin-args with Kafka", p.stdout,
       "--shards 4 --base-port 3002 --bind 0.0.0.0 --admin-addr 0.0.0.0:9102 --max-connections 6000 "
       "--drain-window 10s --grace 30s --log-json --kafka-brokers kafka-0:9092,kafka-1:9092 "
       "--kafka-topics trades,book --kafka-start back:1000")


def main():
    cmds = []
    for t in (test_dry_run, test_refusals, test_kafka_args):
        cmds = guarded(t) or cmds
    if "--no-exec" not in sys.argv:
        guarded(lambda: test_real_gcloud(cmds), "test_real_gcloud")
    return report("test_gcloud")


if __name__ == "__main__":
    sys.exit(main())
