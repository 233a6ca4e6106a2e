// Reads the expiry of a JWT without verifying it: the client only needs to know when to ask
// for a new token; the server is the one that verifies.

/** Claims the client looks at. */
export interface TokenTimes {
  /** Expiry, milliseconds since the epoch. */
  exp: number;
  /** Issued-at, milliseconds since the epoch, when the token says. */
  iat?: number;
}

function base64UrlDecode(s: string): string | null {
  try {
    let b = s.replace(/-/g, '+').replace(/_/g, '/');
    while (b.length % 4 !== 0) b += '=';
    const bin = atob(b);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TextDecoder().decode(bytes);
  } catch {
    return null;
  }
}

/** `exp` (and `iat`) of a JWT, or null when it is not a JWT or carries no numeric `exp`. */
export function tokenTimes(token: string): TokenTimes | null {
  const parts = token.split('.');
  if (parts.length !== 3 || parts[1] === undefined) return null;
  const json = base64UrlDecode(parts[1]);
  if (json === null) return null;
  let claims: unknown;
  try {
    claims = JSON.parse(json);
  } catch {
    return null;
  }
  if (typeof claims !== 'object' || claims === null) return null;
  const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
  if (typeof exp !== 'number' || !Number.isFinite(exp)) return null;
  const out: TokenTimes = { exp: exp * 1000 };
  if (typeof iat === 'number' && Number.isFinite(iat)) out.iat = iat * 1000;
  return out;
}

/**
 * When to send the refresh: `margin` before expiry, but never earlier than half-way through
 * the token's life (a 60 s token is refreshed after 30 s, not at once), and never in the past.
 */
export function refreshAt(t: TokenTimes, now: number, margin: number): number {
  let at = t.exp - margin;
  if (t.iat !== undefined && t.iat < t.exp) at = Math.max(at, t.iat + (t.exp - t.iat) / 2);
  return Math.max(now, at);
}
