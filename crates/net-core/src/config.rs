//! Configuration plumbing shared by the two binaries: defaults < TOML file < environment <
//! flags, merged with figment into a settings type, plus a deserializer for list values that
//! arrive either as TOML arrays or as comma-separated environment strings.
//!
//! Only the binaries call this; core crates take typed, validated configs.

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

/// Merges `defaults`, the TOML `file` (if given), each environment provider in order, and
/// the command-line `flags` (fields serialized only when given), then extracts `T`.
pub fn load<T, F>(
    defaults: T,
    file: Option<&Path>,
    envs: Vec<Env>,
    flags: &F,
) -> Result<T, LoadError>
where
    T: Serialize + DeserializeOwned,
    F: Serialize,
{
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.exists() {
            return Err(LoadError::MissingFile(path.display().to_string()));
        }
        fig = fig.merge(Toml::file(path));
    }
    for env in envs {
        fig = fig.merge(env);
    }
    fig.merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| LoadError::Invalid(Box::new(e)))
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

    #[test]
    fn missing_file_is_an_error() {
        let err = load(
            S { items: vec![] },
            Some(Path::new("/nonexistent.toml")),
            vec![],
            &(),
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::MissingFile(_)));
    }
}
