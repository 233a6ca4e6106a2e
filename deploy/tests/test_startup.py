#!/usr/bin/env python3
"""Runs deploy/startup/*.sh against stubs, in a scratch root, and checks what
they would do on a VM: kernel settings, env file, host firewall, the exact
`docker run` command line (Container-Optimized OS), the release install and
systemd calls (Debian), the connections-metric publisher, the shutdown script,
and failures on bad metadata.

PATH holds only stubs (curl, docker, docker-credential-gcr, sysctl, iptables,
systemctl, systemd-run, gcloud) and links to harmless coreutils, so an
unexpected command fails the test instead of touching this machine.

Run: python3 deploy/tests/test_startup.py   (exit 0 = all passed)
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from checks import check, eq, run

DEPLOY = Path(__file__).resolve().parent.parent
STARTUP = DEPLOY / "startup"
SYSTEMD = DEPLOY / "systemd"
IMAGE = "us-central1-docker.pkg.dev/odin-ws-placeholder/odin/odin-ws:0.1.0"
LB_ARGS = ("--listen 0.0.0.0:3001 --admin-addr 0.0.0.0:9101 "
           "--backend-urls=ws://10.128.0.10:3002/ws,ws://10.128.0.10:3003/ws,ws://10.128.0.11:3002/ws "
           "--allowed-origins https://app.example.com --trust-forwarded-for")
SHARD_ARGS = ("--shards 4 --base-port 3002 --bind 0.0.0.0 --admin-addr 0.0.0.0:9102 "
              "--max-connections 6000 --drain-window 10s --grace 30s --log-json")
LB_ENV = "CIRCUIT_BREAKER_FAILURE_THRESHOLD=10 CIRCUIT_BREAKER_TIMEOUT=30s CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS=5"
METADATA_URL = "http://metadata.test/computeMetadata/v1"
TOOLS = ["bash", "sed", "tr", "head", "mkdir", "cat", "mv", "rm", "mktemp", "tar", "gzip", "install",
         "awk", "date", "dirname", "sleep", "chmod", "cp", "ls", "printf", "env", "true", "false",
         "grep", "sort", "seq"]

STUB = r'''#!PYTHON
import json, os, shutil, sys
name = os.path.basename(sys.argv[0]); args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([name] + args) + "\n")
md = os.environ["STUB_METADATA_DIR"]; md_url = os.environ["STUB_METADATA_URL"]
if name == "curl":
    url = [a for a in args if "://" in a][-1]
    out = args[args.index("-o") + 1] if "-o" in args else None
    if url.startswith(md_url + "/"):
        path = os.path.join(md, url[len(md_url) + 1:])
        if not os.path.isfile(path):
            sys.exit(22)
        data = open(path, "rb").read()
    elif url in os.environ.get("STUB_URLS", "").split():
        data = open(os.path.join(os.environ["STUB_FILES"], url.rsplit("/", 1)[-1]), "rb").read()
    elif url.startswith("https://monitoring.test/"):
        data = b"{}"
    elif url.startswith("https://compute.test/"):
        path = os.path.join(os.environ["STUB_FILES"], "compute.json")
        if not os.path.isfile(path):
            sys.exit(22)
        data = open(path, "rb").read()
    else:
        sys.exit(7)  # unknown host
    if out:
        open(out, "wb").write(data)
    else:
        sys.stdout.buffer.write(data)
elif name == "iptables" and "-C" in args:
    sys.exit(1)  # rule not there yet
elif name == "docker" and args[:1] == ["inspect"]:
    sys.exit(0 if args[-1] in os.environ.get("STUB_CONTAINERS", "").split() else 1)
elif name == "systemctl" and args[:2] == ["is-active", "--quiet"]:
    sys.exit(0 if args[2] in os.environ.get("STUB_ACTIVE", "").split() else 3)
elif name == "gcloud" and args[:2] == ["storage", "cp"]:
    shutil.copy(os.path.join(os.environ["STUB_FILES"], args[2].rsplit("/", 1)[-1]), args[3])
'''


class Sandbox:
    def __init__(self, os_id, metadata, urls=()):
        self.tmp = Path(tempfile.mkdtemp(prefix="odin-startup-"))
        self.root = self.tmp / "root"
        self.root.mkdir()
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        for tool in TOOLS:
            real = shutil.which(tool)
            if real:
                (self.bin / tool).symlink_to(real)
        stub = STUB.replace("PYTHON", sys.executable)
        for name in ("curl", "docker", "docker-credential-gcr", "sysctl", "iptables",
                     "systemctl", "systemd-run", "gcloud"):
            p = self.bin / name
            p.write_text(stub)
            p.chmod(0o755)
        self.md = self.tmp / "metadata"
        (self.md / "instance" / "attributes").mkdir(parents=True)
        (self.md / "project").mkdir()
        for k, v in metadata.items():
            path = self.md / k if "/" in k else self.md / "instance" / "attributes" / k
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(v)
        self.files = self.tmp / "files"
        self.files.mkdir()
        self.os_release = self.tmp / "os-release"
        self.os_release.write_text(f'NAME="test"\nID={os_id}\nVERSION_ID="1"\n')
        self.log = self.tmp / "calls.jsonl"
        self.urls = list(urls)

    def run(self, script, *args, extra_env=None):
        env = {
            "PATH": str(self.bin), "HOME": str(self.tmp), "LANG": "C.UTF-8",
            "ODIN_ROOT": str(self.root), "ODIN_OS_RELEASE": str(self.os_release),
            "ODIN_METADATA_URL": METADATA_URL,
            "STUB_LOG": str(self.log), "STUB_METADATA_DIR": str(self.md), "STUB_METADATA_URL": METADATA_URL,
            "STUB_FILES": str(self.files), "STUB_URLS": " ".join(self.urls),
        }
        env.update(extra_env or {})
        p = subprocess.run([str(self.bin / "bash"), str(STARTUP / script), *args], env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        return p

    def calls(self, name=None):
        if not self.log.exists():
            return []
        out = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c[1:] for c in out if name is None or c[0] == name]

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def lb_metadata():
    return {"odin-args": LB_ARGS, "odin-env": LB_ENV, "odin-open-ports": "3001,9101",
            "odin-container-image": IMAGE, "odin-release-url": "",
            "odin-connections-metric": "custom.googleapis.com/ws_lb_active_connections"}


def shard_metadata(**extra):
    md = {"odin-args": SHARD_ARGS, "odin-env": "", "odin-open-ports": "3002:3005,9102",
          "odin-container-image": IMAGE}
    md.update(extra)
    return md


def expected_docker_run(role, args, env_file):
    return ["run", "--detach", "--name", role, "--restart", "on-failure",
            "--network", "host", "--ulimit", "nofile=1048576:1048576",
            "--stop-signal", "SIGTERM", "--stop-timeout", "45",
            "--log-opt", "max-size=100m", "--log-opt", "max-file=5",
            "--env-file", env_file, "--volume", "/var/lib/odin-ws:/var/lib/odin-ws:ro",
            IMAGE, f"/usr/local/bin/{role}", *args.split()]


def test_common_block_identical():
    def common(text):
        start = text.index("# ==== BEGIN COMMON")
        end = text.index("# ==== END COMMON ====")
        return text[start:end]
    a = common((STARTUP / "ws-lb-startup.sh").read_text())
    b = common((STARTUP / "ws-shard-startup.sh").read_text())
    check("common block of ws-lb-startup.sh and ws-shard-startup.sh identical", a == b)


def test_backlog_agrees_with_somaxconn():
    """The application's listen backlog (both binaries' default, docs/runbook.md and the
    Rust defaults) is the net.core.somaxconn the startup scripts set: neither caps the
    other below what the VM is tuned for."""
    import re
    repo = DEPLOY.parent
    for script in ("ws-lb-startup.sh", "ws-shard-startup.sh"):
        m = re.search(r"^net\.core\.somaxconn = (\d+)$", (STARTUP / script).read_text(), re.M)
        check(f"{script} sets net.core.somaxconn", m is not None)
        somaxconn = int(m.group(1)) if m else None
        runbook = re.findall(r"^\| `backlog` \| (\d+) \|", (repo / "docs/runbook.md").read_text(), re.M)
        eq(f"runbook backlog defaults (ws-shard, ws-lb) = {script} somaxconn", [int(v) for v in runbook],
           [somaxconn, somaxconn])
        # The one definition (net-core's ListenOptions::default); both binaries' `backlog`
        # setting takes its default from it, and their runbook tests compare that with the
        # runbook rows read above.
        src = "crates/net-core/src/listener.rs"
        d = re.findall(r"^\s*backlog: (\d+),$", (repo / src).read_text(), re.M)
        eq(f"{src} default backlog = {script} somaxconn", [int(v) for v in d], [somaxconn])
        for src in ("crates/ws-lb/src/config.rs", "crates/ws-shard/src/config.rs"):
            check(f"{src}: backlog defaults to ListenOptions::default()",
                  "default_value_t = ListenOptions::default().backlog" in (repo / src).read_text())


def test_cos_lb():
    sb = Sandbox("cos", lb_metadata())
    try:
        p = sb.run("ws-lb-startup.sh")
        eq("cos lb: exit code", p.returncode, 0)
        if p.returncode:
            print(p.stderr, file=sys.stderr)
        sysctl = sb.root / "etc/sysctl.d/99-odin-ws.conf"
        text = sysctl.read_text() if sysctl.exists() else ""
        for line in ("net.core.somaxconn = 65535", "net.ipv4.ip_local_port_range = 10240 65535",
                     "net.ipv4.tcp_tw_reuse = 1", "fs.file-max = 4194304", "fs.nr_open = 2097152"):
            check(f"sysctl file has '{line}'", line in text.splitlines(), text)
        eq("sysctl loaded", sb.calls("sysctl"), [["-q", "-p", str(sysctl)]])
        env_file = sb.root / "etc/odin-ws/ws-lb.env"
        env_lines = env_file.read_text().splitlines() if env_file.exists() else []
        eq("ws-lb.env", [line for line in env_lines if not line.startswith("#")],
           [f"ODIN_ARGS={LB_ARGS}"] + LB_ENV.split())
        eq("host firewall", [c for c in sb.calls("iptables") if "-A" in c],
           [["-w", "-A", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "3001,9101", "-j", "ACCEPT"]])
        eq("registry login", sb.calls("docker-credential-gcr"),
           [["configure-docker", "--registries=us-central1-docker.pkg.dev"]])
        docker = sb.calls("docker")
        eq("docker pull", docker[0] if docker else None, ["pull", IMAGE])
        eq("docker run", [c for c in docker if c[0] == "run"], [expected_docker_run("ws-lb", LB_ARGS, str(env_file))])
        runs = sb.calls("systemd-run")
        eq("connections-metric publisher unit", runs,
           [["--unit=odin-ws-connections-metric",
             "--description=odin-ws: publish custom.googleapis.com/ws_lb_active_connections",
             "--property=Restart=always", "--property=RestartSec=10", "/bin/bash",
             "/var/lib/odin-ws/ws-lb-startup.sh", "publish-connections-metric",
             "custom.googleapis.com/ws_lb_active_connections"]])
        copy = sb.root / "var/lib/odin-ws/ws-lb-startup.sh"
        check("publisher script copied", copy.exists() and copy.read_text() == (STARTUP / "ws-lb-startup.sh").read_text())
        check("no release install on COS", not (sb.root / "usr/local/bin/ws-lb").exists())
    finally:
        sb.close()


def test_cos_shard():
    sb = Sandbox("cos", shard_metadata())
    try:
        p = sb.run("ws-shard-startup.sh")
        eq("cos shard: exit code", p.returncode, 0)
        env_file = sb.root / "etc/odin-ws/ws-shard.env"
        eq("docker run", [c for c in sb.calls("docker") if c[0] == "run"],
           [expected_docker_run("ws-shard", SHARD_ARGS, str(env_file))])
        eq("host firewall", [c for c in sb.calls("iptables") if "-A" in c],
           [["-w", "-A", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "3002:3005,9102", "-j", "ACCEPT"]])
        eq("no publisher on shards", sb.calls("systemd-run"), [])
        eq("ws-shard.env", [line for line in env_file.read_text().splitlines() if not line.startswith("#")],
           [f"ODIN_ARGS={SHARD_ARGS}"])
    finally:
        sb.close()


def make_release(sb, name):
    stage = sb.tmp / "stage"
    (stage / "bin").mkdir(parents=True)
    (stage / "systemd").mkdir()
    for b in ("ws-lb", "ws-shard"):
        (stage / "bin" / b).write_text("#!/bin/sh\n")
        shutil.copy(SYSTEMD / f"{b}.service", stage / "systemd" / f"{b}.service")
    with tarfile.open(sb.files / name, "w:gz") as tar:
        tar.add(stage / "bin", arcname="bin")
        tar.add(stage / "systemd", arcname="systemd")


def test_debian_shard(url):
    sb = Sandbox("debian", shard_metadata(**{"odin-release-url": url}), urls=[url])
    try:
        make_release(sb, "odin-ws-release.tar.gz")
        p = sb.run("ws-shard-startup.sh")
        eq(f"debian shard ({url.split(':')[0]}): exit code", p.returncode, 0)
        if p.returncode:
            print(p.stderr, file=sys.stderr)
        binary = sb.root / "usr/local/bin/ws-shard"
        check("binary installed executable", binary.exists() and os.access(binary, os.X_OK))
        unit = sb.root / "etc/systemd/system/ws-shard.service"
        check("unit installed", unit.exists() and unit.read_text() == (SYSTEMD / "ws-shard.service").read_text())
        eq("systemctl calls", sb.calls("systemctl"),
           [["daemon-reload"], ["enable", "ws-shard.service"], ["restart", "ws-shard.service"]])
        eq("no docker on Debian", sb.calls("docker"), [])
        check("env file read by the unit exists",
              (sb.root / "etc/odin-ws/ws-shard.env").exists()
              and "EnvironmentFile=/etc/odin-ws/ws-shard.env" in (SYSTEMD / "ws-shard.service").read_text())
        if url.startswith("gs://"):
            eq("gcloud storage cp", [c[:3] for c in sb.calls("gcloud")], [["storage", "cp", url]])
    finally:
        sb.close()


def test_failures():
    cases = [
        ("no odin-args", "cos", {k: v for k, v in shard_metadata().items() if k != "odin-args"},
         "metadata odin-args is not set"),
        ("unsupported OS", "fedora", shard_metadata(), "unsupported OS 'fedora'"),
        ("bad odin-env", "cos", shard_metadata(**{"odin-env": "A=1 FOO=\"bar\""}), "bad odin-env entry"),
        ("no image on COS", "cos", {k: v for k, v in shard_metadata().items() if k != "odin-container-image"},
         "metadata odin-container-image is not set"),
        ("no release on Debian", "debian", shard_metadata(), "metadata odin-release-url is not set"),
    ]
    for name, os_id, md, message in cases:
        sb = Sandbox(os_id, md)
        try:
            p = sb.run("ws-shard-startup.sh")
            check(f"fails: {name}", p.returncode != 0 and message in p.stderr, f"rc={p.returncode} {p.stderr!r}")
            eq(f"fails: {name}: nothing started", [c for c in sb.calls("docker") if c[0] == "run"]
               + [c for c in sb.calls("systemctl") if c[0] in ("enable", "restart")], [])
        finally:
            sb.close()


def test_publisher():
    md = {"project/project-id": "odin-ws-placeholder", "instance/id": "1234567890",
          "instance/zone": "projects/987/zones/us-central1-b",
          "instance/service-accounts/default/token": '{"access_token":"tok-123","expires_in":3599,"token_type":"Bearer"}'}
    sb = Sandbox("cos", md, urls=["http://admin.test/metrics"])
    try:
        (sb.files / "metrics").write_text(
            "# TYPE ws_lb_active_connections gauge\nws_lb_active_connections 1234\n"
            "ws_lb_active_connections_other 9\n")
        p = sb.run("ws-lb-startup.sh", "publish-connections-metric", "custom.googleapis.com/ws_lb_active_connections",
                   extra_env={"ODIN_PUBLISH_ONCE": "1", "ODIN_ADMIN_METRICS_URL": "http://admin.test/metrics",
                              "ODIN_MONITORING_URL": "https://monitoring.test/v3"})
        eq("publisher exit code", p.returncode, 0)
        posts = [c for c in sb.calls("curl") if "POST" in c]
        eq("one timeSeries write", len(posts), 1)
        if posts:
            c = posts[0]
            eq("write URL", c[-1], "https://monitoring.test/v3/projects/odin-ws-placeholder/timeSeries")
            check("bearer token", "Authorization: Bearer tok-123" in c, c)
            body = json.loads(c[c.index("--data") + 1])
            ts = body["timeSeries"][0]
            eq("metric type", ts["metric"], {"type": "custom.googleapis.com/ws_lb_active_connections"})
            eq("resource", ts["resource"], {"type": "gce_instance", "labels": {
                "project_id": "odin-ws-placeholder", "instance_id": "1234567890", "zone": "us-central1-b"}})
            eq("value", ts["points"][0]["value"], {"doubleValue": 1234})
            check("end time", ts["points"][0]["interval"]["endTime"].endswith("Z"))
    finally:
        sb.close()


COMPUTE_REPLY = json.dumps({"items": {
    "zones/us-central1-a": {"instances": [{"networkInterfaces": [{"networkIP": "10.128.0.21"}]},
                                          {"networkInterfaces": [{"networkIP": "10.128.0.20"}]}]},
    "zones/us-central1-b": {"instances": [{"networkInterfaces": [{"networkIP": "10.128.0.22"}]}]},
    "zones/us-central1-c": {"warning": {"code": "NO_RESULTS_ON_PAGE"}}}}, indent=1)


def group_metadata():
    md = lb_metadata()
    md.update({"odin-shard-group": "odin-ws-shard", "odin-shard-ports": "3002:3003",
               "project/project-id": "odin-ws-placeholder",
               "instance/service-accounts/default/token": '{"access_token":"tok-123","expires_in":3599}'})
    return md


def test_shard_members():
    env = {"ODIN_COMPUTE_URL": "https://compute.test/compute/v1", "ODIN_MEMBERS_ONCE": "1"}
    sb = Sandbox("cos", group_metadata())
    try:
        members = sb.root / "var/lib/odin-ws/shards"
        # No reply (API error): nothing written, startup gives up only after its retries,
        # so run the updater alone here.
        p = sb.run("ws-lb-startup.sh", "update-shard-members", "odin-ws-shard", "3002:3003", extra_env=env)
        eq("updater exit code on a failed listing", p.returncode, 0)
        check("failed listing writes no file", not members.exists())
        (sb.files / "compute.json").write_text(COMPUTE_REPLY)
        p = sb.run("ws-lb-startup.sh", extra_env=env)
        eq("cos lb with a shard group: exit code", p.returncode, 0)
        if p.returncode:
            print(p.stderr, file=sys.stderr)
        text = members.read_text() if members.exists() else ""
        eq("member file: every running VM x every port, sorted",
           [line for line in text.splitlines() if not line.startswith("#")],
           [f"ws://10.128.0.{ip}:{port}/ws" for ip in (20, 21, 22) for port in (3002, 3003)])
        listing = [c for c in sb.calls("curl") if any("compute.test" in a for a in c)]
        check("lists by group label and RUNNING",
              any('filter=(labels.odin-ws-group = "odin-ws-shard") AND (status = "RUNNING")' in c for c in listing), listing)
        check("with the VM's token", all("Authorization: Bearer tok-123" in c for c in listing), listing)
        eq("listing URL", listing[0][-1] if listing else None,
           "https://compute.test/compute/v1/projects/odin-ws-placeholder/aggregated/instances")
        runs = sb.calls("systemd-run")
        check("members updater unit started before ws-lb", any("--unit=odin-shard-members" in r for r in runs), runs)
        calls = [json.loads(line) for line in sb.log.read_text().splitlines()]
        first_list = next(i for i, c in enumerate(calls) if any("compute.test" in a for a in c))
        first_run = next((i for i, c in enumerate(calls) if c[:2] == ["docker", "run"]), -1)
        check("first list written before ws-lb starts", 0 <= first_list < first_run, (first_list, first_run))
        check("the container sees the member file", any("/var/lib/odin-ws:/var/lib/odin-ws:ro" in c
                                                         for c in sb.calls("docker") if c[0] == "run"))
        # A later listing that finds nothing keeps the last good file.
        (sb.files / "compute.json").write_text(json.dumps({"items": {}}))
        p = sb.run("ws-lb-startup.sh", "update-shard-members", "odin-ws-shard", "3002:3003", extra_env=env)
        eq("updater exit code on an empty listing", p.returncode, 0)
        eq("empty listing keeps the file", members.read_text() if members.exists() else "", text)
    finally:
        sb.close()


def test_shard_publisher():
    md = {"project/project-id": "odin-ws-placeholder", "instance/id": "1234567890",
          "instance/zone": "projects/987/zones/us-central1-b",
          "instance/service-accounts/default/token": '{"access_token":"tok-123","expires_in":3599,"token_type":"Bearer"}'}
    sb = Sandbox("cos", md, urls=["http://admin.test/metrics"])
    try:
        (sb.files / "metrics").write_text(
            "# TYPE ws_shard_connections gauge\nws_shard_connections{shard_id=\"0\"} 1200\n"
            "ws_shard_connections{shard_id=\"1\"} 34\nws_shard_connections_accepted_total{shard_id=\"0\"} 9\n")
        p = sb.run("ws-shard-startup.sh", "publish-connections-metric", "custom.googleapis.com/ws_shard_connections",
                   extra_env={"ODIN_PUBLISH_ONCE": "1", "ODIN_ADMIN_METRICS_URL": "http://admin.test/metrics",
                              "ODIN_MONITORING_URL": "https://monitoring.test/v3"})
        eq("shard publisher exit code", p.returncode, 0)
        posts = [c for c in sb.calls("curl") if "POST" in c]
        eq("one timeSeries write", len(posts), 1)
        if posts:
            body = json.loads(posts[0][posts[0].index("--data") + 1])
            ts = body["timeSeries"][0]
            eq("shard metric type", ts["metric"], {"type": "custom.googleapis.com/ws_shard_connections"})
            eq("sum over the VM's shards", ts["points"][0]["value"], {"doubleValue": 1234})
    finally:
        sb.close()


def test_shutdown():
    sb = Sandbox("cos", {})
    try:
        p = sb.run("odin-ws-shutdown.sh", extra_env={"STUB_CONTAINERS": "ws-lb"})
        eq("shutdown exit code", p.returncode, 0)
        eq("shutdown stops the container with 45 s", [c for c in sb.calls("docker") if c[0] == "stop"],
           [["stop", "--time", "45", "ws-lb"]])
    finally:
        sb.close()
    sb = Sandbox("debian", {})
    try:
        p = sb.run("odin-ws-shutdown.sh", extra_env={"STUB_ACTIVE": "ws-shard.service"})
        eq("shutdown (systemd) exit code", p.returncode, 0)
        eq("shutdown stops the unit", [c for c in sb.calls("systemctl") if c[0] == "stop"],
           [["stop", "odin-ws-connections-metric.service", "odin-shard-members.service"],
            ["stop", "ws-shard.service"]])
    finally:
        sb.close()


def main():
    tests = [test_common_block_identical, test_backlog_agrees_with_somaxconn, test_cos_lb, test_cos_shard,
             lambda: test_debian_shard("https://releases.test/odin-ws-release.tar.gz"),
             lambda: test_debian_shard("gs://odin-releases/odin-ws-release.tar.gz"),
             test_failures, test_publisher, test_shard_members, test_shard_publisher, test_shutdown]
    return run("test_startup", tests)


if __name__ == "__main__":
    sys.exit(main())
