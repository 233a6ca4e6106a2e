// odin-ws client for browsers and Node: see docs/clients.md.
export { OdinClient, Subscription } from './client.js';
export {
  CloseCodes,
  closeAction,
  reconnectDelay,
  reconnectDelayBounds,
  resolveReconnect,
  type CloseAction,
  type ReconnectOptions,
  type ResolvedReconnect,
} from './policy.js';
export { tokenTimes, refreshAt, type TokenTimes } from './jwt.js';
export type * from './types.js';
