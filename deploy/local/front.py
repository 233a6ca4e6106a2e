"""The stand-in for the GCP global external Application Load Balancer, generated from the
Terraform values (deploy_values.FrontValues), and the stand-in for the LB instance
group's autohealer.

Front: HAProxy (Debian's package) on the front VM, terminating TLS on the forwarding
rule's port (443) with a certificate made at start (openssl, ECDSA P-256, for the front
VM's address and the example domain). Like the Google front ends it

- health-checks every LB VM with the backend service's check: `GET <request_path>` on the
  named port, every `check_interval_sec`, `timeout_sec`, out after `unhealthy_threshold`
  failures, back after `healthy_threshold` successes; only a 200 passes;
- appends `X-Forwarded-For: <client-ip>,<load-balancer-ip>` to what the client sent, the
  format GFE uses (ws-lb's `trust_forwarded_for` takes the second entry from the right);
- keeps a WebSocket up to the backend service timeout (`timeout_sec`, 24 h);
- retries a request whose backend connection fails once, on another LB (GFE retries
  failed connections; it cannot retry after a backend answered);
- stops sending new requests to an LB that leaves the instance group and lets its open
  connections finish (connection draining), using HAProxy's `drain` state.

GFE is many proxies: the front runs `procs` HAProxy processes on the same address and port
(SO_REUSEPORT), each health-checking on its own like separate probers, each holding up to
`maxconn` clients (this machine allows 20,000 descriptors per process, two per client).
The load balancer's one address is one TLS endpoint: every process encrypts and decrypts
session tickets with the same keys (`tls-ticket-keys`, a file made at start), so a client
re-dialling with its ticket resumes whichever process the kernel hands its connection to.
(Whether and how GFE resumes a session across its front ends is not documented in what we
read; shared keys model the one endpoint a client sees.) Without it each process made its own keys and about half of
the re-dials (those landing on the other process) paid a full handshake.

Autohealer: every `check_interval_sec` of the autohealing check it asks each LB VM of the
group for `/health`; after `unhealthy_threshold` consecutive failures it recreates the VM
(here: the VM's process is killed if still there and started again with the same
settings), then leaves the VM alone for `initial_delay_sec`, as the MIG does.
"""

import base64
import csv
import io
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from topo import proc_cpu_s  # one reader of /proc/<pid>/stat for every harness

DOMAIN = "md.example.com"


