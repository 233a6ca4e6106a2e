#!/usr/bin/env python3
"""Offline checks of deploy/terraform (no provider, no `terraform init`).

Parses every .tf file with python-hcl2 and asserts the facts the deployment
plan depends on, comparing exact values, so that changing any of them fails:
LB MIG target size 10, shard_count bounds 7..10, /health checks on the right
ports, backend-service timeouts, the Google health-check source ranges, the
autoscaler bounds and its CPU + connections signals, the shard wiring
(reserved INTERNAL addresses, stateful IPs, backend URL list), the HTTPS front
end, and that instance metadata matches what the startup scripts read.

Run: python3 deploy/tests/test_terraform.py   (exit 0 = all passed)
"""

import re
import sys
from pathlib import Path

import hcl2
from hcl2 import SerializationOptions

from checks import check, eq, run

DEPLOY = Path(__file__).resolve().parent.parent
TF_DIR = DEPLOY / "terraform"
OPTS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_tf():
    resources, variables, locals_, outputs = {}, {}, {}, {}
    files = sorted(TF_DIR.glob("*.tf"))
    if not files:
        raise SystemExit(f"no .tf files in {TF_DIR}")
    for f in files:
        doc = hcl2.loads(f.read_text(), serialization_options=OPTS)
        for block in doc.get("resource", []):
            for rtype, by_name in block.items():
                for rname, body in by_name.items():
                    key = (rtype, rname)
                    if key in resources:
                        raise SystemExit(f"duplicate resource {rtype}.{rname}")
                    resources[key] = body
        for block in doc.get("variable", []):
            variables.update(block)
        for block in doc.get("locals", []):
            for k, v in block.items():
                if k in locals_:
                    raise SystemExit(f"duplicate local {k}")
                locals_[k] = v
        for block in doc.get("output", []):
            outputs.update(block)
    return resources, variables, locals_, outputs


RES, VARS, LOCALS, OUTPUTS = load_tf()


def res(rtype, name):
    body = RES.get((rtype, name))
    check(f"resource {rtype}.{name} exists", body is not None)
    return body or {}


def block(body, name):
    """First instance of a nested block (hcl2 lists them)."""
    v = body.get(name)
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return v[0]
    return {}


REF = re.compile(r"\b(var|local)\.([A-Za-z0-9_]+)\b")
WHOLE = re.compile(r"^\$\{(.*)\}$", re.S)


def lookup(kind, name):
    if kind == "var":
        return VARS.get(name, {}).get("default")
    return LOCALS.get(name)


def resolve(v, depth=0):
    """Resolves var/local references and simple arithmetic; leaves anything
    else (function calls, resource attributes) as the expression string."""
    if depth > 20 or not isinstance(v, str):
        return v
    m = WHOLE.match(v)
    if m and "${" not in m.group(1):
        expr = m.group(1).strip()
        r = REF.fullmatch(expr)
        if r:
            return resolve(lookup(*r.groups()), depth + 1)
        t = re.fullmatch(r"tostring\((.+)\)", expr)
        if t:
            inner = resolve("${" + t.group(1) + "}", depth + 1)
            return str(inner) if isinstance(inner, (int, float)) else v
        sub = substitute(expr, depth)
        if re.fullmatch(r"[\d\s+\-*()]+", sub):
            return eval(sub)  # digits and + - * only
        return v
    # A template with ${...} parts: substitute the scalar ones.
    def part(mm):
        r = resolve("${" + mm.group(1) + "}", depth + 1)
        return str(r) if isinstance(r, (int, float, str)) and "${" not in str(r) else mm.group(0)
    return re.sub(r"\$\{([^${}]*)\}", part, v)


