//! Shard membership from a file: joins after a healthy poll, leaves without cutting
//! relays, a broken file keeps the last good set.

use std::path::PathBuf;
use std::time::Duration;

use test_support::http::{metric, wait_until};
use test_support::ws::{connect, subscribe};
use test_support::{start_lb, start_shards, TestLb};
use ws_lb::MembershipSource;

fn members_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("odin-it-members-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("shards")
}

/// Writes the file by rename, as the deploy's updater does, so the LB never reads half.
fn write_members(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn member_states(lb: &TestLb) -> Vec<(String, String)> {
    let h = lb.health().await;
    h["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["url"].as_str().unwrap().to_owned(),
                s["member"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_state(lb: &TestLb, url: &str, state: &str) {
    let ok = wait_until(Duration::from_secs(10), || async {
        member_states(lb)
            .await
            .iter()
            .any(|(u, s)| u == url && s == state)
    })
    .await;
    assert!(ok, "{url} never {state}: {:?}", member_states(lb).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_membership_joins_leaves_and_survives_a_broken_file() {
    let shards = start_shards(2, |_| {}).await;
    let (a, b) = (shards.ws_url(0), shards.ws_url(1));
    let file = members_file("joins");
    write_members(&file, &format!("# test\n{a}\n"));
    let lb = start_lb(Vec::new(), |c| {
        c.membership = MembershipSource::File(file.clone());
        c.membership_interval = Duration::from_millis(50);
        c.slow_start = Duration::ZERO;
    })
    .await;
    assert_eq!(member_states(&lb).await, [(a.clone(), "active".to_owned())]);
    let mut on_a = connect(&lb.ws_url()).await.unwrap();
    subscribe(&mut on_a, &["x"]).await.unwrap();
    assert_eq!(shards.connections(0).await, 1);

    // B joins (admitted after its health poll); A leaves: A's client stays connected and
    // served, every new client goes to B.
    write_members(&file, &format!("{b}\n"));
    wait_state(&lb, &b, "active").await;
    wait_state(&lb, &a, "removed").await;
    let mut new = Vec::new();
    for _ in 0..20 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["y"]).await.unwrap();
        new.push(ws);
    }
    assert_eq!(shards.connections(1).await, 20);
    assert_eq!(shards.connections(0).await, 1);
    let replies = subscribe(&mut on_a, &["z"]).await.unwrap();
    assert_eq!(replies.len(), 1, "the removed shard's relay still works");
    let page = lb.metrics().await;
    assert_eq!(metric(&page, "ws_lb_members", &["state=\"removed\""]), 1.0);
    assert_eq!(metric(&page, "ws_lb_members", &["state=\"active\""]), 1.0);
    assert_eq!(metric(&page, "ws_lb_membership_updates_total", &[]), 1.0);
    assert!(metric(&page, "ws_lb_membership_last_update_timestamp_seconds", &[]) > 1.7e9);

    // A file with no shard, then a missing file: counted, logged, last good set kept.
    write_members(&file, "# nothing\n");
    let counted = wait_until(Duration::from_secs(10), || async {
        metric(
            &lb.metrics().await,
            "ws_lb_membership_source_errors_total",
            &["reason=\"empty\""],
        ) >= 1.0
    })
    .await;
    assert!(counted);
    std::fs::remove_file(&file).unwrap();
    let counted = wait_until(Duration::from_secs(10), || async {
        metric(
            &lb.metrics().await,
            "ws_lb_membership_source_errors_total",
            &["reason=\"unreadable\""],
        ) >= 1.0
    })
    .await;
    assert!(counted);
    let mut late = connect(&lb.ws_url()).await.unwrap();
    subscribe(&mut late, &["y"]).await.unwrap();
    assert_eq!(shards.connections(1).await, 21);
    assert_eq!(
        member_states(&lb).await,
        [
            (a.clone(), "removed".to_owned()),
            (b.clone(), "active".to_owned())
        ]
    );

    // A comes back: same slot, admitted again after its poll.
    write_members(&file, &format!("{a}\n{b}\n"));
    wait_state(&lb, &a, "active").await;
    assert_eq!(member_states(&lb).await.len(), 2, "no new slot");
    let h = lb.health().await;
    assert_eq!(h["shards_total"], 2);
    drop((on_a, new, late));
    shards.kill();
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shard_is_pending_until_its_health_answers() {
    let up = start_shards(1, |_| {}).await;
    let dead = format!("ws://{}/ws", test_support::free_port());
    let file = members_file("pending");
    write_members(&file, &format!("{}\n", up.ws_url(0)));
    let lb = start_lb(Vec::new(), |c| {
        c.membership = MembershipSource::File(file.clone());
        c.membership_interval = Duration::from_millis(50);
    })
    .await;
    write_members(&file, &format!("{}\n{dead}\n", up.ws_url(0)));
    wait_state(&lb, &dead, "pending").await;
    // Polled and unreachable many times over: still pending, never dialled by a client.
    let polled = wait_until(Duration::from_secs(10), || async {
        metric(
            &lb.metrics().await,
            "ws_lb_health_poll_failures_total",
            &["shard_id=\"1\""],
        ) >= 3.0
    })
    .await;
    assert!(polled);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["x"]).await.unwrap();
        clients.push(ws);
    }
    let page = lb.metrics().await;
    assert_eq!(
        metric(&page, "ws_handshake_attempts_total", &["shard_id=\"1\""]),
        0.0
    );
    assert_eq!(metric(&page, "ws_lb_members", &["state=\"pending\""]), 1.0);
    assert_eq!(up.connections(0).await, 20);
    drop(clients);
    up.kill();
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}
