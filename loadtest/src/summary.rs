//! The human summary printed on stdout at the end of a run, publish or find-max search.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::findmax::{step_line, FindMaxReport};
use crate::progress::fmt_us;
use crate::publish::PublishReport;
use crate::report::{Percentiles, Report};

fn row(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {label:<22} {value}");
}

fn percentiles(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".to_owned();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        fmt_us(p.p50),
        fmt_us(p.p90),
        fmt_us(p.p99),
        fmt_us(p.p999),
        fmt_us(p.max),
        p.count
    )
}

fn keyed(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders the connection-run summary.
pub fn render(r: &Report) -> String {
    let c = &r.counts;
    let cfg = &r.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "odin-ws loadtest: {} ({} process{})",
        cfg.url,
        r.processes,
        if r.processes == 1 { "" } else { "es" }
    );
    row(
        &mut out,
        "target",
        format!(
            "{} connections at {}/s, hold {}s, {} channels",
            cfg.connections, cfg.rate, cfg.hold_s, cfg.channel_count
        ),
    );
    let pct = if c.attempted > 0 {
        100.0 * c.established as f64 / c.attempted as f64
    } else {
        0.0
    };
    row(&mut out, "attempted", c.attempted);
    row(
        &mut out,
        "established",
        format!("{} ({pct:.2}%)", c.established),
    );
    row(
        &mut out,
        "failed",
        format!("{}: {}", c.failed, keyed(&r.failures)),
    );
    row(&mut out, "active end of ramp", c.active_end_of_ramp);
    row(&mut out, "active end of hold", c.active_end_of_hold);
    row(
        &mut out,
        "disconnects",
        format!("{}: {}", c.disconnects, keyed(&r.disconnects)),
    );
    if cfg.reconnect {
        row(
            &mut out,
            "reconnects",
            format!(
                "{} of {} attempts, recovered:false {}, failures: {}",
                c.reconnects,
                c.reconnect_attempts,
                c.recovered_false,
                keyed(&r.reconnect_failures)
            ),
        );
    }
    row(&mut out, "handshake latency", percentiles(&r.handshake_us));
    if c.tls_full_handshakes + c.tls_resumed_handshakes > 0 {
        row(
            &mut out,
            "tls handshakes",
            format!(
                "{} full, {} resumed",
                c.tls_full_handshakes, c.tls_resumed_handshakes
            ),
        );
    }
    let s = &r.schedule;
    row(
        &mut out,
        "schedule",
        format!(
            "achieved {:.1}/s of {}/s; lag p50 {} p99 {} max {}{}",
            s.achieved_rate,
            s.target_rate,
            fmt_us(s.lag_us.p50),
            fmt_us(s.lag_us.p99),
            fmt_us(s.lag_us.max),
            if s.generator_behind {
                "  << GENERATOR BEHIND: latencies include its delay"
            } else {
                "  (kept up)"
            }
        ),
    );
    if c.deliveries > 0 || r.publisher.is_some() {
        row(
            &mut out,
            "deliveries",
            format!("{} ({:.1}/s during hold)", c.deliveries, r.deliveries_per_s),
        );
        row(&mut out, "delivery latency", percentiles(&r.delivery_us));
        row(
            &mut out,
            "seq gaps / duplicates",
            format!(
                "{} ({} messages) / {}",
                c.gaps, c.gap_messages, c.duplicates
            ),
        );
        row(&mut out, "epoch changes", c.epoch_changes);
        let per_conn = &r.messages_per_connection;
        row(
            &mut out,
            "messages per conn",
            format!(
                "min {} p50 {} max {}",
                per_conn.min, per_conn.p50, per_conn.max
            ),
        );
    }
    if c.server_errors + c.undecodable + c.pings_answered > 0 {
        row(
            &mut out,
            "other frames",
            format!(
                "{} error replies, {} undecodable, {} pings answered",
                c.server_errors, c.undecodable, c.pings_answered
            ),
        );
    }
    if let Some(p) = &r.publisher {
        out.push_str(&render_publish(p));
    }
    if let Some(f) = &r.find_max {
        out.push_str(&render_find_max(f));
    }
    out
}

/// Renders a publisher's summary.
pub fn render_publish(p: &PublishReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "publisher: {}", p.url);
    row(
        &mut out,
        "published",
        format!("{} ({} accepted)", p.attempted, p.accepted),
    );
    row(
        &mut out,
        "rate",
        format!(
            "achieved {:.1}/s of {}/s; lag p99 {}",
            p.achieved_rate,
            p.target_rate,
            fmt_us(p.lag_us.p99)
        ),
    );
    row(&mut out, "statuses", keyed(&p.statuses));
    row(&mut out, "errors", keyed(&p.errors));
    row(&mut out, "request latency", percentiles(&p.latency_us));
    out
}

/// Renders the find-max step table.
pub fn render_find_max(f: &FindMaxReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "find-max: {} connections per step; pass = success >= {:.1}% and handshake p99 <= {}",
        f.connections_per_step,
        f.min_success * 100.0,
        fmt_us(f.max_p99_us)
    );
    for s in &f.steps {
        let _ = writeln!(out, "  {}", step_line(s));
    }
    match f.highest_sustained_rate {
        Some(rate) => {
            let _ = writeln!(out, "  highest sustained rate: {rate}/s");
        }
        None => {
            let _ = writeln!(
                out,
                "  highest sustained rate: none (the first step failed)"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_main_rows() {
        let mut r = Report {
            processes: 1,
            ..Report::default()
        };
        r.counts.attempted = 10;
        r.counts.established = 9;
        r.counts.failed = 1;
        r.failures.insert("http_503".into(), 1);
        let text = render(&r);
        assert!(text.contains("established            9 (90.00%)"), "{text}");
        assert!(text.contains("http_503 1"));
        assert!(text.contains("kept up"));
    }
}
