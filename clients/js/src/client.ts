// The odin-ws client: one WebSocket, any number of channel subscriptions, and the recovery
// rules of docs/protocol.md applied for the application (positions, `since`, backoff per
// close code, application pings, token refresh).

import { refreshAt, tokenTimes, type TokenTimes } from './jwt.js';
import {
  closeAction,
  reconnectDelay,
  resolveReconnect,
  type CloseAction,
  type ResolvedReconnect,
} from './policy.js';
import type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  DisconnectedEvent,
  Position,
  ResyncEvent,
  ServerError,
  SubscribeOptions,
  SubscriptionHandlers,
  SubscriptionState,
  TokenProvider,
  TokenReason,
  WebSocketConstructor,
  WebSocketLike,
} from './types.js';

const CHANNEL_RE = /^[A-Za-z0-9._\-:@]{1,128}$/;
/** Longest delay setTimeout accepts. */
const MAX_TIMER = 0x7fffffff;

type Listener<T> = (ev: T) => void;
type Timer = ReturnType<typeof setTimeout>;
type TimerName = 'retry' | 'connect' | 'ping' | 'pong' | 'refresh';

/** Wire state of one channel on the current connection. */
type Wire = 'pending' | 'subscribing' | 'subscribed';

interface Chan {
  sub: Subscription;
  wire: Wire;
  /** Last position delivered to the application (or confirmed by `subscribed`). */
  position: Position | null;
  /** The `since` sent with the subscribe in flight. */
  requested: Position | null;
  /** After a recovered resubscribe: messages up to this seq are replays. */
  replayUntil: number | null;
  everSubscribed: boolean;
}

function defaultHandlerError(e: unknown): void {
  const g = globalThis as { reportError?: (e: unknown) => void };
  if (typeof g.reportError === 'function') g.reportError(e);
  else console.error('odin-ws: an event handler threw', e);
}

/** A channel subscription. Ends with {@link Subscription.unsubscribe} or a refusal. */
export class Subscription {
  state: SubscriptionState = 'subscribing';
  /** The refusal that ended it, if one did. */
  error: ServerError | null = null;

  /** @internal */
  constructor(
    readonly channel: string,
    /** @internal */ readonly handlers: SubscriptionHandlers,
    private readonly owner: OdinClient,
  ) {}

  /** The last position delivered (what a reconnect resumes after). */
  get position(): Position | null {
    return this.owner._position(this);
  }

  /** Stops delivery at once; the server is told when connected. */
  unsubscribe(): void {
    this.owner._unsubscribe(this);
  }
}

export class OdinClient {
  private readonly opts: {
    url: string;
    WebSocket: WebSocketConstructor;
    getToken: TokenProvider | undefined;
    tokenTransport: 'query' | 'message';
    refreshMargin: number;
    reconnect: ResolvedReconnect;
    pingInterval: number;
    pongTimeout: number;
    connectTimeout: number;
    random: () => number;
    onHandlerError: (e: unknown) => void;
  };
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();
  private readonly chans = new Map<string, Chan>();
  /** Channels unsubscribed on this connection whose `unsubscribed` has not arrived. */
  private readonly leaving = new Set<string>();

  private _state: ConnectionState = 'disconnected';
  private ws: WebSocketLike | null = null;
  /** Bumped whenever the current connection (or attempt) is abandoned. */
  private gen = 0;
  private attempt = 0;
  /** Consecutive attempts that ended before the server answered anything. */
  private failures = 0;
  private authFailures = 0;
  private healthy = false;
  private stopped = true;
  private flushQueued = false;

  private token: string | null = null;
  private tokenTimes: TokenTimes | null = null;
  private tokenReason: TokenReason | null = 'connect';
  private refreshPending = false;

  private pingId = 0;
  private pingSentAt = 0;
  private lastInbound = 0;
  private timers: Partial<Record<TimerName, Timer>> = {};
  private readonly onOnline = (): void => {
    // Back from sleep or a network change: check the path now instead of at the next ping.
    if (this._state === 'connected' && this.timers.pong === undefined) this.sendPing();
  };