def make_cert(run_dir: Path, ip: str) -> tuple:
    """(cert+key PEM for HAProxy, CA PEM clients trust). A private CA signs the front's
    certificate, as a public CA signs the managed certificate."""
    ca_key, ca, key, csr, crt = (run_dir / n for n in ("ca.key", "ca.pem", "front.key", "front.csr", "front.crt"))
    ext = run_dir / "front.ext"
    ext.write_text(f"subjectAltName=IP:{ip},DNS:{DOMAIN}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=odin-ws local front CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={DOMAIN}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    pem = run_dir / "front.pem"
    pem.write_text(crt.read_text() + key.read_text())
    return pem, ca


def make_ticket_keys(run_dir: Path) -> Path:
    """The session-ticket keys every front process shares: HAProxy's `tls-ticket-keys` file,
    three base64 lines of 80 random bytes (AES-256 + HMAC keys); HAProxy encrypts new tickets
    with the second-to-last and accepts all three."""
    path = run_dir / "tickets.key"
    path.write_text("".join(base64.b64encode(os.urandom(80)).decode() + "\n" for _ in range(3)))
    path.chmod(0o600)
    return path


def haproxy_config(values, front_ip, lbs, run_dir: Path, index: int, maxconn: int, shared_tickets=True) -> str:
    """One HAProxy process's configuration. `lbs` is [(name, ip)] for every LB slot the
    instance group may use (members and surge slots; `Front.set_state` says which serve).
    `shared_tickets`: the session-ticket keys of `make_ticket_keys` (else HAProxy's own)."""
    c = values.backend_check
    tickets = f" tls-ticket-keys {run_dir}/tickets.key" if shared_tickets else ""
    servers = "\n".join(
        f"  server {name} {ip}:{c.port} check inter {c.interval_s}s fall {c.unhealthy} rise {c.healthy}"
        for name, ip in lbs)
    return f"""# Generated by deploy/local/front.py from deploy/terraform (global-lb.tf, lb-tier.tf).
global
  maxconn {maxconn}
  nbthread 1
  stats socket {run_dir}/haproxy-{index}.sock mode 600 level admin
  log stderr format iso local0 info
  ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
  mode http
  log global
  option httplog
  option log-health-checks
  option dontlognull
  timeout connect 5s
  # backend service timeout_sec: for WebSockets, the longest a connection may live.
  timeout client {values.backend_timeout_s}s
  timeout server {values.backend_timeout_s}s
  timeout tunnel {values.backend_timeout_s}s
  timeout http-request 30s
  timeout check {c.timeout_s}s
  # A failed backend connection is retried once, on another LB.
  retries 1
  option redispatch 1

frontend https
  bind {front_ip}:{values.https_port} ssl crt {run_dir}/front.pem{tickets} alpn http/1.1
  maxconn {maxconn}
  # GFE appends "<client-ip>,<load-balancer-ip>" to whatever X-Forwarded-For the client sent.
  http-request set-header X-Forwarded-For "%[req.fhdr(x-forwarded-for)],%[src],%[dst]" if {{ req.fhdr(x-forwarded-for) -m found }}
  http-request set-header X-Forwarded-For "%[src],%[dst]" unless {{ req.fhdr(x-forwarded-for) -m found }}
  http-request set-header X-Forwarded-Proto https
  default_backend lb_mig

backend lb_mig
  balance roundrobin
  option httpchk
  http-check send meth GET uri {c.path} ver HTTP/1.1 hdr Host health-check
  http-check expect status 200
{servers}
"""


class Front:
    def __init__(self, values, vm, lbs, run_dir: Path, procs: int, maxconn: int, shared_tickets=True):
        self.values, self.vm, self.lbs, self.run_dir = values, vm, lbs, run_dir
        self.procs, self.maxconn, self.shared_tickets = procs, maxconn, shared_tickets
        self.p = []
        self.pem = self.ca = None

    def start(self):
        self.pem, self.ca = make_cert(self.run_dir, self.vm.ip)
        make_ticket_keys(self.run_dir)
        for i in range(self.procs):
            cfg = self.run_dir / f"haproxy-{i}.cfg"
            cfg.write_text(haproxy_config(self.values, self.vm.ip, self.lbs, self.run_dir, i, self.maxconn,
                                          self.shared_tickets))
            r = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"haproxy rejected {cfg}: {r.stderr.strip()}")
            log = open(self.run_dir / f"haproxy-{i}.log", "w")
            self.p.append(subprocess.Popen(["ip", "netns", "exec", self.vm.ns, "haproxy", "-db", "-f", str(cfg)],
                                           stdout=log, stderr=log, start_new_session=True))
        deadline = time.time() + 20
        while time.time() < deadline:
            if all(Path(self.run_dir / f"haproxy-{i}.sock").exists() for i in range(self.procs)):
                try:
                    self.stats()
                    return
                except OSError:
                    pass
            if any(p.poll() is not None for p in self.p):
                break
            time.sleep(0.1)
        raise RuntimeError(f"haproxy did not start (see {self.run_dir}/haproxy-*.log)")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the running HAProxy processes have spent."""
        total = 0.0
        for p in self.p:
            try:
                total += proc_cpu_s(p.pid)
            except OSError:  # ended: its time is gone with it
                pass
        return total

    def stop(self):
        for p in self.p:
            if p.poll() is None:
                p.kill()
        for p in self.p:
            p.wait()
        self.p = []

    def command(self, index: int, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.run_dir / f"haproxy-{index}.sock"))
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def stats(self) -> list:
        """Per process: {server name: row of `show stat`} for the LB backend."""
        out = []
        for i in range(self.procs):
            text = self.command(i, "show stat").lstrip("# ")
            rows = {r["svname"]: r for r in csv.DictReader(io.StringIO(text))
                    if r.get("pxname") == "lb_mig" and r["svname"] not in ("BACKEND", "FRONTEND")}
            out.append(rows)
        return out

    def status(self) -> dict:
        """Server name -> list of statuses as each process sees it (UP, DOWN, MAINT, DRAIN, ...)."""
        out = {}
        for rows in self.stats():
            for name, r in rows.items():
                out.setdefault(name, []).append(r["status"])
        return out

    def set_state(self, name: str, state: str):
        """`ready` (in the group), `drain` (leaving: no new requests, open ones stay) or
        `maint` (not in the group)."""
        for i in range(self.procs):
            self.command(i, f"set server lb_mig/{name} state {state}")

    def totals(self) -> dict:
        """Sums over processes: HTTP responses by class, backend connection errors, retries."""
        t = {}
        for i in range(self.procs):
            text = self.command(i, "show stat").lstrip("# ")
            for r in csv.DictReader(io.StringIO(text)):
                if r.get("pxname") == "https" and r["svname"] == "FRONTEND":
                    for k in ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "req_tot", "scur", "stot"):
                        t[k] = t.get(k, 0) + int(r.get(k) or 0)
                if r.get("pxname") == "lb_mig" and r["svname"] == "BACKEND":
                    for k in ("econ", "eresp", "wretr", "wredis"):
                        t["backend_" + k] = t.get("backend_" + k, 0) + int(r.get(k) or 0)
        return t


class Autohealer(threading.Thread):
    """The LB instance group's autohealing, driven by the autohealing health check."""

    def __init__(self, values, cluster):
        super().__init__(daemon=True, name="autohealer")
        self.check = values.autoheal_check
        self.initial_delay = values.autoheal_initial_delay_s
        self.cluster = cluster
        self.failures = {}
        self.quiet_until = {}
        self.events = []        # (time, vm, what)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def probe(self, ip) -> bool:
        try:
            with urllib.request.urlopen(f"http://{ip}:{self.check.port}{self.check.path}",
                                        timeout=self.check.timeout_s) as r:
                return r.status == 200
        except OSError:
            return False

    def started(self, name):
        """A VM (re)started: its checks count only after the initial delay."""
        with self.lock:
            self.quiet_until[name] = time.time() + self.initial_delay
            self.failures[name] = 0

    def run(self):
        while not self.stop_event.wait(self.check.interval_s):
            for name in list(self.cluster.lb_members()):
                if self.stop_event.is_set():
                    return      # the cluster is being torn down: its VMs go away, none is sick
                with self.lock:
                    if time.time() < self.quiet_until.get(name, 0):
                        continue
                vm = self.cluster.net.vms[name]
                ok = self.probe(vm.ip)
                with self.lock:
                    self.failures[name] = 0 if ok else self.failures.get(name, 0) + 1
                    recreate = self.failures[name] >= self.check.unhealthy
                if recreate and name in self.cluster.lb_members() and not self.stop_event.is_set():
                    self.events.append((time.time(), name, "recreated"))
                    self.cluster.log(f"autohealer: {name} failed {self.check.unhealthy} checks, recreating it")
                    self.cluster.restart_lb(name, reason="autoheal")
                    self.started(name)

    def recreated(self, since=0.0) -> list:
        return [(t, n) for t, n, w in self.events if w == "recreated" and t >= since]
