//! Where the shard list comes from and how it is kept current: the static
//! `--backend-urls`, a file of shard URLs (re-read when its modification time or size
//! changes, and on SIGHUP), or a DNS name with one A/AAAA record per shard VM (re-resolved
//! every `membership_interval`). The pool ([`lb_core::ShardPool::update`]) turns each new
//! list into joins, leaves and rejoins (see `lb_core::membership`).
//!
//! A source that fails — the file unreadable or invalid, DNS timing out or answering
//! nothing — changes nothing: the last good set stays, the failure is counted in
//! `ws_lb_membership_source_errors_total` and logged (once per streak, and again when it
//! recovers). An empty list is a failure, never an instruction to empty the pool.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lb_core::membership::{check_len, parse_list, ListError};
use tokio::time::{timeout, Instant};

use crate::backend::Backend;
use crate::metrics::SourceError;
use crate::Lb;

/// Where the shard list comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MembershipSource {
    /// `backends` only, fixed for the life of the process.
    #[default]
    Static,
    /// A file with one `ws://host:port/path` per line (`#` comments).
    File(PathBuf),
    /// `ws://name:port/path`: every address `name` resolves to is a shard, dialled on
    /// `port` with `path`.
    Dns(String),
}

/// A source's answer that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: SourceError,
    pub message: String,
}

impl Failure {
    fn new(reason: SourceError, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<ListError> for Failure {
    fn from(e: ListError) -> Self {
        let reason = match e {
            ListError::Empty => SourceError::Empty,
            ListError::TooMany(_) => SourceError::TooMany,
            ListError::BadLine { .. } => SourceError::Invalid,
        };
        Self::new(reason, e.to_string())
    }
}

/// Members as the pool takes them: URL and how to dial it.
pub(crate) type Members = Vec<(String, Arc<Backend>)>;

/// Parses URLs into dialable backends; one bad URL rejects the whole list (a half-applied
/// file is harder to reason about than the last good one).
fn backends(urls: Vec<String>) -> Result<Members, Failure> {
    urls.into_iter()
        .map(|u| {
            Backend::parse(&u)
                .map(|b| (u, Arc::new(b)))
                .map_err(|e| Failure::new(SourceError::Invalid, e.to_string()))
        })
        .collect()
}

/// Reads and checks a membership file (blocking: a file URL's host may need resolving).
pub(crate) fn read_file(path: &Path) -> Result<Members, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(SourceError::Unreadable, format!("{}: {e}", path.display())))?;
    backends(parse_list(&text)?)
}

/// What a failed system lookup (`getaddrinfo`) means for the member list. The standard
/// library keeps only the resolver's message (`gai_strerror`), so the reason is read from it
/// (glibc's and musl's wording):
///
/// - the name does not exist (NXDOMAIN) or has no address (no A/AAAA record): `empty` — the
///   answer names no shard, like an empty file;
/// - anything else (SERVFAIL, the resolver's own timeout `EAI_AGAIN`, no resolver
///   configured): `dns_error`.
fn lookup_failure(e: &std::io::Error) -> SourceError {
    const NO_ADDRESS: [&str; 3] = [
        "Name or service not known",           // glibc EAI_NONAME (NXDOMAIN)
        "No address associated with hostname", // glibc EAI_NODATA (no A/AAAA)
        "Name does not resolve",               // musl EAI_NONAME
    ];
    let text = e.to_string();
    if NO_ADDRESS.iter().any(|m| text.contains(m)) {
        SourceError::Empty
    } else {
        SourceError::DnsError
    }
}

/// A DNS source URL split into what is resolved and how members are dialled.
struct DnsName {
    host: String,
    port: u16,
    path: String,
}

fn dns_name(url: &str) -> Result<DnsName, Failure> {
    let bad = |m: String| Failure::new(SourceError::Invalid, m);
    let uri: http::Uri = url
        .parse()
        .map_err(|_| bad(format!("{url:?}: not a valid URL")))?;
    if uri.scheme_str() != Some("ws") {
        return Err(bad(format!("{url:?}: scheme must be ws://")));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad(format!("{url:?}: missing host")))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(DnsName { host, port, path })
}

fn no_answer(host: &str, limit: Duration) -> Failure {
    Failure::new(
        SourceError::DnsTimeout,
        format!("resolving {host}: no answer within {limit:?}"),
    )
}

