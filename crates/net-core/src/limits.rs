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
    fn this_process_has_a_limit() {
        let n = open_files_limit().unwrap();
        assert!(n > 0);
        assert_eq!(clients_for_open_files(2, 64) as u64, (n - 64) / 2);
    }
}