def substitute(expr, depth):
    def one(mm):
        r = resolve(lookup(mm.group(1), mm.group(2)), depth + 1)
        return str(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else mm.group(0)
    return REF.sub(one, expr)


def condition(var):
    vals = VARS.get(var, {}).get("validation", [])
    return [v.get("condition", "") for v in vals]


# ---------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------

def test_variables():
    eq("var.lb_target_size default", VARS.get("lb_target_size", {}).get("default"), 10)
    eq("shard group autoscaled 7..10 by default",
       (VARS.get("shard_min_replicas", {}).get("default"), VARS.get("shard_max_replicas", {}).get("default")), (7, 10))
    spv = condition("shards_per_vm")
    eq("shards_per_vm validation bounds",
       ([int(x) for c in spv for x in re.findall(r"var\.shards_per_vm\s*>=\s*(\d+)", c)],
        [int(x) for c in spv for x in re.findall(r"var\.shards_per_vm\s*<=\s*(\d+)", c)]),
       ([1], [10]))
    eq("var.lb_autoscaler_min default", VARS.get("lb_autoscaler_min", {}).get("default"), 10)
    eq("var.lb_autoscaler_max default", VARS.get("lb_autoscaler_max", {}).get("default"), 20)
    check("lb_autoscaler_min validated <= lb_autoscaler_max",
          any("var.lb_autoscaler_min <= var.lb_autoscaler_max" in c for c in condition("lb_autoscaler_min")),
          f"conditions: {condition('lb_autoscaler_min')}")
    check("lb_target_size validated within [min, max]",
          any("var.lb_target_size >= var.lb_autoscaler_min" in c and "var.lb_target_size <= var.lb_autoscaler_max" in c
              for c in condition("lb_target_size")),
          f"conditions: {condition('lb_target_size')}")
    for v in ("project", "region", "zones", "domain", "container_image", "boot_image",
              "lb_machine_type", "shard_machine_type", "shards_per_vm"):
        check(f"variable {v} declared", v in VARS)
    for v, body in VARS.items():
        check(f"variable {v} has a description", bool(body.get("description")))


def test_ports_and_locals():
    eq("local.lb_port", LOCALS.get("lb_port"), 3001)
    eq("local.lb_admin_port", LOCALS.get("lb_admin_port"), 9101)
    eq("local.shard_base_port", LOCALS.get("shard_base_port"), 3002)
    eq("local.shard_admin_port", LOCALS.get("shard_admin_port"), 9102)
    eq("local.shard_last_port (default 4 shards per VM)", resolve(LOCALS.get("shard_last_port")), 3005)
    eq("local.lb_connections_metric", LOCALS.get("lb_connections_metric"),
       "custom.googleapis.com/ws_lb_active_connections")
    eq("local.shard_ports", LOCALS.get("shard_ports"),
       "${[for i in range(var.shards_per_vm) : local.shard_base_port + i]}")
    eq("local.shard_members_file", LOCALS.get("shard_members_file"), "/var/lib/odin-ws/shards")
    eq("local.shard_connections_metric", LOCALS.get("shard_connections_metric"),
       "custom.googleapis.com/ws_shard_connections")
    lb_args = LOCALS.get("lb_args", "")
    for part in ('"--listen 0.0.0.0:${local.lb_port}"', '"--admin-addr 0.0.0.0:${local.lb_admin_port}"',
                 '"--backend-file ${local.shard_members_file}"', '"--trust-forwarded-for"',
                 '"--allowed-origins ${join(",", var.allowed_origins)}"'):
        check(f"lb_args has {part}", part in lb_args, lb_args)
    shard_args = LOCALS.get("shard_args", "")
    for part in ('"--shards ${var.shards_per_vm}"', '"--base-port ${local.shard_base_port}"',
                 '"--bind 0.0.0.0"', '"--admin-addr 0.0.0.0:${local.shard_admin_port}"',
                 '"--max-connections ${var.shard_max_connections}"', '"--grace 30s"'):
        check(f"shard_args has {part}", part in shard_args, shard_args)
    # A restarted shard VM warms its history from Kafka (clients reconnecting there recover).
    check("shard_args has --kafka-start ${var.kafka_start} with Kafka",
          '"--kafka-start ${var.kafka_start}"' in shard_args, shard_args)
    eq("var.kafka_start default", VARS.get("kafka_start", {}).get("default"), "back:1000")
    eq("local.lb_open_ports", resolve(LOCALS.get("lb_open_ports")), "3001,9101")
    eq("local.shard_open_ports", resolve(LOCALS.get("shard_open_ports")), "3002:3005,9102")


def test_health_checks():
    # The shard VMs' autohealing check is the shard's liveness (/live): its /health is 503
    # while it drains or warms its history, which must not get the VM recreated.
    want = {"lb_backend": (3001, "/health"), "lb_autoheal": (3001, "/health"), "shard": (3002, "/live")}
    for name, (port, path) in want.items():
        hc = block(res("google_compute_health_check", name), "http_health_check")
        eq(f"health check {name} request_path", hc.get("request_path"), path)
        eq(f"health check {name} port", resolve(hc.get("port")), port)
    # Both LB-tier checks are liveness checks of ws-lb, and say so.
    desc = resolve(LOCALS.get("lb_health_check_description"))
    check("lb_health_check_description says liveness, 503 only while draining",
          isinstance(desc, str) and "liveness" in desc and "503 only while draining" in desc, desc)
    for name in ("lb_backend", "lb_autoheal"):
        eq(f"health check {name} description", res("google_compute_health_check", name).get("description"),
           "${local.lb_health_check_description}")
    hcs = sorted(n for (t, n) in RES if t == "google_compute_health_check")
    eq("health checks defined", hcs, sorted(want))
    lb_mig = res("google_compute_region_instance_group_manager", "lb")
    eq("LB MIG autohealing check", block(lb_mig, "auto_healing_policies").get("health_check"),
       "${google_compute_health_check.lb_autoheal.id}")
    shard_mig = res("google_compute_region_instance_group_manager", "shard")
    eq("shard MIG autohealing check", block(shard_mig, "auto_healing_policies").get("health_check"),
       "${google_compute_health_check.shard.id}")
    be = res("google_compute_backend_service", "lb")
    eq("backend service health check", be.get("health_checks"), ["${google_compute_health_check.lb_backend.id}"])


def test_lb_tier():
    mig = res("google_compute_region_instance_group_manager", "lb")
    eq("LB MIG target_size expression", mig.get("target_size"), "${var.lb_target_size}")
    eq("LB MIG target_size value", resolve(mig.get("target_size")), 10)
    eq("LB MIG named port", (block(mig, "named_port").get("name"), resolve(block(mig, "named_port").get("port"))),
       ("ws", 3001))
    eq("LB MIG template", block(mig, "version").get("instance_template"),
       "${google_compute_instance_template.lb.self_link_unique}")
    eq("LB MIG zones", mig.get("distribution_policy_zones"), "${var.zones}")

    a = res("google_compute_region_autoscaler", "lb")
    eq("autoscaler target", a.get("target"), "${google_compute_region_instance_group_manager.lb.id}")
    pol = block(a, "autoscaling_policy")
    eq("autoscaler min_replicas", (pol.get("min_replicas"), resolve(pol.get("min_replicas"))),
       ("${var.lb_autoscaler_min}", 10))
    eq("autoscaler max_replicas", (pol.get("max_replicas"), resolve(pol.get("max_replicas"))),
       ("${var.lb_autoscaler_max}", 20))
    eq("autoscaler CPU signal", resolve(block(pol, "cpu_utilization").get("target")), 0.6)
    metrics = pol.get("metric", [])
    eq("autoscaler metric signals", len(metrics), 1)
    m = metrics[0] if metrics else {}
    eq("autoscaler metric name", resolve(m.get("name")), "custom.googleapis.com/ws_lb_active_connections")
    eq("autoscaler metric type", m.get("type"), "GAUGE")
    eq("autoscaler metric target", resolve(m.get("target")), 20000)


def test_global_lb():
    be = res("google_compute_backend_service", "lb")
    eq("backend service timeout_sec", be.get("timeout_sec"), 86400)
    check("backend service timeout_sec >= 3600", isinstance(be.get("timeout_sec"), int) and be["timeout_sec"] >= 3600)
    eq("backend service connection_draining_timeout_sec", be.get("connection_draining_timeout_sec"), 300)
    check("backend service draining > 0", isinstance(be.get("connection_draining_timeout_sec"), int)
          and be["connection_draining_timeout_sec"] > 0)
    eq("backend service protocol", be.get("protocol"), "HTTP")
    eq("backend service session_affinity", be.get("session_affinity"), "NONE")
    eq("backend service port_name", be.get("port_name"), "ws")
    eq("backend service scheme", be.get("load_balancing_scheme"), "EXTERNAL_MANAGED")
    eq("backend group", block(be, "backend").get("group"),
       "${google_compute_region_instance_group_manager.lb.instance_group}")
    eq("URL map default service", res("google_compute_url_map", "https").get("default_service"),
       "${google_compute_backend_service.lb.id}")
    cert = res("google_compute_managed_ssl_certificate", "lb")
    eq("managed certificate domains", block(cert, "managed").get("domains"), ["${var.domain}"])
    proxy = res("google_compute_target_https_proxy", "lb")
    eq("HTTPS proxy certificate", proxy.get("ssl_certificates"),
       ["${google_compute_managed_ssl_certificate.lb.id}"])
    eq("HTTPS proxy URL map", proxy.get("url_map"), "${google_compute_url_map.https.id}")
    fr = res("google_compute_global_forwarding_rule", "https")
    eq("HTTPS forwarding rule", (fr.get("port_range"), fr.get("target"), fr.get("load_balancing_scheme")),
       ("443", "${google_compute_target_https_proxy.lb.id}", "EXTERNAL_MANAGED"))
    redirect = block(res("google_compute_url_map", "http_redirect"), "default_url_redirect")
    eq("HTTP redirect", redirect.get("https_redirect"), True)
    eq("HTTP forwarding rule port", res("google_compute_global_forwarding_rule", "http_redirect").get("port_range"), "80")


def test_firewall():
    fw = res("google_compute_firewall", "google_lb_and_health_checks")
    ranges = resolve(fw.get("source_ranges"))
    eq("Google LB/health-check source ranges", sorted(ranges) if isinstance(ranges, list) else ranges,
       sorted(["35.191.0.0/16", "130.211.0.0/22"]))
    eq("Google LB/health-check ports", [resolve(p) for p in block(fw, "allow").get("ports", [])], ["3001", "3002"])
    eq("Google LB/health-check targets", fw.get("target_service_accounts"),
       ["${google_service_account.lb.email}", "${google_service_account.shard.email}"])
    check("Google LB/health-check rule opens nothing else", "source_tags" not in fw and "source_service_accounts" not in fw)
    s = res("google_compute_firewall", "lb_to_shards")
    eq("LB->shard source", s.get("source_service_accounts"), ["${google_service_account.lb.email}"])
    eq("LB->shard target", s.get("target_service_accounts"), ["${google_service_account.shard.email}"])
    check("LB->shard has no source_ranges", "source_ranges" not in s)
    eq("LB->shard ports", [resolve(p) for p in block(s, "allow").get("ports", [])], ["3002-3005"])
    open_to_world = [n for (t, n), b in RES.items() if t == "google_compute_firewall"
                     and "0.0.0.0/0" in str(b.get("source_ranges"))]
    eq("no firewall rule open to 0.0.0.0/0", open_to_world, [])


def test_shard_tier():
    check("no reserved shard addresses", ("google_compute_address", "shard") not in RES)
    check("no per-instance configs", ("google_compute_region_per_instance_config", "shard") not in RES)
    mig = res("google_compute_region_instance_group_manager", "shard")
    eq("shard MIG initial size", mig.get("target_size"), "${var.shard_min_replicas}")
    eq("shard MIG not stateful", block(mig, "stateful_internal_ip"), {})
    eq("shard MIG redistribution", block(mig, "update_policy").get("instance_redistribution_type"), "NONE")
    check("shard MIG size owned by the autoscaler", "target_size" in str(block(mig, "lifecycle").get("ignore_changes")))
    a = res("google_compute_region_autoscaler", "shard")
    eq("shard autoscaler target", a.get("target"), "${google_compute_region_instance_group_manager.shard.id}")
    pol = block(a, "autoscaling_policy")
    eq("shard autoscaler bounds", (pol.get("min_replicas"), pol.get("max_replicas")),
       ("${var.shard_min_replicas}", "${var.shard_max_replicas}"))
    eq("shard autoscaler cool-down", pol.get("cooldown_period"), 180)
    eq("shard autoscaler CPU", block(pol, "cpu_utilization").get("target"), "${var.shard_cpu_target}")
    eq("shard autoscaler connections signal", block(pol, "metric"),
       {"name": "${local.shard_connections_metric}", "target": "${local.shard_connections_target}", "type": "GAUGE"})
    sic = block(pol, "scale_in_control")
    eq("shard scale-in: one VM per 15 minutes", (block(sic, "max_scaled_in_replicas").get("fixed"),
                                                 sic.get("time_window_sec")), (1, 900))
    tpl = res("google_compute_instance_template", "shard")
    eq("shard VMs carry the group label LB VMs list", tpl.get("labels", {}).get("odin-ws-group"), "${local.shard_group}")
    lb_md = res("google_compute_instance_template", "lb")["metadata"]
    for k, v in (("odin-shard-group", "local.shard_group"),
                 ("odin-shard-ports", '"${local.shard_base_port}:${local.shard_last_port}"')):
        check(f"lb template {k} = {v}", f"{k} = {v}" in " ".join(lb_md.split()), lb_md)
    iam = res("google_project_iam_member", "lb_compute_viewer")
    eq("LB may list instances", (iam.get("role"), iam.get("member")),
       ("roles/compute.viewer", "serviceAccount:${google_service_account.lb.email}"))


METADATA_KEY = re.compile(r"([a-z][a-z0-9-]*)\s*=")
STARTUP_ATTR = re.compile(r"\battr\s+(odin-[a-z0-9-]+)")


def template_metadata_keys(name):
    md = res("google_compute_instance_template", name).get("metadata", "")
    m = re.fullmatch(r"\$\{merge\(local\.common_metadata, \{(.*)\}\)\}", md, re.S)
    check(f"{name} template metadata merges common_metadata", m is not None, md)
    keys = set(METADATA_KEY.findall(m.group(1))) if m else set()
    return keys | set(LOCALS.get("common_metadata", {}))


def test_metadata_matches_startup_scripts():
    for name, script in (("lb", "ws-lb-startup.sh"), ("shard", "ws-shard-startup.sh")):
        keys = template_metadata_keys(name)
        read = set(STARTUP_ATTR.findall((DEPLOY / "startup" / script).read_text()))
        eq(f"{name} template odin-* metadata == keys read by {script}",
           sorted(k for k in keys if k.startswith("odin-")), sorted(read))
        for k in ("startup-script", "shutdown-script"):
            check(f"{name} template sets {k}", k in keys)
        md = res("google_compute_instance_template", name)["metadata"]
        check(f"{name} template startup-script is {script}", f'/../startup/{script}' in md, md)
    lb_md = res("google_compute_instance_template", "lb")["metadata"]
    for k, v in (("odin-args", "local.lb_args"), ("odin-connections-metric", "local.lb_connections_metric")):
        check(f"lb template {k} = {v}", f"{k} = {v}" in lb_md, lb_md)
    check("shard template odin-args = local.shard_args",
          "odin-args = local.shard_args" in res("google_compute_instance_template", "shard")["metadata"])
    for name in ("lb", "shard"):
        t = res("google_compute_instance_template", name)
        check(f"{name} template has no external IP", "access_config" not in block(t, "network_interface"))
        eq(f"{name} template service account", block(t, "service_account").get("email"),
           f"${{google_service_account.{name}.email}}")


def test_outputs_and_example():
    for o in ("lb_ip", "shard_group", "lb_args"):
        check(f"output {o}", o in OUTPUTS)
    example = hcl2.loads((TF_DIR / "terraform.tfvars.example").read_text(), serialization_options=OPTS)
    unknown = sorted(k for k in example if k not in VARS)
    eq("tfvars.example sets only declared variables", unknown, [])
    required = sorted(k for k, v in VARS.items() if "default" not in v)
    missing = sorted(k for k in required if k not in example)
    eq("tfvars.example sets every required variable", missing, [])
    eq("tfvars.example lb_target_size", example.get("lb_target_size"), 10)
    eq("tfvars.example shard group bounds", (example.get("shard_min_replicas"), example.get("shard_max_replicas")), (7, 10))
    readme = (TF_DIR / "README.md").read_text()
    for step in ("terraform init", "terraform plan", "terraform apply"):
        check(f"README mentions {step}", step in readme)


def main():
    return run("test_terraform", (test_variables, test_ports_and_locals, test_health_checks, test_lb_tier,
                                  test_global_lb, test_firewall, test_shard_tier,
                                  test_metadata_matches_startup_scripts, test_outputs_and_example))


if __name__ == "__main__":
    sys.exit(main())