  constructor(options: ClientOptions) {
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (Ctor === undefined) {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket (e.g. from the "ws" package)');
    }
    this.opts = {
      url: options.url,
      WebSocket: Ctor,
      getToken: options.getToken,
      tokenTransport: options.tokenTransport ?? 'query',
      refreshMargin: options.refreshMargin ?? 30_000,
      reconnect: resolveReconnect(options.reconnect),
      pingInterval: options.pingInterval ?? 10_000,
      pongTimeout: options.pongTimeout ?? 5_000,
      connectTimeout: options.connectTimeout ?? 10_000,
      random: options.random ?? Math.random,
      onHandlerError: options.onHandlerError ?? defaultHandlerError,
    };
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** Subscribes to an event; returns a function that removes the listener. */
  on<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(fn as Listener<never>);
    return () => set?.delete(fn as Listener<never>);
  }

  /** Starts connecting (and keeps reconnecting until {@link disconnect}). */
  connect(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.failures = 0;
    this.authFailures = 0;
    const g = globalThis as { addEventListener?: (t: string, f: () => void) => void };
    g.addEventListener?.('online', this.onOnline);
    void this.dial();
  }

  /** Closes the connection and stops reconnecting. Subscriptions are kept for a later connect(). */
  disconnect(): void {
    if (this.stopped) return;
    this.stopped = true;
    const g = globalThis as { removeEventListener?: (t: string, f: () => void) => void };
    g.removeEventListener?.('online', this.onOnline);
    const ws = this.ws;
    this.abandon();
    if (ws !== null) {
      try {
        ws.close(1000, 'client disconnect');
      } catch {
        // Already closing.
      }
    }
    this.emit('disconnected', {
      code: 1000,
      reason: 'client disconnect',
      cause: 'client',
      healthy: this.healthy,
      reconnect: false,
      delay: null,
    });
    this.setState('disconnected');
  }

