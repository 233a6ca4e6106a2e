//! In-process ws-shard and ws-lb servers on `127.0.0.1:0`, ready when returned.

use std::net::SocketAddr;
use std::time::Duration;

use net_core::{ListenOptions, Shutdown};
use shard_core::SessionConfig;
use tokio::task::JoinHandle;

use crate::http::{get, wait_until};

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A running ws-shard process stand-in.
#[derive(Debug)]
pub struct TestShards {
    pub shards: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<usize, ws_shard::ServerError>>,
}

impl TestShards {
    /// `ws://.../ws` of shard `i`.
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.shards[i])
    }

    /// Current connections of shard `i` from its `/health`.
    pub async fn connections(&self, i: usize) -> u64 {
        let r = get(self.shards[i], "/health").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["connections"].as_u64().unwrap()
    }

    /// The admin `/metrics` page.
    pub async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.unwrap().body
    }

    /// Stops at once (tests that do not exercise the drain).
    pub fn kill(&self) {
        self.shutdown.hard.cancel();
    }
}

/// Test defaults: the production defaults (`ServerConfig::default()`) with shorter close and
/// drain timers, so drain tests end quickly, and `/echo` on.
pub fn shard_config() -> ws_shard::ServerConfig {
    let session = SessionConfig {
        close_timeout: Duration::from_secs(2),
        drain_window: Duration::from_millis(500),
        ..SessionConfig::default()
    };
    ws_shard::ServerConfig {
        session,
        echo: Some(session.echo(SessionConfig::ECHO_MAX_MESSAGE_SIZE)),
        grace: Duration::from_secs(10),
        ..ws_shard::ServerConfig::default()
    }
}

/// Starts `n` shards in one in-process server, configured by `configure`.
pub async fn start_shards(
    n: usize,
    configure: impl FnOnce(&mut ws_shard::ServerConfig),
) -> TestShards {
    start_shards_at(vec![any_port(); n], configure).await
}

/// Starts one shard per address in `addrs` (port 0 picks a free port).
pub async fn start_shards_at(
    addrs: Vec<SocketAddr>,
    configure: impl FnOnce(&mut ws_shard::ServerConfig),
) -> TestShards {
    let mut cfg = shard_config();
    configure(&mut cfg);
    let opts = ListenOptions::default();
    let listeners: Vec<_> = addrs
        .iter()
        .map(|a| net_core::bind(*a, opts).unwrap())
        .collect();
    let shards: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let admin_l = net_core::bind(any_port(), opts).unwrap();
    let admin = admin_l.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(ws_shard::run(
        ws_shard::Listeners {
            shards: listeners,
            admin: admin_l,
        },
        cfg,
        net_core::telemetry::prometheus(),
        shutdown.clone(),
    ));
    for s in &shards {
        let addr = *s;
        assert!(
            wait_until(Duration::from_secs(5), || async move {
                get(addr, "/health").await.is_ok()
            })
            .await
        );
    }
    TestShards {
        shards,
        admin,
        shutdown,
        task,
    }
}

/// One shard at `addr` (port 0: any) that re-reads its Kafka history (`back:1000`) from a
/// broker that is not there: it says `starting` (and refuses upgrades) for `warmup_timeout`,
/// then takes clients.
pub async fn start_warming_shard_at(addr: SocketAddr, warmup_timeout: Duration) -> TestShards {
    let dead = free_port();
    start_shards_at(vec![addr], |c| {
        c.source = ws_shard::SourceConfig::Kafka(kafka_source::KafkaConfig {
            brokers: dead.to_string(),
            topics: vec!["trades".into()],
            start: kafka_source::StartPosition::Back(1000),
            warmup_timeout,
            ..kafka_source::KafkaConfig::default()
        });
    })
    .await
}

/// A running ws-lb stand-in.
#[derive(Debug)]
pub struct TestLb {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<usize, ws_lb::LbError>>,
}

impl TestLb {
    /// `ws://.../ws` of the LB.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.unwrap().body
    }

    /// The LB's `/health` JSON.
    pub async fn health(&self) -> serde_json::Value {
        serde_json::from_str(&get(self.addr, "/health").await.unwrap().body).unwrap()
    }
}

/// Test defaults for the LB: the production defaults (`LbConfig::default()`) with shorter
/// health polls and close/drain timers, and no per-IP limit (every test client is 127.0.0.1).
pub fn lb_config(backends: Vec<String>) -> ws_lb::LbConfig {
    ws_lb::LbConfig {
        backends,
        per_ip: None,
        health_interval: Duration::from_millis(100),
        close_timeout: Duration::from_secs(2),
        drain_window: Duration::from_millis(500),
        grace: Duration::from_secs(10),
        ..ws_lb::LbConfig::default()
    }
}

