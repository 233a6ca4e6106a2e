//! Process and tokio runtime metrics, read when `/metrics` is scraped: resident memory, CPU
//! seconds, open descriptors against the limit, threads, start time, and the tokio
//! runtime's workers, live tasks, global queue depth and busy time.
//!
//! The names are the ones the Prometheus client libraries' process collectors use
//! (`process_*`), so dashboards and alerts written for other services read them unchanged.
//! The values come from `/proc/self` (Linux); on other systems the process lines are left
//! out. They are rendered as text at scrape time rather than stored in the recorder: a
//! counter such as CPU seconds is a float read from the kernel, not something the process
//! increments.

use std::fmt::Write as _;
use std::fs;

/// Gauge: resident set size in bytes.
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// Gauge: virtual memory size in bytes.
pub const VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
/// Counter: user plus system CPU time in seconds.
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Gauge: open file descriptors (sockets included).
pub const OPEN_FDS: &str = "process_open_fds";
/// Gauge: the soft open-files limit (`ulimit -n`).
pub const MAX_FDS: &str = "process_max_fds";
/// Gauge: OS threads of the process.
pub const THREADS: &str = "process_threads";
/// Gauge: start time of the process, seconds since the Unix epoch.
pub const START_TIME: &str = "process_start_time_seconds";
/// Gauge: tokio runtime worker threads.
pub const TOKIO_WORKERS: &str = "tokio_workers";
/// Gauge: tokio tasks alive (spawned and not yet finished).
pub const TOKIO_ALIVE_TASKS: &str = "tokio_alive_tasks";
/// Gauge: tasks waiting in the runtime's global (injection) queue.
pub const TOKIO_GLOBAL_QUEUE: &str = "tokio_global_queue_depth";
/// Counter: seconds the runtime's workers spent busy, summed over workers.
pub const TOKIO_BUSY_SECONDS: &str = "tokio_worker_busy_seconds_total";

/// Every runtime metric name (for the runbook test and the dashboard check).
pub const ALL: &[&str] = &[
    RESIDENT_MEMORY,
    VIRTUAL_MEMORY,
    CPU_SECONDS,
    OPEN_FDS,
    MAX_FDS,
    THREADS,
    START_TIME,
    TOKIO_WORKERS,
    TOKIO_ALIVE_TASKS,
    TOKIO_GLOBAL_QUEUE,
    TOKIO_BUSY_SECONDS,
];

/// The kernel reports CPU times and start times in `/proc` in clock ticks of `USER_HZ`,
/// which is 100 on every architecture Linux runs this on (it is part of the user ABI,
/// independent of the kernel's `HZ`).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where it is not available.
    pub fn read() -> Option<Self> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        let mut s = parse_status(&status);
        let (cpu_ticks, start_ticks) = parse_stat(&stat)?;
        s.cpu_seconds = cpu_ticks as f64 / USER_HZ;
        s.start_time_seconds = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| boot_time(&t))
            .map(|boot| boot as f64 + start_ticks as f64 / USER_HZ);
        s.open_fds = open_fds();
        s.max_fds = crate::limits::open_files_limit();
        Some(s)
    }
}

/// Open descriptors. Since Linux 6.2 the size of `/proc/self/fd` is the number of open
/// descriptors, one `stat` whatever their number; older kernels report 0 there, and the
/// directory is listed instead (one entry per descriptor: ~20,000 at the default limit).
fn open_fds() -> u64 {
    match fs::metadata("/proc/self/fd") {
        Ok(m) if m.len() > 0 => m.len(),
        _ => fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64),
    }
}

/// VmRSS, VmSize (kB) and Threads from `/proc/self/status`.
fn parse_status(text: &str) -> ProcessStats {
    let mut s = ProcessStats::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        match (key, value) {
            ("VmRSS", Some(kb)) => s.resident_bytes = kb * 1024,
            ("VmSize", Some(kb)) => s.virtual_bytes = kb * 1024,
            ("Threads", Some(n)) => s.threads = n,
            _ => {}
        }
    }
    s
}

/// (utime + stime, starttime) in clock ticks from `/proc/self/stat`. The command name in
/// field 2 may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let after = text.rsplit_once(')')?.1;
    // After the name: field 3 (state) is index 0, so field n is index n - 3.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let num = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((num(14)? + num(15)?, num(22)?))
}

