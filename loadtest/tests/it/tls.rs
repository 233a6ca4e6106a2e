//! `wss://`: the same runs over TLS, against in-process TLS WebSocket servers (rustls on the
//! server side, tokio-tungstenite on top). The certificates in `tests/it/tls/` are test
//! fixtures made for this purpose (a CA and a server certificate for 127.0.0.1 and
//! localhost, valid for 100 years); their keys protect nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use loadtest::{Progress, Report, RunConfig};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::bounded;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/tls")
        .join(name)
}

fn acceptor() -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(fixture("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS WebSocket server: echoes, or (with `close`) closes with that code at once.
async fn wss_server(close: Option<u16>) -> SocketAddr {
    wss_server_closing_after(close, std::time::Duration::ZERO).await
}

/// Like [`wss_server`], closing with `close` only after `after` (rustls' server defaults:
/// it resumes TLS 1.3 sessions from its own 256-entry cache).
async fn wss_server_closing_after(close: Option<u16>, after: std::time::Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = acceptor();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                if let Some(code) = close {
                    tokio::time::sleep(after).await;
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: "go away".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                }
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn run(url: &str, ca: &str, extra: &[&str]) -> Report {
    let ca = fixture(ca);
    let mut args = vec![
        "loadtest",
        "--url",
        url,
        "--quiet",
        "--ca-file",
        ca.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let cli = <loadtest::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let cfg = RunConfig::from_args(&cli.run).unwrap();
    loadtest::run(&cfg, &Progress::Quiet).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_ramp_establishes_every_connection_and_verifies_the_server() {
    bounded(60, async {
        let addr = wss_server(None).await;
        let url = format!("wss://{addr}/ws");
        let r = run(
            &url,
            "ca.pem",
            &["--connections", "200", "--rate", "400", "--hold", "1"],
        )
        .await;
        assert_eq!(r.counts.attempted, 200);
        assert_eq!(r.counts.established, 200, "{:?}", r.failures);
        assert_eq!(r.counts.active_end_of_hold, 200);
        assert!(r.handshake_us.count == 200 && r.handshake_us.p50 > 0);
        assert!(r.disconnects.is_empty(), "{:?}", r.disconnects);
        // New clients never resume: not even a session another client of the run got.
        assert_eq!(
            (
                r.counts.tls_full_handshakes,
                r.counts.tls_resumed_handshakes
            ),
            (200, 0)
        );

        // The name in the certificate is checked: localhost is in it too, so verifying as
        // localhost works, while a CA that did not sign it fails every attempt as `tls`.
        let by_name = format!("wss://localhost:{}/ws", addr.port());
        let r = run(
            &by_name,
            "ca.pem",
            &["--connections", "5", "--rate", "100", "--hold", "0"],
        )
        .await;
        assert_eq!(r.counts.established, 5, "{:?}", r.failures);
        let r = run(
            &url,
            "other-ca.pem",
            &["--connections", "5", "--rate", "100", "--hold", "0"],
        )
        .await;
        assert_eq!(r.counts.established, 0);
        assert_eq!(r.failures.get("tls"), Some(&5), "{:?}", r.failures);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_frames_arrive_through_tls() {
    bounded(60, async {
        let addr = wss_server(Some(1012)).await;
        let url = format!("wss://{addr}/ws");
        let r = run(
            &url,
            "ca.pem",
            &["--connections", "20", "--rate", "200", "--hold", "0"],
        )
        .await;
        assert_eq!(r.counts.established, 0);
        assert_eq!(r.failures.get("closed_1012"), Some(&20), "{:?}", r.failures);
    })
    .await;
}

/// A client that re-dials resumes its own TLS session (as a browser does); its first
/// connection, and every connection with `--no-tls-resume`, is a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_dials_resume_the_clients_own_tls_session() {
    bounded(90, async {
        // The server closes every connection with 1012 1 s after its upgrade: pacing, so that
        // clients re-dial during the hold. The one timing assumption is that a client's 10 ms
        // settle (which makes it established) ends within that second; the other assertions
        // hold however many re-dials a slow machine manages.
        let addr = wss_server_closing_after(Some(1012), std::time::Duration::from_secs(1)).await;
        let url = format!("wss://{addr}/ws");
        let args = [
            "--connections",
            "20",
            "--rate",
            "200",
            "--hold",
            "4",
            "--settle",
            "10ms",
            "--reconnect",
            "--reconnect-min-delay",
            "50ms",
            "--reconnect-max-delay",
            "200ms",
        ];
        let r = run(&url, "ca.pem", &args).await;
        let c = &r.counts;
        assert_eq!(c.established, 20, "{:?}", r.failures);
        assert!(c.reconnects >= 1, "{c:?}");
        assert_eq!(r.config.tls_resume, Some(true));
        // One full handshake per client (its first); every later one resumed.
        assert_eq!(c.tls_full_handshakes, 20, "{c:?}");
        assert!(c.tls_resumed_handshakes >= c.reconnects, "{c:?}");

        let mut off = args.to_vec();
        off.push("--no-tls-resume");
        let r = run(&url, "ca.pem", &off).await;
        let c = &r.counts;
        assert!(c.reconnects >= 1, "{c:?}");
        assert_eq!(r.config.tls_resume, Some(false));
        assert_eq!(c.tls_resumed_handshakes, 0, "{c:?}");
        assert!(c.tls_full_handshakes >= 20 + c.reconnects, "{c:?}");
    })
    .await;
}
