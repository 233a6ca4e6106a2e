//! Breakers opening, traffic avoiding the shard, half-open trials, recovery; and
//! load-aware selection.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_core::error::UNAVAILABLE;
use lb_core::{BreakerConfig, RetryConfig};
use test_support::http::{metric, wait_until};
use test_support::ws::{connect, next_event, subscribe, Event};
use test_support::{free_port, start_lb, start_shards, start_shards_at, BlackHole};

fn transitions(page: &str, shard: &str, from: &str, to: &str) -> f64 {
    metric(
        page,
        "ws_circuit_breaker_transitions_total",
        &[
            &format!("shard_id=\"{shard}\""),
            &format!("from=\"{from}\""),
            &format!("to=\"{to}\""),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_shard_opens_is_avoided_half_opens_and_closes_on_recovery() {
    // The healthy shard is 90% full, so on score alone the failing one (idle, but failing
    // every handshake: score 0.6) still looks better (0.46) and keeps being picked: only
    // the breaker can stop that.
    let good = start_shards(1, |c| c.max_connections = 40).await;
    let mut held = Vec::new();
    for _ in 0..36 {
        held.push(connect(&good.ws_url(0)).await.unwrap());
    }
    // The failing shard accepts TCP and hangs up at once: its handshakes fail, while the
    // LB's health polls (which connect fine) find no answer, which is not held against its
    // breaker, so the breaker here counts handshakes only.
    let hangup = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky = hangup.local_addr().unwrap();
    let hangup = tokio::spawn(async move {
        while let Ok((s, _)) = hangup.accept().await {
            drop(s);
        }
    });
    let lb = start_lb(vec![good.ws_url(0), format!("ws://{flaky}/ws")], |c| {
        // Open for 5 s: the 20 clients below must all meet the open breaker, and on a
        // loaded machine 20 debug-build round trips can take more than 1 s.
        c.breaker = BreakerConfig::try_new(3, Duration::from_secs(5), 2, 2).unwrap();
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            lb.health().await["shards"][0]["utilization"] == 0.9
        })
        .await
    );
    let mut n = 0;
    while transitions(&lb.metrics().await, "1", "closed", "open") < 1.0 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["x"]).await.unwrap();
        test_support::ws::close(ws).await;
        n += 1;
        assert!(n < 20, "breaker never opened");
    }
    let opened = tokio::time::Instant::now();
    let page = lb.metrics().await;
    let attempts_before = metric(&page, "ws_handshake_attempts_total", &["shard_id=\"1\""]);
    assert_eq!(attempts_before, 3.0, "threshold of consecutive failures");
    assert_eq!(
        metric(
            &page,
            "ws_circuit_breaker_state",
            &["shard_id=\"1\"", "state=\"open\""]
        ),
        1.0
    );
    let h = lb.health().await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["shards"][1]["breaker"], "open");
    // While open, traffic avoids it entirely.
    for _ in 0..20 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["x"]).await.unwrap();
        test_support::ws::close(ws).await;
    }
    assert_eq!(
        metric(
            &lb.metrics().await,
            "ws_handshake_attempts_total",
            &["shard_id=\"1\""]
        ),
        attempts_before
    );

    // The shard comes back on the same address; after the open timeout trials close it.
    hangup.abort();
    let _ = hangup.await;
    let revived = start_shards_at(vec![flaky], |_| {}).await;
    tokio::time::sleep_until(opened + Duration::from_millis(5100)).await;
    let mut probes = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["x"]).await.unwrap();
        probes.push(ws);
    }
    let page = lb.metrics().await;
    assert_eq!(transitions(&page, "1", "open", "half_open"), 1.0);
    assert_eq!(transitions(&page, "1", "half_open", "closed"), 1.0);
    assert_eq!(
        metric(
            &page,
            "ws_circuit_breaker_state",
            &["shard_id=\"1\"", "state=\"closed\""]
        ),
        1.0
    );
    assert!(
        revived.connections(0).await >= 2,
        "the trials landed on the revived shard"
    );
    drop((held, probes));
    good.kill();
    revived.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_never_runs_more_than_the_configured_trials_at_once() {
    let good = start_shards(1, |_| {}).await;
    let hole = BlackHole::start().await;
    let lb = start_lb(vec![good.ws_url(0), hole.ws_url()], |c| {
        c.breaker = BreakerConfig::try_new(1, Duration::from_millis(500), 2, 1).unwrap();
        c.retry = lb_core::RetryConfig::try_new(
            Duration::from_millis(10),
            Duration::from_secs(5),
            Duration::from_millis(800),
        )
        .unwrap();
    })
    .await;
    while transitions(&lb.metrics().await, "1", "closed", "open") < 1.0 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["x"]).await.unwrap();
    }
    let before = hole.accepted.load(Ordering::SeqCst);
    assert_eq!(before, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Twenty clients at once while the breaker admits trials.
    let url = lb.ws_url();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut ws = connect(&url).await.unwrap();
                subscribe(&mut ws, &["x"]).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let trials = hole.accepted.load(Ordering::SeqCst) - before;
    assert!(
        (1..=2).contains(&trials),
        "{trials} trial handshakes at once"
    );
    let page = lb.metrics().await;
    assert_eq!(
        transitions(&page, "1", "half_open", "open"),
        1.0,
        "a failed trial re-opens"
    );
    good.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_go_to_lightly_loaded_shards() {
    let shards = start_shards(3, |c| c.max_connections = 100).await;
    let mut held = Vec::new();
    for (shard, n) in [(0, 90), (1, 10), (2, 10)] {
        for _ in 0..n {
            held.push(connect(&shards.ws_url(shard)).await.unwrap());
        }
    }
    let lb = start_lb((0..3).map(|i| shards.ws_url(i)).collect(), |_| {}).await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let h = lb.health().await;
            (h["shards"][0]["utilization"].as_f64().unwrap() - 0.9).abs() < 1e-9
        })
        .await
    );
    for _ in 0..100 {
        held.push(connect(&lb.ws_url()).await.unwrap());
    }
    let on = [
        shards.connections(0).await - 90,
        shards.connections(1).await - 10,
        shards.connections(2).await - 10,
    ];
    assert_eq!(on.iter().sum::<u64>(), 100);
    assert!(on[0] <= 5, "the 90% shard got {} of 100 ({on:?})", on[0]);
    shards.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_the_lb_cannot_connect_to_opens_its_breaker_without_any_client() {
    // A shard this LB cannot reach at all (here: nothing listens; a network partition looks
    // the same, with connect timeouts) is found by the health polls alone: no client pays
    // for it. The breaker counts each failed connect of a poll while closed.
    let good = start_shards(1, |_| {}).await;
    let gone = free_port();
    let lb = start_lb(vec![good.ws_url(0), format!("ws://{gone}/ws")], |c| {
        c.breaker = BreakerConfig::try_new(3, Duration::from_secs(3600), 2, 2).unwrap();
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            transitions(&lb.metrics().await, "1", "closed", "open") == 1.0
        })
        .await,
        "the breaker of the unreachable shard opened"
    );
    let page = lb.metrics().await;
    assert_eq!(
        metric(&page, "ws_handshake_attempts_total", &["shard_id=\"1\""]),
        0.0
    );
    assert_eq!(transitions(&page, "0", "closed", "open"), 0.0);
    assert_eq!(metric(&page, "ws_lb_shards_available", &[]), 1.0);
    let h = lb.health().await;
    assert_eq!(
        (h["status"].as_str(), h["shards_available"].as_u64()),
        (Some("ok"), Some(1))
    );
    assert_eq!(h["shards"][1]["health_ok"], false);
    good.kill();
}

