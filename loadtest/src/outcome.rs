//! Why an attempt failed or an established connection ended, as stable report keys.
//!
//! The keys are part of the JSON schema (README): dashboards and the find-max step table
//! branch on them, so they are spelled here once. Local resource exhaustion (ports, file
//! descriptors) is kept apart from server behaviour on purpose: running out of ephemeral
//! ports is a load-generator limit, not a server failure.

use std::io;

/// Why an attempt did not become established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connect was refused (nothing listening, or the backlog overflowed).
    Refused,
    /// The deadline passed before the TCP connect completed.
    ConnectTimeout,
    /// The deadline passed between the TCP connect and the 101 response.
    HandshakeTimeout,
    /// The server answered the upgrade with this HTTP status instead of 101.
    Http(u16),
    /// The 101 response was malformed or its `Sec-WebSocket-Accept` was wrong.
    BadHandshake,
    /// The TLS handshake failed (certificate not trusted, wrong name, no common protocol).
    Tls,
    /// The server sent a close frame (with this code, if any) before establishment.
    ClosedBefore(Option<u16>),
    /// The server broke the framing rules before establishment (our close code).
    Protocol(u16),
    /// The connection was reset before establishment.
    Reset,
    /// The server closed the TCP connection without a close frame before establishment.
    Eof,
    /// No `subscribed` reply arrived within the handshake timeout.
    SubscribeTimeout,
    /// The server answered the subscription with an `error` message.
    SubscribeError,
    /// No local port was free for the source address (`EADDRNOTAVAIL`/`EADDRINUSE`).
    LocalPortsExhausted,
    /// This process hit its open-file limit (`EMFILE`/`ENFILE`).
    LocalFdLimit,
    /// The run ended (hold over) while the attempt was still in progress.
    Aborted,
    /// Anything else (logged at debug level).
    Other,
}

impl Failure {
    /// The report key, e.g. `refused`, `http_503`, `closed_1013`.
    pub fn key(&self) -> String {
        match self {
            Failure::Refused => "refused".into(),
            Failure::ConnectTimeout => "connect_timeout".into(),
            Failure::HandshakeTimeout => "handshake_timeout".into(),
            Failure::Http(code) => format!("http_{code}"),
            Failure::BadHandshake => "bad_handshake".into(),
            Failure::Tls => "tls".into(),
            Failure::ClosedBefore(Some(code)) => format!("closed_{code}"),
            Failure::ClosedBefore(None) => "closed_no_code".into(),
            Failure::Protocol(code) => format!("protocol_error_{code}"),
            Failure::Reset => "reset".into(),
            Failure::Eof => "eof".into(),
            Failure::SubscribeTimeout => "subscribe_timeout".into(),
            Failure::SubscribeError => "subscribe_error".into(),
            Failure::LocalPortsExhausted => "local_ports_exhausted".into(),
            Failure::LocalFdLimit => "local_fd_limit".into(),
            Failure::Aborted => "aborted_at_end".into(),
            Failure::Other => "other".into(),
        }
    }

    /// Classifies an I/O error seen while connecting or before establishment.
    pub fn from_io(e: &io::Error) -> Self {
        // EMFILE (24) and ENFILE (23) have no io::ErrorKind of their own.
        if matches!(e.raw_os_error(), Some(23 | 24)) {
            return Failure::LocalFdLimit;
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::UnexpectedEof => Failure::Eof,
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => {
                Failure::LocalPortsExhausted
            }
            io::ErrorKind::TimedOut => Failure::ConnectTimeout,
            _ => {
                tracing::debug!(error = %e, "attempt failed with an unclassified I/O error");
                Failure::Other
            }
        }
    }
}

/// How an established connection ended, when we did not end it ourselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// The server sent a close frame, with this code if any.
    Closed(Option<u16>),
    /// The TCP connection ended (EOF or reset) without a close frame.
    NoCloseFrame,
    /// The server broke the framing rules; we closed with this code.
    Protocol(u16),
}

impl Disconnect {
    /// The report key, e.g. `close_1012`, `no_close_frame`.
    pub fn key(&self) -> String {
        match self {
            Disconnect::Closed(Some(code)) => format!("close_{code}"),
            Disconnect::Closed(None) => "close_no_code".into(),
            Disconnect::NoCloseFrame => "no_close_frame".into(),
            Disconnect::Protocol(code) => format!("protocol_error_{code}"),
        }
    }

    /// What the same event means before establishment.
    pub fn as_failure(&self, io_reset: bool) -> Failure {
        match self {
            Disconnect::Closed(code) => Failure::ClosedBefore(*code),
            Disconnect::NoCloseFrame if io_reset => Failure::Reset,
            Disconnect::NoCloseFrame => Failure::Eof,
            Disconnect::Protocol(code) => Failure::Protocol(*code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable() {
        assert_eq!(Failure::Http(503).key(), "http_503");
        assert_eq!(Failure::ClosedBefore(Some(1013)).key(), "closed_1013");
        assert_eq!(Disconnect::Closed(Some(1012)).key(), "close_1012");
        assert_eq!(Disconnect::NoCloseFrame.key(), "no_close_frame");
        assert_eq!(Disconnect::NoCloseFrame.as_failure(true), Failure::Reset);
    }

    #[test]
    fn classifies_io_errors() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::from_io(&e), Failure::Refused);
        assert_eq!(
            Failure::from_io(&io::Error::from_raw_os_error(24)),
            Failure::LocalFdLimit
        );
        let e = io::Error::from(io::ErrorKind::AddrNotAvailable);
        assert_eq!(Failure::from_io(&e), Failure::LocalPortsExhausted);
        let e = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::from_io(&e), Failure::Reset);
    }
}
