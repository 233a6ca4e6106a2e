//! Links over real sockets on 127.0.0.1: streams, credit, refusals, and the link's end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use net_io::Transport;
use tier_mux::{Link, LinkError, MuxStream, Open, Refusal, Reply, WINDOW};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use ws_protocol::ShardStatus;

const LIMIT: Duration = Duration::from_secs(10);

/// `fut`, which must complete by being woken: a lost wake-up fails the test. (A
/// `tokio::time::timeout` would poll the future once more when its timer fires and so hide
/// a wake-up that never came; here the timer wins.)
async fn woken<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(LIMIT) => panic!("not woken within {LIMIT:?}"),
        r = fut => r,
    }
}

fn open(path: &str) -> Open {
    Open {
        path: path.into(),
        token: Some("t".into()),
    }
}

/// A shard-side link whose opened streams arrive on the channel, and the LB's link to it.
async fn pair() -> (
    Link,
    mpsc::UnboundedReceiver<(MuxStream, Open)>,
    tokio::task::JoinHandle<LinkError>,
    tokio::task::JoinHandle<LinkError>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb_sock = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (shard_sock, _) = l.accept().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Mutex::new(tx);
    let shard = Link::shard(Box::new(move |s, o| {
        let _ = tx.lock().unwrap().send((s, o));
    }));
    let lb = Link::lb();
    let (a, b) = (lb.clone(), shard.clone());
    let lb_task = tokio::spawn(async move { a.run(lb_sock, Bytes::new()).await });
    let shard_task = tokio::spawn(async move { b.run(shard_sock, Bytes::new()).await });
    (lb, rx, lb_task, shard_task)
}

async fn readable(s: &MuxStream) {
    woken(std::future::poll_fn(|cx| s.poll_read_ready(cx)))
        .await
        .unwrap();
}

