// Real tiers for the client tests: ws-shard processes on the embedded bus, ws-lb in front,
// a publisher of a numbered stream, a connection flood for the admission queue, and the
// clients under test (the TypeScript client in headless Chromium, ws-tail on the Rust crate).
// Everything binds ports from the OS, waits by polling with deadlines, and is killed at the end.
import { spawn } from 'node:child_process';
import { createReadStream, existsSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.resolve(process.env.ODIN_BIN ?? path.join(REPO, 'target/debug'));
const LOGS = mkdtempSync(path.join(os.tmpdir(), 'odin-clients-'));

/** Polls `cond` every 25 ms until it returns a truthy value or `ms` pass. */
export async function until(cond, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const v = await cond();
      if (v) return v;
    } catch {
      // Not yet (a server still starting, a process gone).
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function listenOn(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

function ephemeralLow() {
  try {
    return Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

const handedOut = new Set();

/**
 * A port nothing listens on, below the kernel's ephemeral range; with `span` > 1, the first
 * of that many consecutive free ports. Each port is handed out once per process.
 *
 * Not port 0: the kernel's pick comes from the ephemeral range, where outgoing connections
 * take their local ports — the overload flood leaves tens of thousands of them in TIME_WAIT
 * (without SO_REUSEADDR, so nothing can bind them), and a CI run lost the next scenario on
 * "no free port range" that way. Ports below the range are never autobound (the same rule as
 * tests/pylib/odin.py's free_port).
 */
export async function freePort(span = 1) {
  const low = Math.max(ephemeralLow(), 11000);
  for (let i = 0; i < 2000; i++) {
    const port = 10000 + Math.floor(Math.random() * (low - 10000 - span));
    let ok = true;
    for (let k = 0; k < span && ok; k++) ok = !handedOut.has(port + k) && (await listenOn(port + k));
    if (ok) {
      for (let k = 0; k < span; k++) handedOut.add(port + k);
      return port;
    }
  }
  throw new Error('no free port range');
}

export function httpRequest(port, method, pathname, body, timeout = 2000) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method,
        path: pathname,
        timeout,
        agent: false,
        headers: data ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } : {},
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode, text }));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end(data);
  });
}

/** Every process started here; all are killed by `killAll` (and on exit). */
const started = new Set();
export function killAll() {
  for (const p of started) {
    if (p.exitCode === null && p.signalCode === null) {
      try {
        process.kill(p.pid, 'SIGCONT');
      } catch {
        // Already gone.
      }
      p.kill('SIGKILL');
    }
  }
  started.clear();
}
process.on('exit', killAll);

function run(name, file, args, stdio = 'log') {
  if (!existsSync(file)) throw new Error(`${file} is missing: build it first (make build-debug)`);
  const out = stdio === 'log' ? openSync(path.join(LOGS, `${name}.log`), 'a') : 'pipe';
  const p = spawn(file, args, { stdio: ['ignore', out, stdio === 'log' ? out : 'inherit'] });
  started.add(p);
  p.once('exit', () => started.delete(p));
  return p;
}

function exited(p) {
  return p.exitCode !== null || p.signalCode !== null;
}

