"""Helpers shared by the Python test and benchmark scripts (tests/e2e, tests/faults,
tests/conformance, bench): free loopback ports, waiting for a server to come up, plain HTTP
GETs, reading Prometheus text, and the processes a script starts.

A script imports it with

    sys.path.insert(0, str(Path(__file__).resolve().parents[N] / "tests" / "pylib"))
    import odin

(N: how many directories the script is below the repository root).
"""

import asyncio
import json
import os
from signal import SIGKILL, SIGTERM
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def release_bin() -> Path:
    """Where the release binaries are: `$ODIN_BIN`, else target/release (set ODIN_BIN to run
    a benchmark's scripts against another build, side by side)."""
    return Path(os.environ.get("ODIN_BIN") or REPO / "target" / "release")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, below the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 returns) can be taken, between this
    call and the server's bind, as the local port of any outgoing connection — a Kafka
    client's, a health poll's — and the server then fails to listen (a CI run lost
    exported_metrics.py that way: "not ready after 30 s, connection refused"). Ports below
    the range are never autobound. Each port is handed out once per process."""
    import random
    low = max(_ephemeral_low(), 11000)
    for _ in range(2000):
        port = random.randrange(10000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # nothing free below the range: fall back to the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound (nothing listens there any more)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Waits until something accepts connections on `port`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not ready after {timeout:.0f} s")


def http_get(url: str, timeout: float = 2.0) -> tuple:
    """`GET url`: (status, body as text); an HTTP error status is a result, not an exception.
    Raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_json(url: str, timeout: float = 2.0):
    """`GET url` parsed as JSON, whatever the status."""
    return json.loads(http_get(url, timeout)[1])


def wait_http(url: str, timeout: float = 30.0, ready=lambda status, body: True) -> tuple:
    """Polls `url` until it answers with a response `ready(status, body)` accepts (any
    response by default); returns that (status, body)."""
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        try:
            status, body = http_get(url, timeout=1)
            if ready(status, body):
                return status, body
            last = f"HTTP {status}"
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.05)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s ({last})")


def wait_for(cond, timeout: float, what: str) -> None:
    """Polls `cond()` every 0.1 s until it is true; an OSError (nothing answers yet) counts as
    false. Raises RuntimeError after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def ok(status, _body) -> bool:
    """For `wait_http`: a 200."""
    return status == 200


def metric(page: str, name: str, *labels: str) -> float:
    """The sum of `name`'s samples in a Prometheus text page whose label set contains every
    string in `labels` (e.g. 'code="1012"')."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name):]
        if not rest.startswith(("{", " ")):
            continue
        if all(lab in line for lab in labels):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return total


def metric_names(page: str) -> set:
    """Every metric family named in a Prometheus text page (histograms by their base name)."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
    return names


def _exit_on_sigterm() -> None:
    """A script killed with SIGTERM (make interrupted, a CI timeout) unwinds like one that
    failed: SystemExit runs the `with`/`finally` blocks that stop the servers it started,
    instead of dying at once and leaving them running. Only where nothing else handles
    SIGTERM, and only from the main thread (where Python delivers signals)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(SIGTERM) not in (signal.SIG_DFL, None):
        return

    def handler(signum, _frame):
        # Once: a second SIGTERM during the clean-up must not interrupt it.
        signal.signal(SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(SIGTERM, handler)


class Procs:
    """The processes a script started, each logging to /tmp/odin-<tag>-<name>.log; stopped
    together by `stop()` or on leaving a `with` block: `stop_signal` (SIGTERM: a drain), then
    SIGKILL for whatever is left after `grace` seconds."""

    def __init__(self, tag: str, stop_signal=SIGTERM, grace: float = 20):
        _exit_on_sigterm()
        self.tag = tag
        self.stop_signal = stop_signal
        self.grace = grace
        # By name (the latest of that name), and every process ever started, for `stop`.
        self.procs = {}
        self.started = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def log_path(self, name: str) -> str:
        return f"/tmp/odin-{self.tag}-{name}.log"

    def start(self, name: str, args, **kw) -> subprocess.Popen:
        """Starts `args` as `name` (reusing a name points it at the new process)."""
        log = open(self.log_path(name), "w")
        kw.setdefault("stdout", log)
        kw.setdefault("stderr", log)
        p = subprocess.Popen([str(a) for a in args], **kw)
        self.procs[name] = p
        self.started.append(p)
        return p

    def __getitem__(self, name: str) -> subprocess.Popen:
        return self.procs[name]

    def signal(self, name: str, sig=SIGTERM) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, name: str, sig=SIGKILL, timeout: float = 30) -> None:
        """Sends `sig` and waits for the process to exit."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=timeout)

    def wait(self, name: str, timeout: float):
        return self.procs[name].wait(timeout=timeout)

    def exited(self) -> dict:
        """Processes that have already exited, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self) -> None:
        """Stops every process still running, newest first."""
        running = [p for p in reversed(self.started) if p.poll() is None]
        for p in running:
            p.send_signal(self.stop_signal)
        deadline = time.time() + self.grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = {}
        self.started = []


async def until(cond, timeout: float, what: str):
    """Polls a blocking `cond()` off the event loop (run in a thread, so servers or clients on
    the loop keep running) every 0.05 s until it returns something true, which is returned; an
    OSError (nothing answers yet) counts as false. AssertionError after `timeout` seconds.
    The 0.05 s is the poll interval over state in other processes (metrics, `/health`),
    bounded by the deadline: a slow machine only makes it poll fewer times."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(cond)
            if last:
                return last
        except OSError as e:
            last = e
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Arrivals:
    """~`rate` new WebSocket clients per second to `url` (`run()` as a task): each connects,
    subscribes to the next of `channels`, waits for `subscribed` and closes. `ok` counts the
    ones that did, `failed` keeps every failure."""

    def __init__(self, url: str, rate: float, channels):
        self.url, self.rate, self.channels = url, rate, list(channels)
        self.ok = 0
        self.failed = []
        self.stop = False
        self.tasks = set()
        self.ended = asyncio.Event()  # set whenever an arrival ends (for `pass_`)

    async def one(self, channel):
        import websockets
        try:
            async with websockets.connect(self.url, open_timeout=20) as ws:
                await ws.send(json.dumps({"type": "subscribe", "channels": [channel]}))
                while json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] != "subscribed":
                    pass
            self.ok += 1
        except Exception as e:  # noqa: BLE001 - every failure is a test failure, kept
            self.failed.append(repr(e))
        self.ended.set()

    async def run(self):
        start, n = time.monotonic(), 0
        while not self.stop:
            due = start + n / self.rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 2:
                start, n = now, 0  # fell behind (a loaded machine): no burst to catch up
            t = asyncio.create_task(self.one(self.channels[n % len(self.channels)]))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
            n += 1
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=30)

    async def settle(self, timeout: float = 30.0):
        """Until every arrival begun so far has ended (bounded): a handshake leased to a
        shard just before it was removed completes after the removal, and is not new."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    async def pass_(self, n: int, timeout: float = 30.0):
        """Until `n` more arrivals succeeded (bounded); fails at the first failed arrival."""
        target = self.ok + n
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert not self.failed, f"arrivals failed: {self.failed[:3]}"
            self.ended.clear()
            try:
                await asyncio.wait_for(self.ended.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise AssertionError(f"arrivals stalled at {self.ok} of {target}") from None
        assert not self.failed, f"arrivals failed: {self.failed[:3]}"