/// `btime` (boot time, seconds since the epoch) from `/proc/stat`.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Appends the process and runtime metrics to a Prometheus text page.
pub fn render(out: &mut String) {
    if let Some(p) = ProcessStats::read() {
        render_process(out, &p);
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let m = handle.metrics();
        let busy: f64 = (0..m.num_workers())
            .map(|w| m.worker_total_busy_duration(w).as_secs_f64())
            .sum();
        line(
            out,
            TOKIO_WORKERS,
            "gauge",
            "tokio runtime worker threads",
            m.num_workers() as f64,
        );
        line(
            out,
            TOKIO_ALIVE_TASKS,
            "gauge",
            "tokio tasks alive",
            m.num_alive_tasks() as f64,
        );
        line(
            out,
            TOKIO_GLOBAL_QUEUE,
            "gauge",
            "tasks in the tokio runtime's global queue",
            m.global_queue_depth() as f64,
        );
        line(
            out,
            TOKIO_BUSY_SECONDS,
            "counter",
            "seconds the tokio workers spent busy, summed over workers",
            busy,
        );
    }
}

fn render_process(out: &mut String, p: &ProcessStats) {
    line(
        out,
        RESIDENT_MEMORY,
        "gauge",
        "resident memory in bytes",
        p.resident_bytes as f64,
    );
    line(
        out,
        VIRTUAL_MEMORY,
        "gauge",
        "virtual memory in bytes",
        p.virtual_bytes as f64,
    );
    line(
        out,
        CPU_SECONDS,
        "counter",
        "user and system CPU time in seconds",
        p.cpu_seconds,
    );
    line(
        out,
        OPEN_FDS,
        "gauge",
        "open file descriptors",
        p.open_fds as f64,
    );
    if let Some(max) = p.max_fds {
        line(out, MAX_FDS, "gauge", "open-files limit (soft)", max as f64);
    }
    line(out, THREADS, "gauge", "OS threads", p.threads as f64);
    if let Some(start) = p.start_time_seconds {
        line(
            out,
            START_TIME,
            "gauge",
            "start time, seconds since the Unix epoch",
            start,
        );
    }
}

fn line(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tws-lb\nVmSize:\t  204800 kB\nVmRSS:\t    5120 kB\nThreads:\t7\n";
        let s = parse_status(status);
        assert_eq!(s.resident_bytes, 5120 * 1024);
        assert_eq!(s.virtual_bytes, 204_800 * 1024);
        assert_eq!(s.threads, 7);
        // A command name with spaces and a parenthesis does not shift the fields.
        let stat = "42 (ws (lb) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 0 0";
        assert_eq!(parse_stat(stat), Some((300, 12345)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renders_every_metric_for_this_process() {
        let mut page = String::new();
        render(&mut page);
        for name in ALL {
            let value = page
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from:\n{page}"));
            let v: f64 = value.parse().unwrap();
            assert!(v.is_finite() && v >= 0.0, "{name} = {v}");
        }
        let value = |name: &str| -> f64 {
            page.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(value(RESIDENT_MEMORY) > 1_000_000.0);
        assert!(value(OPEN_FDS) >= 3.0 && value(OPEN_FDS) <= value(MAX_FDS));
        assert!(value(THREADS) >= 2.0);
        assert_eq!(value(TOKIO_WORKERS), 2.0);
        assert!(value(TOKIO_ALIVE_TASKS) >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value(START_TIME);
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "start {start}, now {now}"
        );
    }

    #[test]
    fn open_descriptors_follow_what_the_process_opens() {
        // Other tests of this binary may run on other threads and open files meanwhile, so
        // the bounds leave room above; below, every file this test holds must be counted.
        let before = open_fds();
        let held: Vec<fs::File> = (0..64)
            .map(|_| fs::File::open("/proc/self/status").unwrap())
            .collect();
        let during = open_fds();
        assert!(
            during >= before + 64 && during <= before + 64 + 32,
            "before {before}, with 64 more open {during}"
        );
        drop(held);
        assert!(
            open_fds() < during,
            "closing 64 files did not lower the count"
        );
    }

    #[test]
    fn runbook_documents_every_runtime_metric() {
        let runbook = include_str!("../../../docs/runbook.md");
        for name in ALL {
            assert!(
                runbook.contains(&format!("| `{name}` |")),
                "metric {name} missing from docs/runbook.md"
            );
        }
    }
}