/// Resolves `url` once through the system resolver, with the resolver's own time limits.
async fn lookup(url: &str) -> Result<Members, Failure> {
    let DnsName { host, port, path } = dns_name(url)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| Failure::new(lookup_failure(&e), format!("resolving {host}: {e}")))?
        .collect();
    let mut urls: Vec<String> = Vec::new();
    for a in addrs {
        let u = format!("ws://{a}{path}");
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    // Sorted, so that the same answer in another order is the same list.
    urls.sort();
    backends(check_len(urls).map_err(|e| match e {
        ListError::Empty => {
            Failure::new(SourceError::Empty, format!("resolving {host}: no address"))
        }
        e => e.into(),
    })?)
}

/// Resolves the DNS source `url` (`ws://name:port/path`) within `limit`.
pub(crate) async fn resolve(url: &str, limit: Duration) -> Result<Members, Failure> {
    match timeout(limit, lookup(url)).await {
        Ok(r) => r,
        Err(_) => Err(no_answer(
            &dns_name(url).map(|n| n.host).unwrap_or_default(),
            limit,
        )),
    }
}

/// The watch loop's DNS lookups, at most one at a time. The system resolver cannot be
/// cancelled: a lookup that outlives `limit` keeps a blocking thread until the resolver
/// gives up (glibc: `timeout` × `attempts` of resolv.conf, 10 s by default, per server).
/// Starting another every interval would pile those threads up while the DNS server is
/// silent; instead, each tick while the last lookup still runs counts as another
/// `dns_timeout`, and a new lookup starts once it has ended.
struct DnsLookups {
    url: String,
    in_flight: Option<tokio::task::JoinHandle<Result<Members, Failure>>>,
}

impl DnsLookups {
    async fn read(&mut self, limit: Duration) -> Result<Members, Failure> {
        let host = || dns_name(&self.url).map(|n| n.host).unwrap_or_default();
        if let Some(h) = &self.in_flight {
            if !h.is_finished() {
                return Err(no_answer(&host(), limit));
            }
            // It ended after its time: that answer is old, ask again.
            self.in_flight = None;
        }
        let url = self.url.clone();
        let mut task = tokio::spawn(async move { lookup(&url).await });
        match timeout(limit, &mut task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Failure::new(SourceError::DnsError, e.to_string())),
            Err(_) => {
                self.in_flight = Some(task);
                Err(no_answer(&host(), limit))
            }
        }
    }
}

/// Reads `source` once (at start, and by the watch loop).
pub(crate) async fn read(source: &MembershipSource, limit: Duration) -> Result<Members, Failure> {
    match source {
        MembershipSource::Static => Err(Failure::new(SourceError::Invalid, "static source")),
        MembershipSource::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_file(&path))
                .await
                .unwrap_or_else(|e| Err(Failure::new(SourceError::Unreadable, e.to_string())))
        }
        MembershipSource::Dns(url) => resolve(url, limit).await,
    }
}

