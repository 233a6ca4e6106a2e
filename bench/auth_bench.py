#!/usr/bin/env python3
"""What authentication costs ws-lb (issue 16), measured with the real release binaries.

Subcommands (each starts and stops its own servers on 127.0.0.x and bounds its duration):

  rate    ws-lb's connection rate with auth off and on (HS256, RS256, ES256 tokens minted
          by loadtest before each ramp, one `sub` per connection). One server set (ws-shard
          with 2 shards + ws-lb) per mode, all started at once and kept up; rounds alternate
          the modes (the order rotates each round). Per run: a fixed ramp (success, handshake
          p50/p99, ws-lb and ws-shard CPU per connection) and a find-max search (highest
          rate with success >= 99.9 % and handshake p99 <= --max-p99). The first run of each
          server set (first after start) is reported apart; medians and ratios to "off" over
          the warm runs.
          Two token cases per auth mode and round: `fresh` (a new token per connection, never
          seen by the servers: every verification is a full one, the worst case) and `storm`
          (a reconnect storm: the same --connections tokens, from a file minted once per mode
          with PyJWT, presented again every round, so from round 2 on ws-lb and the shard
          find them in their verified-token caches; round 1's storm run fills the caches and
          is reported apart as `priming`). Each run records the cache hit/miss counts of both
          tiers (ws_*_auth_cache_lookups_total deltas). --cases picks the cases.
  flood   memory under a flood of bad tokens: ws-lb and ws-shard with auth on, RSS after a
          warm-up, then --rounds rounds of --per-round connections, each with a bad token
          (malformed, alg none, algorithm confusion, wrong signature, expired, not yet valid,
          wrong audience, unknown kid, 7 KB garbage), in the query and as a first message,
          plus 100 KB tokens in both places (the query one is refused with 431 by the
          header limit, before any token code). Checks that none was established, that the
          shard accepted no connection, that the auth-failure counter moved by at least the
          number of token refusals, and that RSS stays at its post-warm-up level (the growth
          from round 1 to the last round is below --max-growth-kib).

  verify  the verification cost per token: `cargo bench -p auth --bench verify` (our verifier
          per algorithm, and ring's bare signature checks of the same signatures), with
          `openssl speed` on the same algorithms as an independent reference for this CPU,
          --repeat times, alternating, load average before and after each.

Results: bench/results/auth-<subcommand>-<time>.json (commit, machine, load average, every
non-default flag of the servers and of loadtest) and a markdown table on stdout.
"""

import argparse
import base64
import glob
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pylib"))
import bench  # noqa: E402
import odin  # noqa: E402

TESTDATA = odin.REPO / "crates" / "auth" / "testdata"
SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
MODES = ["off", "HS256", "RS256", "ES256"]
CHANNELS = "trades.S{0..9}"
# The flags bench.py gives every ws-lb and ws-shard it measures (not the subject here; they
# lift the per-IP and admission limits that would otherwise cap a co-located generator).
LB_FLAGS = ["--per-ip-rate", "0", "--admission-rate", "20000", "--admission-burst", "2000",
            "--log-level", "warn", "--drain-window", "1s"]
SHARD_FLAGS = ["--shards", "2", "--max-connections", "6000", "--log-level", "warn", "--drain-window", "1s",
               "--client-rate", "0"]


def key_files(tmp: Path) -> dict:
    """The servers' key files (an HS256 secret, a JWKS with the test RSA and EC keys) and
    loadtest's signing keys."""
    (tmp / "secret").write_text(SECRET + "\n")
    keys = [json.loads((TESTDATA / f"{k}.jwk.json").read_text()) for k in ("rsa1", "ec1")]
    (tmp / "jwks.json").write_text(json.dumps({"keys": keys}))
    return {"secret": tmp / "secret", "jwks": tmp / "jwks.json",
            "rsa": TESTDATA / "rsa1.pem", "ec": TESTDATA / "ec1.pem"}


def auth_flags(files: dict) -> list:
    return ["--auth-hs256-secret-file", str(files["secret"]), "--auth-jwks-file", str(files["jwks"])]