function waitExit(p, ms) {
  if (exited(p)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`pid ${p.pid} did not exit within ${ms} ms`)), ms);
    p.once('exit', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

/** One ws-shard process with `shards` shards on the embedded bus. */
export class ShardProcess {
  constructor(name, shards, extra = []) {
    this.name = name;
    this.shards = shards;
    this.extra = extra;
  }

  async start() {
    if (this.base === undefined) {
      this.base = await freePort(this.shards);
      this.admin = await freePort();
    }
    this.proc = run(this.name, path.join(BIN, 'ws-shard'), [
      '--shards', String(this.shards),
      '--base-port', String(this.base),
      '--admin-addr', `127.0.0.1:${this.admin}`,
      '--history-len', '5000',
      '--client-rate', '0',
      '--drain-window', '200ms',
      '--grace', '5s',
      '--log-level', 'warn',
      ...this.extra,
    ]);
    await until(async () => (await httpRequest(this.admin, 'GET', '/health')).status === 200, 20_000, `${this.name} health`);
    for (let i = 0; i < this.shards; i++) {
      await until(async () => (await httpRequest(this.base + i, 'GET', '/health')).status === 200, 20_000, `${this.name} shard ${i}`);
    }
    return this;
  }

  urls() {
    return Array.from({ length: this.shards }, (_, i) => `ws://127.0.0.1:${this.base + i}/ws`);
  }

  /** Live WebSocket connections over all shards of the process. */
  async connections() {
    const r = await httpRequest(this.admin, 'GET', '/health');
    return JSON.parse(r.text).reduce((a, s) => a + s.connections, 0);
  }

  signal(sig) {
    if (!exited(this.proc)) this.proc.kill(sig);
  }

  async kill() {
    this.signal('SIGKILL');
    await waitExit(this.proc, 10_000);
  }

  alive() {
    return this.proc !== undefined && !exited(this.proc);
  }
}

/** ws-lb in front of `backends`; `extra` flags on top of the test defaults. */
export class Lb {
  constructor(port) {
    this.port = port;
  }

  async start(backends, extra = []) {
    this.admin ??= await freePort();
    this.proc = run('ws-lb', path.join(BIN, 'ws-lb'), [
      '--listen', `127.0.0.1:${this.port}`,
      '--admin-addr', `127.0.0.1:${this.admin}`,
      '--backend-urls', backends.join(','),
      '--per-ip-rate', '0',
      '--health-interval', '100ms',
      '--attempt-timeout', '1s',
      '--handshake-deadline', '2s',
      '--drain-window', '200ms',
      '--grace', '5s',
      '--log-level', 'warn',
      ...extra,
    ]);
    await until(async () => (await httpRequest(this.port, 'GET', '/health')).status === 200, 20_000, 'ws-lb health');
    return this;
  }

  /** Drains (SIGTERM: 1012 to every client) and waits for the process to end. */
  async stop() {
    if (this.proc !== undefined && !exited(this.proc)) {
      this.proc.kill('SIGTERM');
      await waitExit(this.proc, 15_000);
    }
  }

  url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }
}

/**
 * Publishes `{"n": 1, 2, 3, ...}` on `channel` to every live shard process, each number to
 * all of them before the next, every `everyMs`.
 */
export class Publisher {
  constructor(channel, procs, everyMs = 20) {
    this.channel = channel;
    this.procs = procs;
    this.everyMs = everyMs;
    this.n = 0;
    this.paused = false;
    this.stopped = false;
    this.loop = this.run();
  }

  async run() {
    while (!this.stopped) {
      if (!this.paused) {
        this.inflight = this.publishOne();
        await this.inflight;
      }
      await new Promise((r) => setTimeout(r, this.everyMs));
    }
  }

  /** Stops publishing once the message in flight has reached every process. */
  async pause() {
    this.paused = true;
    await this.inflight;
  }

  resume() {
    this.paused = false;
  }

  async publishOne() {
    this.n += 1;
    const body = { channel: this.channel, data: { n: this.n } };
    await Promise.all(
      this.procs
        .filter((p) => p.alive())
        .map((p) => httpRequest(p.admin, 'POST', '/publish', body).catch(() => undefined)),
    );
  }

  async stop() {
    this.stopped = true;
    await this.loop;
  }
}

/** Keeps ws-lb's admission queue full with raw upgrade requests until stopped. */
export class Flood {
  constructor(port, concurrency = 4, limitMs = 90_000) {
    this.port = port;
    this.stopped = false;
    this.sent = 0;
    // Bounded by time, not by a count: on a quiet machine refused upgrades take well under a
    // millisecond, and a bound of 100,000 attempts ran out within seconds, before the client
    // under test had met its third 1013 (CI at 19:39 on 2026-11-29: it got a place instead).
    this.started = Date.now();
    this.until = this.started + limitMs;
    this.workers = Array.from({ length: concurrency }, () => this.worker());
  }

  async worker() {
    while (!this.stopped && Date.now() < this.until) {
      this.sent += 1;
      await new Promise((resolve) => {
        const s = net.connect(this.port, '127.0.0.1');
        const done = () => {
          s.destroy();
          resolve();
        };
        s.setTimeout(3000, done);
        s.on('error', done);
        s.on('data', done); // 101 (then a 1013 close, or a relay we drop at once)
        s.on('close', done);
        s.write(
          'GET /ws HTTP/1.1\r\nHost: lb\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
            'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
        );
      });
    }
  }

  async stop() {
    this.stopped = true;
    await Promise.all(this.workers);
  }
}

// ---- clients under test ----

