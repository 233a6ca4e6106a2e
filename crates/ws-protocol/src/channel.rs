//! Channel names: the only identifiers a client can choose, so they are validated once here.
//!
//! A valid name is 1 to [`MAX_CHANNEL_LEN`] bytes from `A-Z a-z 0-9 . _ - : @`. The set is
//! small on purpose: names appear verbatim in JSON, logs and Kafka-derived mappings, and a
//! name from this set never needs escaping anywhere.

use std::fmt;
use std::sync::Arc;

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChannel {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {len} bytes; the limit is {MAX_CHANNEL_LEN}")]
    TooLong { len: usize },
    #[error("channel name contains {found:?}; allowed are A-Z a-z 0-9 . _ - : @")]
    BadCharacter { found: char },
}

/// Returns whether `b` may appear in a channel name.
#[inline]
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@')
}

/// Checks `name` against the channel-name rules.
pub fn validate(name: &str) -> Result<(), InvalidChannel> {
    if name.is_empty() {
        return Err(InvalidChannel::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(InvalidChannel::TooLong { len: name.len() });
    }
    match name
        .chars()
        .find(|c| !c.is_ascii() || !is_channel_byte(*c as u8))
    {
        Some(found) => Err(InvalidChannel::BadCharacter { found }),
        None => Ok(()),
    }
}

/// A validated channel name; cheap to clone (shared `Arc<str>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates and wraps `name`.
    pub fn new(name: &str) -> Result<Self, InvalidChannel> {
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ChannelName {
    type Error = InvalidChannel;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_documented_examples() {
        for ok in [
            "trades.BTC-USD",
            "book:ETH_USD",
            "a",
            "user@desk-1",
            &"x".repeat(128),
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(validate(""), Err(InvalidChannel::Empty));
        assert_eq!(
            validate(&"x".repeat(129)),
            Err(InvalidChannel::TooLong { len: 129 })
        );
        assert_eq!(
            validate("a b"),
            Err(InvalidChannel::BadCharacter { found: ' ' })
        );
        assert_eq!(
            validate("a/b"),
            Err(InvalidChannel::BadCharacter { found: '/' })
        );
        assert_eq!(
            validate("é"),
            Err(InvalidChannel::BadCharacter { found: 'é' })
        );
        assert_eq!(
            validate("a\"b"),
            Err(InvalidChannel::BadCharacter { found: '"' })
        );
    }

    proptest! {
        #[test]
        fn validation_matches_the_documented_rule(s in "\\PC{0,140}") {
            let expected = !s.is_empty() && s.len() <= MAX_CHANNEL_LEN
                && s.bytes().all(is_channel_byte);
            prop_assert_eq!(validate(&s).is_ok(), expected);
        }
    }
}