def token_flags(mode: str, files: dict) -> list:
    """loadtest's flags for a mode: one token minted per attempt, entitled to every channel."""
    if mode == "off":
        return []
    key, kid = {"HS256": (files["secret"], None), "RS256": (files["rsa"], "rsa1"), "ES256": (files["ec"], "ec1")}[mode]
    return ["--sign-key", str(key), "--sign-alg", mode, *(["--sign-kid", kid] if kid else [])]


class ServerSet:
    """ws-shard (2 shards in one process) + ws-lb, auth on or off."""

    def __init__(self, procs, name: str, auth: list):
        self.name = name
        self.shard, ports, self.shard_admin = bench.start_shards(procs, shards=2, extra=auth)
        self.lb, self.port, self.lb_admin = bench.start_lb(procs, ports, name=f"lb-{name}", extra=auth)
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.runs = 0

    def cpu(self):
        return bench.proc_cpu_s(self.lb.pid), bench.proc_cpu_s(self.shard.pid)


def cache_lookups(server: ServerSet) -> dict:
    """The verified-token cache counters of both tiers (hits and misses since start)."""
    lb = odin.http_get(f"http://127.0.0.1:{server.lb_admin}/metrics")[1]
    sh = odin.http_get(f"http://127.0.0.1:{server.shard_admin}/metrics")[1]
    return {f"{tier}_{r}": odin.metric(page, f"ws_{tier}_auth_cache_lookups_total", f'result="{r}"')
            for tier, page in (("lb", lb), ("shard", sh)) for r in ("hit", "miss")}


