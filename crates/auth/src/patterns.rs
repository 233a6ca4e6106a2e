//! Channel patterns: which channels a token (or everyone, for public channels) may subscribe to.
//!
//! A pattern is an exact channel name (`orders.user-42`), a prefix wildcard ending in `.*`
//! (`orders.user-42.*` matches `orders.user-42.fills` and deeper names, not `orders.user-42`
//! itself), or `*` alone (every channel). Nothing else is special: a `*` anywhere else makes
//! the pattern invalid, so a typo cannot silently widen an entitlement.

/// Longest pattern accepted, in bytes (channel names are shorter still).
pub const MAX_PATTERN_LEN: usize = 256;
/// Most patterns one token may carry; a token with more is refused as malformed, which bounds
/// the memory a session spends on its entitlements.
pub const MAX_PATTERNS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    /// The prefix including its trailing dot.
    Prefix(String),
}

/// A pattern string that is not one of the three accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel pattern {pattern:?}: {problem}")]
pub struct InvalidPattern {
    pub pattern: String,
    pub problem: &'static str,
}

/// A set of channel patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelPatterns {
    patterns: Vec<Pattern>,
}

impl ChannelPatterns {
    /// No channel at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every channel (`*`).
    pub fn any() -> Self {
        Self {
            patterns: vec![Pattern::Any],
        }
    }

    /// Parses patterns; an empty list allows nothing.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, InvalidPattern> {
        if items.len() > MAX_PATTERNS {
            return Err(InvalidPattern {
                pattern: format!("({} patterns)", items.len()),
                problem: "too many patterns",
            });
        }
        let mut patterns = Vec::with_capacity(items.len());
        for item in items {
            patterns.push(parse_one(item.as_ref())?);
        }
        Ok(Self { patterns })
    }

    /// Parses a comma-separated list (settings); blanks around items are ignored.
    pub fn parse_list(list: &str) -> Result<Self, InvalidPattern> {
        let items: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        Self::parse(&items)
    }

    /// Whether `channel` matches any pattern.
    pub fn allows(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(e) => e == channel,
            Pattern::Prefix(prefix) => {
                channel.len() > prefix.len() && channel.starts_with(prefix.as_str())
            }
        })
    }

    /// Heap bytes the patterns hold (for the verified-token cache's byte bound).
    pub fn heap_bytes(&self) -> usize {
        self.patterns.capacity() * std::mem::size_of::<Pattern>()
            + self
                .patterns
                .iter()
                .map(|p| match p {
                    Pattern::Any => 0,
                    Pattern::Exact(s) | Pattern::Prefix(s) => s.capacity(),
                })
                .sum::<usize>()
    }

    /// Whether no channel matches.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

fn parse_one(s: &str) -> Result<Pattern, InvalidPattern> {
    let bad = |problem| InvalidPattern {
        pattern: s.chars().take(64).collect(),
        problem,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_PATTERN_LEN {
        return Err(bad("too long"));
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    if let Some(prefix) = s.strip_suffix('*') {
        if !prefix.ends_with('.') || prefix.len() < 2 {
            return Err(bad(
                "a wildcard must be `*` alone or end a prefix like `a.b.*`",
            ));
        }
        if prefix.contains('*') {
            return Err(bad("only one trailing `*` is allowed"));
        }
        return Ok(Pattern::Prefix(prefix.to_owned()));
    }
    if s.contains('*') {
        return Err(bad("`*` is only allowed at the end, after a dot"));
    }
    Ok(Pattern::Exact(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_any() {
        let p = ChannelPatterns::parse(&["orders.user-42.*", "balances.user-42"]).unwrap();
        assert!(p.allows("orders.user-42.fills"));
        assert!(p.allows("orders.user-42.fills.BTC"));
        assert!(!p.allows("orders.user-42"));
        assert!(!p.allows("orders.user-420.fills"));
        assert!(!p.allows("orders.user-43.fills"));
        assert!(p.allows("balances.user-42"));
        assert!(!p.allows("balances.user-42x"));
        assert!(ChannelPatterns::any().allows("anything"));
        assert!(!ChannelPatterns::none().allows("anything"));
    }

    #[test]
    fn rejects_misplaced_wildcards() {
        for bad in ["", "a*", "*.a", "a.*.b", "a.**", ".*", "a.b*"] {
            assert!(ChannelPatterns::parse(&[bad]).is_err(), "{bad:?}");
        }
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert!(ChannelPatterns::parse(&[long]).is_err());
        let many = vec!["a"; MAX_PATTERNS + 1];
        assert!(ChannelPatterns::parse(&many).is_err());
    }

    #[test]
    fn parses_setting_lists() {
        let p = ChannelPatterns::parse_list(" trades.* , book.*,").unwrap();
        assert!(p.allows("trades.BTC-USD"));
        assert!(p.allows("book.ETH-USD"));
        assert!(!p.allows("orders.x"));
        assert!(ChannelPatterns::parse_list("").unwrap().is_empty());
    }
}
