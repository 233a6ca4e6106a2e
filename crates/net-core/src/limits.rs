//! Process limits that size defaults: how many clients fit in the open-files limit, how much
//! memory the process may use.

/// The soft `RLIMIT_NOFILE` of this process, read from `/proc/self/limits` (Linux);
/// `None` where that file is missing or says "unlimited".
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&text)
}

fn parse_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The most descriptor-table entries [`reserve_descriptor_table`] asks for (8 MiB of kernel
/// memory at 8 bytes per entry), whatever the limit.
pub const MAX_RESERVED_DESCRIPTORS: u64 = 1 << 20;

/// Grows this process's descriptor table to `wanted` entries now (at most the soft open-files
/// limit and [`MAX_RESERVED_DESCRIPTORS`]) and returns the entries asked for, 0 where there is
/// nothing to do.
///
/// Why: Linux doubles a process's descriptor table when a descriptor past its end is opened,
/// and in a multi-threaded process each doubling waits for an RCU grace period
/// (`expand_fdtable` → `synchronize_rcu`) while another thread's `accept`/`socket` past the
/// old end waits for it. Measured here at 6-18 ms per doubling in the first thousands of connections after
/// a start (`perf trace --duration 2` on ws-lb, `bench/cold_start.py`: `accept4` returning
/// descriptor 256, 512, ... 8192 and `socket` returning 513, 2049, 4097 took 6.6-18.4 ms each)
/// — the whole of ws-lb's slow first ramp. Call it before any thread is started: a single-threaded process grows
/// its table without the wait. The table never shrinks; its cost is kernel memory (8 bytes
/// per entry plus two bitmaps), not resident memory of the process.
pub fn reserve_descriptor_table(wanted: u64) -> std::io::Result<u64> {
    let cap = open_files_limit()
        .unwrap_or(MAX_RESERVED_DESCRIPTORS)
        .min(MAX_RESERVED_DESCRIPTORS);
    let n = wanted.min(cap);
    if n <= 64 {
        return Ok(0);
    }
    let highest = rustix::fd::RawFd::try_from(n - 1).unwrap_or(rustix::fd::RawFd::MAX);
    let null = std::fs::File::open("/dev/null")?;
    // The lowest free descriptor at or above `highest`: the kernel grows the table to hold
    // it. Dropped (closed) at once; the table keeps its size.
    drop(rustix::io::fcntl_dupfd_cloexec(&null, highest)?);
    Ok(n)
}

/// The multi-threaded tokio runtime of a binary (what `#[tokio::main]` builds), with
/// the descriptor table first grown to `descriptors` entries while this thread is still the
/// only one ([`reserve_descriptor_table`]; 0: not grown). A table that cannot be grown is
/// logged, not fatal.
pub fn server_runtime(descriptors: u64) -> std::io::Result<tokio::runtime::Runtime> {
    match reserve_descriptor_table(descriptors) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(entries = n, "descriptor table grown ahead"),
        Err(e) => {
            tracing::warn!(error = %e, "could not grow the descriptor table ahead; the first thousands of connections may stall (6-18 ms each time it doubles)")
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The descriptor-table entries of process `pid` (this process for `None`): `FDSize` in
/// `/proc/<pid>/status`; `None` where that cannot be read.
pub fn descriptor_table_size(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/status".into(),
        |p| format!("/proc/{p}/status"),
    );
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FDSize:"))?
        .trim()
        .parse()
        .ok()
}

/// How many clients fit when each holds `per_client` descriptors and `reserve` are kept for
/// listeners, the runtime, health checks and logs. 0 (no cap) when the limit is unknown.
pub fn clients_for_open_files(per_client: u64, reserve: u64) -> usize {
    open_files_limit().map_or(0, |n| {
        usize::try_from(n.saturating_sub(reserve) / per_client.max(1))
            .unwrap_or(usize::MAX)
            .max(1)
    })
}

/// The memory this process may use in bytes: the smaller of its cgroup's limit (v2
/// `memory.max`, or v1 `memory.limit_in_bytes`) and the machine's `MemTotal`; `None` where
/// neither can be read (not Linux).
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_mem_total(&t));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|t| parse_cgroup_limit(&t));
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A cgroup limit; "max" (v2) and the v1 "no limit" value (close to `i64::MAX`) are none.
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    (n < 1 << 60).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_soft_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files(text), Some(20000));
        assert_eq!(
            parse_open_files(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(parse_open_files("nothing here"), None);
    }

    #[test]
    fn parses_memory_limits() {
        assert_eq!(
            parse_mem_total("MemTotal:       24568244 kB\nMemFree: 1 kB\n"),
            Some(24_568_244 * 1024)
        );
        assert_eq!(parse_mem_total("nothing"), None);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("4294967296\n"), Some(4 << 30));
        let here = memory_limit().unwrap();
        assert!(here > 1 << 20, "{here}");
    }

    #[test]
    fn the_descriptor_table_is_grown_ahead_and_bounded_by_the_limit() {
        let limit = open_files_limit().unwrap();
        let before = descriptor_table_size(None).unwrap();
        let want = (before * 4).min(limit);
        assert!(
            want > before,
            "limit {limit} leaves no room to grow from {before}"
        );
        assert_eq!(reserve_descriptor_table(want).unwrap(), want);
        assert!(descriptor_table_size(None).unwrap() >= want);
        // More than the limit is asked: the limit is what is reserved, no error.
        assert_eq!(
            reserve_descriptor_table(limit + 1000).unwrap(),
            limit.min(MAX_RESERVED_DESCRIPTORS)
        );
        assert!(descriptor_table_size(None).unwrap() >= limit.min(MAX_RESERVED_DESCRIPTORS));
        assert_eq!(reserve_descriptor_table(10).unwrap(), 0);
        assert_eq!(
            descriptor_table_size(Some(std::process::id())),
            descriptor_table_size(None)
        );
    }

    #[test]
    fn this_process_has_a_limit() {
        let n = open_files_limit().unwrap();
        assert!(n > 0);
        assert_eq!(clients_for_open_files(2, 64) as u64, (n - 64) / 2);
    }
}
