//! Close codes used anywhere in odin-ws, with the meaning each one carries for a client.
//!
//! Clients branch on these numbers (a browser cannot read the HTTP status of a failed
//! handshake; the close code is what it sees), so they are part of the contract and listed in
//! `docs/protocol.md`.

/// 1000: the purpose of the connection is fulfilled (client asked to close, or echo of it).
pub const NORMAL: u16 = 1000;
/// 1001: the endpoint is going away (keepalive timeout, process exiting without restart).
pub const GOING_AWAY: u16 = 1001;
/// 1002: the peer broke RFC 6455 (unmasked client frame, reserved bits/opcodes, bad close).
pub const PROTOCOL_ERROR: u16 = 1002;
/// 1007: a text message or close reason was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// 1008: policy violation (message-rate abuse, ping flood).
pub const POLICY_VIOLATION: u16 = 1008;
/// 1009: a frame or message exceeded the configured size limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// 1011: the server hit an unexpected internal condition.
pub const INTERNAL_ERROR: u16 = 1011;
/// 1012: service restart — the shard is draining or was lost; reconnect (with `since`).
pub const SERVICE_RESTART: u16 = 1012;
/// 1013: try again later — overloaded (admission queue full, every shard busy or timing out).
pub const TRY_AGAIN_LATER: u16 = 1013;
/// 4000: slow consumer — the client did not read fast enough and its outbound queue overflowed.
pub const SLOW_CONSUMER: u16 = 4000;
/// 4001: unauthorized — the token was missing where one is required, malformed, badly
/// signed, not yet valid or for another audience/issuer. Get a new token before retrying.
pub const UNAUTHORIZED: u16 = 4001;
/// 4002: token expired — `exp` passed without a valid `refresh`. Reconnect with a fresh token.
pub const TOKEN_EXPIRED: u16 = 4002;
/// 4003: too many connections for this token's subject on this load balancer.
pub const TOO_MANY_CONNECTIONS: u16 = 4003;

/// Every code this system sends, with its documented meaning (used by docs tests).
pub const SENT_CODES: &[(u16, &str)] = &[
    (NORMAL, "normal closure"),
    (GOING_AWAY, "going away"),
    (PROTOCOL_ERROR, "protocol error"),
    (INVALID_PAYLOAD, "invalid payload data"),
    (POLICY_VIOLATION, "policy violation"),
    (MESSAGE_TOO_BIG, "message too big"),
    (INTERNAL_ERROR, "internal error"),
    (SERVICE_RESTART, "service restart"),
    (TRY_AGAIN_LATER, "try again later"),
    (SLOW_CONSUMER, "slow consumer"),
    (UNAUTHORIZED, "unauthorized"),
    (TOKEN_EXPIRED, "token expired"),
    (
        TOO_MANY_CONNECTIONS,
        "too many connections for this subject",
    ),
];

/// Whether a peer may put `code` in a close frame (RFC 6455 §7.4 and the IANA registry).
///
/// 1004-1006 and 1015 are reserved for local use and must never appear on the wire;
/// 1016-2999 are unassigned; 3000-4999 belong to libraries and applications.
pub fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Longest close reason in bytes: a close frame payload is at most 125 bytes, two of which
/// carry the code.
pub const MAX_REASON_LEN: usize = 123;

/// Truncates `reason` to at most [`MAX_REASON_LEN`] bytes on a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.get(..end).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_matches_autobahn_lists() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_on_wire(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_on_wire(bad), "{bad}");
        }
    }

    #[test]
    fn every_sent_code_is_valid_on_the_wire() {
        for (code, _) in SENT_CODES {
            assert!(is_valid_on_wire(*code), "{code}");
        }
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let long = "é".repeat(100);
        let t = truncate_reason(&long);
        assert!(t.len() <= MAX_REASON_LEN);
        assert_eq!(t.len() % 2, 0);
        assert_eq!(truncate_reason("short"), "short");
    }
}
