//! Parsers for the compact values people type on the command line: channel patterns, source
//! address ranges, durations and ws:// / http:// URLs.
//!
//! They live apart from the flag definitions so they can be unit-tested without clap and
//! reused by the publisher and the worker re-exec.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// Largest number of channels a single pattern may expand to; a typo such as `{0..99999999}`
/// should fail fast instead of allocating gigabytes.
const MAX_EXPANDED: u64 = 1_000_000;

/// Expands a comma list of channel names where each item may contain one `{a..b}` range, e.g.
/// `trades.S{0..99},book.BTC-USD` yields `trades.S0` … `trades.S99` and `book.BTC-USD`.
/// Names are checked against the wire rules so a bad pattern fails before any connection.
pub fn expand_channels(spec: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.find('{') {
            None => out.push(item.to_owned()),
            Some(open) => {
                let close = item[open..]
                    .find('}')
                    .map(|c| open + c)
                    .with_context(|| format!("unclosed '{{' in channel pattern {item:?}"))?;
                let (prefix, suffix) = (&item[..open], &item[close + 1..]);
                let range = &item[open + 1..close];
                let (lo, hi) = range
                    .split_once("..")
                    .with_context(|| format!("expected {{a..b}} in channel pattern {item:?}"))?;
                let lo: u64 = lo
                    .trim()
                    .parse()
                    .with_context(|| format!("bad range start in {item:?}"))?;
                let hi: u64 = hi
                    .trim()
                    .parse()
                    .with_context(|| format!("bad range end in {item:?}"))?;
                if hi < lo || hi - lo >= MAX_EXPANDED {
                    bail!("channel range {lo}..{hi} in {item:?} is empty or too large");
                }
                out.extend((lo..=hi).map(|n| format!("{prefix}{n}{suffix}")));
            }
        }
    }
    for name in &out {
        ws_protocol::channel::validate(name).with_context(|| format!("channel {name:?}"))?;
    }
    Ok(out)
}

/// Parses `127.0.0.1-127.0.0.20` (inclusive IPv4 range), a comma list, or a mix of both.
pub fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address in {item:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address in {item:?}"))?;
            let (lo, hi) = (u32::from(a), u32::from(b));
            if hi < lo || u64::from(hi - lo) >= 65_536 {
                bail!("source range {item:?} is empty or larger than 65536 addresses");
            }
            out.extend((lo..=hi).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(
                item.parse()
                    .with_context(|| format!("bad source address {item:?}"))?,
            );
        }
    }
    Ok(out)
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => bail!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h)"),
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("bad duration {s:?}"))
}

/// A parsed `ws://`, `wss://` or `http://` URL: what to put in the request line and Host
/// header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The scheme, lower case (`ws`, `wss`, `http`).
    pub scheme: String,
    /// `host` or `host:port` exactly as given, for the Host header.
    pub authority: String,
    /// The host without brackets, for resolution.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `scheme://host[:port][/path][?query]`; `schemes` lists the accepted schemes
    /// with their default ports.
    pub fn parse(url: &str, schemes: &[(&str, u16)]) -> anyhow::Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("no scheme in {url:?}"))?;
        let default_port = schemes
            .iter()
            .find(|(s, _)| s.eq_ignore_ascii_case(scheme))
            .map(|(_, p)| *p)
            .with_context(|| {
                let known: Vec<_> = schemes.iter().map(|(s, _)| format!("{s}://")).collect();
                format!(
                    "unsupported scheme {scheme:?} in {url:?} ({} only)",
                    known.join(" or ")
                )
            })?;
        let cut = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(cut);
        if authority.is_empty() {
            bail!("no host in {url:?}");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .with_context(|| format!("bad IPv6 host in {url:?}"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().with_context(|| format!("bad port in {url:?}"))?,
                None => default_port,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().with_context(|| format!("bad port in {url:?}"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            bail!("no host in {url:?}");
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_owned(),
            host,
            port,
            path,
        })
    }

    /// Resolves the host once; every connection reuses the first address so DNS is never on
    /// the measured path.
    pub async fn resolve(&self) -> anyhow::Result<std::net::SocketAddr> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("resolving {}", self.host))?;
        addrs
            .next()
            .with_context(|| format!("{} resolved to no address", self.host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_patterns_and_lists() {
        let c = expand_channels("trades.S{0..99}").unwrap();
        assert_eq!(c.len(), 100);
        assert_eq!(c[0], "trades.S0");
        assert_eq!(c[99], "trades.S99");
        assert_eq!(
            expand_channels("a, b.{1..2}.x ,").unwrap(),
            vec!["a", "b.1.x", "b.2.x"]
        );
        assert!(expand_channels("").unwrap().is_empty());
        assert!(expand_channels("x{3..1}").is_err());
        assert!(expand_channels("x{1..").is_err());
        assert!(expand_channels("x{a..b}").is_err());
        assert!(
            expand_channels("bad name").is_err(),
            "space is not a channel byte"
        );
        assert!(expand_channels("x{0..99999999}").is_err());
    }

    #[test]
    fn parses_source_ranges() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.20").unwrap();
        assert_eq!(ips.len(), 20);
        assert_eq!(ips[0], "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(ips[19], "127.0.0.20".parse::<IpAddr>().unwrap());
        let mixed = parse_source_ips("127.0.0.2,127.0.1.255-127.0.2.1").unwrap();
        assert_eq!(mixed.len(), 4);
        assert_eq!(mixed[3], "127.0.2.1".parse::<IpAddr>().unwrap());
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn parses_urls() {
        let ws = [("ws", 80)];
        let u = Url::parse("ws://127.0.0.1:3002/ws?x=1", &ws).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 3002, "/ws?x=1")
        );
        assert_eq!(u.authority, "127.0.0.1:3002");
        let u = Url::parse("ws://localhost", &ws).unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = Url::parse("ws://[::1]:9000?q", &ws).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 9000, "/?q")
        );
        assert!(Url::parse("wss://example/", &ws).is_err());
        let u = Url::parse("WSS://example", &[("ws", 80), ("wss", 443)]).unwrap();
        assert_eq!((u.scheme.as_str(), u.port), ("wss", 443));
        assert!(Url::parse("127.0.0.1:80", &ws).is_err());
        assert!(Url::parse("ws://:80/", &ws).is_err());
    }
}
