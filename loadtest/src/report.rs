//! The JSON report: what a run measured, in a shape that can be merged across processes.
//!
//! Percentiles are derived values; the serialized HDR histograms (V2, base64) are the source
//! of truth, so merging worker reports adds histograms and recomputes percentiles instead of
//! averaging percentiles, which would be wrong. The schema is documented in the README.

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::ConfigEcho;
use crate::findmax::FindMaxReport;
use crate::publish::PublishReport;
use crate::stats::Histograms;

/// Version of the report layout; bumped on incompatible changes.
pub const SCHEMA: u32 = 1;

/// Everything one run (or a merge of worker runs) measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub config: ConfigEcho,
    pub started_unix_ms: u64,
    pub duration_s: f64,
    /// Processes whose measurements this report contains.
    pub processes: u32,
    pub counts: Counts,
    /// Failed attempts by cause (`refused`, `http_503`, `closed_1013`, ...).
    pub failures: BTreeMap<String, u64>,
    /// Ends of established connections by cause (`close_1012`, `no_close_frame`, ...).
    pub disconnects: BTreeMap<String, u64>,
    /// Failed reconnect attempts by cause.
    pub reconnect_failures: BTreeMap<String, u64>,
    pub handshake_us: Percentiles,
    pub delivery_us: Percentiles,
    pub messages_per_connection: Percentiles,
    /// Deliveries per second during the hold.
    pub deliveries_per_s: f64,
    pub schedule: ScheduleReport,
    pub per_channel: BTreeMap<String, u64>,
    pub timeline: Vec<TimelinePoint>,
    pub histograms: EncodedHistograms,
    pub publisher: Option<PublishReport>,
    pub find_max: Option<FindMaxReport>,
}

/// Plain counts (see the README for each).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub active_end_of_ramp: i64,
    pub active_end_of_hold: i64,
    pub disconnects: u64,
    pub reconnect_attempts: u64,
    pub reconnects: u64,
    pub recovered_false: u64,
    pub deliveries: u64,
    pub gaps: u64,
    pub gap_messages: u64,
    pub duplicates: u64,
    pub epoch_changes: u64,
    pub server_errors: u64,
    pub undecodable: u64,
    pub pings_answered: u64,
    /// `wss://` connections that upgraded after a full TLS handshake / after resuming an
    /// earlier session of the same client (a TLS handshake whose upgrade failed is in neither).
    #[serde(default)]
    pub tls_full_handshakes: u64,
    #[serde(default)]
    pub tls_resumed_handshakes: u64,
}

impl Counts {
    /// Adds another process's counts (active gauges add too: processes hold disjoint sets).
    pub fn add(&mut self, o: &Counts) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.failed += o.failed;
        self.active_end_of_ramp += o.active_end_of_ramp;
        self.active_end_of_hold += o.active_end_of_hold;
        self.disconnects += o.disconnects;
        self.reconnect_attempts += o.reconnect_attempts;
        self.reconnects += o.reconnects;
        self.recovered_false += o.recovered_false;
        self.deliveries += o.deliveries;
        self.gaps += o.gaps;
        self.gap_messages += o.gap_messages;
        self.duplicates += o.duplicates;
        self.epoch_changes += o.epoch_changes;
        self.server_errors += o.server_errors;
        self.undecodable += o.undecodable;
        self.pings_answered += o.pings_answered;
        self.tls_full_handshakes += o.tls_full_handshakes;
        self.tls_resumed_handshakes += o.tls_resumed_handshakes;
    }
}

/// Percentiles of one histogram; all zero when it is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// How well the load generator kept to its schedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleReport {
    pub target_rate: f64,
    /// Attempts per second between the first and the last attempt start.
    pub achieved_rate: f64,
    pub scheduled_ramp_s: f64,
    pub first_attempt_s: f64,
    pub last_attempt_s: f64,
    /// How late attempts started relative to their scheduled instant.
    pub lag_us: Percentiles,
    /// True when lag p99 exceeded 10 ms or the achieved rate fell below 95 % of the target:
    /// the measured latencies then include the generator's own delay.
    pub generator_behind: bool,
}