  /**
   * Subscribes to `channel`. Messages arrive once and in order through `handlers.onMessage`;
   * when continuity cannot be guaranteed, `handlers.onResync` says so. One subscription per
   * channel: a second one throws (use {@link getSubscription}).
   */
  subscribe(channel: string, handlers: SubscriptionHandlers = {}, options: SubscribeOptions = {}): Subscription {
    if (!CHANNEL_RE.test(channel)) {
      throw new TypeError(`invalid channel name ${JSON.stringify(channel)}: 1-128 of A-Z a-z 0-9 . _ - : @`);
    }
    if (this.chans.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(channel, handlers, this);
    const since = options.since;
    this.chans.set(channel, {
      sub,
      wire: 'pending',
      position: since ? { epoch: since.epoch, seq: since.seq } : null,
      requested: null,
      replayUntil: null,
      everSubscribed: false,
    });
    this.scheduleFlush();
    return sub;
  }

  getSubscription(channel: string): Subscription | null {
    return this.chans.get(channel)?.sub ?? null;
  }

  /** @internal */
  _position(sub: Subscription): Position | null {
    const c = this.chans.get(sub.channel);
    return c !== undefined && c.sub === sub && c.position !== null ? { ...c.position } : null;
  }

  /** @internal */
  _unsubscribe(sub: Subscription): void {
    const c = this.chans.get(sub.channel);
    if (c === undefined || c.sub !== sub) return;
    this.chans.delete(sub.channel);
    sub.state = 'unsubscribed';
    if (c.wire !== 'pending' && this._state === 'connected') {
      this.leaving.add(sub.channel);
      this.send({ type: 'unsubscribe', channels: [sub.channel] });
    }
    this.call(() => sub.handlers.onUnsubscribed?.());
  }

  // ---- connection lifecycle ----

  private async dial(): Promise<void> {
    const gen = ++this.gen;
    this.attempt += 1;
    this.healthy = false;
    this.setState('connecting');
    this.emit('connecting', { attempt: this.attempt });

    if (this.opts.getToken !== undefined && this.needToken()) {
      const reason = this.tokenReason ?? 'connect';
      let token: string | null;
      try {
        token = await this.opts.getToken({ reason });
      } catch (e) {
        if (gen !== this.gen) return;
        this.emit('error', { kind: 'token_provider', code: 'token_provider', message: String(e) });
        this.failures += 1;
        this.scheduleRetry('reconnect', 1006, 'token provider failed', 'lost');
        return;
      }
      if (gen !== this.gen) return;
      this.setToken(token);
      this.tokenReason = null;
    }

    let url = this.opts.url;
    if (this.token !== null && this.opts.tokenTransport === 'query') {
      url += (url.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(this.token);
    }
    let ws: WebSocketLike;
    try {
      ws = new this.opts.WebSocket(url);
    } catch (e) {
      this.stopped = true;
      this.emit('error', { kind: 'connect', code: 'invalid_url', message: String(e) });
      this.setState('disconnected');
      return;
    }
    this.ws = ws;
    this.timers.connect = setTimeout(() => {
      if (gen === this.gen) this.giveUp(ws, 'connect_timeout', 'connect timeout');
    }, this.opts.connectTimeout);
    ws.onopen = () => {
      if (gen === this.gen) this.onOpen();
    };
    ws.onmessage = (ev) => {
      if (gen === this.gen) this.onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (gen !== this.gen) return;
      // 1005 (no code) and 1006 (no close frame) are not codes a server sent.
      const lost = ev.code === 1006 || ev.code === 1005 || ev.code === 1015;
      this.ended(lost ? 1006 : ev.code, ev.reason ?? '', lost ? 'lost' : 'closed');
    };
    ws.onerror = () => {
      // A close event follows; it carries what there is to know.
    };
  }

  private needToken(): boolean {
    if (this.tokenReason !== null || this.token === null) return true;
    return this.tokenTimes !== null && this.tokenTimes.exp - Date.now() < this.opts.refreshMargin;
  }

  private setToken(token: string | null): void {
    this.token = token;
    this.tokenTimes = token === null ? null : tokenTimes(token);
  }

  private onOpen(): void {
    this.clearTimer('connect');
    this.setState('connected');
    this.emit('connected', { attempt: this.attempt });
    this.lastInbound = Date.now();
    if (this.token !== null && this.opts.tokenTransport === 'message') {
      this.send({ type: 'auth', token: this.token });
    }
    // The first ping proves the path to a shard: ws-lb opens the WebSocket before it knows
    // whether it will close it again with 1013.
    this.sendPing();
    for (const c of this.chans.values()) c.wire = 'pending';
    this.flush();
    this.scheduleRefresh();
  }

  /** The path is dead (or never opened): drop it without waiting for a close handshake. */
  private giveUp(ws: WebSocketLike, cause: 'ping_timeout' | 'connect_timeout', reason: string): void {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(4100, reason);
    } catch {
      // Nothing to close.
    }
    this.ended(1006, reason, cause);
  }

  private abandon(): void {
    this.gen += 1;
    const ws = this.ws;
    if (ws !== null) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.ws = null;
    for (const k of Object.keys(this.timers) as TimerName[]) this.clearTimer(k);
    this.leaving.clear();
    this.refreshPending = false;
    for (const c of this.chans.values()) {
      c.wire = 'pending';
      c.requested = null;
      c.replayUntil = null;
      if (c.sub.state === 'subscribed') c.sub.state = 'subscribing';
    }
  }

  private ended(code: number, reason: string, cause: DisconnectedEvent['cause']): void {
    const wasHealthy = this.healthy;
    this.abandon();
    if (this.stopped) return;
    let action: CloseAction = cause === 'closed' ? closeAction(code) : 'reconnect';
    if (action === 'fatal') {
      this.stopped = true;
      this.emit('error', { kind: 'fatal_close', code, message: reason || `closed with ${code}` });
      this.emit('disconnected', { code, reason, cause, healthy: wasHealthy, reconnect: false, delay: null });
      this.setState('disconnected');
      return;
    }
    if (action === 'unauthorized') {
      this.authFailures += 1;
      this.tokenReason = 'unauthorized';
      if (this.authFailures >= this.opts.reconnect.maxAuthFailures) {
        this.stopped = true;
        this.emit('error', {
          kind: 'unauthorized',
          code,
          message: `token refused ${this.authFailures} times in a row: ${reason}`,
        });
        this.emit('disconnected', { code, reason, cause, healthy: wasHealthy, reconnect: false, delay: null });
        this.setState('disconnected');
        return;
      }
      // A refused token is not a healthy connection, whatever was received before.
      this.failures += 1;
      action = 'reconnect';
    } else if (action === 'expired') {
      this.tokenReason = 'expired';
      this.failures = wasHealthy ? 0 : this.failures + 1;
    } else {
      this.failures = wasHealthy && action === 'reconnect' ? 0 : this.failures + 1;
    }
    this.scheduleRetry(action, code, reason, cause, wasHealthy);
  }

  private scheduleRetry(
    action: Exclude<CloseAction, 'fatal' | 'unauthorized'>,
    code: number,
    reason: string,
    cause: DisconnectedEvent['cause'],
    healthy = false,
  ): void {
    const delay = reconnectDelay(action, this.failures, this.opts.reconnect, this.opts.random);
    this.emit('disconnected', { code, reason, cause, healthy, reconnect: true, delay });
    if (this.stopped) return;
    this.setState('connecting');
    const gen = this.gen;
    this.timers.retry = setTimeout(() => {
      if (gen === this.gen && !this.stopped) void this.dial();
    }, delay);
  }

  // ---- frames ----

  private send(msg: object): void {
    const ws = this.ws;
    if (ws === null || ws.readyState !== 1) return;
    try {
      ws.send(JSON.stringify(msg));
    } catch {
      // The close event follows.
    }
  }

  private onFrame(data: unknown): void {
    this.lastInbound = Date.now();
    if (typeof data !== 'string') return;
    let m: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(data);
      if (typeof parsed !== 'object' || parsed === null) return;
      m = parsed as Record<string, unknown>;
    } catch {
      return;
    }
    if (!this.healthy && (m.type === 'pong' || m.type === 'subscribed' || m.type === 'message')) {
      // A shard answered: this connection works (an error reply or a close does not count).
      this.healthy = true;
      this.failures = 0;
      this.authFailures = 0;
    }
    switch (m.type) {
      case 'message':
        this.onMessage(m);
        break;
      case 'subscribed':
        this.onSubscribed(m);
        break;
      case 'unsubscribed':
        if (typeof m.channel === 'string') {
          this.leaving.delete(m.channel);
          this.scheduleFlush();
        }
        break;
      case 'pong':
        if (m.id === this.pingId && this.timers.pong !== undefined) {
          this.clearTimer('pong');
          this.emit('pong', { rtt: Date.now() - this.pingSentAt });
          this.timers.ping = setTimeout(() => this.sendPing(), this.opts.pingInterval);
        }
        break;
      case 'refreshed':
        this.refreshPending = false;
        this.scheduleRefresh();
        break;
      case 'error':
        this.onError(m);
        break;
      default:
      // Newer servers may send types this client does not know.
    }
  }