async fn read_exact(s: &MuxStream, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < n {
        readable(s).await;
        match s.read_nonblocking(&mut buf) {
            Ok(0) => panic!("end of stream after {} of {n} bytes", out.len()),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    out
}

async fn write_all(s: &MuxStream, mut data: &[u8]) {
    while !data.is_empty() {
        woken(std::future::poll_fn(|cx| s.poll_write_ready(cx)))
            .await
            .unwrap();
        match s.write_nonblocking(&[IoSlice::new(data)]) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Reads until end of stream; what was read.
async fn read_to_end(s: &MuxStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        readable(s).await;
        match s.read_nonblocking(&mut buf) {
            Ok(0) => return out,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_bytes_both_ways_and_close_like_sockets() {
    let (lb, mut opened, _, _) = pair().await;
    let mut streams = Vec::new();
    for i in 0..20 {
        let s = lb.open(&open(&format!("/ws?{i}"))).unwrap();
        let (shard_side, o) = woken(opened.recv()).await.unwrap();
        assert_eq!(o, open(&format!("/ws?{i}")));
        assert!(shard_side.accept());
        assert_eq!(woken(s.reply()).await.unwrap(), Reply::Accepted);
        streams.push((s, shard_side));
    }
    assert_eq!(lb.streams(), 20);
    // Several windows' worth each way on every stream at once: credit must come back.
    let big: Vec<u8> = (0..(3 * WINDOW as usize + 123))
        .map(|i| (i % 251) as u8)
        .collect();
    let big = Arc::new(big);
    let mut tasks = Vec::new();
    for (lb_side, shard_side) in streams {
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let (lb_side, shard_side) = (Arc::new(lb_side), Arc::new(shard_side));
            let w = {
                let (l, b) = (lb_side.clone(), big.clone());
                tokio::spawn(async move { write_all(&l, &b).await })
            };
            let echoed = {
                let s = shard_side.clone();
                let n = big.len();
                tokio::spawn(async move {
                    let got = read_exact(&s, n).await;
                    write_all(&s, &got).await;
                    got
                })
            };
            // The echo comes back while it is being written (its credit needs this read).
            assert_eq!(read_exact(&lb_side, big.len()).await, big[..]);
            w.await.unwrap();
            assert_eq!(&echoed.await.unwrap()[..], &big[..]);
            // The shard side closes: the LB reads what is left, then end of stream.
            write_all(&shard_side, b"bye").await;
            drop(Arc::try_unwrap(shard_side).unwrap());
            assert_eq!(read_to_end(&lb_side).await, b"bye");
            let e = lb_side
                .write_nonblocking(&[IoSlice::new(b"x")])
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    // Every stream is forgotten on both sides once closed.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while lb.streams() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} streams left",
            lb.streams()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_writer_stops_at_the_window_until_the_reader_gives_credit() {
    let (lb, mut opened, _, _) = pair().await;
    let s = lb.open(&open("/ws")).unwrap();
    let (shard_side, _) = opened.recv().await.unwrap();
    shard_side.accept();
    assert_eq!(s.reply().await.unwrap(), Reply::Accepted);
    let chunk = vec![1u8; 8 * 1024];
    let mut sent = 0usize;
    loop {
        match s.write_nonblocking(&[IoSlice::new(&chunk)]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        sent, WINDOW as usize,
        "a stream sends exactly one window unacknowledged"
    );
    // Not writable until the reader consumes and credits (nothing else can give credit: one
    // poll decides, no waiting).
    let waker = futures_util::task::noop_waker();
    let polled = s.poll_write_ready(&mut std::task::Context::from_waker(&waker));
    assert!(polled.is_pending(), "writable with no credit");
    assert_eq!(read_exact(&shard_side, sent).await.len(), sent);
    woken(std::future::poll_fn(|cx| s.poll_write_ready(cx)))
        .await
        .unwrap();
    assert!(s.write_nonblocking(&[IoSlice::new(&chunk)]).unwrap() > 0);
}

#[tokio::test]
async fn a_refusal_reaches_the_lb_with_its_status() {
    let (lb, mut opened, _, _) = pair().await;
    let s = lb.open(&open("/ws")).unwrap();
    let (shard_side, _) = opened.recv().await.unwrap();
    let r = Refusal {
        status: 503,
        shard_status: Some(ShardStatus::Draining),
        reason: "shard draining".into(),
    };
    shard_side.refuse(&r);
    assert_eq!(s.reply().await.unwrap(), Reply::Refused(r));
    assert!(s.is_closed());
    assert_eq!(lb.streams(), 0);
    // A stream the shard drops unanswered is an error, not a hang.
    let s = lb.open(&open("/ws")).unwrap();
    drop(opened.recv().await.unwrap());
    assert!(woken(s.reply()).await.is_err());
}

#[tokio::test]
async fn when_the_link_dies_every_stream_ends_and_no_stream_opens() {
    let (lb, mut opened, lb_task, shard_task) = pair().await;
    let s = lb.open(&open("/ws")).unwrap();
    let (shard_side, _) = opened.recv().await.unwrap();
    shard_side.accept();
    s.reply().await.unwrap();
    let pending = lb.open(&open("/ws")).unwrap();
    let (_unanswered, _) = opened.recv().await.unwrap();
    shard_task.abort(); // the shard's end of the link goes away (socket closed)
    let _ = shard_task.await;
    assert!(timeout(LIMIT, lb_task).await.unwrap().is_ok());
    assert!(lb.is_dead());
    assert_eq!(read_to_end(&s).await, b"");
    assert!(s.write_nonblocking(&[IoSlice::new(b"x")]).is_err());
    assert!(pending.reply().await.is_err());
    assert!(lb.open(&open("/ws")).is_err());
}

/// A peer that breaks the protocol ends the link (and only its streams), whatever it sent.
#[tokio::test]
async fn hostile_frames_end_the_link() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown kind", vec![9, 0, 0, 0, 1, 0, 0, 0, 0]),
        ("payload over the limit", vec![4, 0, 0, 0, 1, 0, 1, 0, 1]),
        ("OPEN sent to the LB", vec![1, 0, 0, 0, 1, 0, 0, 0, 0]),
        ("malformed credit", vec![5, 0, 0, 0, 1, 0, 0, 0, 1, 7]),
    ];
    for (what, bytes) in cases {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let lb = Link::lb();
        let run = tokio::spawn({
            let lb = lb.clone();
            async move { lb.run(sock, Bytes::new()).await }
        });
        let s = lb.open(&open("/ws")).unwrap();
        peer.write_all(&bytes).await.unwrap();
        let end = timeout(LIMIT, run).await.unwrap().unwrap();
        assert!(
            matches!(end, LinkError::Frame(_) | LinkError::Protocol(_)),
            "{what}: {end}"
        );
        assert!(s.reply().await.is_err(), "{what}");
    }
    // DATA beyond the window, to a stream the shard side knows.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sock = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (mut peer, _) = l.accept().await.unwrap();
    let shard = Link::shard(Box::new(|s, _| std::mem::forget(s)));
    let run = tokio::spawn({
        let shard = shard.clone();
        async move { shard.run(sock, Bytes::new()).await }
    });
    let o = open("/ws").encode().unwrap();
    let mut bytes = vec![1, 0, 0, 0, 7];
    bytes.extend_from_slice(&(o.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&o);
    let chunk = vec![0u8; 60 * 1024];
    for _ in 0..2 {
        bytes.extend_from_slice(&[4, 0, 0, 0, 7]);
        bytes.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&chunk);
    }
    peer.write_all(&bytes).await.unwrap();
    let end = timeout(LIMIT, run).await.unwrap().unwrap();
    assert!(matches!(end, LinkError::Protocol(_)), "{end}");
}

#[tokio::test]
async fn a_retired_link_ends_when_its_last_stream_does() {
    let (lb, mut opened, lb_task, _) = pair().await;
    let s = lb.open(&open("/ws")).unwrap();
    let (shard_side, _) = opened.recv().await.unwrap();
    shard_side.accept();
    s.reply().await.unwrap();
    lb.retire();
    assert!(
        lb.open(&open("/ws")).is_err(),
        "a retiring link opens no stream"
    );
    write_all(&shard_side, b"still here").await;
    assert_eq!(read_exact(&s, 10).await, b"still here");
    assert!(!lb_task.is_finished());
    drop(s);
    let end = timeout(LIMIT, lb_task).await.unwrap().unwrap();
    assert!(matches!(end, LinkError::Closed), "{end}");
}

/// The LB's side of `GET /mux` against a server that answers 101 (with frames right behind
/// it), 404, or something that is not HTTP.
#[tokio::test]
async fn the_upgrade_reads_the_status_and_keeps_bytes_after_the_101() {
    use tier_mux::upgrade::{upgrade, UpgradeError, PROTOCOL};
    async fn dial(
        addr: std::net::SocketAddr,
        host: &str,
    ) -> Result<(TcpStream, Bytes), UpgradeError> {
        upgrade(TcpStream::connect(addr).await?, host).await
    }
    use tokio::io::AsyncReadExt;
    async fn serve(answer: Vec<u8>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0);
                head.extend_from_slice(&b[..n]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("GET /mux HTTP/1.1\r\n"), "{head}");
            assert!(head.contains(&format!("Upgrade: {PROTOCOL}\r\n")), "{head}");
            s.write_all(&answer).await.unwrap();
            // Keep the socket open until the client is done with it.
            let _ = s.read(&mut b).await;
        });
        addr
    }
    let ok = format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n\r\nFRAMES");
    let (_sock, rest) = dial(serve(ok.into_bytes()).await, "h").await.unwrap();
    assert_eq!(&rest[..], b"FRAMES");
    let e = dial(serve(b"HTTP/1.1 404 Not Found\r\n\r\n".to_vec()).await, "h")
        .await
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Status(404)), "{e}");
    let e = dial(
        serve(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec()).await,
        "h",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, UpgradeError::Malformed(_)), "{e}");
    let e = dial(serve(b"SSH-2.0-x\r\n\r\n".to_vec()).await, "h")
        .await
        .unwrap_err();
    assert!(matches!(e, UpgradeError::Malformed(_)), "{e}");
}
