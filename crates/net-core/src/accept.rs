//! The accept loop: accepts until stopped, sets per-connection socket options, and keeps
//! working when the process runs out of file descriptors.
//!
//! On `EMFILE`/`ENFILE` a naive loop spins: the pending connection stays in the backlog and
//! `accept` fails again at once. Here one descriptor is kept in reserve; on exhaustion it is
//! released, the pending connection is accepted and answered `503 Service Unavailable`
//! (so a load balancer or client knows to go elsewhere) and closed, and the reserve is taken
//! again. If even that fails, the loop backs off for a few milliseconds instead of spinning.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Counter: accept errors, labels `listener`, `kind` (fd_exhausted, other).
pub const ACCEPT_ERRORS: &str = "ws_accept_errors_total";
/// Counter: connections refused with 503 because descriptors ran out, label `listener`.
pub const FD_REJECTS: &str = "ws_accept_fd_exhausted_rejects_total";

const REJECT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";

fn fd_exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc_emfile() || code == libc_enfile())
        || e.kind() == io::ErrorKind::OutOfMemory
}

// EMFILE and ENFILE are 24 and 23 on Linux and the BSDs.
const fn libc_emfile() -> i32 {
    24
}
const fn libc_enfile() -> i32 {
    23
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Options applied to every accepted socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOptions {
    /// `SO_KEEPALIVE` with this idle time before the first probe (`None`: off).
    pub keepalive: Option<Duration>,
    /// `SO_SNDBUF` in bytes (`None`: kernel default and autotuning). A small buffer bounds
    /// kernel memory per connection and makes a client that stops reading show up sooner
    /// as a slow consumer.
    pub send_buffer: Option<usize>,
}

impl SocketOptions {
    /// `nodelay`: set `TCP_NODELAY` on this socket (where the listener could not pass it on).
    fn apply(&self, stream: &TcpStream, nodelay: bool) {
        if nodelay {
            let _ = stream.set_nodelay(true);
        }
        if self.keepalive.is_none() && self.send_buffer.is_none() {
            return;
        }
        let sock = socket2::SockRef::from(stream);
        if let Some(idle) = self.keepalive {
            let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
        }
        if let Some(size) = self.send_buffer {
            let _ = sock.set_send_buffer_size(size);
        }
    }
}

/// Whether the sockets `listener` accepts start with `TCP_NODELAY`: true when the listener
/// has it, because Linux copies a listener's options into the sockets it accepts. `crate::bind`
/// sets it before `listen`, so none of its connections is ever queued without it. A listener
/// without it (bound elsewhere), or another OS: false, and the option is set on each accepted
/// socket. Saves one `setsockopt` per connection (of the ~21 system calls ws-lb makes per
/// relayed client).
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .tcp_nodelay()
            .unwrap_or(false)
}

/// Accepts connections on `listener` until `stop` is cancelled, calling `on_conn` for each
/// (with `TCP_NODELAY` and `opts` applied). `name` labels metrics and logs.
pub async fn accept_loop<F>(
    listener: TcpListener,
    name: &'static str,
    opts: SocketOptions,
    stop: CancellationToken,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    for kind in ["fd_exhausted", "other"] {
        metrics::counter!(ACCEPT_ERRORS, "listener" => name, "kind" => kind).increment(0);
    }
    metrics::counter!(FD_REJECTS, "listener" => name).increment(0);
    let nodelay_per_socket = !nodelay_inherited(&listener);
    let mut reserve = File::open("/dev/null").ok();
    let mut last_warn: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                opts.apply(&stream, nodelay_per_socket);
                on_conn(stream, peer);
            }
            Err(e) if fd_exhausted(&e) => {
                metrics::counter!(ACCEPT_ERRORS, "listener" => name, "kind" => "fd_exhausted")
                    .increment(1);
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(listener = name, error = %e, "out of file descriptors; refusing new connections with 503");
                    last_warn = Some(Instant::now());
                }
                // The reserve may have been lost to another task's socket in the window
                // below; take it again as soon as a descriptor is free.
                if reserve.is_none() {
                    reserve = File::open("/dev/null").ok();
                }
                if reserve.take().is_some() {
                    if let Ok(Ok((mut stream, _))) =
                        tokio::time::timeout(Duration::from_millis(5), listener.accept()).await
                    {
                        let _ = tokio::time::timeout(
                            Duration::from_millis(50),
                            stream.write_all(REJECT),
                        )
                        .await;
                        let _ = stream.shutdown().await;
                        metrics::counter!(FD_REJECTS, "listener" => name).increment(1);
                    }
                    reserve = File::open("/dev/null").ok();
                }
                if reserve.is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Err(e) if transient(&e) => continue,
            Err(e) => {
                metrics::counter!(ACCEPT_ERRORS, "listener" => name, "kind" => "other")
                    .increment(1);
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepted_nodelay(listener: TcpListener) -> Vec<bool> {
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            "test",
            SocketOptions::default(),
            stop.clone(),
            move |stream, _| {
                let _ = tx.send(stream.nodelay().unwrap());
            },
        ));
        let mut clients = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            seen.push(rx.recv().await.unwrap());
        }
        stop.cancel();
        task.await.unwrap();
        seen
    }

    /// Every accepted socket has `TCP_NODELAY`: inherited from a listener `bind` made (with
    /// the first client queued before the accept loop runs), or set per socket for a listener
    /// bound without it.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let ours = crate::bind(
            "127.0.0.1:0".parse().unwrap(),
            crate::ListenOptions::default(),
        )
        .unwrap();
        assert_eq!(
            socket2::SockRef::from(&ours).tcp_nodelay().unwrap(),
            cfg!(target_os = "linux")
        );
        assert_eq!(accepted_nodelay(ours).await, [true; 3]);
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!socket2::SockRef::from(&plain).tcp_nodelay().unwrap());
        assert_eq!(accepted_nodelay(plain).await, [true; 3]);
    }
}
