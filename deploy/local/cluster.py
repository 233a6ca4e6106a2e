#!/usr/bin/env python3
"""The production topology on one machine (docs/topology.md).

One network namespace per VM on a bridge: N ws-lb VMs (default 10, the LB instance
group's size), M ws-shard VMs (default 7), a Kafka VM (tansu), a front VM running the
stand-in for the GCP global external Application Load Balancer (HAProxy, TLS on 443, from
the Terraform values) and a clients VM for the load generators. Every process gets the
arguments and environment the deploy artefacts give it (deploy/gcp/lib.sh, the startup
scripts' kernel settings, the systemd units' environment). An autohealer stands in for the
LB instance group's. The LB VMs follow the shard group as on GCP: each runs the startup
script's member-file updater against a stand-in Compute API (members.py), and shard VMs can
be added and removed while it runs (`create_shard_vm`, `remove_shard_vm`: the group scaling
out and in, scale-in through the shutdown script's SIGTERM).

    cluster.py up [--lbs N --shards M --delay-ms D]   start, print the client URL, wait for Ctrl-C
    cluster.py test [scenario ...]                     short version of every scenario (make cluster-test)
    cluster.py bench [scenario ...]                    full sizes (make cluster-bench)
    cluster.py down                                    remove what a crashed run left behind

Scenarios (deploy/local/scenarios/*.py, each also runnable on its own): ramp, client-ip,
kill-lb, kill-shard, shard-outage, rolling, kafka-restart, partition, and scale (bench
only, or when named). Each prints PASS/FAIL and writes
bench/results/cluster-<scenario>-<time>.json.
"""

import argparse
import fcntl
import json
import os
import signal
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import deploy_values  # noqa: E402
import members as gce  # noqa: E402
import topo  # noqa: E402
import bench  # noqa: E402  (machine() and commit_of(): what every result records)
from front import Autohealer, Front  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
LOCK = Path("/run/odin-ws-cluster.lock")

FRONT_IP = "10.213.0.10"
KAFKA_IP = "10.213.0.20"
KAFKA_PORT = 9092
# The stand-in metadata server and Compute API (members.py), on the host's bridge address.
COMPUTE_PORT = 8089
KAFKA_S3_PORT = 9000        # the Kafka VM's "disk" for s3 storage, on the VM's loopback only
KAFKA_S3_BUCKET = "tansu"
# Addresses the harness itself uses as distinct clients (beside the bridge's 10.213.0.1).
HOST_CLIENT_IPS = [f"10.213.0.{200 + i}" for i in range(1, 9)]


def lb_ip(i):
    return f"10.213.1.{10 + i}"


def shard_ip(j):
    return f"10.213.2.{10 + j}"


def client_ips(n):
    return [f"10.213.100.{1 + i}" for i in range(n)]


def get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def get_any(url, timeout=2.0):
    """(status, body) also for error statuses; (None, error) when nothing answered."""
    try:
        return get(url, timeout)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def wait(cond, timeout, what, interval=0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception as e:  # a probe that cannot answer yet is "not yet"
            last = e
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))


def metric(page, name, *labels):
    total, found = 0.0, False
    for line in page.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ") and all(l in line for l in labels):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


class Proc:
    """One VM's process: started with `ip netns exec`, logs in the run directory."""

    def __init__(self, name, ns, argv, env, log_path):
        self.name, self.ns, self.argv, self.env, self.log_path = name, ns, argv, env, log_path
        self.p = None
        self.starts = 0
        self.started_at = None

    def start(self):
        log = open(self.log_path, "a")
        log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n")
        log.flush()
        self.p = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.argv], env=self.env,
                                  stdout=log, stderr=log, start_new_session=True)
        self.starts += 1
        self.started_at = time.time()

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            self.p.send_signal(sig)

    def wait(self, timeout):
        if self.p is None:
            return None
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.alive():
            # The whole session: ws-shard's Kafka consumer child goes with it.
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.p is not None:
            self.p.wait()


