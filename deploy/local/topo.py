"""The network of the local topology: one Linux network namespace per VM, each with one
link to a bridge in the host namespace and its own address in 10.213.0.0/16, an
address for the host on the bridge (the operator's machine: it reaches every VM), an
optional delay on every VM's egress (one-way latency between any two VMs), and a per-path
cut used by the partition scenario.

The delay: `tc netem` on each VM's veth where the kernel has it (`CONFIG_NET_SCH_NETEM`);
where it does not, a `tc` filter on the bridge side of each VM's veth redirects every frame
the VM sends to a TAP interface, whose `delayline` process (crates/delayline) writes it into
the bridge the delay later — the same one-way latency, in user space, for the frames a VM
sends only (frames towards a VM stay in the kernel). Either way the round trip between two
VMs is measured at start and the start fails if the delay is not in effect.

Everything created here carries the prefix `odinc` (namespaces `odinc-<vm>`, links
`oc-<vm>`, bridge `odincbr0`), so `cleanup()` can remove the leftovers of a crashed run
without touching anything else on the machine.
"""

import ipaddress
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench import proc_cpu_s  # noqa: E402  (one reader of /proc/<pid>/stat for every harness)

PREFIX = "odinc"
BRIDGE = "odincbr0"
NET = ipaddress.ip_network("10.213.0.0/16")
HOST_IP = "10.213.0.1"
# MAC address no interface has: neighbours pointed at it receive nothing (the cut).
NOWHERE_MAC = "02:00:00:de:ad:01"


class TopologyError(RuntimeError):
    pass


def sh(*args, check=True, ns=None, quiet=False):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise TopologyError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def namespaces():
    r = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _delayline_pids():
    """delayline processes of this harness (their TAP interfaces are named `od-*`), also a
    crashed run's: they run in the host namespace, so `ip netns pids` does not list them."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"delayline") and b"--tap" in argv:
            i = argv.index(b"--tap")
            if i + 1 < len(argv) and argv[i + 1].startswith(b"od-"):
                out.append(int(entry))
    return out


def _tap(vm):
    """The TAP interface of `vm`'s delay line (`od-…`, next to its bridge link `oc-…`)."""
    return "od-" + vm.link[3:]


def _tap_drops(vm):
    try:
        return int(Path(f"/sys/class/net/{_tap(vm)}/statistics/tx_dropped").read_text())
    except (OSError, ValueError):
        return 0