/// A half-open trial that meets a shard still re-reading its history (503 with
/// `x-odin-shard-status: starting`) is no failure: the breaker stays half-open, the shard
/// counts as `starting` until a poll says `ok`, and the client hears 1012 (reconnect), not
/// 1013 (back off). Before, the refusal re-opened the breaker for another
/// `circuit_breaker_timeout`: in a whole-tier restart whose warm-up outlasts the shard's 1 s
/// wait, shards stayed out that long after they were ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_refused_by_a_starting_shard_leaves_the_breaker_half_open() {
    let addr = free_port();
    let lb = start_lb(vec![format!("ws://{addr}/ws")], |c| {
        c.breaker = BreakerConfig::try_new(1, Duration::from_secs(1), 1, 1).unwrap();
        // One poll, at start, while nothing listens: it opens the breaker. None after it,
        // so only the trial's answer can tell this LB that the shard is starting.
        c.health_interval = Duration::from_secs(3600);
        // The shard holds the upgrade 1 s before it refuses: room for a slow machine.
        c.retry = RetryConfig::try_new(
            Duration::from_millis(10),
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
        .unwrap();
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            lb.health().await["shards"][0]["breaker"] == "open"
        })
        .await
    );
    let shard = test_support::start_warming_shard_at(addr, Duration::from_secs(600)).await;
    let attempts = |page: &str| metric(page, "ws_handshake_attempts_total", &["shard_id=\"0\""]);
    // Until the open timeout has run out, clients are refused without an attempt (1012);
    // the first one after it is the breaker's trial. Each client is closed before the next.
    let unavailable = Event::Close(1012, UNAVAILABLE.reason.into());
    let trial_close = std::sync::Mutex::new(None);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let mut ws = connect(&lb.ws_url()).await.unwrap();
            let close = next_event(&mut ws, Duration::from_secs(15)).await.unwrap();
            if attempts(&lb.metrics().await) == 0.0 {
                assert_eq!(close, unavailable, "refused by the open breaker");
                return false;
            }
            *trial_close.lock().unwrap() = Some(close);
            true
        })
        .await,
        "no trial in 20 s"
    );
    let trial_close = trial_close.into_inner().unwrap().unwrap();
    assert_eq!(trial_close, unavailable);
    let page = lb.metrics().await;
    assert_eq!(attempts(&page), 1.0);
    assert_eq!(
        metric(
            &page,
            "ws_lb_attempt_errors_total",
            &["shard_id=\"0\"", "kind=\"not_ready\""]
        ),
        1.0
    );
    assert_eq!(transitions(&page, "0", "half_open", "open"), 0.0);
    let h = lb.health().await;
    assert_eq!(h["shards"][0]["breaker"], "half_open", "{h}");
    assert_eq!(h["shards"][0]["reported"], "starting", "{h}");
    // The next client is not sent there (no attempt) until a poll says `ok`.
    let mut ws = connect(&lb.ws_url()).await.unwrap();
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(15)).await.unwrap(),
        unavailable
    );
    assert_eq!(attempts(&lb.metrics().await), 1.0);
    shard.kill();
}
