//! Configuration plumbing shared by the two binaries: defaults < TOML file < environment <
//! flags, merged with figment into a settings type, plus a deserializer for list values that
//! arrive either as TOML arrays or as comma-separated environment strings.
//!
//! Only the binaries call this; core crates take typed, validated configs.
//!
//! The environment is shared with everything else the operator runs (a `Makefile`'s own
//! variables, a load tool's `WS_URL`), so a variable that carries our prefix but names no
//! setting is ignored and reported once, never fatal. A config file is ours alone: an unknown
//! key there stays an error, as does a bad value anywhere.

use std::collections::BTreeSet;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// Where settings come from in the environment.
#[derive(Debug, Clone, Copy)]
pub struct EnvSources<'a> {
    /// `<PREFIX><KEY>` sets `key` (case-insensitive), e.g. `LB_` for ws-lb.
    pub prefix: &'a str,
    /// Unprefixed names that set the key of the same name (lowercased), read before the
    /// prefixed ones so that a prefixed variable wins.
    pub raw: &'a [&'a str],
}

/// Settings and what was ignored on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    pub settings: T,
    /// Environment variables with our prefix that name no setting (sorted, as written).
    pub ignored_env: Vec<String>,
}

impl<T> Loaded<T> {
    /// Logs one warning naming every ignored variable. Call once tracing is set up.
    pub fn warn_ignored(&self) {
        if !self.ignored_env.is_empty() {
            tracing::warn!(
                variables = %self.ignored_env.join(", "),
                "ignoring environment variables with our prefix that name no setting"
            );
        }
    }
}

/// Merges `defaults`, the TOML `file` (if given), the environment (`env`: only variables
/// that name a key of `T`), and the command-line `flags` (fields serialized only when given),
/// then extracts `T`.
pub fn load<T, F>(
    defaults: T,
    file: Option<&Path>,
    env: EnvSources<'_>,
    flags: &F,
) -> Result<Loaded<T>, LoadError>
where
    T: Serialize + DeserializeOwned,
    F: Serialize,
{
    load_from(defaults, file, env, flags, std::env::vars_os())
}

/// [`load`] with the environment's variable names given (tests).
fn load_from<T, F>(
    defaults: T,
    file: Option<&Path>,
    env: EnvSources<'_>,
    flags: &F,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Loaded<T>, LoadError>
where
    T: Serialize + DeserializeOwned,
    F: Serialize,
{
    let known = keys_of(&defaults)?;
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.exists() {
            return Err(LoadError::MissingFile(path.display().to_string()));
        }
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::raw().only(env.raw));
    let known_env = known.clone();
    fig = fig.merge(
        Env::prefixed(env.prefix)
            .filter(move |k| known_env.contains(&k.as_str().to_ascii_lowercase())),
    );
    let settings = fig
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| LoadError::Invalid(Box::new(e)))?;
    Ok(Loaded {
        settings,
        ignored_env: unknown_prefixed(vars, env.prefix, &known),
    })
}

/// The top-level keys `defaults` serializes to.
fn keys_of<T: Serialize>(defaults: &T) -> Result<BTreeSet<String>, LoadError> {
    let value =
        figment::value::Value::serialize(defaults).map_err(|e| LoadError::Invalid(Box::new(e)))?;
    Ok(value
        .into_dict()
        .map(|d| d.into_keys().collect())
        .unwrap_or_default())
}

/// Names of variables that start with `prefix` (case-insensitively, as figment matches) and
/// name no key in `known`.
fn unknown_prefixed(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    prefix: &str,
    known: &BTreeSet<String>,
) -> Vec<String> {
    let mut out: Vec<String> = vars
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            name.len() > prefix.len()
                && name.is_char_boundary(prefix.len())
                && name[..prefix.len()].eq_ignore_ascii_case(prefix)
                && !known.contains(&name[prefix.len()..].to_ascii_lowercase())
        })
        .collect();
    out.sort();
    out
}

/// Deserializes `"a, b"` (environment) as well as `["a", "b"]` (TOML, flags) into a list.
pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct S {
        #[serde(deserialize_with = "list")]
        items: Vec<String>,
    }

    #[test]
    fn lists_from_strings_and_arrays() {
        let from_str: S = serde_json::from_str(r#"{"items":"a, b,,c "}"#).unwrap();
        assert_eq!(from_str.items, ["a", "b", "c"]);
        let from_arr: S = serde_json::from_str(r#"{"items":["x y"]}"#).unwrap();
        assert_eq!(from_arr.items, ["x y"]);
    }

    const NO_ENV: EnvSources<'static> = EnvSources {
        prefix: "NET_CORE_TEST_NONE_",
        raw: &[],
    };

    #[test]
    fn missing_file_is_an_error() {
        let err = load(
            S { items: vec![] },
            Some(Path::new("/nonexistent.toml")),
            NO_ENV,
            &(),
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::MissingFile(_)));
    }

    #[test]
    fn unknown_prefixed_variables_are_listed_not_fatal() {
        let vars = [
            ("T_ITEMS", "a"),
            ("T_PORT", "1"),
            ("t_url", "x"),
            ("T_", "empty key"),
            ("OTHER_PORT", "2"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let known: BTreeSet<String> = ["items".to_owned()].into();
        assert_eq!(
            unknown_prefixed(vars.into_iter(), "T_", &known),
            ["T_PORT", "t_url"]
        );
    }
}
