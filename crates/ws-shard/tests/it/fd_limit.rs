//! Out of descriptors, a shard answers new connections 503 from its reserve descriptor
//! instead of spinning on EMFILE in the accept loop or leaving them hanging in the backlog;
//! its connected clients are unaffected; it accepts again once descriptors free up. The real
//! binary runs with `RLIMIT_NOFILE` 64 (util-linux `prlimit`) and `--max-connections` far
//! above what 64 descriptors hold, so the descriptor limit, not the slot count, is hit.

use std::time::Duration;

use test_support::ws::{connect, next_event, send, Event};
use tokio_tungstenite::tungstenite;
use ws_protocol::ServerMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_a_shard_answers_503_and_does_not_spin() {
    let (mut shard, port, _) = crate::spawn_shard(
        &["--max-connections", "1000", "--client-rate", "0"],
        Some(64),
    )
    .await;
    let pid = shard.id().unwrap();
    let url = format!("ws://{port}/ws");

    let (mut held, mut refused) = (Vec::new(), 0u32);
    for _ in 0..80 {
        match connect(&url).await {
            Ok(ws) => held.push(ws),
            Err(e) => match e.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Http(r)) if r.status() == 503 => refused += 1,
                _ => panic!("unexpected connect failure: {e:#}"),
            },
        }
    }
    assert!(held.len() >= 30, "only {} connected", held.len());
    assert!(refused >= 20, "the limit was never reached");

    let before = test_support::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = test_support::cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "ws-shard used {used:.2} CPU s in 2 s out of descriptors"
    );

    for (id, ws) in held.iter_mut().enumerate() {
        send(ws, &format!(r#"{{"type":"ping","id":{id}}}"#))
            .await
            .unwrap();
        assert!(matches!(
            next_event(ws, Duration::from_secs(5)).await.unwrap(),
            Event::Msg(ServerMessage::Pong { .. })
        ));
    }

    for ws in held.drain(..5) {
        test_support::ws::close(ws).await;
    }
    // Descriptors come back as the server side of those connections closes; poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match connect(&url).await {
            Ok(ws) => break ws,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "never accepted again: {e:#}"
            ),
        }
    };
    send(&mut again, r#"{"type":"ping","id":1}"#).await.unwrap();
    assert!(matches!(
        next_event(&mut again, Duration::from_secs(5))
            .await
            .unwrap(),
        Event::Msg(ServerMessage::Pong { .. })
    ));

    shard.kill().await.unwrap();
}

/// ws-shard grows its descriptor table before its runtime starts (see
/// `net_core::limits::reserve_descriptor_table`): 1 shard x 2,000 slots + 64 = 2064 entries
/// wanted, under the 5000 limit; the same binary without it has 256 when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_table_is_grown_before_the_first_client() {
    let (mut shard, _, _) = crate::spawn_shard(&["--max-connections", "2000"], Some(5000)).await;
    let pid = shard.id().unwrap();
    let entries = net_core::limits::descriptor_table_size(Some(pid)).unwrap_or(0);
    assert!((2064..5000 * 2).contains(&entries), "FDSize {entries}");
    shard.kill().await.unwrap();
}