  private onSubscribed(m: Record<string, unknown>): void {
    const { channel, epoch, seq, recovered } = m;
    if (typeof channel !== 'string' || typeof epoch !== 'string' || typeof seq !== 'number') return;
    const c = this.chans.get(channel);
    if (c === undefined || c.wire !== 'subscribing') return;
    c.wire = 'subscribed';
    c.sub.state = 'subscribed';
    const resubscribe = c.everSubscribed;
    c.everSubscribed = true;
    const current = { epoch, seq };
    const asked = c.requested;
    c.requested = null;
    let resync = null;
    if (asked === null) {
      c.position = current;
    } else if (recovered === true) {
      c.replayUntil = epoch === asked.epoch ? seq : null;
    } else {
      c.position = current;
      resync = { channel, reason: 'not_recovered' as const, previous: asked, current };
    }
    const sub = c.sub;
    this.call(() => sub.handlers.onSubscribed?.({ channel, epoch, seq, recovered: recovered === true, resubscribe }));
    if (resync !== null) this.resync(sub, resync);
  }

  private onMessage(m: Record<string, unknown>): void {
    const { channel, epoch, seq } = m;
    if (typeof channel !== 'string' || typeof epoch !== 'string' || typeof seq !== 'number') return;
    const c = this.chans.get(channel);
    if (c === undefined || c.wire !== 'subscribed') return;
    const pos = c.position;
    if (pos !== null && pos.epoch === epoch && seq <= pos.seq) return; // already delivered
    if (pos !== null && pos.epoch !== epoch) {
      this.resync(c.sub, { channel, reason: 'epoch_changed', previous: pos, current: { epoch, seq } });
      if (this.chans.get(channel) !== c) return;
    }
    c.position = { epoch, seq };
    const replayed = c.replayUntil !== null && seq <= c.replayUntil;
    if (!replayed) c.replayUntil = null;
    const sub = c.sub;
    this.call(() => sub.handlers.onMessage?.({ channel, epoch, seq, data: m.data, replayed }));
  }

  private onError(m: Record<string, unknown>): void {
    const err: ServerError = {
      code: typeof m.code === 'string' ? m.code : 'unknown',
      message: typeof m.message === 'string' ? m.message : '',
    };
    if (typeof m.channel === 'string') {
      err.channel = m.channel;
      // Races of our own making (an unsubscribe crossing a message): nothing to report.
      if (err.code === 'not_subscribed' || err.code === 'already_subscribed') return;
      const c = this.chans.get(m.channel);
      if (c !== undefined && c.wire === 'subscribing') {
        // Refused (forbidden, invalid_channel, too_many_subscriptions, ...): the
        // subscription ends; the connection and the other subscriptions go on.
        this.chans.delete(m.channel);
        c.sub.state = 'unsubscribed';
        c.sub.error = err;
        this.call(() => c.sub.handlers.onError?.(err));
        return;
      }
    } else if (this.refreshPending) {
      this.refreshPending = false;
      this.emit('error', { kind: 'refresh', code: err.code, message: err.message });
      return;
    }
    this.emit('error', { kind: 'server', code: err.code, message: err.message });
  }

