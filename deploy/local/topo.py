"""The network of the local topology: one Linux network namespace per VM, each with one
veth link to a bridge in the host namespace and its own address in 10.213.0.0/16, an
address for the host on the bridge (the operator's machine: it reaches every VM), optional
`tc netem` delay on every VM's egress (one-way latency between any two VMs), and a
per-path cut used by the partition scenario.

Everything created here carries the prefix `odinc` (namespaces `odinc-<vm>`, links
`oc-<vm>`, bridge `odincbr0`), so `cleanup()` can remove the leftovers of a crashed run
without touching anything else on the machine.
"""

import ipaddress
import os
import subprocess
from dataclasses import dataclass, field

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


def cleanup():
    """Removes every namespace and link of this harness (also those of a crashed run) and
    kills whatever still runs inside those namespaces."""
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
        if name.startswith("oc-") or name == BRIDGE:
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


class Network:
    def __init__(self, delay_ms: float):
        self.delay_ms = delay_ms
        self.vms = {}
        self.netem = None        # None = not tried, True = in effect, False = unavailable
        self.netem_error = ""
        self.cuts = set()

    def create(self):
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/{NET.prefixlen}", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def add_vm(self, vm: Vm, sysctls=None):
        sh("ip", "netns", "add", vm.ns)
        sh("ip", "link", "add", vm.link, "type", "veth", "peer", "name", "eth0", "netns", vm.ns)
        sh("ip", "link", "set", vm.link, "master", BRIDGE, "up")
        sh("ip", "link", "set", "lo", "up", ns=vm.ns)
        for ip in [vm.ip, *vm.extra_ips]:
            sh("ip", "addr", "add", f"{ip}/{NET.prefixlen}", "dev", "eth0", ns=vm.ns)
        sh("ip", "link", "set", "eth0", "up", ns=vm.ns)
        applied, skipped = {}, {}
        for key, value in (sysctls or {}).items():
            r = sh("sysctl", "-q", "-w", f"{key}={value}", ns=vm.ns, check=False)
            (applied if r.returncode == 0 else skipped)[key] = value
        self.vms[vm.name] = vm
        self._delay(vm)
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
        sh("ip", "netns", "del", vm.ns, check=False)
        sh("ip", "link", "del", vm.link, check=False)
        self.cuts = {c for c in self.cuts if name not in c}

    def _delay(self, vm):
        if self.delay_ms <= 0 or self.netem is False:
            return
        r = sh("tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{self.delay_ms}ms",
               ns=vm.ns, check=False)
        if r.returncode != 0:
            self.netem = False
            self.netem_error = r.stderr.strip()
        else:
            self.netem = True

    @property
    def effective_delay_ms(self):
        return self.delay_ms if self.netem else 0.0

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
                "netem": {None: "not used (delay 0)", True: "in effect", False: f"unavailable: {self.netem_error}"}[self.netem]}
