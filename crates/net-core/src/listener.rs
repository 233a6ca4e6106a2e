//! Binding TCP listeners with explicit backlog, `SO_REUSEADDR` and optional `SO_REUSEPORT`
//! (several processes sharing one port, as the LB tier does on one host).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// How to bind a listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// Listen backlog. The kernel silently caps it at `net.core.somaxconn` (4096 on a stock
    /// kernel), so the default asks for 65535, the value the deploy startup scripts give
    /// `net.core.somaxconn`: the application never holds the queue shorter than the kernel
    /// allows.
    pub backlog: u32,
    /// Set `SO_REUSEPORT` so several processes can accept on the same port.
    pub reuse_port: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            backlog: 65535,
            reuse_port: false,
        }
    }
}

/// Binds `addr`. Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr, opts: ListenOptions) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Before `listen`: on Linux every accepted socket inherits it (`accept_loop` then skips
    // the per-connection `setsockopt`).
    #[cfg(target_os = "linux")]
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(opts.backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}
