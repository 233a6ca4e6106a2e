//! Typed, validated configuration built once from the flags; the run code never parses.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::cli::{PublishArgs, RunArgs};
use crate::schedule::Slot;
use crate::spec::{expand_channels, parse_duration, parse_source_ips, Url};
use crate::token::{read_token_file, Minter, TokenConfig, TokenSource};

/// Default find-max rates: fine steps where servers usually saturate, then doubling.
const FIND_MAX_RATES: &[f64] = &[
    500.0, 1000.0, 2000.0, 3000.0, 5000.0, 7500.0, 10_000.0, 20_000.0, 40_000.0, 80_000.0,
    160_000.0,
];

/// A connection run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub url: String,
    /// The URLs of `url` (a comma list): connection `id` goes to `targets[id % len]`.
    pub targets: Vec<Url>,
    /// PEM roots trusted for `wss://` (default: `SSL_CERT_FILE`, then the system bundle).
    pub ca_file: Option<std::path::PathBuf>,
    /// Total attempts across all workers.
    pub connections: u64,
    /// Total attempts per second across all workers.
    pub rate: f64,
    pub hold: Duration,
    /// Each connection closes itself this long after it was established (`None`: at the end
    /// of the run).
    pub lifetime: Option<Duration>,
    /// The channels pattern as given, for the report.
    pub channels_spec: String,
    pub channels: Vec<String>,
    pub channels_per_conn: usize,
    pub handshake_timeout: Duration,
    pub settle: Duration,
    /// This process's source addresses (a worker's share of the given ones).
    pub source_ips: Vec<IpAddr>,
    /// How many source addresses were given in total, for the report.
    pub source_ip_count: usize,
    pub reconnect: bool,
    /// Re-dials resume the client's own TLS session (`--no-tls-resume` turns it off).
    pub tls_resume: bool,
    /// Re-dial backoff: first and largest delay.
    pub reconnect_delay: (Duration, Duration),
    pub max_message: usize,
    /// Publishing during the hold, if asked for.
    pub publish: Option<PublishConfig>,
    pub slot: Slot,
    /// Common schedule start for workers (Unix milliseconds).
    pub start_at_unix_ms: Option<u64>,
    pub quiet: bool,
    /// Tokens for a server with authentication on.
    pub tokens: Option<TokenConfig>,
}

/// A publisher: the subcommand, or the hold phase of a run.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub url: Url,
    pub rate: f64,
    pub channels: Vec<String>,
    pub duration: Duration,
    pub connections: usize,
    /// Bytes of padding in each message's data.
    pub pad_bytes: usize,
}

/// find-max settings.
#[derive(Debug, Clone)]
pub struct FindMaxConfig {
    pub rates: Vec<f64>,
    pub max_p99: Duration,
    pub min_success: f64,
    pub pause: Duration,
}

/// The configuration as recorded in the JSON report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigEcho {
    pub url: String,
    pub connections: u64,
    pub rate: f64,
    pub hold_s: f64,
    /// Connection lifetime (churn), seconds; absent when connections live until the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_s: Option<f64>,
    pub channels: String,
    pub channel_count: usize,
    pub channels_per_conn: usize,
    pub handshake_timeout_ms: u64,
    pub settle_ms: u64,
    pub source_ips: usize,
    pub reconnect: bool,
    /// Re-dial backoff, first and largest delay in ms (recorded when --reconnect is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_delay_ms: Option<(u64, u64)>,
    /// Whether re-dials resume the client's own TLS session (recorded when --reconnect is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_resume: Option<bool>,
    pub publish_url: Option<String>,
    pub publish_rate: f64,
    pub workers: u32,
    /// How connections authenticate (never the token or the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<String>,
}

