// What the client does after a connection ends, per close code, and how long it waits.
// This is the contract documented in docs/clients.md ("Reconnecting"); the browser test in
// tests/clients measures the client against it.

/** Reconnect timing. All durations in milliseconds. */
export interface ReconnectOptions {
  /** Base of the backoff, and the window a prompt reconnect is spread over. Default 500. */
  minDelay?: number;
  /** Cap of every backoff. Default 20000 (as centrifuge-js): a client is back at most ~20 s after its server is. */
  maxDelay?: number;
  /** Base of the backoff after an overload close (1013, 4003). Default 2000. */
  overloadDelay?: number;
  /** Growth per consecutive failed attempt. Default 2. */
  factor?: number;
  /** Fraction of each backoff taken off at random (0 = none, 1 = full jitter). Default 0.5. */
  jitter?: number;
  /** Consecutive 4001 closes after which the client stops and reports. Default 3. */
  maxAuthFailures?: number;
}

export type ResolvedReconnect = Required<ReconnectOptions>;

export function resolveReconnect(o: ReconnectOptions | undefined): ResolvedReconnect {
  const r = {
    minDelay: o?.minDelay ?? 500,
    maxDelay: o?.maxDelay ?? 20_000,
    overloadDelay: o?.overloadDelay ?? 2_000,
    factor: o?.factor ?? 2,
    jitter: o?.jitter ?? 0.5,
    maxAuthFailures: o?.maxAuthFailures ?? 3,
  };
  if (!(r.minDelay >= 0 && r.maxDelay >= r.minDelay && r.overloadDelay >= 0 && r.factor >= 1)) {
    throw new RangeError('reconnect: need 0 <= minDelay <= maxDelay, overloadDelay >= 0, factor >= 1');
  }
  if (!(r.jitter >= 0 && r.jitter <= 1)) throw new RangeError('reconnect.jitter must be in [0, 1]');
  return r;
}

/** How a close is handled. */
export type CloseAction =
  /** The connection worked and ended for a reason that is not the client's: reconnect soon. */
  | 'reconnect'
  /** The server is overloaded (1013, 4003): exponential backoff from `overloadDelay`. */
  | 'overload'
  /** The token was refused (4001): fresh token, backoff, give up after `maxAuthFailures`. */
  | 'unauthorized'
  /** The token expired (4002): fresh token, reconnect soon. */
  | 'expired'
  /** The client broke the protocol or a limit (1002, 1003, 1007, 1008, 1009, 1010): no retry. */
  | 'fatal';

/** Close codes of odin-ws (docs/protocol.md) and of the planned authentication. */
export const CloseCodes = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  MANDATORY_EXTENSION: 1010,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  SLOW_CONSUMER: 4000,
  UNAUTHORIZED: 4001,
  TOKEN_EXPIRED: 4002,
  TOO_MANY_CONNECTIONS: 4003,
} as const;

/** The action for a close code (1006 = the connection was lost without a close frame). */
export function closeAction(code: number): CloseAction {
  switch (code) {
    case 1002:
    case 1003:
    case 1007:
    case 1008:
    case 1009:
    case 1010:
      return 'fatal';
    case 1013:
    case 4003:
      return 'overload';
    case 4001:
      return 'unauthorized';
    case 4002:
      return 'expired';
    default:
      // 1000 (unasked), 1001, 1005, 1006, 1011, 1012, 4000, unknown codes: the path or the
      // server went away; the position makes reconnecting safe.
      return 'reconnect';
  }
}

/**
 * Delay before the next attempt.
 *
 * `failures` counts consecutive attempts that ended before the server answered anything
 * (this one included); 0 means the connection that just ended was healthy.
 * `random` returns a number in [0, 1).
 */
export function reconnectDelay(
  action: Exclude<CloseAction, 'fatal'>,
  failures: number,
  o: ResolvedReconnect,
  random: () => number,
): number {
  const r = random();
  if (failures === 0 && (action === 'reconnect' || action === 'expired')) {
    // A healthy connection ended: come back at once, spread over minDelay so that a
    // thousand clients of a lost shard do not arrive in the same millisecond.
    return o.minDelay * r;
  }
  const base = action === 'overload' ? o.overloadDelay : o.minDelay;
  const n = Math.max(1, failures);
  const ceiling = Math.min(o.maxDelay, base * Math.pow(o.factor, n - 1));
  return ceiling * (1 - o.jitter * r);
}

/** The bounds of {@link reconnectDelay} (for tests and documentation). */
export function reconnectDelayBounds(
  action: Exclude<CloseAction, 'fatal'>,
  failures: number,
  o: ResolvedReconnect,
): [number, number] {
  if (failures === 0 && (action === 'reconnect' || action === 'expired')) return [0, o.minDelay];
  const base = action === 'overload' ? o.overloadDelay : o.minDelay;
  const ceiling = Math.min(o.maxDelay, base * Math.pow(o.factor, Math.max(1, failures) - 1));
  return [ceiling * (1 - o.jitter), ceiling];
}