class MetricsWatcher(threading.Thread):
    """Scrapes every ws-lb and ws-shard admin page every `interval` seconds and keeps the
    runtime metrics (and a few gauges) per VM."""

    NAMES = ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
             "process_threads", "process_start_time_seconds", "tokio_alive_tasks", "tokio_global_queue_depth",
             "tokio_worker_busy_seconds_total", "ws_lb_active_connections", "ws_lb_shards_available",
             "ws_shard_connections"]

    def __init__(self, cluster, interval=5.0):
        super().__init__(daemon=True, name="metrics-watcher")
        self.cluster, self.interval = cluster, interval
        self.samples = []          # (t, vm, {name: value})
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def scrape(self):
        now = time.time()
        for vm, url in self.cluster.admin_urls():
            status, page = get_any(url, timeout=2)
            if status != 200:
                continue
            values = {n: metric(page, n) for n in self.NAMES}
            with self.lock:
                self.samples.append((now, vm, values))

    def run(self):
        while not self.stop_event.is_set():
            self.scrape()
            self.stop_event.wait(self.interval)

    def summary(self, since=0.0, until=None):
        """Per tier: the highest RSS, descriptors, threads and tasks any VM had, and CPU
        seconds used, between `since` and `until`."""
        until = until or time.time()
        with self.lock:
            rows = [(t, vm, v) for t, vm, v in self.samples if since <= t <= until]
        out = {}
        for tier in ("lb", "shard"):
            tr = [(t, vm, v) for t, vm, v in rows if vm.startswith(tier + "-")]
            if not tr:
                continue

            def top(name):
                vals = [v[name] for _, _, v in tr if v.get(name) is not None]
                return max(vals) if vals else None
            cpu = {}
            for t, vm, v in tr:
                if v.get("process_cpu_seconds_total") is not None:
                    lo, hi = cpu.get(vm, (None, None))
                    c = v["process_cpu_seconds_total"]
                    cpu[vm] = (c if lo is None else min(lo, c), c if hi is None else max(hi, c))
            out[tier] = {
                "samples": len(tr),
                "max_rss_mib": round((top("process_resident_memory_bytes") or 0) / 2**20, 1),
                "max_open_fds": top("process_open_fds"), "max_fds_limit": top("process_max_fds"),
                "max_threads": top("process_threads"), "max_tokio_alive_tasks": top("tokio_alive_tasks"),
                "max_tokio_global_queue": top("tokio_global_queue_depth"),
                "cpu_seconds": round(sum(hi - lo for lo, hi in cpu.values()), 2),
            }
        return out

    def latest(self):
        with self.lock:
            out = {}
            for t, vm, v in self.samples:
                out[vm] = (t, v)
        return out