/// `--reconnect-min-delay` and `--reconnect-max-delay`: both positive, min ≤ max.
fn reconnect_delay(min: &str, max: &str) -> anyhow::Result<(Duration, Duration)> {
    let (lo, hi) = (parse_duration(min)?, parse_duration(max)?);
    if lo.is_zero() || lo > hi {
        bail!("--reconnect-min-delay must be positive and at most --reconnect-max-delay, got {min} and {max}");
    }
    Ok((lo, hi))
}

fn positive_rate(rate: f64, what: &str) -> anyhow::Result<f64> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("{what} must be a positive number, got {rate}");
    }
    Ok(rate)
}

impl RunConfig {
    /// Validates the flags of a connection run.
    pub fn from_args(a: &RunArgs) -> anyhow::Result<Self> {
        let url = a.url.clone().context("--url (or WS_URL) is required")?;
        let targets = url
            .split(',')
            .map(|u| Url::parse(u.trim(), &[("ws", 80), ("wss", 443)]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if a.connections == 0 {
            bail!("--connections must be at least 1");
        }
        let channels = expand_channels(&a.channels)?;
        if !channels.is_empty() && !(1..=channels.len()).contains(&a.channels_per_conn) {
            bail!(
                "--channels-per-conn must be between 1 and the number of channels ({})",
                channels.len()
            );
        }
        let publish = match (&a.publish_url, a.publish_rate > 0.0) {
            (Some(u), true) => {
                if channels.is_empty() {
                    bail!("publishing during the hold needs --channels");
                }
                Some(PublishConfig {
                    url: Url::parse(u, &[("http", 80)])?,
                    rate: positive_rate(a.publish_rate, "--publish-rate")?,
                    channels: channels.clone(),
                    duration: Duration::ZERO,
                    connections: a.publish_connections.max(1),
                    pad_bytes: a.publish_pad_bytes,
                })
            }
            (Some(_), false) => bail!("--publish-url needs --publish-rate above 0"),
            (None, _) => None,
        };
        let slot = match (a.worker_index, a.worker_count) {
            (Some(index), Some(count)) if index < count => Slot { index, count },
            (None, None) => Slot::SOLO,
            _ => bail!("--worker-index must come with a larger --worker-count"),
        };
        let hold = parse_duration(&a.hold)?;
        let mut cfg = Self {
            url,
            targets,
            ca_file: a.ca_file.clone(),
            connections: a.connections,
            rate: positive_rate(a.rate, "--rate")?,
            hold,
            lifetime: Some(parse_duration(&a.lifetime)?).filter(|d| !d.is_zero()),
            channels_spec: a.channels.clone(),
            channels,
            channels_per_conn: a.channels_per_conn.max(1),
            handshake_timeout: parse_duration(&a.handshake_timeout)?,
            settle: parse_duration(&a.settle)?,
            source_ips: a
                .source_ips
                .as_deref()
                .map(parse_source_ips)
                .transpose()?
                .unwrap_or_default(),
            source_ip_count: 0,
            reconnect: a.reconnect,
            tls_resume: !a.no_tls_resume,
            reconnect_delay: reconnect_delay(&a.reconnect_min_delay, &a.reconnect_max_delay)?,
            max_message: a.max_message.max(1024),
            publish,
            slot,
            start_at_unix_ms: a.start_at_unix_ms,
            quiet: a.quiet,
            tokens: token_config(a)?,
        };
        if let Some(p) = &mut cfg.publish {
            p.duration = hold;
        }
        cfg.source_ip_count = cfg.source_ips.len();
        cfg.source_ips = worker_share(&cfg.source_ips, slot);
        Ok(cfg)
    }

    /// The configuration as the report records it.
    pub fn echo(&self, workers: u32) -> ConfigEcho {
        ConfigEcho {
            url: self.url.clone(),
            connections: self.connections,
            rate: self.rate,
            hold_s: self.hold.as_secs_f64(),
            lifetime_s: self.lifetime.map(|d| d.as_secs_f64()),
            channels: self.channels_spec.clone(),
            channel_count: self.channels.len(),
            channels_per_conn: self.channels_per_conn,
            handshake_timeout_ms: u64::try_from(self.handshake_timeout.as_millis())
                .unwrap_or(u64::MAX),
            settle_ms: u64::try_from(self.settle.as_millis()).unwrap_or(u64::MAX),
            source_ips: self.source_ip_count,
            reconnect: self.reconnect,
            reconnect_delay_ms: self.reconnect.then(|| {
                let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                (ms(self.reconnect_delay.0), ms(self.reconnect_delay.1))
            }),
            tls_resume: self.reconnect.then_some(self.tls_resume),
            publish_url: self
                .publish
                .as_ref()
                .map(|p| format!("http://{}{}", p.url.authority, p.url.path)),
            publish_rate: self.publish.as_ref().map_or(0.0, |p| p.rate),
            workers,
            tokens: self.tokens.as_ref().map(TokenConfig::describe),
        }
    }
}

/// The token flags, validated: at most one source; the key is loaded (and one token minted)
/// now, so a bad key fails before any connection.
fn token_config(a: &RunArgs) -> anyhow::Result<Option<TokenConfig>> {
    let given = [
        a.token.is_some(),
        a.token_file.is_some(),
        a.sign_key.is_some(),
    ];
    let source = match given.iter().filter(|g| **g).count() {
        0 => return Ok(None),
        1 => {
            if let Some(t) = &a.token {
                if t.trim().is_empty() {
                    bail!("--token is empty");
                }
                TokenSource::Fixed(t.trim().into())
            } else if let Some(f) = &a.token_file {
                TokenSource::List(read_token_file(f)?)
            } else if let Some(key) = &a.sign_key {
                TokenSource::Mint(Box::new(Minter::new(
                    a.sign_alg,
                    key,
                    a.sign_kid.clone(),
                    &a.sign_channels,
                    parse_duration(&a.sign_ttl)?,
                    a.sign_aud.clone(),
                    a.sign_iss.clone(),
                )?))
            } else {
                return Ok(None);
            }
        }
        _ => bail!("give one of --token, --token-file and --sign-key"),
    };
    Ok(Some(TokenConfig {
        source,
        place: a.token_in,
    }))
}

impl PublishConfig {
    /// Validates the flags of `loadtest publish`.
    pub fn from_args(a: &PublishArgs) -> anyhow::Result<Self> {
        let channels = expand_channels(&a.channels)?;
        if channels.is_empty() {
            bail!("--channels is required to publish");
        }
        Ok(Self {
            url: Url::parse(&a.publish_url, &[("http", 80)])?,
            rate: positive_rate(a.rate, "--rate")?,
            channels,
            duration: parse_duration(&a.duration)?,
            connections: a.connections.max(1),
            pad_bytes: a.pad_bytes,
        })
    }
}

impl FindMaxConfig {
    /// Validates the find-max flags.
    pub fn from_args(a: &RunArgs) -> anyhow::Result<Self> {
        let rates = match &a.find_max_rates {
            Some(list) => list
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse::<f64>()
                        .context("bad --find-max-rates entry")
                })
                .map(|r| r.and_then(|r| positive_rate(r, "a find-max rate")))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => FIND_MAX_RATES.to_vec(),
        };
        if rates.is_empty() {
            bail!("--find-max-rates is empty");
        }
        Ok(Self {
            rates,
            max_p99: parse_duration(&a.max_p99)?,
            min_success: a.min_success.clamp(0.0, 1.0),
            pause: parse_duration(&a.step_pause)?,
        })
    }
}

