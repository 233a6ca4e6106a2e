// The client libraries against the real tiers (`make test-clients`): the TypeScript client in
// headless Chromium and the Rust crate (through ws-tail), each through ws-lb to ws-shard
// processes on the embedded bus, while a numbered stream is published and the tiers are
// broken in turn:
//
//   1. ws-lb restarted (SIGTERM, new process on the same port)     -> exact recovery
//   2. every shard process stopped for 5 s (SIGSTOP, then SIGCONT) -> dead path found by ping,
//                                                                      exact recovery
//   3. the admission queue overloaded (a flood; 1013s)             -> backoff, exact recovery
//   4. ws-lb now fronts two processes; the one holding the client
//      is SIGKILLed                                                 -> resync-needed (the other
//                                                                      process has another epoch)
//
// The application must see every number exactly once and in order, except across a
// resync-needed event; never a silent gap. Every reconnect wait is measured against the
// documented backoff (docs/clients.md).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  BrowserClient, Flood, Lb, Publisher, RustClient, ShardProcess,
  cleanupLogs, freePort, httpRequest, killAll, until,
} from './tiers.mjs';

const CHANNEL = 'test.seq';
/** Client settings of both clients in this test (short, so the run stays short). */
const OPTS = {
  minDelay: 200,
  maxDelay: 2000,
  overloadDelay: 400,
  jitter: 0.5,
  pingInterval: 1000,
  pongTimeout: 1000,
  connectTimeout: 4000,
};
/** Allowed lateness of a timer on a loaded 2-core machine; a timer is never early. The
 * delay each client chose is checked against the documented range exactly (both report
 * it); only the timer that waits it out gets this slack. */
const LATE_MS = 2000;
const EARLY_MS = 5;

let ok = true;
after(() => {
  killAll();
  cleanupLogs(ok);
});

// ---- the documented rules, written out again here so the test checks the client ----

function closeAction(code) {
  if ([1002, 1003, 1007, 1008, 1009, 1010].includes(code)) return 'fatal';
  if (code === 1013 || code === 4003) return 'overload';
  if (code === 4001) return 'unauthorized';
  if (code === 4002) return 'expired';
  return 'reconnect';
}

/** [min, max] wait after disconnect `d` given `failures` so far; returns the new count too. */
function documentedWait(d, failures) {
  const action = d.cause === 'closed' ? closeAction(d.code) : 'reconnect';
  const n = action === 'overload' || action === 'unauthorized' || !d.healthy ? failures + 1 : 0;
  if (n === 0) return { n, action, range: [0, OPTS.minDelay] };
  const base = action === 'overload' ? OPTS.overloadDelay : OPTS.minDelay;
  const ceiling = Math.min(OPTS.maxDelay, base * 2 ** (n - 1));
  return { n, action, range: [ceiling * (1 - OPTS.jitter), ceiling] };
}

// ---- checks over a client's event log ----

function messages(events) {
  return events.filter((e) => e.event === 'message');
}

function maxN(events) {
  let m = 0;
  for (const e of messages(events)) m = Math.max(m, e.data.n);
  return m;
}

/** Every number once and in order, except across a resync event. */
function checkContinuity(events) {
  let prev = null;
  let resyncSince = false;
  let delivered = 0;
  const byEpoch = new Map();
  for (const e of events) {
    if (e.event === 'resync') resyncSince = true;
    if (e.event !== 'message') continue;
    delivered += 1;
    const last = byEpoch.get(e.epoch);
    assert.ok(last === undefined || e.seq > last, `seq ${e.seq} after ${last} in epoch ${e.epoch}: duplicate or out of order`);
    byEpoch.set(e.epoch, e.seq);
    if (prev !== null && !resyncSince) {
      assert.equal(e.data.n, prev + 1, `silent gap or duplicate: ${prev} then ${e.data.n} with no resync event between`);
    }
    prev = e.data.n;
    resyncSince = false;
  }
  return delivered;
}

