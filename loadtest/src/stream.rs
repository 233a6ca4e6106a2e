//! A client connection's byte stream: plain TCP (`ws://`) or TLS over TCP (`wss://`), both
//! driven on readiness so the connection task keeps its shape — wait until the socket is
//! readable, then read synchronously into a stack buffer.
//!
//! TLS is rustls' sans-I/O `ClientConnection` fed from the non-blocking socket. After every
//! read the plaintext rustls holds is drained completely, so socket readiness stays the only
//! signal the task waits for (no plaintext can sit in the TLS layer unnoticed).
//!
//! Session resumption is per client, as with browsers: a client's first connection is always
//! a full handshake (the shared config has no session cache, so no client can use a ticket
//! another client received), and with `--reconnect` each client keeps its own one-entry cache
//! ([`Tls::own_config`]) so its re-dials resume its own earlier session.

use std::io::{self, Read as _, Write as _};
use std::sync::Arc;

use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore};
use tokio::net::TcpStream;

/// Where the trusted roots for `wss://` come from when `--ca-file` is not given.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS settings of a run, built once.
#[derive(Debug, Clone)]
pub struct Tls {
    /// For first connections: no session cache (see the module comment).
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl Tls {
    /// A client config trusting the PEM certificates in `ca_file` (or the system bundle),
    /// verifying the server as `host` (a DNS name or an IP address).
    pub fn new(ca_file: Option<&std::path::Path>, host: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let path = ca_file
            .map(std::path::Path::to_path_buf)
            .or_else(|| std::env::var_os("SSL_CERT_FILE").map(Into::into))
            .unwrap_or_else(|| SYSTEM_BUNDLE.into());
        let pem = std::fs::read(&path)
            .with_context(|| format!("reading CA certificates from {}", path.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding a root from {}", path.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("no certificate in {}", path.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // rustls' default cache is shared by every connection of the config: a new client
        // would resume a session (or TLS 1.3 ticket) another client got, which no real new
        // client can, and which makes the server's TLS look cheaper than it is.
        config.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

impl Tls {
    /// One client's own configuration: the shared one with a cache for one server's
    /// sessions, so this client's later connections resume its own earlier session (as a
    /// browser's do) and never another client's.
    pub fn own_config(&self) -> Arc<ClientConfig> {
        let mut config = (*self.config).clone();
        config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(1)));
        Arc::new(config)
    }
}

/// A connected stream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls' connection state is large and most runs are plain.
    Tls(Box<TlsStream>),
}

/// TLS over a non-blocking socket.
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    conn: ClientConnection,
}

/// `io::Read`/`io::Write` over a tokio socket's `try_read`/`try_write` (WouldBlock when it
/// is not ready), for rustls' `read_tls`/`write_tls`.
struct Nonblocking<'a>(&'a TcpStream);

impl io::Read for Nonblocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for Nonblocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Stream {
    /// Runs the TLS handshake over `tcp` when `tls` is given, with the client's `own`
    /// configuration ([`Tls::own_config`]) when it has one.
    pub async fn connect(
        tcp: TcpStream,
        tls: Option<&Tls>,
        own: Option<&Arc<ClientConfig>>,
    ) -> io::Result<Self> {
        let Some(tls) = tls else {
            return Ok(Self::Plain(tcp));
        };
        let config = own.unwrap_or(&tls.config).clone();
        let conn = ClientConnection::new(config, tls.server_name.clone()).map_err(tls_error)?;
        let mut s = TlsStream { tcp, conn };
        while s.conn.is_handshaking() {
            s.flush().await?;
            if !s.conn.is_handshaking() {
                break;
            }
            s.tcp.readable().await?;
            match s.conn.read_tls(&mut Nonblocking(&s.tcp)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {
                    s.conn.process_new_packets().map_err(tls_error)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        s.flush().await?;
        Ok(Self::Tls(Box::new(s)))
    }

    /// For TLS, whether the handshake resumed an earlier session; `None` for plain TCP.
    pub fn tls_resumed(&self) -> Option<bool> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(t) => Some(t.conn.handshake_kind() == Some(HandshakeKind::Resumed)),
        }
    }

    /// Waits until the socket has something to read.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.readable().await,
            Self::Tls(t) => t.tcp.readable().await,
        }
    }

    /// Reads what is available without waiting: `Ok(0)` at the end of the stream,
    /// `WouldBlock` when nothing is. For TLS, a peer that closes TCP without a TLS
    /// `close_notify` (common) is an end of stream too.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.try_read(buf),
            Self::Tls(t) => t.try_read(buf),
        }
    }

    /// Like [`Stream::try_read`], appending to `buf` (which must have spare capacity).
    pub fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.try_read_buf(buf),
            Self::Tls(t) => {
                let start = buf.len();
                buf.resize(buf.capacity().max(start + 1), 0);
                let r = t.try_read(buf.get_mut(start..).unwrap_or_default());
                buf.truncate(start + *r.as_ref().unwrap_or(&0));
                r
            }
        }
    }

    /// Writes all of `buf`, waiting for writability as needed.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => {
                while !buf.is_empty() {
                    s.writable().await?;
                    match s.try_write(buf) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => buf = buf.get(n..).unwrap_or_default(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Self::Tls(t) => {
                t.conn.writer().write_all(buf)?;
                t.flush().await
            }
        }
    }
}

impl TlsStream {
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // No plaintext buffered: take more ciphertext from the socket (WouldBlock when
            // there is none; Ok(0) from read_tls is TCP EOF, after which the reader reports
            // the end of the stream).
            self.conn.read_tls(&mut Nonblocking(&self.tcp))?;
            self.conn.process_new_packets().map_err(tls_error)?;
            // Anything rustls must answer (alerts, key updates) goes out best-effort; a full
            // socket here is retried with the next write.
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut Nonblocking(&self.tcp)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.tcp.writable().await?;
            match self.conn.write_tls(&mut Nonblocking(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