/// A worker's own source addresses: every `count`-th one starting at its index, so workers
/// never compete for the same address's ephemeral ports. With fewer addresses than workers
/// they are shared (every worker gets the full list).
pub fn worker_share(ips: &[IpAddr], slot: Slot) -> Vec<IpAddr> {
    let count = usize::try_from(slot.count.max(1)).unwrap_or(1);
    let index = usize::try_from(slot.index).unwrap_or(0);
    if ips.len() < count {
        return ips.to_vec();
    }
    ips.iter().skip(index).step_by(count).copied().collect()
}

/// This process's open-file limit from /proc/self/limits (Linux), if readable.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["loadtest", "--url", "ws://127.0.0.1:9/ws"];
        v.extend_from_slice(extra);
        crate::cli::Cli::try_parse_from(v).unwrap().run
    }

    #[test]
    fn validates_runs() {
        let c = RunConfig::from_args(&args(&[
            "--channels",
            "a.{1..4}",
            "--channels-per-conn",
            "2",
        ]))
        .unwrap();
        assert_eq!(c.channels.len(), 4);
        assert_eq!(c.slot, Slot::SOLO);
        assert_eq!(c.targets.len(), 1);
        let spread = ["--url", "ws://127.0.0.1:9/ws,ws://127.0.0.1:10/a"];
        let c = RunConfig::from_args(&args(&spread)).unwrap();
        let ports: Vec<_> = c
            .targets
            .iter()
            .map(|t| (t.port, t.path.as_str()))
            .collect();
        assert_eq!(ports, vec![(9, "/ws"), (10, "/a")]);
        assert!(RunConfig::from_args(&args(&["--url", "ws://127.0.0.1:9/ws,"])).is_err());
        assert!(
            RunConfig::from_args(&args(&["--channels", "a", "--channels-per-conn", "2"])).is_err()
        );
        assert!(RunConfig::from_args(&args(&["--rate", "0"])).is_err());
        assert!(RunConfig::from_args(&args(&["--publish-url", "http://x/publish"])).is_err());
        let later_wins = args(&["--rate", "5", "--rate", "7"]);
        assert_eq!(later_wins.rate, 7.0);
        let w =
            RunConfig::from_args(&args(&["--worker-index", "1", "--worker-count", "3"])).unwrap();
        assert_eq!(w.slot, Slot { index: 1, count: 3 });
        assert!(
            RunConfig::from_args(&args(&["--worker-index", "3", "--worker-count", "3"])).is_err()
        );
    }

    #[test]
    fn reconnect_backoff_is_configurable_and_recorded() {
        let c = RunConfig::from_args(&args(&["--reconnect"])).unwrap();
        assert_eq!(
            c.reconnect_delay,
            (Duration::from_millis(100), Duration::from_secs(5))
        );
        assert_eq!(c.echo(1).reconnect_delay_ms, Some((100, 5000)));
        let lib = ["--reconnect", "--reconnect-min-delay", "500ms"];
        let c = RunConfig::from_args(&args(
            &[&lib[..], &["--reconnect-max-delay", "30s"]].concat(),
        ))
        .unwrap();
        assert_eq!(c.echo(1).reconnect_delay_ms, Some((500, 30_000)));
        assert_eq!(
            RunConfig::from_args(&args(&[]))
                .unwrap()
                .echo(1)
                .reconnect_delay_ms,
            None
        );
        for bad in [
            ["--reconnect-min-delay", "0s"],
            ["--reconnect-max-delay", "50ms"],
        ] {
            let err = RunConfig::from_args(&args(&bad)).unwrap_err().to_string();
            assert!(err.contains("--reconnect-min-delay"), "{err}");
        }
    }

    #[test]
    fn workers_get_disjoint_source_addresses() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.5").unwrap();
        let share = |index| worker_share(&ips, Slot { index, count: 2 });
        assert_eq!(share(0), vec![ips[0], ips[2], ips[4]]);
        assert_eq!(share(1), vec![ips[1], ips[3]]);
        assert_eq!(
            worker_share(&ips[..1], Slot { index: 1, count: 2 }),
            vec![ips[0]]
        );
        assert_eq!(worker_share(&ips, Slot::SOLO), ips);
    }

    #[test]
    fn reads_the_open_file_limit() {
        // Present on Linux, where the tool runs; the value is whatever ulimit -n says.
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }
}