class Cluster:
    def __init__(self, a, log=print):
        self.a = a
        self.log = log
        self.bin = Path(a.bin_dir).resolve()
        self.lb_flags = shlex.split(getattr(a, "lb_flags", "") or "")
        self.run_dir = Path(a.run_dir)
        self.values = deploy_values.front_values()
        shard_ips = [shard_ip(j) for j in range(a.shards)]
        self.pv = deploy_values.process_values(shard_ips, f"{KAFKA_IP}:{KAFKA_PORT}")
        self.sysctls = deploy_values.startup_sysctls()
        self.net = topo.Network(a.delay_ms, a.delay_mode, self.bin / "delayline", str(self.run_dir), a.delay_line_priority)
        self.procs = {}
        self.members = []           # LB VMs in the instance group, in order
        self.shard_vms = []         # shard VMs in the shard group (indices j), in order
        self.compute = None
        self.lb_slots = [f"lb-{i}" for i in range(a.lbs + self.values.max_surge)]
        self.front = None
        self.autohealer = None
        self.watcher = None
        self.producer = None
        self.lock_fd = None
        self.locked = False         # this run holds the machine-wide lock
        self.sysctl_report = {}
        self.kafka_storage = None
        self.kafka_storage_skipped = {}   # storage -> why it did not start (auto)
        self.restarts = []          # (time, vm, reason)
        self.started_at = None

    # ---- lifecycle ---------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        t0 = time.time()
        self.lock_fd = open(LOCK, "w")
        # One cluster per machine (the namespaces and addresses are fixed). Two `make test`
        # runs at once (e.g. CI beside a developer's run) take turns instead of failing.
        deadline, said = time.time() + self.a.lock_wait, False
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked = True
                break
            except OSError:
                if time.time() >= deadline:
                    raise SystemExit(f"another local cluster is running (lock {LOCK}) and did not stop within "
                                     f"{self.a.lock_wait:.0f} s; stop it first") from None
                if not said:
                    self.log(f"another local cluster is running (lock {LOCK}); waiting up to {self.a.lock_wait:.0f} s")
                    said = True
                time.sleep(1)
        topo.preflight()
        topo.cleanup()
        if self.run_dir.exists():
            subprocess.run(["rm", "-rf", str(self.run_dir)], check=True)
        self.run_dir.mkdir(parents=True)
        self.check_tools()
        self.net.create()
        for ip in HOST_CLIENT_IPS:
            topo.sh("ip", "addr", "add", f"{ip}/16", "dev", topo.BRIDGE)
        per_netns = {k: v for k, v in self.sysctls.items() if not k.startswith("fs.")}
        vms = [topo.Vm("front", FRONT_IP), topo.Vm("kafka", KAFKA_IP),
               topo.Vm("clients", "10.213.100.254", extra_ips=client_ips(self.a.client_ips))]
        vms += [topo.Vm(name, lb_ip(i)) for i, name in enumerate(self.lb_slots)]
        for vm in vms:
            applied, skipped = self.net.add_vm(vm, per_netns if vm.name.startswith(("lb-", "shard-")) else {})
            self.sysctl_report = {"applied_in_each_vm": applied,
                                  "not_per_namespace": {**skipped, **{k: v for k, v in self.sysctls.items() if k.startswith("fs.")}}}
        # The delay the VMs see, measured (recorded in every result); the start fails if a
        # requested delay is not in effect.
        for a, b in (("clients", "front"), (self.lb_slots[0], "kafka")):
            rtt = self.net.check_delay(a, b)
            self.log(f"round trip {a} -> {b}: {rtt:.3f} ms (one-way delay {self.net.effective_delay_ms} ms, "
                     f"{self.net.mechanism})")
        self.compute = gce.ComputeApi(topo.HOST_IP, COMPUTE_PORT, self.pv.shard_group)
        self.compute.start()
        self.start_kafka()
        for j in range(self.a.shards):
            self.create_shard_vm(j)
        for j in range(self.a.shards):
            self.wait_shard(j)
        for name in self.lb_slots[:self.a.lbs]:
            self.start_lb(name)
            self.members.append(name)
        for name in self.members:
            self.wait_lb(name)
        lbs = [(name, self.net.vms[name].ip) for name in self.lb_slots]
        self.front = Front(self.values, self.net.vms["front"], lbs, self.run_dir, self.a.front_procs, self.a.front_maxconn,
                           shared_tickets=self.a.front_ticket_keys == "shared")
        self.front.start()
        for name in self.lb_slots:
            if name not in self.members:
                self.front.set_state(name, "maint")
        wait(lambda: self.front_up() == set(self.members), 60, "the front to see every LB VM up")
        self.autohealer = Autohealer(self.values, self)
        for name in self.members:
            self.autohealer.started(name)
        self.autohealer.start()
        self.watcher = MetricsWatcher(self)
        self.watcher.start()
        self.started_at = time.time()
        self.log(f"cluster up in {time.time() - t0:.0f} s: {len(self.members)} LB VMs, {self.a.shards} shard VMs "
                 f"x {self.pv.shards_per_vm} shards, front {self.url()} ({self.a.front_procs} HAProxy processes), "
                 f"delay {self.net.effective_delay_ms} ms ({self.net.mechanism}), Kafka storage {self.kafka_storage}")

    def stop(self):
        if not getattr(self, "locked", False):
            # Stopped (a signal, the lock wait's end) before this run held the lock: the
            # namespaces on the machine are another run's; leave them alone.
            if self.lock_fd is not None:
                self.lock_fd.close()
                self.lock_fd = None
            return
        for t in (self.autohealer, self.watcher):
            if t is not None:
                t.stop_event.set()
        if self.producer is not None:
            self.producer.stop()
        if self.front is not None:
            self.front.stop()
        for p in self.procs.values():
            p.kill()
        if self.compute is not None:
            self.compute.stop()
            self.compute = None
        topo.cleanup()
        if self.lock_fd is not None:
            self.lock_fd.close()
            self.lock_fd = None
        self.locked = False

    def check_tools(self):
        missing = [str(self.bin / b) for b in ("ws-lb", "ws-shard", "loadtest") if not (self.bin / b).exists()]
        if missing:
            raise SystemExit(f"missing binaries: {', '.join(missing)} (build them first)")
        if not Path(self.a.tansu).exists():
            raise SystemExit(f"tansu not found at {self.a.tansu} (scripts/install-deps.sh installs it)")

    # ---- VMs ---------------------------------------------------------------------

    def env(self, extra=None):
        """The process environment of a VM: what systemd's EnvironmentFile gives it."""
        e = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        e.update(extra or {})
        return e

    def start_kafka(self, storage=None):
        """tansu on the Kafka VM. `memory` (the default) is fast and loses the log with the
        process. A Kafka VM keeps its disk across a restart: storage that outlives the broker
        process is `s3` (tansu's dynostore on an S3-compatible object store,
        deploy/local/s3disk.py, run on the Kafka VM as a separate process that stays up when
        the broker restarts: the VM's "disk") or `sqlite` (tansu's libsql feature, not in the
        tansu `make test` installs). s3 costs the broker a listing of every record object of a
        partition per fetch, so it slows down as the log grows: the suite runs kafka-restart
        on a cluster of its own on s3 (scenarios.STORAGE). `auto` takes the first of
        sqlite, memory that starts."""
        chosen = storage or self.a.kafka_storage
        order = {"auto": ["sqlite", "memory"], "s3": ["s3"], "sqlite": ["sqlite"], "memory": ["memory"]}[chosen]
        for storage in order:
            env = self.env()
            if storage == "s3":
                try:
                    env.update(self.start_kafka_disk())
                except RuntimeError as e:
                    self.kafka_storage_skipped[storage] = str(e)
                    if storage == order[-1]:
                        raise
                    continue
                url = f"s3://{KAFKA_S3_BUCKET}/"
            else:
                url = f"sqlite://{self.run_dir}/kafka.db" if storage == "sqlite" else "memory://tansu/"
            argv = [self.a.tansu, "broker", "--listener-url", f"tcp://0.0.0.0:{KAFKA_PORT}",
                    "--advertised-listener-url", f"tcp://{KAFKA_IP}:{KAFKA_PORT}", "--storage-engine", url]
            p = Proc("kafka", self.net.vms["kafka"].ns, argv, env, self.run_dir / f"kafka-{storage}.log")
            p.start()
            try:
                self.wait_kafka(alive=p)
            except RuntimeError as e:
                p.kill()
                self.kafka_storage_skipped[storage] = str(e)
                if storage == "s3":
                    self.procs.pop("kafka-disk").kill()
                if storage == order[-1]:
                    raise
                continue
            self.procs["kafka"] = p
            self.kafka_storage = storage
            break
        self.ensure_topics()

    def start_kafka_disk(self):
        """The Kafka VM's disk for `s3` storage: deploy/local/s3disk.py, a small S3-compatible
        object server on the VM's loopback, one bucket. It keeps the objects in its own
        memory, so they live exactly as long as this process: across any number of broker
        restarts, not across a restart of the disk process (which no scenario does). Returns
        the broker's environment."""
        endpoint = f"http://127.0.0.1:{KAFKA_S3_PORT}"
        ns = self.net.vms["kafka"].ns
        p = Proc("kafka-disk", ns, [sys.executable, str(Path(__file__).resolve().parent / "s3disk.py"),
                                    "--host", "127.0.0.1", "--port", str(KAFKA_S3_PORT)],
                 self.env(), self.run_dir / "kafka-disk.log")
        p.start()
        self.procs["kafka-disk"] = p
        # The bucket, made from inside the VM (the disk is not on the network); this also
        # waits, bounded, for the server to listen.
        make_bucket = ("import sys, time, urllib.request\n"
                       "deadline = time.time() + 30\n"
                       "while True:\n"
                       "    try:\n"
                       f"        urllib.request.urlopen(urllib.request.Request('{endpoint}/{KAFKA_S3_BUCKET}', method='PUT'), timeout=2)\n"
                       "        break\n"
                       "    except OSError as e:\n"
                       "        if time.time() > deadline: sys.exit(f'no S3 endpoint: {e}')\n"
                       "        time.sleep(0.1)\n")
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", make_bucket],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not p.alive():
            p.kill()
            self.procs.pop("kafka-disk", None)
            raise RuntimeError(f"the S3 disk did not serve a bucket: {(r.stderr or r.stdout).strip()[-300:]} "
                               f"(see {p.log_path})")
        # object_store's S3 client (tansu's) reads these (AmazonS3Builder::from_env); the
        # disk does not check the keys.
        return {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "odin-local", "AWS_SECRET_ACCESS_KEY": "odin-local"}

    def ensure_topics(self):
        for topic in self.pv.kafka_topics:
            # The scenarios publish on `trades` only; the other topics (book) get one
            # partition, which spares the broker work on every consumer's fetch.
            parts = self.a.partitions if topic == "trades" else 1
            r = subprocess.run([self.a.tansu, "topic", "create", topic, "--partitions", str(parts),
                                "--broker", f"tcp://{KAFKA_IP}:{KAFKA_PORT}"], capture_output=True, text=True, timeout=60)
            if r.returncode != 0 and "exist" not in (r.stdout + r.stderr).lower():
                raise RuntimeError(f"creating topic {topic}: {(r.stderr or r.stdout).strip()}")

    def restart_kafka(self, down_s):
        """The Kafka VM restarted: SIGTERM (the VM shuts down), `down_s` seconds without a
        broker, then the broker boots again on the same storage."""
        p = self.procs["kafka"]
        p.signal(signal.SIGTERM)
        if p.wait(30) is None:
            p.kill()
        time.sleep(down_s)
        p.start()
        self.wait_kafka(alive=p)
        if self.kafka_storage == "memory":
            self.ensure_topics()

    def wait_kafka(self, timeout=30, alive=None):
        import socket

        def up():
            if alive is not None and not alive.alive():
                raise RuntimeError("tansu exited")
            with socket.create_connection((KAFKA_IP, KAFKA_PORT), 1):
                return True
        deadline = time.time() + timeout
        while True:
            try:
                if up():
                    return
            except OSError:
                pass
            if alive is not None and not alive.alive():
                raise RuntimeError(f"tansu exited (see {alive.log_path})")
            if time.time() > deadline:
                raise RuntimeError("the Kafka VM did not listen")
            time.sleep(0.2)

    def create_shard_vm(self, j):
        """A shard VM joins the group (scale-out): the VM is created and listed RUNNING at
        once, before ws-shard answers (as on GCP, where the VM runs before its startup
        script has started the service); ws-shard starts."""
        name = f"shard-{j}"
        per_netns = {k: v for k, v in self.sysctls.items() if not k.startswith("fs.")}
        self.net.add_vm(topo.Vm(name, shard_ip(j)), per_netns)
        self.shard_vms.append(j)
        self.compute.set(name, shard_ip(j), "RUNNING")
        self.start_shard(j)

    def remove_shard_vm(self, j, timeout=45):
        """A shard VM leaves the group (scale-in): the group deletes it, so it is STOPPING
        (no longer in the LB VMs' listing) while its shutdown script runs
        (deploy/startup/odin-ws-shutdown.sh: the unit or container is stopped with 45 s, so
        ws-shard gets SIGTERM and drains, 1012 spread over drain_window); then the VM is
        gone. Returns ws-shard's exit code (None: killed after `timeout`)."""
        name = f"shard-{j}"
        self.compute.set(name, shard_ip(j), "STOPPING")
        p = self.procs[name]
        p.signal(signal.SIGTERM)
        code = p.wait(timeout)
        if code is None:
            p.kill()
        self.shard_vms.remove(j)
        self.compute.set(name, shard_ip(j), None)
        self.net.remove_vm(name)
        del self.procs[name]
        return code

    def start_shard(self, j):
        name = f"shard-{j}"
        argv = [str(self.bin / "ws-shard"), *self.pv.shard_args]
        env = self.env({"ODIN_ARGS": " ".join(self.pv.shard_args)})
        p = self.procs.get(name) or Proc(name, self.net.vms[name].ns, argv, env, self.run_dir / f"{name}.log")
        self.procs[name] = p
        p.start()

    def shard_ports(self):
        return [self.pv.shard_base_port + k for k in range(self.pv.shards_per_vm)]

    def wait_shard(self, j, timeout=60):
        ip = shard_ip(j)

        def ready():
            for port in self.shard_ports():
                status, body = get_any(f"http://{ip}:{port}/health", 1)
                if status != 200 or not json.loads(body)["source"]["connected"]:
                    return False
            return True
        wait(ready, timeout, f"shard-{j} healthy and consuming")

    def members_root(self, name):
        """The LB VM's file system root for what its startup script writes (ODIN_ROOT)."""
        return self.run_dir / f"root-{name}"

    def start_members_updater(self, name):
        """The LB VM's `odin-shard-members` (ws-lb-startup.sh `update-shard-members`), as
        `role_before_start` does: one listing written before ws-lb starts (which needs a
        file), then the updater keeps the file current (every 10 s)."""
        old = self.procs.get(f"members-{name}")
        if old is not None and old.alive():
            return
        script = str(REPO / "deploy" / "startup" / "ws-lb-startup.sh")
        api = f"http://{topo.HOST_IP}:{COMPUTE_PORT}"
        env = self.env({"ODIN_ROOT": str(self.members_root(name)), "ODIN_METADATA_URL": f"{api}/computeMetadata/v1",
                        "ODIN_COMPUTE_URL": f"{api}/compute/v1"})
        argv = ["bash", script, "update-shard-members", self.pv.shard_group, self.pv.shard_ports]
        first = subprocess.run(
            ["ip", "netns", "exec", self.net.vms[name].ns, *argv], env={**env, "ODIN_MEMBERS_ONCE": "1"},
            capture_output=True, text=True, timeout=60)
        if not self.members_file(name).exists():
            raise RuntimeError(f"{name}: the member updater wrote no file: {first.stderr.strip()[-300:]}")
        p = Proc(f"members-{name}", self.net.vms[name].ns, argv, env, self.run_dir / f"members-{name}.log")
        self.procs[p.name] = p
        p.start()

    def members_file(self, name):
        return Path(str(self.members_root(name)) + self.pv.members_file)

    def lb_argv(self, name):
        """deploy/gcp/lib.sh's LB_ARGS, the member file under the VM's root."""
        args = list(self.pv.lb_args)
        args[args.index("--backend-file") + 1] = str(self.members_file(name))
        return args + list(self.lb_flags)

    def start_lb(self, name):
        self.start_members_updater(name)
        argv = [str(self.bin / "ws-lb"), *self.lb_argv(name)]
        env = self.env({"ODIN_ARGS": " ".join(argv[1:]), **self.pv.lb_env})
        p = Proc(name, self.net.vms[name].ns, argv, env, self.run_dir / f"{name}.log")
        if name in self.procs:
            p.starts = self.procs[name].starts
        self.procs[name] = p
        p.start()

    def wait_lb(self, name, timeout=30):
        ip = self.net.vms[name].ip
        wait(lambda: get_any(f"http://{ip}:{self.pv.lb_port}/health", 1)[0] == 200, timeout, f"{name} /health 200")

    def restart_lb(self, name, reason):
        """Recreate an LB VM (autohealing): whatever runs is gone, the VM boots again."""
        self.restarts.append((time.time(), name, reason))
        self.procs[name].kill()
        self.start_lb(name)

    def lb_members(self):
        return list(self.members)

    def admin_urls(self):
        out = []
        for name, p in list(self.procs.items()):
            if not p.alive():
                continue
            if name.startswith("lb-"):
                out.append((name, f"http://{self.net.vms[name].ip}:{self.pv.lb_admin_port}/metrics"))
            elif name.startswith("shard-"):
                out.append((name, f"http://{self.net.vms[name].ip}:{self.pv.shard_admin_port}/metrics"))
        return out

    # ---- views -------------------------------------------------------------------

    def url(self):
        return f"wss://{FRONT_IP}/ws"

    def front_up(self):
        """LB VMs every front process sees UP."""
        return {name for name, sts in self.front.status().items() if all(s.startswith("UP") for s in sts)}

    def lb_health(self, name):
        # Within the front's own check timeout (the backend service's `timeout_sec`): an LB
        # slower than that would fail a check of the GCP LB too; one merely slower than an
        # arbitrary 2 s on a loaded machine would not.
        status, body = get_any(f"http://{self.net.vms[name].ip}:{self.pv.lb_port}/health",
                               self.values.backend_check.timeout_s)
        try:
            return status, json.loads(body)
        except (ValueError, TypeError):
            return status, None

    def lb_metrics(self, name):
        status, page = get_any(f"http://{self.net.vms[name].ip}:{self.pv.lb_admin_port}/metrics", 3)
        return page if status == 200 else ""

    def shard_metrics(self, j):
        status, page = get_any(f"http://{shard_ip(j)}:{self.pv.shard_admin_port}/metrics", 3)
        return page if status == 200 else ""

    def shard_connections(self):
        total = 0
        for j in self.shard_vms:
            for port in self.shard_ports():
                status, body = get_any(f"http://{shard_ip(j)}:{port}/health", 1)
                if status == 200 or status == 503:
                    total += json.loads(body)["connections"]
        return total

    def lb_active(self):
        return sum(metric(self.lb_metrics(n), "ws_lb_active_connections") or 0 for n in self.members)

    def settle(self, timeout=90):
        """Back to a clean state between scenarios: every VM up, every LB in the front, no
        client left, every breaker admitting."""
        if not self.procs["kafka"].alive():
            self.procs["kafka"].start()
            self.wait_kafka(alive=self.procs["kafka"])
            if self.kafka_storage == "memory":
                self.ensure_topics()
        for j in self.shard_vms:
            if not self.procs[f"shard-{j}"].alive():
                self.start_shard(j)
        for j in self.shard_vms:
            self.wait_shard(j)
        for name in self.members:
            if not self.procs[name].alive():
                self.restart_lb(name, "settle")
                self.autohealer.started(name)
        wait(lambda: self.front_up() == set(self.members), timeout, "every LB VM up in the front")
        total = len(self.shard_ports()) * len(self.shard_vms)

        def all_admit():
            return all((self.lb_health(n)[1] or {}).get("shards_available") == total for n in self.members)
        wait(all_admit, timeout, "every breaker admitting on every LB")
        wait(lambda: self.lb_active() == 0 and self.shard_connections() == 0, timeout, "no client left")

    def listen_backlogs(self):
        """`ss -ltn` in one LB VM and one shard VM: the listen backlog in effect (Send-Q)."""
        out = {}
        for vm in (self.members[0] if self.members else None, "shard-0"):
            if vm is None:
                continue
            r = topo.sh("ss", "-ltnH", ns=self.net.vms[vm].ns, check=False).stdout
            out[vm] = {line.split()[3]: int(line.split()[2]) for line in r.splitlines() if len(line.split()) >= 4}
        return out

    def describe(self):
        return {
            "listen_backlog_in_effect": self.listen_backlogs(),
            "lbs": len(self.members), "shards": len(self.shard_vms), "shards_per_vm": self.pv.shards_per_vm,
            "shard_membership": f"group: member file {self.pv.members_file} kept by ws-lb-startup.sh "
                                f"update-shard-members against a stand-in Compute API",
            "front_processes": self.a.front_procs, "front_maxconn": self.a.front_maxconn,
            "front_ticket_keys": self.a.front_ticket_keys,
            "network": self.net.describe(), "kafka_storage": self.kafka_storage,
            "kafka_storage_skipped": self.kafka_storage_skipped,
            "kafka_partitions": self.a.partitions,
            "lb_args": " ".join(self.pv.lb_args)[:160] + " ...", "lb_flags": self.lb_flags, "lb_env": self.pv.lb_env,
            "shard_args": " ".join(self.pv.shard_args),
            "sysctls": self.sysctl_report,
            "open_files_limit": {"units_ask": deploy_values.unit_limit_nofile(), "in_effect": bench.machine()["nofile"]},
            "front": {"backend_check": vars(self.values.backend_check), "autoheal_check": vars(self.values.autoheal_check),
                      "autoheal_initial_delay_s": self.values.autoheal_initial_delay_s,
                      "backend_timeout_s": self.values.backend_timeout_s, "max_surge": self.values.max_surge},
        }


