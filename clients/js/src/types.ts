// Public types of the odin-ws client.

import type { ReconnectOptions } from './policy.js';

/** A point in a channel's stream: `seq` is only comparable within one `epoch`. */
export interface Position {
  epoch: string;
  seq: number;
}

/** One published message, delivered once and in order per channel. */
export interface Publication {
  channel: string;
  epoch: string;
  seq: number;
  data: unknown;
  /** Replayed from the server's history after a reconnect (not live). */
  replayed: boolean;
}

/** The server confirmed a subscription (first time, or again after a reconnect). */
export interface SubscribedEvent {
  channel: string;
  /** The channel's position on the server at that moment. */
  epoch: string;
  seq: number;
  /** Every message after the position the client asked from is being replayed. */
  recovered: boolean;
  /** This is a resubscription after a reconnect. */
  resubscribe: boolean;
}

/**
 * The client cannot guarantee continuity for a channel: messages may be missing between
 * `previous` (the last position the application saw) and what follows. The application must
 * resynchronise from elsewhere (for market data: fetch a snapshot) and then apply the
 * messages that keep arriving.
 */
export interface ResyncEvent {
  channel: string;
  /**
   * `not_recovered`: the server's history no longer covers the gap (or the stream was
   * restarted); `epoch_changed`: a live message came from a new stream generation.
   */
  reason: 'not_recovered' | 'epoch_changed';
  previous: Position;
  current: Position;
}

/** An `error` reply from the server (the connection stays open). */
export interface ServerError {
  code: string;
  message: string;
  channel?: string;
}

export interface SubscriptionHandlers {
  onMessage?(pub: Publication): void;
  onSubscribed?(ev: SubscribedEvent): void;
  onResync?(ev: ResyncEvent): void;
  /** The server refused the subscription (e.g. `forbidden`, `invalid_channel`); it has ended. */
  onError?(err: ServerError): void;
  onUnsubscribed?(): void;
}

export interface SubscribeOptions {
  /** Resume after this position (e.g. one the application stored before a page reload). */
  since?: Position;
}

export type SubscriptionState = 'subscribing' | 'subscribed' | 'unsubscribed';

export type ConnectionState = 'disconnected' | 'connecting' | 'connected';

/** Why the token provider is asked. */
export type TokenReason = 'connect' | 'refresh' | 'expired' | 'unauthorized';

export type TokenProvider = (ctx: { reason: TokenReason }) => Promise<string | null>;

/** The part of the WebSocket API the client uses (the browser's, or any compatible one). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** `ws(s)://host/ws` of ws-lb. */
  url: string;
  /** WebSocket implementation; default `globalThis.WebSocket` (browsers, Node >= 22). */
  WebSocket?: WebSocketConstructor;
  /** Returns the token to connect with (null: connect without one). */
  getToken?: TokenProvider;
  /** Where the token goes: `query` (`?token=`, default) or `message` (first frame). */
  tokenTransport?: 'query' | 'message';
  /** Refresh this long before the token's `exp` (ms). Default 30000. */
  refreshMargin?: number;
  reconnect?: ReconnectOptions;
  /** Application ping period while connected (ms). Default 10000. */
  pingInterval?: number;
  /** A ping unanswered (and nothing else received) for this long closes the connection (ms). Default 5000. */
  pongTimeout?: number;
  /** The WebSocket must open within this long (ms). Default 10000. */
  connectTimeout?: number;
  /** Source of randomness for jitter, in [0, 1). Default `Math.random`. */
  random?: () => number;
  /** Called with what an event handler threw (default: `reportError`, else `console.error`). */
  onHandlerError?: (e: unknown) => void;
}

/** Why a connection (or an attempt) ended. */
export interface DisconnectedEvent {
  /** The close code; 1006 when the connection was lost without a close frame. */
  code: number;
  reason: string;
  /** `closed`: a close frame; `lost`: no close frame; `ping_timeout` / `connect_timeout`: the client gave up on the path; `client`: `disconnect()` was called. */
  cause: 'closed' | 'lost' | 'ping_timeout' | 'connect_timeout' | 'client';
  /** The connection had been answered by the server (a healthy connection ended). */
  healthy: boolean;
  /** The client will reconnect after `delay` ms. */
  reconnect: boolean;
  delay: number | null;
}

export interface ClientError {
  /**
   * `fatal_close`: closed with a code that retrying cannot fix (1002, 1007, 1008, 1009...);
   * `unauthorized`: the token was refused `maxAuthFailures` times in a row;
   * `refresh`: a token refresh was refused; `token_provider`: `getToken` threw;
   * `server`: an error reply not tied to a subscription; `connect`: the URL was refused.
   */
  kind: 'fatal_close' | 'unauthorized' | 'refresh' | 'token_provider' | 'server' | 'connect';
  code: string | number;
  message: string;
}

export interface ClientEvents {
  state: { state: ConnectionState; previous: ConnectionState };
  connecting: { attempt: number };
  connected: { attempt: number };
  disconnected: DisconnectedEvent;
  resync: ResyncEvent;
  error: ClientError;
  pong: { rtt: number };
}
