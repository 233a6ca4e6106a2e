//! Process limits that size defaults: how many clients fit in the open-files limit.

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
    fn this_process_has_a_limit() {
        let n = open_files_limit().unwrap();
        assert!(n > 0);
        assert_eq!(clients_for_open_files(2, 64) as u64, (n - 64) / 2);
    }
}