/** The TypeScript client in headless Debian Chromium, driven by playwright-core. */
export class BrowserClient {
  static async launch() {
    const { chromium } = await import(path.join(REPO, 'clients/js/node_modules/playwright-core/index.mjs'));
    const browser = await chromium.launch({
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    const client = new BrowserClient(browser);
    const server = http.createServer((req, res) => {
      const url = new URL(req.url, 'http://x');
      if (url.pathname === '/token' && client.tokens) {
        // The page's token provider (opts.tokens): what the test says the token is now.
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(client.tokens.current);
      } else if (url.pathname === '/') {
        res.writeHead(200, { 'content-type': 'text/html' });
        createReadStream(path.join(REPO, 'tests/clients/page.html')).pipe(res);
      } else if (/^\/dist\/[\w.-]+\.js$/.test(url.pathname)) {
        res.writeHead(200, { 'content-type': 'text/javascript' });
        createReadStream(path.join(REPO, 'clients/js', url.pathname)).on('error', () => res.end()).pipe(res);
      } else {
        res.writeHead(404).end();
      }
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    client.server = server;
    return client;
  }

  constructor(browser) {
    this.browser = browser;
    this.events = [];
  }

  /**
   * `channel` may be a comma list. With `opts.tokens` (a `Tokens`), the client's token
   * provider answers with `tokens.current` whenever the client asks.
   */
  async start(wsUrl, channel, opts) {
    this.tokens = opts.tokens;
    opts = { ...opts, tokens: opts.tokens !== undefined };
    this.page = await this.browser.newPage();
    this.page.on('pageerror', (e) => this.events.push({ event: 'pageerror', message: String(e) }));
    const q = new URLSearchParams({ ws: wsUrl, channel, opts: JSON.stringify(opts) });
    await this.page.goto(`http://127.0.0.1:${this.server.address().port}/?${q}`);
    await until(() => this.page.evaluate(() => window.ready === true), 10_000, 'page ready');
  }

  async poll() {
    const batch = await this.page.evaluate(() => window.takeLog());
    for (const e of batch) this.events.push(e);
  }

  async close() {
    await this.browser.close().catch(() => undefined);
    await new Promise((r) => this.server.close(r));
  }
}

/** ws-tail (the Rust crate) printing JSON lines. */
export class RustClient {
  constructor() {
    this.events = [];
  }

  async start(wsUrl, channel, opts) {
    const ms = (v) => `${v}ms`;
    const auth = opts.tokens === undefined ? [] : [
      '--token-file', opts.tokens.file,
      '--token-in', opts.tokenTransport ?? 'query',
      '--refresh-margin', ms(opts.refreshMargin ?? 30_000),
    ];
    this.proc = run('ws-tail', path.join(BIN, 'ws-tail'), [
      '--json',
      '--url', wsUrl,
      '--min-delay', ms(opts.minDelay),
      '--max-delay', ms(opts.maxDelay),
      '--overload-delay', ms(opts.overloadDelay),
      '--jitter', String(opts.jitter),
      '--ping-interval', ms(opts.pingInterval),
      '--pong-timeout', ms(opts.pongTimeout),
      '--connect-timeout', ms(opts.connectTimeout),
      ...auth,
      ...channel.split(','),
    ], 'pipe');
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      const e = JSON.parse(line);
      if (e.event === 'disconnected') e.delay = e.delay_ms;
      this.events.push(e);
    });
  }

  async poll() {
    if (exited(this.proc)) throw new Error(`ws-tail exited (${this.proc.exitCode ?? this.proc.signalCode})`);
  }

  async close() {
    if (this.proc !== undefined && !exited(this.proc)) {
      this.proc.kill('SIGTERM');
      await waitExit(this.proc, 10_000).catch(() => this.proc.kill('SIGKILL'));
    }
  }
}

/**
 * The token a client gets when it asks: `current`, also written to `file` (ws-tail reads the
 * file each time it needs a token; the browser page asks its server, which answers
 * `current`).
 */
export class Tokens {
  constructor(file, current) {
    this.file = file;
    this.set(current);
  }

  set(token) {
    this.current = token;
    // Written aside and renamed, so a reader never sees half a token.
    writeFileSync(`${this.file}.new`, `${token}\n`);
    renameSync(`${this.file}.new`, this.file);
  }
}

export function cleanupLogs(ok) {
  if (ok) rmSync(LOGS, { recursive: true, force: true });
  else console.error(`server logs kept in ${LOGS}`);
}
