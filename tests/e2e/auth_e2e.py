#!/usr/bin/env python3
"""Authentication end to end (issue 16): real ws-shard and ws-lb with the same keys, tokens
made by PyJWT (an implementation independent of ours), clients from Python `websockets`.

Checks, through ws-lb and directly against the shard: a public channel without a token; a
private channel with and without entitlement (`forbidden`, the connection stays open); the
token in the query and as the first message; bad tokens (malformed, alg none, algorithm
confusion, wrong signature, expired, not yet valid, wrong audience, 100 KB) closed with 4001
and never reaching a shard (the shard's accepted-connections counter does not move); the
per-subject limit (4003); expiry (4002) and refresh (`refreshed`, then no close); rotation
of the JWKS file with N clients connected (new key accepted, a broken file keeps the last
good keys, the old key retired), the clients all still open afterwards.

Usage: auth_e2e.py <ws-shard> <ws-lb> [clients during rotation, default 1000]
"""

import asyncio
import base64
import json
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jwt
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402

SECRET = "e2e-secret-0123456789abcdef-0123456789abcdef"


def b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class Keys:
    def __init__(self):
        self.rsa = {k: rsa.generate_private_key(public_exponent=65537, key_size=2048) for k in ["k1", "k2"]}

    def jwk(self, kid):
        n = self.rsa[kid].public_key().public_numbers()
        return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64(n.n), "e": b64(n.e)}

    def jwks(self, *kids):
        return json.dumps({"keys": [self.jwk(k) for k in kids]})

    def public_pem(self, kid):
        return self.rsa[kid].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def rs(self, kid, sub, channels=(), ttl=300, **extra):
        now = int(time.time())
        claims = {"sub": sub, "exp": now + ttl, "iat": now, "channels": list(channels), **extra}
        return jwt.encode(claims, self.rsa[kid], algorithm="RS256", headers={"kid": kid})


def hs(sub, channels=(), ttl=300, key=SECRET, **extra):
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + ttl, "iat": now, "channels": list(channels), **extra},
                      key, algorithm="HS256")


def unsigned(sub):
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc({'sub': sub, 'exp': int(time.time()) + 300, 'channels': ['*']})}."


