"""The scenarios run on the local production topology. Each module has
`run(cluster, full) -> (figures, checks)` and can be run on its own
(`python3 deploy/local/scenarios/kill_lb.py [--full] [cluster flags]`); `run_suite` runs
them one after another on one cluster (`make cluster-test`, `make cluster-bench`)."""

import copy
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ORDER = ["ramp", "client-ip", "kill-shard", "partition", "kafka-restart", "rolling", "shard-outage", "kill-lb", "scale"]
# Run by `cluster.py bench` (make cluster-bench) and when named, not by `cluster.py test`
# (make cluster-test, part of make test): scale takes ~3 minutes. It comes last: it leaves
# the shard group on other VMs than the 0..6 the scenarios before it use.
BENCH_ONLY = {"scale"}


def module(name):
    return importlib.import_module(name.replace("-", "_"))


# Scenarios that need the Kafka VM on a storage of their own: kafka-restart needs a log that
# outlives the broker (s3: the VM's disk process). s3 slows the broker down as the log grows,
# so the others keep the fast memory storage and these run last, on a cluster of their own
# (see run_suite).
STORAGE = {"kafka-restart": "s3"}


def cannot_run(c, name):
    """Why `name` cannot show anything on this cluster, or None. A broker on memory storage
    loses its log when restarted (a Kafka VM keeps its disk): kafka-restart would only show
    that."""
    if name == "kafka-restart" and c.kafka_storage not in ("s3", "sqlite"):
        return (f"the broker runs on {c.kafka_storage} storage, which a restart empties "
                f"({c.kafka_storage_skipped or 'chosen by --kafka-storage'}); run it with --kafka-storage s3")
    return None


def run_one(c, name, full):
    import common
    import topo
    started = time.time()
    print(f"--- {name} ({'full' if full else 'short'})", flush=True)
    why = cannot_run(c, name)
    if why:
        print(f"NOT RUN {name}: {why}", flush=True)
        return None
    common.HANDSHAKE_TIMEOUT = c.a.client_handshake_timeout or (None if full else "30s")
    cpu0 = (c.net.lines_cpu_s(), topo.busy_cpu_s())
    drops0 = c.net.tap_drops()
    try:
        c.settle()
        figures, checks = module(name).run(c, full)
    except Exception as e:  # a scenario that cannot run is a failure, reported as such
        figures, checks = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}, [("scenario ran", False)]
    # What the delay lines cost during the scenario, next to what the whole machine spent.
    cpu = {"delay_lines": round(c.net.lines_cpu_s() - cpu0[0], 1), "machine_busy": round(topo.busy_cpu_s() - cpu0[1], 1)}
    # Frames the emulated wire lost because a delay line fell behind (TCP retransmits them):
    # the total, and per VM where any.
    per_vm = {n: d - drops0.get(n, 0) for n, d in c.net.tap_drops().items() if d > drops0.get(n, 0)}
    path, ok = common.save(name, c, full, figures, checks, started,
                           extra={"cpu_s": cpu, "delay_line_tap_drops": sum(per_vm.values()),
                                  "delay_line_tap_drops_by_vm": per_vm})
    print(f"{'PASS' if ok else 'FAIL'} {name} ({time.time() - started:.0f} s)  {path.name}")
    for label, v in checks:
        print(f"    {'ok ' if v else 'BAD'} {label}")
    if "error" in figures:
        print("    " + figures["traceback"].replace("\n", "\n    "))
    return ok


def run_suite(a, full):
    import cluster as cl
    import topo
    names = a.scenarios or [n for n in ORDER if full or n not in BENCH_ONLY]
    # scale leaves the shard group on other VMs: whatever else is named runs before it.
    names = sorted(names, key=lambda n: n == "scale")
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    t0 = time.time()
    results = {}
    # A scenario that needs a storage of its own runs last, on a cluster of its own (a fresh
    # broker: on s3 tansu slows down as the log grows). It used to be left out of the
    # default suite because its `ws_kafka_connected` check failed on a slow broker; that was
    # the metric flapping, fixed in kafka-source (docs/topology.md, "kafka-restart").
    own = {n: STORAGE.get(n) for n in names if a.kafka_storage not in ("s3", "sqlite") and STORAGE.get(n)}
    names = sorted(names, key=lambda n: n in own)
    # Consecutive scenarios with the same storage share one cluster.
    groups = []
    for name in names:
        storage = own.get(name)
        if groups and groups[-1][0] == storage:
            groups[-1][1].append(name)
        else:
            groups.append((storage, [name]))
    try:
        for storage, group in groups:
            ga = copy.copy(a)
            if storage:
                ga.kafka_storage = storage
            with cl.Cluster(ga) as c:
                for name in group:
                    results[name] = run_one(c, name, full)
    except topo.TopologyError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; torn down", file=sys.stderr)
        return 130
    failed = [n for n, ok in results.items() if ok is False]
    not_run = [n for n, ok in results.items() if ok is None]
    passed = len(results) - len(failed) - len(not_run)
    print(f"cluster {'bench' if full else 'test'}: {passed} passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}"
          f"{f', {len(not_run)} not run (' + ', '.join(not_run) + ')' if not_run else ''} in {time.time() - t0:.0f} s")
    return 1 if failed else 0


def main_single(name):
    """Entry point of a scenario module run as a script."""
    import cluster as cl
    args = sys.argv[1:]
    full = "--full" in args
    args = [x for x in args if x != "--full"]
    a = cl.parser().parse_args(["bench" if full else "test", name, *args])
    cl.install_signal_handlers()
    sys.exit(run_suite(a, full))