/** Each wait between a disconnect and the next attempt, against the documented range. */
function checkBackoff(events) {
  const waits = [];
  let failures = 0;
  for (let i = 0; i < events.length; i++) {
    const d = events[i];
    if (d.event !== 'disconnected') continue;
    const { n, action, range } = documentedWait(d, failures);
    failures = n;
    const next = events.slice(i + 1).find((e) => e.event === 'connecting');
    if (next === undefined) continue;
    const measured = next.t_ms - d.t_ms;
    const chosen = d.delay ?? d.delay_ms;
    waits.push({ code: d.code, cause: d.cause, action, failures: n, range, chosen, measured: Math.round(measured) });
    assert.ok(
      typeof chosen === 'number' && chosen >= range[0] - 0.001 && chosen <= range[1] + 0.001,
      `delay chosen after ${d.code}/${d.cause} (attempt ${n} failed in a row) was ${chosen} ms, documented [${range[0]}, ${range[1]}]`,
    );
    assert.ok(
      measured >= chosen - EARLY_MS && measured <= chosen + LATE_MS,
      `wait after ${d.code}/${d.cause} was ${measured.toFixed(1)} ms for a chosen delay of ${chosen.toFixed(1)} ms`,
    );
  }
  return waits;
}

// ---- the scenario ----