impl ScheduleReport {
    /// Derives the rate and verdict from the attempt window and lag histogram.
    pub fn new(
        target_rate: f64,
        attempted: u64,
        window: Option<(f64, f64)>,
        lag: &Histogram<u64>,
    ) -> Self {
        let (first, last) = window.unwrap_or((0.0, 0.0));
        let achieved_rate = if attempted > 1 && last > first {
            (attempted - 1) as f64 / (last - first)
        } else {
            target_rate
        };
        let lag_us = Percentiles::of(lag);
        let generator_behind = lag_us.p99 > 10_000 || achieved_rate < 0.95 * target_rate;
        Self {
            target_rate,
            achieved_rate,
            scheduled_ramp_s: attempted.saturating_sub(1) as f64 / target_rate,
            first_attempt_s: first,
            last_attempt_s: last,
            lag_us,
            generator_behind,
        }
    }
}

/// One second of the run: the interval (second - 1, second] after the schedule start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    pub second: u64,
    /// Established connections at the end of the second.
    pub active: i64,
    pub attempts: u64,
    pub established: u64,
    pub failures: u64,
    /// Handshake p99 of the upgrades completed in this second (merged reports: the highest
    /// of the workers' values).
    pub handshake_p99_us: Option<u64>,
    pub deliveries: u64,
    /// Delivery p99 of the messages received in this second (merged reports: the highest
    /// of the workers' values).
    #[serde(default)]
    pub delivery_p99_us: Option<u64>,
}

/// HDR histograms, V2 serialized and base64 encoded (`""` when empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodedHistograms {
    pub handshake_us: String,
    pub delivery_us: String,
    pub schedule_lag_us: String,
    pub messages_per_connection: String,
}

/// Serializes a histogram as V2 + base64.
pub fn encode_histogram(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Reverses [`encode_histogram`]; an empty string is an empty histogram.
pub fn decode_histogram(s: &str) -> anyhow::Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(crate::stats::new_histogram());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("histogram V2: {e:?}"))?;
    // Re-home into the standard bounds so histograms from any source can be added.
    let mut out = crate::stats::new_histogram();
    out.add(&h)
        .map_err(|e| anyhow::anyhow!("histogram bounds: {e:?}"))?;
    Ok(out)
}

impl EncodedHistograms {
    pub fn encode(h: &Histograms) -> anyhow::Result<Self> {
        Ok(Self {
            handshake_us: encode_histogram(&h.handshake)?,
            delivery_us: encode_histogram(&h.delivery)?,
            schedule_lag_us: encode_histogram(&h.lag)?,
            messages_per_connection: encode_histogram(&h.messages_per_conn)?,
        })
    }

    pub fn decode(&self) -> anyhow::Result<Histograms> {
        Ok(Histograms {
            handshake: decode_histogram(&self.handshake_us)?,
            delivery: decode_histogram(&self.delivery_us)?,
            lag: decode_histogram(&self.schedule_lag_us)?,
            messages_per_conn: decode_histogram(&self.messages_per_connection)?,
        })
    }
}

impl Report {
    /// Fills every percentile from the histograms, which must already be set.
    pub fn set_histograms(&mut self, h: &Histograms) -> anyhow::Result<()> {
        self.handshake_us = Percentiles::of(&h.handshake);
        self.delivery_us = Percentiles::of(&h.delivery);
        self.messages_per_connection = Percentiles::of(&h.messages_per_conn);
        self.histograms = EncodedHistograms::encode(h)?;
        Ok(())
    }

    /// Fraction of attempts that became established (0 when nothing was attempted).
    pub fn success_ratio(&self) -> f64 {
        if self.counts.attempted == 0 {
            return 0.0;
        }
        self.counts.established as f64 / self.counts.attempted as f64
    }
}
