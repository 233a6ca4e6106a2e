// Unit tests of the client's rules against a scripted in-memory WebSocket, on mocked timers:
// what it sends, what it delivers, and when it reconnects for every close code. The real tiers
// and a real browser are exercised by tests/clients/tiers.test.mjs.
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { OdinClient, reconnectDelayBounds, resolveReconnect, tokenTimes, refreshAt } from '../dist/index.js';

/** A WebSocket whose server side the test plays. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }
  // ---- the server side ----
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  push(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
  sentOf(type) {
    return this.sent.filter((m) => m.type === type);
  }
  /** Answers the probe ping so the connection counts as healthy. */
  pong() {
    const p = this.sentOf('ping').at(-1);
    this.push({ type: 'pong', id: p.id });
  }
}

const last = () => FakeSocket.all.at(-1);
const tick = async (ms) => {
  mock.timers.tick(ms);
  // Let promise continuations (token provider, microtask flushes) run.
  for (let i = 0; i < 5; i++) await Promise.resolve();
};
const settle = () => tick(0);

function client(opts = {}) {
  const c = new OdinClient({
    url: 'ws://lb.test/ws',
    WebSocket: FakeSocket,
    random: () => 0,
    ...opts,
  });
  const events = [];
  for (const k of ['state', 'connecting', 'connected', 'disconnected', 'resync', 'error']) {
    c.on(k, (e) => events.push({ k, ...e }));
  }
  return { c, events };
}

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.sig`;
}

const T0 = 1_700_000_000_000;
beforeEach(() => {
  FakeSocket.all = [];
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: T0 });
});
afterEach(() => mock.timers.reset());

test('subscribes on open, delivers in order once, resumes with since after 1012', async () => {
  const { c } = client({ random: () => 0.5 });
  const got = [];
  const resyncs = [];
  const sub = c.subscribe('trades.BTC-USD', { onMessage: (p) => got.push(p), onResync: (e) => resyncs.push(e) });
  c.connect();
  await settle();
  const ws = last();
  assert.equal(ws.url, 'ws://lb.test/ws');
  ws.open();
  assert.deepEqual(ws.sent[0].type, 'ping');
  assert.deepEqual(ws.sentOf('subscribe'), [{ type: 'subscribe', channels: ['trades.BTC-USD'] }]);
  ws.push({ type: 'subscribed', channel: 'trades.BTC-USD', epoch: 'e1', seq: 10, recovered: false });
  for (const s of [11, 12, 12, 11, 13]) ws.push({ type: 'message', channel: 'trades.BTC-USD', epoch: 'e1', seq: s, data: { n: s } });
  assert.deepEqual(got.map((p) => p.seq), [11, 12, 13]);
  assert.deepEqual(sub.position, { epoch: 'e1', seq: 13 });

  ws.serverClose(1012, 'shard lost');
  assert.equal(c.state, 'connecting');
  // Prompt reconnect spread over minDelay (500 ms): random 0.5 gives 250 ms.
  await tick(249);
  assert.equal(FakeSocket.all.length, 1);
  await tick(1);
  assert.equal(FakeSocket.all.length, 2);
  const ws2 = last();
  ws2.open();
  assert.deepEqual(ws2.sentOf('subscribe'), [
    { type: 'subscribe', channels: ['trades.BTC-USD'], since: { 'trades.BTC-USD': { epoch: 'e1', seq: 13 } } },
  ]);
  ws2.push({ type: 'subscribed', channel: 'trades.BTC-USD', epoch: 'e1', seq: 15, recovered: true });
  for (const s of [14, 15, 16]) ws2.push({ type: 'message', channel: 'trades.BTC-USD', epoch: 'e1', seq: s, data: {} });
  assert.deepEqual(got.map((p) => [p.seq, p.replayed]), [[11, false], [12, false], [13, false], [14, true], [15, true], [16, false]]);
  assert.equal(resyncs.length, 0);
  c.disconnect();
});

test('recovered:false after since and a live epoch change are resync-needed events', async () => {
  const { c, events } = client();
  const resyncs = [];
  const got = [];
  c.subscribe('book.ETH-USD', { onResync: (e) => resyncs.push(e), onMessage: (p) => got.push(p.seq) }, { since: { epoch: 'old', seq: 5 } });
  c.connect();
  await settle();
  last().open();
  assert.deepEqual(last().sentOf('subscribe')[0].since, { 'book.ETH-USD': { epoch: 'old', seq: 5 } });
  last().push({ type: 'subscribed', channel: 'book.ETH-USD', epoch: 'new', seq: 3, recovered: false });
  assert.deepEqual(resyncs, [
    { channel: 'book.ETH-USD', reason: 'not_recovered', previous: { epoch: 'old', seq: 5 }, current: { epoch: 'new', seq: 3 } },
  ]);
  last().push({ type: 'message', channel: 'book.ETH-USD', epoch: 'new', seq: 4, data: {} });
  last().push({ type: 'message', channel: 'book.ETH-USD', epoch: 'gen2', seq: 1, data: {} });
  assert.equal(resyncs[1].reason, 'epoch_changed');
  assert.deepEqual(resyncs[1].previous, { epoch: 'new', seq: 4 });
  assert.deepEqual(got, [4, 1]);
  assert.equal(events.filter((e) => e.k === 'resync').length, 2);
});

test('1013 backs off exponentially from overloadDelay, with a cap, then resets once a shard answers', async () => {
  const { c, events } = client({ reconnect: { overloadDelay: 1000, maxDelay: 5000, jitter: 0.5 } });
  c.connect();
  await settle();
  const o = resolveReconnect({ overloadDelay: 1000, maxDelay: 5000, jitter: 0.5 });
  // random() = 0 takes no jitter off: each wait is its ceiling.
  for (const expected of [1000, 2000, 4000, 5000, 5000]) {
    last().open();
    last().serverClose(1013, 'Server temporarily overloaded, please retry');
    const d = events.filter((e) => e.k === 'disconnected').at(-1);
    assert.equal(d.delay, expected);
    const n = FakeSocket.all.length;
    await tick(expected - 1);
    assert.equal(FakeSocket.all.length, n, `no attempt before ${expected} ms`);
    await tick(1);
    assert.equal(FakeSocket.all.length, n + 1);
  }
  assert.deepEqual(reconnectDelayBounds('overload', 2, o), [1000, 2000]);
  // A connection that works resets the count: the next loss reconnects promptly.
  last().open();
  last().pong();
  last().serverClose(1012);
  assert.equal(events.filter((e) => e.k === 'disconnected').at(-1).delay, 0);
  c.disconnect();
});

test('connection refused backs off from minDelay', async () => {
  const { c, events } = client({ reconnect: { minDelay: 100, maxDelay: 1000 } });
  c.connect();
  await settle();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    last().serverClose(1006);
    const d = events.filter((e) => e.k === 'disconnected').at(-1);
    assert.equal(d.cause, 'lost');
    delays.push(d.delay);
    await tick(d.delay);
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1000, 1000]);
  c.disconnect();
});

for (const code of [1002, 1007, 1008, 1009]) {
  test(`close ${code} is surfaced and not retried`, async () => {
    const { c, events } = client();
    c.connect();
    await settle();
    last().open();
    last().pong();
    last().serverClose(code, 'bad client');
    await tick(120_000);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(c.state, 'disconnected');
    const err = events.find((e) => e.k === 'error');
    assert.equal(err.kind, 'fatal_close');
    assert.equal(err.code, code);
    assert.equal(events.filter((e) => e.k === 'disconnected').at(-1).reconnect, false);
    // The application may decide to try again.
    c.connect();
    await settle();
    assert.equal(FakeSocket.all.length, 2);
    c.disconnect();
  });
}

test('an unanswered ping closes a dead path and reconnects with since', async () => {
  const { c, events } = client({ pingInterval: 1000, pongTimeout: 500 });
  c.subscribe('trades.SOL-USD');
  c.connect();
  await settle();
  const ws = last();
  ws.open();
  ws.pong();
  ws.push({ type: 'subscribed', channel: 'trades.SOL-USD', epoch: 'e', seq: 7, recovered: false });
  await tick(1000); // next ping
  assert.equal(ws.sentOf('ping').length, 2);
  await tick(499);
  assert.equal(FakeSocket.all.length, 1);
  await tick(1); // pong timeout: given up, prompt reconnect (random 0 => 0 ms)
  const d = events.filter((e) => e.k === 'disconnected').at(-1);
  assert.equal(d.cause, 'ping_timeout');
  assert.equal(d.healthy, true);
  assert.equal(ws.closedByClient.code, 4100);
  await settle();
  assert.equal(FakeSocket.all.length, 2);
  last().open();
  assert.deepEqual(last().sentOf('subscribe')[0].since, { 'trades.SOL-USD': { epoch: 'e', seq: 7 } });
  c.disconnect();
});

test('a busy path is not mistaken for a dead one', async () => {
  const { c } = client({ pingInterval: 1000, pongTimeout: 500 });
  c.subscribe('x');
  c.connect();
  await settle();
  const ws = last();
  ws.open();
  ws.push({ type: 'subscribed', channel: 'x', epoch: 'e', seq: 0, recovered: false });
  for (let s = 1; s <= 10; s++) {
    await tick(100);
    ws.push({ type: 'message', channel: 'x', epoch: 'e', seq: s, data: {} });
  }
  assert.equal(FakeSocket.all.length, 1);
  await tick(600);
  assert.equal(FakeSocket.all.length, 2);
  c.disconnect();
});

test('connect timeout counts as a failed attempt', async () => {
  const { c, events } = client({ connectTimeout: 2000, reconnect: { minDelay: 100 } });
  c.connect();
  await settle();
  await tick(2000);
  const d = events.filter((e) => e.k === 'disconnected').at(-1);
  assert.equal(d.cause, 'connect_timeout');
  assert.equal(d.delay, 100);
  c.disconnect();
});

test('unsubscribe stops delivery at once and a new subscribe waits for unsubscribed', async () => {
  const { c } = client();
  const got = [];
  const sub = c.subscribe('a', { onMessage: (p) => got.push(p.seq) });
  c.connect();
  await settle();
  const ws = last();
  ws.open();
  ws.push({ type: 'subscribed', channel: 'a', epoch: 'e', seq: 0, recovered: false });
  ws.push({ type: 'message', channel: 'a', epoch: 'e', seq: 1, data: {} });
  sub.unsubscribe();
  assert.equal(sub.state, 'unsubscribed');
  assert.deepEqual(ws.sentOf('unsubscribe'), [{ type: 'unsubscribe', channels: ['a'] }]);
  ws.push({ type: 'message', channel: 'a', epoch: 'e', seq: 2, data: {} });
  c.subscribe('a', { onMessage: (p) => got.push(p.seq) });
  await settle();
  assert.equal(ws.sentOf('subscribe').length, 1);
  ws.push({ type: 'unsubscribed', channel: 'a' });
  await settle();
  assert.equal(ws.sentOf('subscribe').length, 2);
  assert.deepEqual(got, [1]);
  assert.throws(() => c.subscribe('a'), /already subscribed/);
  assert.throws(() => c.subscribe('bad channel'), /invalid channel/);
  c.disconnect();
});

// ---- authentication (client side of the planned protocol, issue 16) ----

test('token goes in the query; a refresh is sent before exp; refreshed re-arms it', async () => {
  const now = T0 / 1000;
  const tokens = [jwt({ sub: 'u', iat: now, exp: now + 120 }), jwt({ sub: 'u', iat: now + 90, exp: now + 240 })];
  const reasons = [];
  const { c } = client({
    refreshMargin: 30_000,
    getToken: async ({ reason }) => {
      reasons.push(reason);
      return tokens.shift() ?? null;
    },
  });
  c.connect();
  await settle();
  const ws = last();
  assert.match(ws.url, /^ws:\/\/lb\.test\/ws\?token=[\w.-]+$/);
  ws.open();
  ws.pong();
  await tick(89_999);
  assert.equal(ws.sentOf('refresh').length, 0);
  await tick(1);
  assert.deepEqual(reasons, ['connect', 'refresh']);
  const r = ws.sentOf('refresh');
  assert.equal(r.length, 1);
  assert.equal(tokenTimes(r[0].token).exp, (now + 240) * 1000);
  ws.push({ type: 'refreshed' });
  assert.equal(FakeSocket.all.length, 1);
  c.disconnect();
});

test('token as first message when asked', async () => {
  const { c } = client({ tokenTransport: 'message', getToken: async () => 'opaque-token' });
  c.subscribe('a');
  c.connect();
  await settle();
  assert.equal(last().url, 'ws://lb.test/ws');
  last().open();
  assert.deepEqual(last().sent[0], { type: 'auth', token: 'opaque-token' });
  assert.equal(last().sent[2].type, 'subscribe');
  c.disconnect();
});

test('a refused refresh is surfaced; the connection stays', async () => {
  const now = T0 / 1000;
  let n = 0;
  const { c, events } = client({ getToken: async () => jwt({ exp: now + 60 + 60 * n++ }) });
  c.connect();
  await settle();
  last().open();
  last().pong();
  await tick(30_000);
  assert.equal(last().sentOf('refresh').length, 1);
  last().push({ type: 'error', code: 'invalid_token', message: 'bad signature' });
  const err = events.find((e) => e.k === 'error');
  assert.deepEqual([err.kind, err.code], ['refresh', 'invalid_token']);
  assert.equal(FakeSocket.all.length, 1);
  c.disconnect();
});

test('4002 asks for a fresh token and reconnects promptly with since', async () => {
  const reasons = [];
  const { c } = client({ getToken: async ({ reason }) => (reasons.push(reason), `t${reasons.length}`) });
  c.subscribe('orders.user-1');
  c.connect();
  await settle();
  last().open();
  last().push({ type: 'subscribed', channel: 'orders.user-1', epoch: 'e', seq: 4, recovered: false });
  last().serverClose(4002, 'token expired');
  await settle();
  assert.deepEqual(reasons, ['connect', 'expired']);
  assert.match(last().url, /token=t2$/);
  last().open();
  assert.deepEqual(last().sentOf('subscribe')[0].since, { 'orders.user-1': { epoch: 'e', seq: 4 } });
  c.disconnect();
});

test('4001 asks the provider again, backs off, and stops with an error when it keeps failing', async () => {
  const reasons = [];
  const { c, events } = client({
    reconnect: { minDelay: 100, maxAuthFailures: 3 },
    getToken: async ({ reason }) => (reasons.push(reason), 'bad'),
  });
  c.connect();
  await settle();
  const delays = [];
  for (let i = 0; i < 3; i++) {
    last().open();
    last().serverClose(4001, 'unauthorized');
    const d = events.filter((e) => e.k === 'disconnected').at(-1);
    delays.push(d.reconnect ? d.delay : null);
    if (d.reconnect) await tick(d.delay);
  }
  assert.deepEqual(delays, [100, 200, null]);
  assert.deepEqual(reasons, ['connect', 'unauthorized', 'unauthorized']);
  assert.equal(c.state, 'disconnected');
  assert.equal(events.find((e) => e.k === 'error').kind, 'unauthorized');
  await tick(60_000);
  assert.equal(FakeSocket.all.length, 3);
});

test('4003 backs off like an overload', async () => {
  const { c, events } = client({ reconnect: { overloadDelay: 3000 } });
  c.connect();
  await settle();
  last().open();
  last().serverClose(4003, 'too many connections');
  assert.equal(events.filter((e) => e.k === 'disconnected').at(-1).delay, 3000);
  c.disconnect();
});

test('forbidden ends that subscription only; the connection and the others stay', async () => {
  const { c } = client();
  const errs = [];
  const got = [];
  const denied = c.subscribe('orders.user-2', { onError: (e) => errs.push(e) });
  c.subscribe('trades.BTC-USD', { onMessage: (p) => got.push(p.seq) });
  c.connect();
  await settle();
  const ws = last();
  ws.open();
  assert.deepEqual(ws.sentOf('subscribe')[0].channels, ['orders.user-2', 'trades.BTC-USD']);
  ws.push({ type: 'error', code: 'forbidden', message: 'not entitled', channel: 'orders.user-2' });
  ws.push({ type: 'subscribed', channel: 'trades.BTC-USD', epoch: 'e', seq: 0, recovered: false });
  ws.push({ type: 'message', channel: 'trades.BTC-USD', epoch: 'e', seq: 1, data: {} });
  assert.deepEqual(errs, [{ code: 'forbidden', message: 'not entitled', channel: 'orders.user-2' }]);
  assert.equal(denied.state, 'unsubscribed');
  assert.equal(c.getSubscription('orders.user-2'), null);
  assert.deepEqual(got, [1]);
  assert.equal(c.state, 'connected');
  // After a reconnect only the live subscription is asked for again.
  ws.serverClose(1012);
  await settle();
  last().open();
  assert.deepEqual(last().sentOf('subscribe')[0].channels, ['trades.BTC-USD']);
  c.disconnect();
});

test('JWT expiry is read without verification; refresh time honours margin and half-life', () => {
  assert.equal(tokenTimes('not-a-jwt'), null);
  assert.equal(tokenTimes(jwt({ sub: 'x' })), null);
  assert.deepEqual(tokenTimes(jwt({ exp: 100, iat: 40 })), { exp: 100_000, iat: 40_000 });
  // 60 s token, 30 s margin: refresh at 30 s. 20 s token: at half-life (10 s), not at once.
  assert.equal(refreshAt({ exp: 60_000, iat: 0 }, 0, 30_000), 30_000);
  assert.equal(refreshAt({ exp: 20_000, iat: 0 }, 0, 30_000), 10_000);
  assert.equal(refreshAt({ exp: 20_000 }, 5_000, 30_000), 5_000);
});

test('an exception in a handler does not break delivery', async () => {
  const uncaught = [];
  const { c } = client({ onHandlerError: (e) => uncaught.push(e) });
  const got = [];
  c.subscribe('a', {
    onMessage: (p) => {
      got.push(p.seq);
      if (p.seq === 1) throw new Error('app bug');
    },
  });
  c.connect();
  await settle();
  last().open();
  last().push({ type: 'subscribed', channel: 'a', epoch: 'e', seq: 0, recovered: false });
  last().push({ type: 'message', channel: 'a', epoch: 'e', seq: 1, data: {} });
  last().push({ type: 'message', channel: 'a', epoch: 'e', seq: 2, data: {} });
  assert.deepEqual(got, [1, 2]);
  assert.equal(uncaught.length, 1);
  c.disconnect();
});