def storm_tokens(mode: str, n: int, path: Path) -> Path:
    """n tokens of `mode` (distinct subs, entitled to every channel, valid 2 h), made with
    PyJWT: the tokens the clients of a reconnect storm present again."""
    now = int(time.time())
    key, kid = {"HS256": (SECRET, None), "RS256": ((TESTDATA / "rsa1.pem").read_bytes(), "rsa1"),
                "ES256": ((TESTDATA / "ec1.pem").read_bytes(), "ec1")}[mode]
    headers = {"kid": kid} if kid else None
    lines = [jwt.encode({"sub": f"storm-{i}", "iat": now, "exp": now + 7200, "channels": ["*"]}, key,
                        algorithm=mode, headers=headers) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def ramp(server: ServerSet, mode: str, files: dict, a, token_file: Path = None) -> dict:
    tokens = ["--token-file", str(token_file)] if token_file else token_flags(mode, files)
    before = cache_lookups(server)
    lb0, sh0 = server.cpu()
    rep = bench.loadtest(server.url, a.connections, a.rate, a.hold,
                         extra=["--channels", CHANNELS, *tokens], name=f"{mode} ramp")
    lb1, sh1 = server.cpu()
    after = cache_lookups(server)
    row = bench.summarize(rep)
    est = max(rep["counts"]["established"], 1)
    row.update({"lb_cpu_us_per_conn": (lb1 - lb0) * 1e6 / est, "shard_cpu_us_per_conn": (sh1 - sh0) * 1e6 / est,
                "tokens": rep["config"].get("tokens"),
                "cache_lookups": {k: after[k] - before[k] for k in after}})
    return row


def find_max(server: ServerSet, mode: str, files: dict, a) -> dict:
    rep = bench.loadtest(server.url, a.step, 1, 1, name=f"{mode} find-max", extra=[
        "--channels", CHANNELS, "--find-max", "--max-p99", f"{a.max_p99}ms",
        "--find-max-rates", ",".join(str(r) for r in a.rates), *token_flags(mode, files)])
    fm = rep.get("find_max") or {}
    return {"highest_sustained_rate": fm.get("highest_sustained_rate"),
            "steps": [{k: s.get(k) for k in ("rate", "passed", "success_ratio", "handshake_p99_us",
                                                 "generator_behind", "reason")}
                      for s in fm.get("steps", [])]}


def cmd_rate(a):
    modes = a.modes
    results = {"machine": bench.machine(), "command": " ".join(sys.argv), "modes": modes, "cases": a.cases,
               "loadtest_flags": {"connections": a.connections, "rate": a.rate, "hold": a.hold,
                                  "channels": CHANNELS, "source_ips": "127.0.0.2-127.0.0.9",
                                  "find_max": None if a.no_find_max else
                                  {"step": a.step, "rates": a.rates, "max_p99_ms": a.max_p99},
                                  "fresh": "--sign-key <key> --sign-alg <mode> (one new token per attempt)",
                                  "storm": f"--token-file <{a.connections} PyJWT tokens per mode, the same every round>"},
               "server_flags": {"ws-lb": LB_FLAGS, "ws-shard": SHARD_FLAGS,
                                "auth (modes other than off, both tiers)": ["--auth-hs256-secret-file <file>",
                                                                           "--auth-jwks-file <rsa1+ec1 JWKS>"]},
               "rounds": []}
    with tempfile.TemporaryDirectory(prefix="odin-auth-bench-") as tmp, odin.Procs("auth-bench") as procs:
        files = key_files(Path(tmp))
        storm_files = {m: storm_tokens(m, a.connections, Path(tmp) / f"storm-{m}.txt")
                       for m in modes if m != "off" and "storm" in a.cases}
        servers = {m: ServerSet(procs, m.lower(), [] if m == "off" else auth_flags(files)) for m in modes}
        for rnd in range(a.rounds):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            runs = {}
            for mode in order:
                s = servers[mode]
                cases = ["fresh"] if mode == "off" else a.cases
                for case in cases:
                    row = ramp(s, mode, files, a, storm_files.get(mode) if case == "storm" else None)
                    if not a.no_find_max and case == "fresh":
                        row["find_max"] = find_max(s, mode, files, a)
                    row.update({"case": case, "first_after_start": s.runs == 0,
                                "priming": case == "storm" and rnd == 0, "loadavg": bench.load()})
                    s.runs += 1
                    name = mode if case == "fresh" else f"{mode} storm"
                    runs[name] = row
                    fm = row.get("find_max", {}).get("highest_sustained_rate")
                    cl = row["cache_lookups"]
                    print(f"round {rnd + 1} {name:>11}: {row['success_pct']:.2f}% p50 {row['handshake_p50_ms']:.2f} ms "
                          f"p99 {row['handshake_p99_ms']:.2f} ms lb {row['lb_cpu_us_per_conn']:.0f} us/conn "
                          f"shard {row['shard_cpu_us_per_conn']:.0f} us/conn cache lb {cl['lb_hit']:.0f}h/{cl['lb_miss']:.0f}m "
                          f"shard {cl['shard_hit']:.0f}h/{cl['shard_miss']:.0f}m find-max {fm} "
                          f"load {row['loadavg'][0]}{' (priming)' if row['priming'] else ''}", flush=True)
            results["rounds"].append({"order": order, "runs": runs})
    rate_table(results)
    bench.save("auth-rate", results)


def rate_table(results):
    cases = results.get("cases", ["fresh"])
    names = []
    for m in results["modes"]:
        names += ["off"] if m == "off" else [n for c, n in (("fresh", m), ("storm", f"{m} storm")) if c in cases]

    def rows(kind: str):
        out = {}
        for n in names:
            rs = [r["runs"][n] for r in results["rounds"] if n in r["runs"]]
            if kind == "first":
                rs = [r for r in rs if r["first_after_start"]]
            elif kind == "priming":
                rs = [r for r in rs if r.get("priming")]
            else:
                rs = [r for r in rs if not r["first_after_start"] and not r.get("priming")]
            out[n] = rs
        return out

    def med(rs, key, sub=None):
        vals = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in rs]
        vals = [v for v in vals if v is not None]
        return bench.median(vals)

    def fmt(v, f="{:.2f}"):
        return "—" if v is None else f.format(v)

    # Ratios are to the warm "off" runs of the same run (the first "off" run after start for
    # the first-after-start table).
    for title, kind in (("First run after start (one per server set)", "first"),
                        ("Storm runs that filled the caches (round 1)", "priming"),
                        ("Warm runs (medians)", "warm")):
        rs = rows(kind)
        if not any(rs.values()):
            continue
        base = rows("first" if kind == "first" else "warm").get("off") or []
        off_cpu = med(base, "lb_cpu_us_per_conn")
        off_fm = med(base, "find_max", "highest_sustained_rate")
        print(f"\n{title}\n\n| mode | runs | success | handshake p50 | p99 | ws-lb CPU/conn | ws-shard CPU/conn "
              f"| ws-lb cache hits | ws-lb rate by CPU vs off | find-max rate | vs off |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for n in names:
            r = rs[n]
            if not r:
                continue
            cpu, fm = med(r, "lb_cpu_us_per_conn"), med(r, "find_max", "highest_sustained_rate")
            by_cpu = off_cpu / cpu if off_cpu and cpu else None
            fm_ratio = fm / off_fm if fm and off_fm else None
            hits = sum(x["cache_lookups"]["lb_hit"] for x in r)
            looks = hits + sum(x["cache_lookups"]["lb_miss"] for x in r)
            hit_pct = 100 * hits / looks if looks else None
            results.setdefault("summary", {}).setdefault(kind, {})[n] = {
                "runs": len(r), "success_pct": med(r, "success_pct"), "handshake_p50_ms": med(r, "handshake_p50_ms"),
                "handshake_p99_ms": med(r, "handshake_p99_ms"), "lb_cpu_us_per_conn": cpu,
                "shard_cpu_us_per_conn": med(r, "shard_cpu_us_per_conn"), "lb_cache_hit_pct": hit_pct,
                "rate_by_lb_cpu_vs_off": by_cpu, "find_max_rate": fm, "find_max_vs_off": fm_ratio}
            print(f"| {n} | {len(r)} | {fmt(med(r, 'success_pct'), '{:.2f}%')} | {fmt(med(r, 'handshake_p50_ms'))} ms "
                  f"| {fmt(med(r, 'handshake_p99_ms'))} ms | {fmt(cpu, '{:.0f}')} µs "
                  f"| {fmt(med(r, 'shard_cpu_us_per_conn'), '{:.0f}')} µs | {fmt(hit_pct, '{:.0f}%')} | {fmt(by_cpu, '{:.2f}×')} "
                  f"| {fmt(fm, '{:.0f}/s')} | {fmt(fm_ratio, '{:.2f}×')} |")


# ---- flood -------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs_raw(header: dict, claims: dict, key: bytes) -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


def bad_tokens() -> dict:
    """One of each kind of bad token (PyJWT where it will make it), by label."""
    now = int(time.time())
    ok = {"sub": "flood", "iat": now, "exp": now + 3600, "channels": ["*"]}
    rsa_pub = (TESTDATA / "rsa1.pub.pem").read_bytes()
    rsa_key = (TESTDATA / "rsa1.pem").read_bytes()
    return {
        "malformed": "not-a-jwt",
        "garbage_7kb": "x" * 7000,
        "alg_none": _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(json.dumps(ok).encode()) + ".",
        "alg_confusion": _hs_raw({"alg": "HS256", "typ": "JWT"}, ok, rsa_pub),
        "wrong_signature": jwt.encode(ok, "another-secret-0123456789abcdef-0123456789", algorithm="HS256"),
        "expired": jwt.encode({**ok, "exp": now - 3600}, SECRET, algorithm="HS256"),
        "not_yet_valid": jwt.encode({**ok, "nbf": now + 3600}, SECRET, algorithm="HS256"),
        "wrong_audience": jwt.encode({**ok, "aud": "someone-else"}, SECRET, algorithm="HS256"),
        "unknown_kid": jwt.encode(ok, rsa_key, algorithm="RS256", headers={"kid": "nobody"}),
    }


def rss_kib(pid: int) -> int:
    return bench.proc_rss_kb(pid)[0]


def cmd_flood(a):
    results = {"machine": bench.machine(), "command": " ".join(sys.argv),
               "server_flags": {"ws-lb": LB_FLAGS, "ws-shard": SHARD_FLAGS,
                                "auth (both tiers)": ["--auth-hs256-secret-file <file>", "--auth-jwks-file <file>"]},
               "per_round": a.per_round, "rounds": [], "rate": a.rate}
    with tempfile.TemporaryDirectory(prefix="odin-auth-flood-") as tmp, odin.Procs("auth-flood") as procs:
        tmp = Path(tmp)
        files = key_files(tmp)
        s = ServerSet(procs, "flood", auth_flags(files))
        toks = bad_tokens()
        results["bad_tokens"] = sorted(toks)
        (tmp / "bad.txt").write_text("\n".join(toks.values()) + "\n")
        (tmp / "huge.txt").write_text("h" * (100 * 1024) + "\n")
        lb_metrics = f"http://127.0.0.1:{s.lb_admin}/metrics"
        shard_metrics = f"http://127.0.0.1:{s.shard_admin}/metrics"

        def lb_failures():
            return odin.metric(odin.http_get(lb_metrics)[1], "ws_lb_auth_failures_total")

        def shard_accepted():
            return odin.metric(odin.http_get(shard_metrics)[1], "ws_shard_connections_accepted_total")

        def flood(place: str, token_file: Path, n: int) -> dict:
            rep = bench.loadtest(s.url, n, a.rate, 0, name=f"flood {place}", extra=[
                "--token-file", str(token_file), "--token-in", place, "--settle", "1s"])
            return {"attempted": rep["counts"]["attempted"], "established": rep["counts"]["established"],
                    "failures": rep["failures"]}

        # Warm-up: good connections and one round of bad ones, so the allocator and the
        # runtime reach their working size before the baseline is taken.
        warm = bench.loadtest(s.url, 2000, a.rate, 1, name="warm-up", extra=[
            "--channels", CHANNELS, *token_flags("HS256", files)])
        results["warm_up_good"] = bench.summarize(warm)
        results["warm_up_bad"] = flood("query", tmp / "bad.txt", a.per_round)
        base = {"lb_rss_kib": rss_kib(s.lb.pid), "shard_rss_kib": rss_kib(s.shard.pid),
                "lb_auth_failures": lb_failures(), "shard_accepted": shard_accepted(), "loadavg": bench.load()}
        results["baseline"] = base
        print(f"baseline after warm-up: ws-lb {base['lb_rss_kib']} KiB, ws-shard {base['shard_rss_kib']} KiB, "
              f"shard accepted {base['shard_accepted']:.0f}", flush=True)
        total = refusals = 0
        for rnd in range(a.rounds):
            half = a.per_round // 2
            tenth = a.per_round // 10
            parts = {"query": flood("query", tmp / "bad.txt", half - tenth // 2),
                     "query_100kb": flood("query", tmp / "huge.txt", tenth // 2),
                     "message": flood("message", tmp / "bad.txt", a.per_round - half - tenth // 2),
                     "message_100kb": flood("message", tmp / "huge.txt", tenth // 2)}
            attempted = sum(p["attempted"] for p in parts.values())
            total += attempted
            refusals += attempted - parts["query_100kb"]["attempted"]
            row = {"parts": parts, "attempted": attempted,
                   "established": sum(p["established"] for p in parts.values()),
                   "lb_rss_kib": rss_kib(s.lb.pid), "shard_rss_kib": rss_kib(s.shard.pid),
                   "lb_auth_failures_delta": lb_failures() - base["lb_auth_failures"],
                   "shard_accepted_delta": shard_accepted() - base["shard_accepted"], "loadavg": bench.load()}
            results["rounds"].append(row)
            print(f"round {rnd + 1}: {attempted} bad-token connections ({total} so far), established "
                  f"{row['established']}, ws-lb {row['lb_rss_kib']} KiB ({row['lb_rss_kib'] - base['lb_rss_kib']:+d}), "
                  f"ws-shard {row['shard_rss_kib']} KiB ({row['shard_rss_kib'] - base['shard_rss_kib']:+d}), "
                  f"auth failures +{row['lb_auth_failures_delta']:.0f}, shard accepted "
                  f"+{row['shard_accepted_delta']:.0f}, load {row['loadavg'][0]}", flush=True)
        # Connections are gone once loadtest returns; the slot gauges must be back at zero.
        odin.wait_for(lambda: odin.metric(odin.http_get(lb_metrics)[1], "ws_lb_active_connections") == 0,
                      10, "ws-lb active connections back to 0")
    last, first = results["rounds"][-1], results["rounds"][0]
    growth = {"lb_kib": last["lb_rss_kib"] - first["lb_rss_kib"],
              "shard_kib": last["shard_rss_kib"] - first["shard_rss_kib"],
              "lb_kib_vs_baseline": last["lb_rss_kib"] - base["lb_rss_kib"],
              "shard_kib_vs_baseline": last["shard_rss_kib"] - base["shard_rss_kib"]}
    checks = {
        "no bad token established": all(r["established"] == 0 for r in results["rounds"]),
        "no bad token reached a shard": last["shard_accepted_delta"] == 0,
        "every token refusal counted": last["lb_auth_failures_delta"] >= refusals,
        f"ws-lb RSS growth round 1 -> {a.rounds} < {a.max_growth_kib} KiB": growth["lb_kib"] < a.max_growth_kib,
        f"ws-shard RSS growth round 1 -> {a.rounds} < {a.max_growth_kib} KiB": growth["shard_kib"] < a.max_growth_kib,
    }
    results.update({"total_bad_connections": total, "token_refusals": refusals, "growth": growth,
                    "checks": checks})
    print(f"\n| | ws-lb RSS | ws-shard RSS |\n|---|---|---|\n"
          f"| baseline (after warm-up) | {base['lb_rss_kib'] / 1024:.1f} MiB | {base['shard_rss_kib'] / 1024:.1f} MiB |")
    for i, r in enumerate(results["rounds"]):
        print(f"| after round {i + 1} ({(i + 1) * a.per_round:,} bad) | {r['lb_rss_kib'] / 1024:.1f} MiB "
              f"| {r['shard_rss_kib'] / 1024:.1f} MiB |")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    bench.save("auth-flood", results)
    if not all(checks.values()):
        raise SystemExit(1)


# ---- verify ------------------------------------------------------------------------------

def criterion_estimates() -> dict:
    """Criterion's latest estimates of the verify bench, µs per call: [lower, estimate, upper]
    of the slope (or the mean when criterion took no slope)."""
    out = {}
    for group in ("verify", "ring", "verify-cpu", "ring-cpu"):
        for f in glob.glob(str(odin.REPO / "target" / "criterion" / group / "*" / "new" / "estimates.json")):
            d = json.loads(Path(f).read_text())
            meta = json.loads((Path(f).parent / "benchmark.json").read_text())
            e = d.get("slope") or d["mean"]
            ci = e["confidence_interval"]
            out[meta["full_id"]] = [round(ci["lower_bound"] / 1e3, 3), round(e["point_estimate"] / 1e3, 3),
                                    round(ci["upper_bound"] / 1e3, 3)]
    return out


def openssl_speed() -> dict:
    """`openssl speed` verify times (µs) for RSA-2048 and ECDSA P-256 on this CPU."""
    r = subprocess.run(["openssl", "speed", "-seconds", "3", "rsa2048", "ecdsap256"], capture_output=True, text=True)
    out = {"version": subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()}
    for line in r.stdout.splitlines():
        m = re.match(r"rsa 2048 bits\s+\S+\s+\S+\s+(\S+)\s+(\S+)", line)
        if m:
            out["RSA-2048 verify"] = round(1e6 / float(m.group(2)), 2)
        m = re.match(r"\s*256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+(\S+)\s+(\S+)", line)
        if m:
            out["ECDSA P-256 verify"] = round(1e6 / float(m.group(2)), 2)
    return out


def cmd_verify(a):
    results = {"machine": bench.machine(), "command": " ".join(sys.argv),
               "bench": "cargo bench --locked -p auth --bench verify (criterion, measurement_time 3 s)",
               "units": "µs per call, [lower, estimate, upper] of criterion's 95 % interval",
               "runs": []}
    # Built once; then the bench executable is run directly, so no run waits for a cargo lock
    # held by a build elsewhere on the box.
    exe = Path(a.bench_bin).resolve() if a.bench_bin else None
    if exe is None:
        r = subprocess.run(["cargo", "bench", "--locked", "-p", "auth", "--bench", "verify", "--no-run",
                            "--message-format", "json"], cwd=odin.REPO, capture_output=True, text=True)
        exes = [m.get("executable") for m in map(json.loads, r.stdout.splitlines())
                if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "verify"]
        if r.returncode != 0 or not exes or not exes[-1]:
            print(r.stderr[-3000:])
            raise SystemExit("cargo bench --no-run failed")
        exe = exes[-1]
    results["bench_executable"] = str(exe)
    env = {**os.environ, "CRITERION_HOME": str(odin.REPO / "target" / "criterion")}
    for i in range(a.repeat):
        before = bench.load()
        r = subprocess.run([str(exe), "--bench"], cwd=odin.REPO / "crates" / "auth", env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:])
            raise SystemExit("the verify bench failed")
        run = {"loadavg_before": before, "criterion": criterion_estimates(), "loadavg_after": bench.load()}
        run["openssl_speed"] = openssl_speed()
        run["loadavg_after_openssl"] = bench.load()
        results["runs"].append(run)
        c, o = run["criterion"], run["openssl_speed"]
        print(f"run {i + 1} (load {before[0]} -> {run['loadavg_after'][0]}): "
              + ", ".join(f"{k} {v[1]:.2f}" for k, v in sorted(c.items()))
              + f"; openssl RSA-2048 {o.get('RSA-2048 verify')} P-256 {o.get('ECDSA P-256 verify')}", flush=True)
    names = sorted({k for r in results["runs"] for k in r["criterion"]})
    print("\n| call | " + " | ".join(f"run {i + 1} (load {r['loadavg_before'][0]})" for i, r in enumerate(results["runs"]))
          + " |\n|---|" + "---|" * len(results["runs"]))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r['criterion'][n][1]:.2f} µs" if n in r["criterion"] else "—"
                                       for r in results["runs"]) + " |")
    for n in ("RSA-2048 verify", "ECDSA P-256 verify"):
        print(f"| openssl speed: {n} | " + " | ".join(f"{r['openssl_speed'].get(n)} µs" for r in results["runs"]) + " |")
    bench.save("auth-verify", results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("rate", help="connection rate and CPU per connection, auth off vs on, alternating")
    c.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    c.add_argument("--rounds", type=int, default=4, help="rounds over all modes; the first run of each is apart")
    c.add_argument("--connections", type=int, default=3000)
    c.add_argument("--rate", type=int, default=1000)
    c.add_argument("--hold", type=int, default=1)
    c.add_argument("--step", type=int, default=2000, help="connections per find-max step")
    c.add_argument("--rates", type=int, nargs="+", default=[1000, 1500, 2000, 2500, 3000, 4000, 5000])
    c.add_argument("--max-p99", type=int, default=25, help="find-max: handshake p99 limit (ms)")
    c.add_argument("--no-find-max", action="store_true")
    c.add_argument("--cases", nargs="+", default=["fresh", "storm"], choices=["fresh", "storm"],
                   help="fresh: a new token per connection; storm: the same tokens every round (cache hits)")
    c = sub.add_parser("flood", help="RSS of ws-lb and ws-shard under rounds of bad-token connections")
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--per-round", type=int, default=4000)
    c.add_argument("--rate", type=int, default=1000)
    c.add_argument("--max-growth-kib", type=int, default=4096)
    c = sub.add_parser("verify", help="verification cost per token (criterion) with openssl speed beside it")
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--bench-bin", help="the built bench executable (default: build it with cargo bench --no-run)")
    a = ap.parse_args()
    {"rate": cmd_rate, "flood": cmd_flood, "verify": cmd_verify}[a.cmd](a)


if __name__ == "__main__":
    main()