async function scenario(makeClient, label) {
  const A = await new ShardProcess(`${label}-shard-a`, 2).start();
  const B = await new ShardProcess(`${label}-shard-b`, 1).start();
  const port = await freePort();
  const lbFlags = ['--reuse-port', '--circuit-breaker-timeout', '1s'];
  let lb = await new Lb(port).start(A.urls(), lbFlags);
  const pub = new Publisher(CHANNEL, [A, B]);
  const client = await makeClient();
  const phases = [];
  const mark = (name) => phases.push({ name, from: client.events.length });
  const phaseEvents = (name) => {
    const i = phases.findIndex((p) => p.name === name);
    return client.events.slice(phases[i].from, phases[i + 1]?.from ?? client.events.length);
  };
  /**
   * Waits until the client has subscribed again in the current phase (unless `resubscribed`
   * is false) and then has the message published last.
   */
  const caughtUp = async (what, resubscribed = true) => {
    const from = phases.at(-1).from;
    if (resubscribed) {
      await until(
        async () => (await client.poll(), client.events.slice(from).some((e) => e.event === 'subscribed')),
        30_000,
        `${label}: ${what}: a subscription`,
      );
    }
    const target = pub.n;
    await until(async () => (await client.poll(), maxN(client.events) >= target), 20_000, `${label}: ${what}: message ${target}`);
  };
  const count = (evs, pred) => evs.filter(pred).length;

  try {
    await client.start(lb.url(), CHANNEL, OPTS);
    mark('steady');
    await until(() => pub.n >= 10, 5000, 'publisher');
    await caughtUp('first messages');

    mark('restart ws-lb');
    await lb.stop();
    // Messages published while no LB runs: the client must get them replayed. Waited for,
    // not assumed: a quick restart on a busy machine once fell between two publishes (CI,
    // 2026-11-30: nothing to replay, and the check below failed).
    const downAt = pub.n;
    await until(() => pub.n >= downAt + 2, 10_000, 'two messages published while the LB is down');
    lb = await new Lb(port).start(A.urls(), lbFlags);
    await caughtUp('after the LB restart');

    mark('stop all shards 5 s');
    await pub.pause();
    A.signal('SIGSTOP');
    B.signal('SIGSTOP');
    const stoppedAt = Date.now();
    await until(async () => (await client.poll(), Date.now() - stoppedAt >= 5000), 10_000, 'the 5 s stop');
    A.signal('SIGCONT');
    B.signal('SIGCONT');
    pub.resume();
    await caughtUp('after the stop');

    mark('overload');
    const overFlags = [
      ...lbFlags,
      '--admission-rate', '2', '--admission-burst', '1',
      '--admission-max-queue', '1', '--admission-max-wait', '300ms',
    ];
    const lbOver = await new Lb(port).start(A.urls(), overFlags);
    // 16 raw upgrades in flight: the queue (1 place) is refilled within a connect after each
    // departure, so the client's reconnects meet a full queue (1013) rather than a free place.
    // With 4, on a loaded machine (slow event loop) the browser once got a place on its first
    // reconnect and never saw a 1013 (CI at 19:45, load average 5-8).
    const flood = new Flood(port, 16);
    await until(async () => {
      const m = await httpRequest(lbOver.admin, 'GET', '/metrics');
      return /ws_lb_close_codes_total\{code="1013"\} [1-9]/.test(m.text);
    }, 10_000, 'a saturated admission queue');
    await lb.stop();
    lb = lbOver;
    const overloadStart = client.events.length;
    // The client can still win a place now and then: the pacer opens one every 500 ms and the
    // first upgrade to arrive takes it, the client's as well as the flood's (CI met it twice,
    // at a2afc15 and 3d6c785; presumably a busy machine slowing the flood's event loop). That is correct
    // behaviour, but a client with a place never sees a 1013 again; so when it got one, the
    // LB is replaced by an identical one (1012: a prompt reconnect, back into the flood).
    let won = -1;
    let places = 0;
    await until(async () => {
      await client.poll();
      const evs = client.events.slice(overloadStart);
      if (count(evs, (e) => e.event === 'disconnected' && e.code === 1013) >= 3) return true;
      const sub = evs.findLastIndex((e) => e.event === 'subscribed');
      if (sub > won && sub > evs.findLastIndex((e) => e.event === 'disconnected')) {
        won = sub;
        places += 1;
        const next = await new Lb(port).start(A.urls(), overFlags);
        await lb.stop();
        lb = next;
      }
      return false;
    }, 30_000, `${label}: three 1013 closes`);
    await flood.stop();
    console.error(`${label}: overload flood: ${flood.sent} upgrades in ${((Date.now() - flood.started) / 1000).toFixed(1)} s; ` +
      `the client got a place ${places} time(s) meanwhile`);
    await caughtUp('after the overload');

    mark('two processes');
    const lbBoth = await new Lb(port).start([...A.urls(), ...B.urls()], lbFlags);
    await lb.stop();
    lb = lbBoth;
    await caughtUp('through the LB in front of both processes');

    mark('kill the shard holding the client');
    // The connection the LB drained may take a moment to be released by its shard.
    let ca, cb;
    await until(async () => ([ca, cb] = [await A.connections(), await B.connections()], ca + cb === 1), 10_000,
      'exactly one client connection on the shards');
    const holder = ca === 1 ? A : B;
    await holder.kill();
    await caughtUp('after the kill');
    await pub.stop();
    await caughtUp('the last message', false);

    // ---- what the application saw ----
    const ev = client.events;
    assert.deepEqual(ev.filter((e) => e.event === 'pageerror' || e.event === 'error' || e.event === 'refused'), []);
    const delivered = checkContinuity(ev);
    const waits = checkBackoff(ev);
    const resyncs = (name) => count(phaseEvents(name), (e) => e.event === 'resync');
    const replayed = (name) => count(phaseEvents(name), (e) => e.event === 'message' && e.replayed);
    for (const name of ['steady', 'restart ws-lb', 'stop all shards 5 s', 'overload']) {
      assert.equal(resyncs(name), 0, `${name}: the history covers the gap, no resync expected`);
    }
    assert.ok(replayed('restart ws-lb') > 0, 'messages published while the LB was down were replayed');
    assert.ok(
      count(phaseEvents('stop all shards 5 s'), (e) => e.event === 'disconnected' && e.cause === 'ping_timeout') >= 1,
      'the stopped path was found by a ping timeout',
    );
    assert.ok(replayed('stop all shards 5 s') + replayed('overload') > 0, 'recovery replayed missed messages');
    const killResyncs = phaseEvents('kill the shard holding the client').filter((e) => e.event === 'resync');
    assert.ok(killResyncs.length >= 1, 'the surviving process has another epoch: resync-needed expected');
    assert.equal(killResyncs[0].reason, 'not_recovered');
    assert.equal(maxN(ev), pub.n);

    const summary = {
      client: label,
      published: pub.n,
      delivered,
      resyncs: count(ev, (e) => e.event === 'resync'),
      replayed: count(ev, (e) => e.event === 'message' && e.replayed),
      reconnects: waits.length,
      closes_1013: count(ev, (e) => e.event === 'disconnected' && e.code === 1013),
      waits,
    };
    console.log(JSON.stringify(summary));
    return summary;
  } catch (e) {
    ok = false;
    await client.poll().catch(() => undefined);
    console.error(`${label}: last events:`, JSON.stringify(client.events.slice(-40)));
    // Every event but the messages, with the phase marks: what the client met, in order.
    console.error(`${label}: phases (from = index of the first event) and every other event than a message:`,
      JSON.stringify({ phases, events: client.events.map((e, i) => ({ i, ...e })).filter((e) => e.event !== 'message').slice(-80) }));
    throw e;
  } finally {
    await pub.stop();
    await client.close();
    killAll();
  }
}

test('TypeScript client in headless Chromium through the real tiers', { timeout: 240_000 }, async () => {
  await scenario(() => BrowserClient.launch(), 'browser');
});

test('Rust crate (ws-tail) through the real tiers', { timeout: 240_000 }, async () => {
  await scenario(async () => new RustClient(), 'rust');
});