/// The file's modification time and length: a change in either means "read it again".
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Applies a good list to the pool, with metrics and log lines.
pub(crate) fn apply(lb: &Lb, members: Members) {
    let now = Instant::now();
    lb.metrics.membership_read_ok();
    let urls: Vec<String> = members.iter().map(|(u, _)| u.clone()).collect();
    match lb.pool.update(members, now) {
        Err(e) => {
            lb.metrics.source_error(SourceError::TooMany);
            tracing::warn!(error = %e, "membership update refused: keeping the current shards");
        }
        Ok(update) if update.changed() => {
            lb.metrics.membership_update();
            let snapshot = lb.pool.snapshot(now);
            let url = |i: usize| {
                snapshot
                    .iter()
                    .find(|s| s.shard_id == i)
                    .map(|s| s.url.as_str())
            };
            for &i in &update.added {
                lb.metrics.register_shard(i, url(i).unwrap_or("?"));
            }
            let list = |v: &[usize]| {
                v.iter()
                    .map(|&i| format!("{i}={}", url(i).unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            tracing::info!(
                added = %list(&update.added),
                rejoined = %list(&update.rejoined),
                removed = %list(&update.removed),
                members = urls.len(),
                "shard membership changed"
            );
            lb.poll_now.notify_one();
        }
        Ok(_) => {}
    }
    lb.metrics.update(&lb.pool.snapshot(now));
}

/// Keeps the pool in step with `lb.cfg.membership` until the LB stops.
pub(crate) async fn watch(lb: Arc<Lb>) {
    let source = lb.cfg.membership.clone();
    if source == MembershipSource::Static {
        return;
    }
    let interval = lb.cfg.membership_interval;
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the membership file is only polled");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stamp = match &source {
        MembershipSource::File(p) => stamp(p),
        _ => None,
    };
    let mut dns = match &source {
        MembershipSource::Dns(url) => Some(DnsLookups {
            url: url.clone(),
            in_flight: None,
        }),
        _ => None,
    };
    // A failure streak is logged once, and its end once.
    let mut failing: Option<String> = None;
    loop {
        let forced = tokio::select! {
            _ = lb.shutdown.hard.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        if let MembershipSource::File(p) = &source {
            let now_stamp = stamp(p);
            // Unchanged and readable: still good, nothing to apply. After a failure, keep
            // trying.
            if !forced && failing.is_none() && now_stamp.is_some() && now_stamp == last_stamp {
                lb.metrics.membership_read_ok();
                continue;
            }
            last_stamp = now_stamp;
        }
        let result = match dns.as_mut() {
            Some(d) => d.read(interval).await,
            None => read(&source, interval).await,
        };
        match result {
            Ok(members) => {
                if let Some(was) = failing.take() {
                    tracing::info!(previous_error = %was, "membership source readable again");
                }
                apply(&lb, members);
            }
            Err(f) => {
                lb.metrics.source_error(f.reason);
                if failing.as_deref() != Some(f.message.as_str()) {
                    tracing::warn!(
                        reason = f.reason.label(),
                        error = %f.message,
                        members = lb.pool.len(),
                        "membership source failed: keeping the last good shards"
                    );
                }
                failing = Some(f.message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_checked_whole() {
        let dir = std::env::temp_dir().join(format!("odin-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("shards");
        std::fs::write(&f, "ws://127.0.0.1:3002/ws\n# c\nws://127.0.0.1:3003/ws\n").unwrap();
        let m = read_file(&f).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].1.addr, "127.0.0.1:3003".parse().unwrap());
        std::fs::write(&f, "ws://127.0.0.1:3002/ws\nhttp://127.0.0.1:3003/ws\n").unwrap();
        assert_eq!(read_file(&f).unwrap_err().reason, SourceError::Invalid);
        std::fs::write(&f, "\n# none\n").unwrap();
        assert_eq!(read_file(&f).unwrap_err().reason, SourceError::Empty);
        assert_eq!(
            read_file(&dir.join("missing")).unwrap_err().reason,
            SourceError::Unreadable
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn dns_names_become_one_member_per_address() {
        let m = resolve("ws://localhost:3002/ws", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!m.is_empty());
        assert!(m
            .iter()
            .all(|(u, b)| u.ends_with(":3002/ws") && b.addr.port() == 3002));
        let e = resolve("ws://no-such-host.invalid:3002/ws", Duration::from_secs(5))
            .await
            .unwrap_err();
        // NXDOMAIN where a resolver answers; a resolver error or timeout in a sandbox
        // without one (tests/e2e/membership_dns_e2e.py drives each case for real).
        assert!(
            matches!(
                e.reason,
                SourceError::Empty | SourceError::DnsError | SourceError::DnsTimeout
            ),
            "{e}"
        );
        assert_eq!(
            resolve("http://localhost:1/ws", Duration::from_secs(1))
                .await
                .unwrap_err()
                .reason,
            SourceError::Invalid
        );
    }

    /// The standard library's messages for failed lookups (`failed to lookup address
    /// information: ` + `gai_strerror`), glibc's and musl's.
    #[test]
    fn lookup_failures_say_whether_the_name_has_no_address() {
        let e = |m: &str| {
            lookup_failure(&std::io::Error::other(format!(
                "failed to lookup address information: {m}"
            )))
        };
        assert_eq!(e("Name or service not known"), SourceError::Empty);
        assert_eq!(e("No address associated with hostname"), SourceError::Empty);
        assert_eq!(e("Name does not resolve"), SourceError::Empty);
        assert_eq!(
            e("Temporary failure in name resolution"),
            SourceError::DnsError
        );
        assert_eq!(
            e("Non-recoverable failure in name resolution"),
            SourceError::DnsError
        );
        assert_eq!(e("Try again"), SourceError::DnsError);
    }
}