  private resync(sub: Subscription, ev: ResyncEvent): void {
    this.call(() => sub.handlers.onResync?.(ev));
    this.emit('resync', ev);
  }

  private scheduleFlush(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      this.flush();
    });
  }

  /** Sends one subscribe for every channel not yet asked for on this connection. */
  private flush(): void {
    if (this._state !== 'connected') return;
    const channels: string[] = [];
    const since: Record<string, Position> = {};
    for (const [name, c] of this.chans) {
      if (c.wire !== 'pending' || this.leaving.has(name)) continue;
      c.wire = 'subscribing';
      channels.push(name);
      if (c.position !== null) {
        c.requested = { ...c.position };
        since[name] = c.requested;
      }
    }
    if (channels.length === 0) return;
    const msg: Record<string, unknown> = { type: 'subscribe', channels };
    if (Object.keys(since).length > 0) msg.since = since;
    this.send(msg);
  }

  // ---- pings ----

  private sendPing(): void {
    this.clearTimer('ping');
    this.pingId += 1;
    this.pingSentAt = Date.now();
    this.send({ type: 'ping', id: this.pingId });
    this.armPong(this.opts.pongTimeout);
  }

  private armPong(after: number): void {
    this.clearTimer('pong');
    const gen = this.gen;
    this.timers.pong = setTimeout(() => {
      if (gen !== this.gen || this.ws === null) return;
      // Frames still arriving mean the path works and the pong waits behind them.
      const quiet = Date.now() - this.lastInbound;
      if (quiet < this.opts.pongTimeout && this.lastInbound > this.pingSentAt) {
        this.armPong(this.opts.pongTimeout - quiet);
        return;
      }
      this.giveUp(this.ws, 'ping_timeout', 'ping timeout');
    }, after);
  }

  // ---- token refresh ----

  private scheduleRefresh(): void {
    this.clearTimer('refresh');
    if (this.opts.getToken === undefined || this.tokenTimes === null) return;
    const now = Date.now();
    const at = refreshAt(this.tokenTimes, now, this.opts.refreshMargin);
    const gen = this.gen;
    this.timers.refresh = setTimeout(() => {
      if (gen === this.gen) void this.refresh(gen);
    }, Math.min(MAX_TIMER, at - now));
  }

  private async refresh(gen: number): Promise<void> {
    const getToken = this.opts.getToken;
    if (getToken === undefined) return;
    const before = this.tokenTimes;
    let token: string | null;
    try {
      token = await getToken({ reason: 'refresh' });
    } catch (e) {
      if (gen === this.gen) this.emit('error', { kind: 'token_provider', code: 'token_provider', message: String(e) });
      return; // The server closes with 4002 at expiry; the reconnect asks again.
    }
    if (gen !== this.gen || token === null) return;
    const times = tokenTimes(token);
    if (before !== null && (times === null || times.exp <= before.exp)) {
      this.emit('error', {
        kind: 'token_provider',
        code: 'stale_token',
        message: 'getToken({reason:"refresh"}) returned a token that does not expire later',
      });
      return;
    }
    this.setToken(token);
    this.refreshPending = true;
    this.send({ type: 'refresh', token });
  }

  // ---- helpers ----

  private clearTimer(k: TimerName): void {
    const t = this.timers[k];
    if (t !== undefined) clearTimeout(t);
    delete this.timers[k];
  }

  private setState(state: ConnectionState): void {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this.emit('state', { state, previous });
  }

  private emit<K extends keyof ClientEvents>(event: K, ev: ClientEvents[K]): void {
    const set = this.listeners.get(event);
    if (set === undefined) return;
    for (const fn of [...set]) this.call(() => (fn as Listener<ClientEvents[K]>)(ev));
  }

  /** Runs application code; an exception there must not break the connection's bookkeeping. */
  private call(f: () => void): void {
    try {
      f();
    } catch (e) {
      this.opts.onHandlerError(e);
    }
  }
}