def busy_cpu_s():
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot."""
    with open("/proc/stat") as f:
        xs = [int(x) for x in f.readline().split()[1:]]
    return (sum(xs) - xs[3] - xs[4]) / os.sysconf("SC_CLK_TCK")


def cleanup():
    """Removes every namespace and link of this harness (also those of a crashed run) and
    kills whatever still runs inside those namespaces, and the delay lines."""
    for pid in _delayline_pids():
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    for ns in namespaces():
        if not ns.startswith(PREFIX + "-"):
            continue
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)
    links = sh("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(("oc-", "od-")) or name == BRIDGE:
            sh("ip", "link", "del", name, check=False)


def preflight():
    """Fails with one clear line when namespaces cannot be created here."""
    if os.geteuid() != 0:
        raise TopologyError("network namespaces need root (run as root, or in a VM/container with CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    probe = f"{PREFIX}-probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        raise TopologyError(f"cannot create network namespaces: {r.stderr.strip()}")
    sh("ip", "netns", "del", probe, check=False)


@dataclass
class Vm:
    name: str          # e.g. lb-3, shard-0, front, kafka, clients
    ip: str
    extra_ips: list = field(default_factory=list)

    @property
    def ns(self):
        return f"{PREFIX}-{self.name}"

    @property
    def link(self):
        return "oc-" + self.name.replace("shard-", "sh").replace("lb-", "lb").replace("clients", "cli")[:12]


# Frames a TAP interface queues towards its reader before dropping (the kernel's default is
# 500, which a burst of a thousand handshakes through one VM overflows).
TAP_QUEUE = 10_000
# Classic BPF for cls_bpf: "return -1", i.e. every frame matches (this kernel has cls_bpf
# and mirred but neither matchall nor u32).
MATCH_ALL = "1,6 0 0 4294967295"


def vm_mac(ip: str) -> str:
    """A VM's MAC address, fixed from its address (locally administered): the bridge
    forwards to it by a static entry, and its delayline passes only frames from it."""
    return "02:00:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


class Network:
    """`delay_mode`: `auto` (netem where the kernel has it, else delayline), `netem`,
    `delayline`; `delayline` is the path of that binary."""

    def __init__(self, delay_ms: float, delay_mode: str = "auto", delayline=None, log_dir=None, line_priority="normal"):
        self.delay_ms = delay_ms
        self.delay_mode = delay_mode
        self.delayline = str(delayline) if delayline else None
        self.log_dir = log_dir
        self.vms = {}
        self.mechanism = "none"  # none (delay 0) | netem | delayline
        self.netem_error = ""
        self.lines = {}          # VM name -> its delayline process
        self.removed_lines_cpu_s = 0.0   # CPU of the lines of VMs removed since the start
        self.removed_tap_drops = {}      # VM name -> frames its removed TAP interfaces dropped
        # `line_priority` "rt": the lines run at SCHED_FIFO 1 (bounded by the kernel's RT
        # throttling), so the wire does not wait for the VMs' CPU. A line the scheduler starves
        # on a saturated machine lets its TAP queue overflow, and the frames lost there stall
        # TCP for retransmission timeouts (a short kill-lb with three CPU hogs beside it, load
        # 21: 46,359 frames lost at normal priority, 0 at rt). The price: the lines use 1.2-1.8x
        # the CPU in the short suite (docs/topology.md, "Delay-line priority").
        self.rt = []
        if line_priority == "rt":
            if not shutil.which("chrt") or subprocess.run(["chrt", "-f", "1", "true"], capture_output=True).returncode:
                raise TopologyError("--delay-line-priority rt needs chrt and the right to use SCHED_FIFO")
            self.rt = ["chrt", "-f", "1"]
        self.rtt = {}            # "a->b" -> measured TCP connect round trip, ms (median)
        self.cuts = set()

    def create(self):
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/{NET.prefixlen}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        self.mechanism = self._choose_mechanism()

    def _choose_mechanism(self):
        if self.delay_ms <= 0:
            return "none"
        if self.delay_mode in ("auto", "netem"):
            # Probe on the bridge itself (removed at once): netem is either in the kernel or not.
            r = sh("tc", "qdisc", "add", "dev", BRIDGE, "root", "netem", "delay", "1ms", check=False)
            if r.returncode == 0:
                sh("tc", "qdisc", "del", "dev", BRIDGE, "root", check=False)
                return "netem"
            self.netem_error = r.stderr.strip() or "tc failed"
            if self.delay_mode == "netem":
                raise TopologyError(f"--delay-mode netem: tc netem is not available here ({self.netem_error})")
        if not self.delayline or not os.access(self.delayline, os.X_OK):
            why = f"tc netem (not in this kernel: {self.netem_error}) or " if self.netem_error else ""
            raise TopologyError(f"--delay-ms {self.delay_ms} needs {why}the delayline binary, not found at "
                                f"{self.delayline} (cargo build -p delayline; or --delay-ms 0)")
        return "delayline"

    def _link_up(self, vm: Vm):
        """The VM's cable: a veth pair, `eth0` in the VM and `vm.link` on the bridge. With
        `delayline`, frames arriving on `vm.link` from the VM are redirected (tc mirred, before
        the bridge sees them) to the TAP interface `od-…`, whose delayline process writes
        them into the bridge — a port with learning and flooding off — after the delay; the
        bridge reaches the VM through a static entry for its MAC on `vm.link`."""
        mac = vm_mac(vm.ip)
        sh("ip", "link", "add", vm.link, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", vm.ns)
        if self.mechanism == "delayline":
            tap = _tap(vm)
            log = open(os.path.join(self.log_dir, f"delayline-{vm.name}.log"), "ab") if self.log_dir else subprocess.DEVNULL
            p = subprocess.Popen([*self.rt, self.delayline, "--tap", tap, "--vm-mac", mac,
                                  "--delay-us", str(round(self.delay_ms * 1000))],
                                 stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
            if log is not subprocess.DEVNULL:
                log.close()
            line = p.stdout.readline()
            p.stdout.close()    # it writes nothing after "ready"; no descriptor kept per VM start
            if line.strip() != b"ready":
                p.kill()
                p.wait()
                raise TopologyError(f"delayline for {vm.name} did not start (see delayline-{vm.name}.log)")
            self.lines[vm.name] = p
            sh("ip", "link", "set", tap, "txqueuelen", TAP_QUEUE, "master", BRIDGE)
            sh("bridge", "link", "set", "dev", tap, "learning", "off", "flood", "off", "mcast_flood", "off",
               "bcast_flood", "off")
            sh("ip", "link", "set", tap, "up")
        sh("ip", "link", "set", vm.link, "master", BRIDGE, "up")
        if self.mechanism == "delayline":
            sh("bridge", "fdb", "replace", mac, "dev", vm.link, "master", "static")
            sh("tc", "qdisc", "add", "dev", vm.link, "clsact")
            sh("tc", "filter", "add", "dev", vm.link, "ingress", "bpf", "bytecode", MATCH_ALL,
               "action", "mirred", "egress", "redirect", "dev", tap)
            # The VM's own broadcasts come back to it through the bridge (the TAP port is not
            # its veth port); harmless for ARP, but IPv6 duplicate-address detection would
            # fail, and nothing here uses IPv6.
            for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
                sh("sysctl", "-q", "-w", f"{key}=1", ns=vm.ns)

    def add_vm(self, vm: Vm, sysctls=None):
        sh("ip", "netns", "add", vm.ns)
        self._link_up(vm)
        sh("ip", "link", "set", "lo", "up", ns=vm.ns)
        for ip in [vm.ip, *vm.extra_ips]:
            sh("ip", "addr", "add", f"{ip}/{NET.prefixlen}", "dev", "eth0", ns=vm.ns)
        sh("ip", "link", "set", "eth0", "up", ns=vm.ns)
        applied, skipped = {}, {}
        for key, value in (sysctls or {}).items():
            r = sh("sysctl", "-q", "-w", f"{key}={value}", ns=vm.ns, check=False)
            (applied if r.returncode == 0 else skipped)[key] = value
        self.vms[vm.name] = vm
        if self.mechanism == "netem":
            sh("tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{self.delay_ms}ms", ns=vm.ns)
        return applied, skipped

    def remove_vm(self, name: str):
        """Deletes a VM: its namespace (and with it its veth pair) and whatever still runs
        in it."""
        vm = self.vms.pop(name)
        for pid in sh("ip", "netns", "pids", vm.ns, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        line = self.lines.pop(name, None)
        if line is not None:
            try:
                self.removed_lines_cpu_s += proc_cpu_s(line.pid)
            except OSError:
                pass
            self.removed_tap_drops[name] = self.removed_tap_drops.get(name, 0) + _tap_drops(vm)
            line.kill()
            line.wait()
        sh("ip", "netns", "del", vm.ns, check=False)
        sh("ip", "link", "del", vm.link, check=False)
        self.cuts = {c for c in self.cuts if name not in c}

    def tap_drops(self):
        """Per VM, the frames the kernel dropped so far because its delay line did not read
        the TAP interface in time (its queue of `TAP_QUEUE` frames full): lost on the
        emulated wire, which TCP then retransmits. Empty without delay lines."""
        out = dict(self.removed_tap_drops)
        for n in self.lines:
            out[n] = out.get(n, 0) + _tap_drops(self.vms[n])
        return out

    def lines_cpu_s(self):
        """CPU seconds every delay line of this network has used so far (0 without them)."""
        total = self.removed_lines_cpu_s
        for line in self.lines.values():
            try:
                total += proc_cpu_s(line.pid)
            except OSError:
                pass
        return total

    @property
    def effective_delay_ms(self):
        return self.delay_ms if self.mechanism in ("netem", "delayline") else 0.0

    def measure_rtt(self, a: str, b: str, samples: int = 30, port: int = 47999):
        """Median TCP connect time (one round trip: SYN, SYN-ACK) from VM a to VM b, ms.
        With a one-way delay D on every VM's egress it is at least 2 D."""
        va, vb = self.vms[a], self.vms[b]
        server = subprocess.Popen(
            ["ip", "netns", "exec", vb.ns, "python3", "-c",
             "import socket,sys,time\n"
             f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{vb.ip}',{port}));s.listen(1024)\n"
             "print('listening',flush=True)\n"
             "s.settimeout(0.2)\n"
             "end=time.time()+60\n"
             "while time.time()<end:\n"
             "  try: s.accept()[0].close()\n"
             "  except OSError: pass\n"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            if server.stdout.readline().strip() != b"listening":
                raise TopologyError(f"round-trip probe: no listener in {b}")
            r = sh("python3", "-c",
                   "import socket,time\n"
                   "ts=[]\n"
                   f"for i in range({samples}):\n"
                   "  t=time.perf_counter()\n"
                   f"  c=socket.create_connection(('{vb.ip}',{port}),timeout=5)\n"
                   "  ts.append((time.perf_counter()-t)*1000)\n"
                   "  c.close()\n"
                   "print(' '.join(f'{x:.4f}' for x in ts))\n", ns=va.ns)
            ts = [float(x) for x in r.stdout.split()]
        finally:
            server.kill()
            server.wait()
        self.rtt[f"{a}->{b}"] = {"median_ms": round(statistics.median(ts), 3), "min_ms": round(min(ts), 3),
                                 "max_ms": round(max(ts), 3), "samples": len(ts)}
        return statistics.median(ts)

    def check_delay(self, a: str, b: str):
        """Fails the start when the requested delay is not what the VMs see: the median
        round trip between two VMs must be at least 1.9 x the one-way delay."""
        rtt = self.measure_rtt(a, b)
        if self.effective_delay_ms > 0 and rtt < 1.9 * self.effective_delay_ms:
            raise TopologyError(f"delay not in effect: {a}->{b} round trip {rtt:.3f} ms, "
                                f"expected >= 2 x {self.effective_delay_ms} ms ({self.mechanism})")
        return rtt

    def cut(self, a: str, b: str):
        """100 % loss between VMs a and b, both directions, nothing else affected: each side's
        neighbour entry for the other points at a MAC address no interface has, so frames
        between them leave the sender and are accepted by nobody (established connections
        and new ones alike see silence, as with `netem loss 100%`; this kernel-independent way
        also works where netem is not built)."""
        va, vb = self.vms[a], self.vms[b]
        for src, dst in ((va, vb), (vb, va)):
            sh("ip", "neigh", "replace", dst.ip, "lladdr", NOWHERE_MAC, "nud", "permanent", "dev", "eth0", ns=src.ns)
        self.cuts.add((a, b))

    def heal(self, a: str, b: str):
        va, vb = self.vms[a], self.vms[b]
        for src, dst in ((va, vb), (vb, va)):
            sh("ip", "neigh", "del", dst.ip, "dev", "eth0", ns=src.ns, check=False)
        self.cuts.discard((a, b))

    def describe(self):
        return {"bridge": BRIDGE, "subnet": str(NET), "host": HOST_IP,
                "vms": {n: {"ns": v.ns, "ip": v.ip, "extra_ips": len(v.extra_ips)} for n, v in self.vms.items()},
                "delay_ms_requested": self.delay_ms, "delay_ms_in_effect": self.effective_delay_ms,
                "delay_mechanism": {"none": "none (delay 0)", "netem": "tc netem on each VM's eth0",
                                    "delayline": "delayline (frames from each VM redirected to a TAP, held in user space; "
                                                 + (f"tc netem not in this kernel: {self.netem_error})" if self.netem_error
                                                    else "chosen by --delay-mode)")}[self.mechanism],
                "rtt_measured": self.rtt,
                "delay_line_priority": ("SCHED_FIFO 1 (chrt)" if self.rt else "normal") if self.mechanism == "delayline" else None}