def forge_confused(keys):
    """HS256 signed with the RSA public key as the secret (PyJWT refuses to do this itself)."""
    import hashlib
    import hmac
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = enc(json.dumps({"sub": "attacker", "exp": int(time.time()) + 300, "channels": ["*"]}).encode())
    sig = hmac.new(keys.public_pem("k1"), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


async def recv_json(ws, timeout=5.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def subscribe(ws, channel):
    await ws.send(json.dumps({"type": "subscribe", "channels": [channel]}))
    return await recv_json(ws)


async def closed_with(url, first=None, timeout=10.0):
    """Connects, optionally sends `first`, and returns the close code the server sends
    ("no close" when none comes within `timeout` seconds)."""
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        try:
            if first is not None:
                await ws.send(first)
            while True:
                await asyncio.wait_for(ws.recv(), timeout)
        except websockets.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None
        except asyncio.TimeoutError:
            return "no close"


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}")


async def scenarios(p, keys, files, n_clients, lb_log):
    lb = f"ws://127.0.0.1:{p['lb']}/ws"
    shard = f"ws://127.0.0.1:{p['shard']}/ws"
    shard_metrics = f"http://127.0.0.1:{p['shard_admin']}/metrics"
    lb_metrics = f"http://127.0.0.1:{p['lb_admin']}/metrics"
    accepted = lambda: odin.metric(odin.http_get(shard_metrics)[1], "ws_shard_connections_accepted_total")  # noqa: E731
    u1 = keys.rs("k1", "u1", ["orders.u1.*"])

    for name, base in [("through ws-lb", lb), ("directly", shard)]:
        async with websockets.connect(base) as ws:
            r = await subscribe(ws, "trades.BTC-USD")
            check(r["type"] == "subscribed", f"{name}: public channel without a token")
            r = await subscribe(ws, "orders.u1.fills")
            check(r["type"] == "error" and r["code"] == "forbidden" and r["channel"] == "orders.u1.fills",
                  f"{name}: private channel without a token is forbidden")
            await ws.send(json.dumps({"type": "ping", "id": 1}))
            check((await recv_json(ws))["type"] == "pong", f"{name}: the connection stays open after forbidden")
        async with websockets.connect(f"{base}?token={u1}") as ws:
            r = await subscribe(ws, "orders.u1.fills")
            check(r["type"] == "subscribed", f"{name}: private channel with entitlement (?token=)")
            body = json.dumps({"channel": "orders.u1.fills", "data": {"fill": 1}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{p['shard_admin']}/publish", body,
                                         {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=3).read()
            m = await recv_json(ws)
            check(m["type"] == "message" and m["data"] == {"fill": 1}, f"{name}: entitled client receives its channel")
            r = await subscribe(ws, "orders.u2.fills")
            check(r["type"] == "error" and r["code"] == "forbidden", f"{name}: channel outside the entitlement is forbidden")
        async with websockets.connect(base) as ws:
            await ws.send(json.dumps({"type": "auth", "token": hs("u3", ["orders.u3.*"])}))
            r = await subscribe(ws, "orders.u3.x")
            check(r["type"] == "subscribed", f"{name}: token as the first message (HS256)")

    # The verified-token cache: u1 was verified by ws-lb and by the shard above; presented
    # again, both find it (no signature check) and the connection works the same.
    def lookups():
        lb_page, sh_page = odin.http_get(lb_metrics)[1], odin.http_get(shard_metrics)[1]
        return tuple(odin.metric(page, f"ws_{tier}_auth_cache_lookups_total", f'result="{r}"')
                     for tier, page in (("lb", lb_page), ("shard", sh_page)) for r in ("hit", "miss"))

    before_lookups = lookups()
    async with websockets.connect(f"{lb}?token={u1}") as ws:
        r = await subscribe(ws, "orders.u1.fills")
        check(r["type"] == "subscribed", "cache: a token seen before is accepted again")
        r = await subscribe(ws, "orders.u2.fills")
        check(r["type"] == "error" and r["code"] == "forbidden", "cache: with the same entitlements")
    delta = tuple(a - b for a, b in zip(lookups(), before_lookups))
    check(delta == (1, 0, 1, 0), f"cache: one hit at ws-lb and one at the shard, no miss (lb hit/miss, shard hit/miss: {delta})")

    # Bad tokens: 4001, and through ws-lb no shard connection at all.
    bad = {
        "malformed": "not-a-jwt",
        "alg_none": unsigned("u1"),
        "algorithm confusion": forge_confused(keys),
        "wrong signature": hs("u1", key="another-secret-0123456789abcdef-0123456789"),
        "expired": keys.rs("k1", "u1", ttl=-30),
        "not yet valid": keys.rs("k1", "u1", nbf=int(time.time()) + 300),
        "wrong audience": keys.rs("k1", "u1", aud="someone-else"),
        "unknown key": keys.rs("k2", "u1"),
    }
    before = accepted()
    for what, token in bad.items():
        code = await closed_with(f"{lb}?token={token}")
        check(code == 4001, f"ws-lb: {what} token (query) closes 4001")
        code = await closed_with(lb, json.dumps({"type": "auth", "token": token}))
        check(code == 4001, f"ws-lb: {what} token (first message) closes 4001")
    code = await closed_with(lb, json.dumps({"type": "auth", "token": "a" * 100_000}))
    check(code == 4001, "ws-lb: 100 KB token closes 4001")
    check(accepted() == before, f"no bad token reached the shard (accepted stays {before:.0f})")
    page = odin.http_get(lb_metrics)[1]
    for reason in ["malformed", "alg_none", "algorithm", "signature", "expired", "not_yet_valid", "audience", "too_long"]:
        check(odin.metric(page, "ws_lb_auth_failures_total", f'reason="{reason}"') >= 1,
              f"ws_lb_auth_failures_total{{reason={reason}}} counted")
    for what, token in [("alg_none", unsigned("u1")), ("expired", keys.rs("k1", "u1", ttl=-30))]:
        code = await closed_with(f"{shard}?token={token}")
        check(code == 4001, f"shard directly: {what} token closes 4001")

    # Per-subject limit (max_connections_per_sub = 2).
    u9 = keys.rs("k1", "u9", [])
    async with websockets.connect(f"{lb}?token={u9}") as a, websockets.connect(f"{lb}?token={u9}") as b:
        for ws in (a, b):
            await ws.send(json.dumps({"type": "ping"}))
            await recv_json(ws)
        code = await closed_with(f"{lb}?token={u9}")
        check(code == 4003, "a third connection of one subject closes 4003")

    # Expiry and refresh (leeway 0 in this test).
    short = keys.rs("k1", "u4", ["orders.u4.*"], ttl=3)
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    code = await closed_with(f"{lb}?token={short}", timeout=15)
    early = exp - time.time()
    # The close must not come before exp (50 ms for the server's Instant and this clock).
    check(code == 4002 and early <= 0.05, f"no refresh: closed 4002 at exp ({-early:.2f} s after it, not before)")
    # The expired token is in both caches now: a hit, and still refused (exp is checked on a hit).
    # A token is valid through the second `exp` itself (jsonwebtoken's rule, leeway 0 here):
    # wait until the clock is past it.
    await asyncio.sleep(max(0.0, exp + 1.2 - time.time()))
    before, before_lookups = accepted(), lookups()
    code = await closed_with(f"{lb}?token={short}")
    check(code == 4001 and accepted() == before, "cache: a cached token past its exp closes 4001 at ws-lb")
    check(lookups()[0] - before_lookups[0] == 1, "cache: ... and it was a cache hit")
    # 10 s: the two refreshes below must come before this token's exp even on a loaded machine.
    first = keys.rs('k1', 'u4', ['orders.u4.*'], ttl=10)
    first_exp = jwt.decode(first, options={"verify_signature": False})["exp"]
    async with websockets.connect(f"{lb}?token={first}") as ws:
        await ws.send(json.dumps({"type": "refresh", "token": keys.rs("k1", "u5", [], ttl=60)}))
        r = await recv_json(ws)
        check(r["type"] == "error" and r["code"] == "invalid_token", "refresh for another sub: invalid_token")
        await ws.send(json.dumps({"type": "refresh", "token": keys.rs("k1", "u4", ["orders.u4.*"], ttl=60)}))
        r = await recv_json(ws)
        check(r["type"] == "refreshed" and r["exp"] > time.time() + 30, "refresh: refreshed with the new exp")
        deadline = first_exp + 2  # well past the first token's exp (valid through that second)
        while time.time() < deadline:
            await ws.send(json.dumps({"type": "ping"}))
            check_pong = await recv_json(ws)
            assert check_pong["type"] == "pong", check_pong
            await asyncio.sleep(0.5)
        print("ok: refreshed connection stays open past the first token's exp")

    # A refresh with narrower entitlements ends the subscriptions it no longer allows.
    async with websockets.connect(f"{lb}?token={keys.rs('k1', 'u7', ['orders.u7.*', 'fills.u7'])}") as ws:
        for ch in ["orders.u7.a", "fills.u7"]:
            check((await subscribe(ws, ch))["type"] == "subscribed", f"refresh narrowing: subscribed {ch}")
        await ws.send(json.dumps({"type": "refresh", "token": keys.rs("k1", "u7", ["fills.u7"], ttl=60)}))
        r = await recv_json(ws)
        check(r["type"] == "error" and r["code"] == "forbidden" and r["channel"] == "orders.u7.a",
              "refresh narrowing: the channel no longer allowed ends with forbidden")
        check((await recv_json(ws))["type"] == "refreshed", "refresh narrowing: then refreshed")
        r = await subscribe(ws, "orders.u7.b")
        check(r["type"] == "error" and r["code"] == "forbidden", "refresh narrowing: new subscribes use the new token")
        await ws.send(json.dumps({"type": "unsubscribe", "channels": ["fills.u7"]}))
        check((await recv_json(ws))["type"] == "unsubscribed", "refresh narrowing: the still-allowed channel stays")

    # Key rotation with clients connected.
    clients = []
    sem = asyncio.Semaphore(100)

    async def connect(i):
        async with sem:
            ws = await websockets.connect(f"{lb}?token={keys.rs('k1', f'r{i}', [])}", open_timeout=30)
            clients.append(ws)

    await asyncio.gather(*(connect(i) for i in range(n_clients)))
    check(len(clients) == n_clients, f"{n_clients} clients connected with k1 tokens")
    new = keys.rs("k2", "u6", [])
    Path(files["jwks"]).write_text(keys.jwks("k1", "k2"))

    async def accepted_now(token):
        """A pong through ws-lb: the token was accepted (a refused one is closed with 4001)."""
        try:
            async with websockets.connect(f"{lb}?token={token}", open_timeout=30) as ws:
                await ws.send(json.dumps({"type": "ping"}))
                return (await recv_json(ws, 30))["type"] == "pong"
        except websockets.ConnectionClosed:
            return False

    async def poll(cond, what, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await cond():
                print(f"ok: {what}")
                return
            await asyncio.sleep(0.2)
        raise SystemExit(f"FAIL: {what}")

    await poll(lambda: accepted_now(new), "rotation: the new key is accepted without a restart")
    check(await accepted_now(u1), "rotation: the old key still works while both are listed")
    warnings_before = Path(lb_log).read_text().count("keeping the last good keys")
    Path(files["jwks"]).write_text('{"keys": [ {"kty": ')
    await poll(lambda: asyncio.sleep(0, Path(lb_log).read_text().count("keeping the last good keys") > warnings_before),
               "a broken JWKS file is noticed by ws-lb")
    check(await accepted_now(new) and await accepted_now(u1), "a broken JWKS file keeps the last good keys")
    Path(files["jwks"]).write_text(keys.jwks("k2"))

    async def old_refused():
        return await closed_with(f"{lb}?token={u1}", timeout=2) == 4001

    await poll(old_refused, "rotation: the old key retired")
    alive = 0
    for ws in clients:
        try:
            await ws.send(json.dumps({"type": "ping"}))
            if (await recv_json(ws, 10))["type"] == "pong":
                alive += 1
        except (websockets.ConnectionClosed, asyncio.TimeoutError):
            pass
    check(alive == n_clients, f"all {n_clients} clients still connected after the rotation ({alive})")
    await asyncio.gather(*(ws.close() for ws in clients))
    # Every slot and relay freed: nothing left behind by the refused, expired or closed ones.
    gauges = lambda: (odin.metric(odin.http_get(shard_metrics)[1], "ws_shard_connections"),  # noqa: E731
                      odin.metric(odin.http_get(lb_metrics)[1], "ws_lb_active_connections"))
    await poll(lambda: asyncio.sleep(0, gauges() == (0.0, 0.0)), "shard connections and ws-lb relays back to 0")


def main():
    shard_bin, lb_bin = sys.argv[1:3]
    n_clients = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    keys = Keys()
    tmp = tempfile.TemporaryDirectory(prefix="odin-auth-")
    files = {"secret": f"{tmp.name}/hs256.secret", "jwks": f"{tmp.name}/jwks.json"}
    Path(files["secret"]).write_text(SECRET + "\n")
    Path(files["jwks"]).write_text(keys.jwks("k1"))
    auth = ["--auth-hs256-secret-file", files["secret"], "--auth-jwks-file", files["jwks"],
            "--auth-leeway", "0s", "--auth-reload-interval", "200ms", "--public-channels", "trades.*"]
    p = {k: odin.free_port() for k in ["shard", "shard_admin", "lb", "lb_admin"]}
    with odin.Procs("auth-e2e", stop_signal=signal.SIGKILL) as procs:
        # A key file that is missing at start stops the process with a message naming it.
        r = procs.start("bad", [shard_bin, "--shards", "1", "--base-port", p["shard"], "--admin-addr",
                                f"127.0.0.1:{p['shard_admin']}", "--auth-jwks-file", f"{tmp.name}/absent.json"])
        code = r.wait(timeout=30)
        log = Path(procs.log_path("bad")).read_text()
        check(code != 0 and "absent.json" in log, "a missing JWKS file at start: refuses to start, names the file")
        procs.start("shard", [shard_bin, "--shards", "1", "--base-port", p["shard"],
                              "--admin-addr", f"127.0.0.1:{p['shard_admin']}", *auth])
        odin.wait_http(f"http://127.0.0.1:{p['shard']}/health", ready=odin.ok)
        procs.start("lb", [lb_bin, "--listen", f"127.0.0.1:{p['lb']}", "--admin-addr", f"127.0.0.1:{p['lb_admin']}",
                           "--backend-urls", f"ws://127.0.0.1:{p['shard']}/ws", "--per-ip-rate", "0",
                           "--max-connections-per-sub", "2", "--auth-timeout", "2s", *auth])
        odin.wait_http(f"http://127.0.0.1:{p['lb']}/health", ready=lambda s, b: s == 200 and '"status":"ok"' in b)
        asyncio.run(scenarios(p, keys, files, n_clients, procs.log_path("lb")))
        for name in ["shard", "lb"]:
            check(procs[name].poll() is None, f"{name} still running")
    print("auth e2e: all checks passed")


if __name__ == "__main__":
    main()