/// Starts an LB in front of `backends`, configured by `configure`; returns once its
/// `/health` answers.
pub async fn start_lb(
    backends: Vec<String>,
    configure: impl FnOnce(&mut ws_lb::LbConfig),
) -> TestLb {
    let mut cfg = lb_config(backends);
    configure(&mut cfg);
    let client = net_core::bind(any_port(), ListenOptions::default()).unwrap();
    let admin_l = net_core::bind(any_port(), ListenOptions::default()).unwrap();
    let (addr, admin) = (client.local_addr().unwrap(), admin_l.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(ws_lb::run(
        ws_lb::Listeners {
            client,
            admin: admin_l,
        },
        cfg,
        net_core::telemetry::prometheus(),
        shutdown.clone(),
    ));
    assert!(
        wait_until(Duration::from_secs(5), || async move {
            get(addr, "/health").await.is_ok()
        })
        .await
    );
    TestLb {
        addr,
        admin,
        shutdown,
        task,
    }
}

/// A free port on 127.0.0.1 (bound and released; nothing listens there afterwards), below the
/// kernel's ephemeral range.
///
/// A port from the ephemeral range (what binding port 0 returns) can be taken, between this
/// call and a server's bind, as the local port of any outgoing connection of a test running
/// alongside (nextest runs tests in parallel processes), and the server then fails to listen.
/// Ports below the range are never autobound. Each port is handed out once per process; picks
/// are random so that parallel test processes rarely try the same ports.
pub fn free_port() -> SocketAddr {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = ephemeral_low().max(11_000);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..2_000 {
        let port = rand::random_range(10_000..low);
        if handed.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            handed.insert(port);
            return addr;
        }
    }
    // Nothing free below the range: the kernel's pick.
    std::net::TcpListener::bind(any_port())
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The first port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A shard server on its own runtime thread, so that [`IsolatedShards::kill`] can make every
/// one of its sockets vanish at once, like a process killed with SIGKILL.
#[derive(Debug)]
pub struct IsolatedShards {
    pub shards: Vec<SocketAddr>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl IsolatedShards {
    /// Starts `n` shards on a dedicated runtime.
    pub fn start(n: usize) -> Self {
        // Built and entered on a fresh thread: a runtime cannot be blocked on from inside the
        // test's own runtime.
        let (runtime, shards) = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let shards = runtime.block_on(async {
                let srv = start_shards(n, |_| {}).await;
                let addrs = srv.shards.clone();
                // The server task lives as long as the runtime.
                drop(srv.task);
                addrs
            });
            (runtime, shards)
        })
        .join()
        .unwrap();
        Self {
            shards,
            runtime: Some(runtime),
        }
    }

    /// `ws://.../ws` of shard `i`.
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.shards[i])
    }

    /// Drops every task and socket of the server at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for IsolatedShards {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP listener that accepts and never answers: a shard whose handshakes time out.
/// `accepted` counts WebSocket handshakes received (health polls are not counted).
#[derive(Debug)]
pub struct BlackHole {
    pub addr: SocketAddr,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl BlackHole {
    /// Starts listening on a free port.
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            while let Ok((mut s, _)) = l.accept().await {
                let count = count.clone();
                held.spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 2048];
                    let mut seen = Vec::new();
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen
                            .windows(17)
                            .any(|w| w.eq_ignore_ascii_case(b"sec-websocket-key"))
                        {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                    }
                    // Hold the connection open, silently, until the peer gives up.
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// `ws://.../ws` of the black hole.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A release-or-debug server binary (`env!("CARGO_BIN_EXE_…")`: ws-lb or ws-shard) started
/// as a child process with `args` (which put its client listener on `client`), its admin
/// listener on a free port and `--log-level error`; killed when dropped, returned once
/// `GET /health` on `client` answers 200 (20 s limit), with the admin address. With
/// `open_files`, it runs under that `RLIMIT_NOFILE` (util-linux `prlimit`).
pub async fn spawn_binary(
    bin: &str,
    args: &[&str],
    open_files: Option<u32>,
    client: SocketAddr,
) -> (tokio::process::Child, SocketAddr) {
    let admin = free_port();
    let admin_arg = admin.to_string();
    let mut cmd = match open_files {
        Some(n) => {
            let mut c = tokio::process::Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    let child = cmd
        .args(args)
        .args(["--admin-addr", &admin_arg, "--log-level", "error"])
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin} (prlimit is util-linux): {e}"));
    assert!(
        crate::http::wait_healthy(client, Duration::from_secs(20)).await,
        "{bin} did not come up"
    );
    (child, admin)
}