# ---- the command line -----------------------------------------------------------------

DEFAULTS = {"lbs": 10, "shards": 7, "delay_ms": 0.25, "delay_mode": "auto", "front_procs": 2, "front_maxconn": 9500,
            "front_ticket_keys": "shared", "client_ips": 64,
            "partitions": 10, "kafka_storage": "memory", "max_rate": 0, "max_clients": 0, "producer_rate": 0,
            "delay_line_priority": "normal", "client_backoff": "", "client_handshake_timeout": ""}


def backoff_pair(text):
    """`--client-backoff`: "MIN,MAX" as loadtest's `--reconnect-min-delay` and
    `--reconnect-max-delay` take them ("" = loadtest's own)."""
    if not text:
        return ""
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"takes MIN,MAX (e.g. 500ms,20s), got {text!r}")
    return text


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "test", "bench", "down"])
    p.add_argument("scenarios", nargs="*")
    p.add_argument("--lbs", type=int, default=DEFAULTS["lbs"], help="ws-lb VMs (the LB instance group's size)")
    p.add_argument("--shards", type=int, default=DEFAULTS["shards"], help="ws-shard VMs (7..10, as the deploy allows)")
    p.add_argument("--delay-ms", type=float, default=DEFAULTS["delay_ms"], help="one-way latency between VMs (0 = none)")
    p.add_argument("--delay-mode", choices=["auto", "netem", "delayline"], default=DEFAULTS["delay_mode"],
                   help="how the delay is made: tc netem on each VM's link, or delayline (a user-space TAP cable "
                        "per VM, crates/delayline, for kernels without netem); auto: netem if the kernel has it")
    p.add_argument("--delay-line-priority", choices=["normal", "rt"], default=DEFAULTS["delay_line_priority"],
                   help="scheduling of the delay lines: normal, or rt (SCHED_FIFO 1: a saturated machine cannot starve "
                        "the emulated wire into dropping frames, at the price of more CPU; docs/topology.md)")
    p.add_argument("--front-procs", type=int, default=DEFAULTS["front_procs"], help="HAProxy processes on the front VM")
    p.add_argument("--front-maxconn", type=int, default=DEFAULTS["front_maxconn"], help="clients per HAProxy process")
    p.add_argument("--front-ticket-keys", choices=["shared", "per-process"], default=DEFAULTS["front_ticket_keys"],
                   help="TLS session-ticket keys of the front's processes: shared (one key file: the front's one address "
                        "is one TLS endpoint, a re-dial resumes on any process) or per-process (each HAProxy makes its own: a "
                        "re-dial landing on another process pays a full handshake; for comparison)")
    p.add_argument("--client-ips", type=int, default=DEFAULTS["client_ips"], help="source addresses of the clients VM")
    p.add_argument("--partitions", type=int, default=DEFAULTS["partitions"], help="partitions per Kafka topic")
    p.add_argument("--kafka-storage", choices=["auto", "s3", "sqlite", "memory"], default=DEFAULTS["kafka_storage"],
                   help="tansu storage of the cluster: memory (fast; lost when the broker restarts), s3 "
                        "(deploy/local/s3disk.py on the Kafka VM) and sqlite (needs tansu built with libsql) survive a "
                        "restart; auto: sqlite if it starts, else memory. The suite runs kafka-restart on a cluster of its own "
                        "on s3")
    p.add_argument("--max-rate", type=int, default=DEFAULTS["max_rate"],
                   help="cap every scenario's connection rate at this many per second (0 = the scenario's own): "
                        "the full client counts at a rate this machine's TLS front can carry (docs/topology.md)")
    p.add_argument("--max-clients", type=int, default=DEFAULTS["max_clients"],
                   help="cap every scenario's client count at this many (0 = the scenario's own): where a full "
                        "size fails on this machine, the count at which it passes (docs/topology.md)")
    p.add_argument("--producer-rate", type=float, default=DEFAULTS["producer_rate"],
                   help="cap the Kafka producer of every scenario that runs one at this many records per second "
                        "(0 = the scenario's own: 20/s, kafka-restart 50/s; with 10 partitions every subscribed client "
                        "receives a tenth of it): the fan-out the full client counts push through the TLS front")
    p.add_argument("--client-backoff", type=backoff_pair, default=DEFAULTS["client_backoff"], metavar="MIN,MAX",
                   help="the reconnecting clients' backoff, first and largest delay (e.g. 500ms,20s: the client "
                        "libraries' defaults); empty: loadtest's own (100ms,5s)")
    p.add_argument("--client-handshake-timeout", default=DEFAULTS["client_handshake_timeout"], metavar="DURATION",
                   help="the load generator's handshake deadline (e.g. 10s: the client libraries' connectTimeout); "
                        "empty: loadtest's own 5 s at full size, 30 s in the short versions")
    p.add_argument("--lb-flags", default="", help="extra ws-lb flags on every LB VM, after the deploy's own "
                                                   "(e.g. --tier-mux); recorded in the results")
    p.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    p.add_argument("--tansu", default=os.environ.get("TANSU") or (subprocess.run(["bash", "-c", "command -v tansu"],
                   capture_output=True, text=True).stdout.strip() or str(Path.home() / ".cargo/bin/tansu")))
    p.add_argument("--run-dir", default="/tmp/odin-cluster")
    p.add_argument("--lock-wait", type=float, default=1800,
                   help="seconds to wait for another local cluster on this machine to finish (0 = fail at once)")
    return p


def non_default_flags(a):
    out = {k: getattr(a, k) for k, v in DEFAULTS.items() if getattr(a, k) != v}
    return out


def install_signal_handlers():
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


def main(argv=None):
    a = parser().parse_intermixed_args(argv)
    install_signal_handlers()
    if a.command == "down":
        topo.cleanup()
        print("removed every odinc namespace and link")
        return 0
    if a.command == "up":
        try:
            with Cluster(a) as c:
                print(f"client URL: {c.url()}   (CA: {c.front.ca}; e.g. "
                      f"python3 -m websockets --help, or loadtest --url {c.url()} --ca-file {c.front.ca})")
                print("LB VMs: " + ", ".join(f"{n}={c.net.vms[n].ip}" for n in c.members) + "; Ctrl-C tears it down")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            print("tearing down")
        except topo.TopologyError as e:
            print(f"cluster: {e}", file=sys.stderr)
            return 2
        return 0
    import scenarios
    return scenarios.run_suite(a, full=(a.command == "bench"))


if __name__ == "__main__":
    sys.exit(main())
