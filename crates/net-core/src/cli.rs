//! The command line as one layer of a binary's settings.
//!
//! Each binary defines every setting once, as a field of one struct that derives both
//! `clap::Args` (the flag, its help text, its default as `--help` shows it) and serde (the
//! TOML key and the environment variable, merged by [`crate::config::load`]). clap fills in
//! every field, given or not, so the parsed struct alone cannot tell `--x 5` from a default
//! of 5; [`CommandLine`] keeps only the flags that were given, so that a flag beats the
//! environment and the file but a default does not.

use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Command, FromArgMatches};
use figment::value::{Dict, Value};
use serde::Serialize;

use crate::config::LoadError;

/// The settings given on the command line, as the top figment layer: a map holding only
/// the keys whose flag was given.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct CommandLine(Dict);

impl CommandLine {
    /// The fields of `parsed` (parsed from `matches`) whose flag was given. A field's key
    /// is its clap argument id, which clap's derive takes from the field name, as serde
    /// does.
    pub fn new<S: Serialize>(parsed: &S, matches: &ArgMatches) -> Result<Self, LoadError> {
        let value = Value::serialize(parsed).map_err(|e| LoadError::Invalid(Box::new(e)))?;
        let given = value
            .into_dict()
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| matches.value_source(key) == Some(ValueSource::CommandLine))
            .collect();
        Ok(Self(given))
    }

    /// The keys given on the command line.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// The defaults of a settings struct: what clap makes of an empty command line. This is the
/// only place defaults come from, so `--help`, `Default` and the runbook test agree.
pub fn defaults<S: Args + FromArgMatches>() -> S {
    let matches = S::augment_args(Command::new("defaults")).try_get_matches_from(["defaults"]);
    #[allow(
        clippy::expect_used,
        reason = "static data: every default is parsed by the settings' own unit tests"
    )]
    matches
        .and_then(|m| S::from_arg_matches(&m))
        .expect("every setting's default parses")
}

/// A duration as flags, files and `--help` write it: `250ms`, `5s`, `1m`.
pub fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Flags of `settings` (a serialized settings struct) that `--help` (`long_help`, from
/// `render_long_help`) shows without a description or without a default; lists that are
/// empty by default show none. For a test in each binary.
pub fn help_gaps(long_help: &str, settings: &serde_json::Value) -> Vec<String> {
    let mut gaps = Vec::new();
    for (key, value) in settings.as_object().into_iter().flatten() {
        let flag = format!("--{}", key.replace('_', "-"));
        let Some(at) = long_help.find(&format!("{flag} ")) else {
            gaps.push(format!("{flag}: not in --help"));
            continue;
        };
        let entry = long_help.get(at..).unwrap_or_default();
        // An entry runs to the next line that starts a flag.
        let end = entry
            .get(2..)
            .and_then(|e| e.find("\n  -"))
            .map_or(entry.len(), |e| e + 2);
        let entry = entry.get(..end).unwrap_or_default();
        if entry.trim_end().lines().count() < 2 {
            gaps.push(format!("{flag}: no description"));
        }
        let empty_list = value.as_array().is_some_and(Vec::is_empty);
        if !empty_list && !entry.contains("[default: ") {
            gaps.push(format!("{flag}: no default shown"));
        }
    }
    gaps
}

/// The table of `binary`'s settings in the runbook: the text under `### <binary>` in the
/// `## Configuration` section, up to the next heading (empty when there is none).
pub fn runbook_table<'a>(runbook: &'a str, binary: &str) -> &'a str {
    let section = runbook
        .find("\n## Configuration\n")
        .and_then(|at| runbook.get(at + 1..))
        .unwrap_or_default();
    let heading = format!("\n### {binary}\n");
    let Some(table) = section
        .find(&heading)
        .and_then(|at| section.get(at + heading.len()..))
    else {
        return "";
    };
    table
        .find("\n#")
        .and_then(|end| table.get(..end))
        .unwrap_or(table)
}

/// Keys of `settings` (a serialized settings struct) whose row in `table` (a runbook section:
/// `| `key` | default | meaning |`) is missing or gives another default. Durations compare as
/// durations (`60s` is `1m`); an empty list must be documented as `(...)`; a cell may go on
/// after the value (`0 (auto)`). For a test in each binary.
pub fn runbook_gaps(table: &str, settings: &serde_json::Value) -> Vec<String> {
    let mut gaps = Vec::new();
    for (key, value) in settings.as_object().into_iter().flatten() {
        let row = format!("| `{key}` | ");
        let Some(at) = table.find(&row) else {
            gaps.push(format!("{key}: missing"));
            continue;
        };
        let cell = table
            .get(at + row.len()..)
            .and_then(|r| r.split(" |").next())
            .unwrap_or_default();
        let default = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(a) if a.is_empty() => "(".into(),
            v => v.to_string(),
        };
        let first = cell.split_whitespace().next().unwrap_or_default();
        let same = match (
            humantime::parse_duration(first),
            humantime::parse_duration(&default),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => cell.starts_with(&default),
        };
        if !same {
            gaps.push(format!(
                "{key}: runbook says {cell:?}, the code {default:?}"
            ));
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, Deserialize)]
    struct S {
        /// A number.
        #[arg(long, default_value_t = 7)]
        n: u32,
        /// A duration.
        #[arg(long, value_parser = humantime::parse_duration, default_value = human(Duration::from_millis(250)))]
        #[serde(with = "humantime_serde")]
        wait: Duration,
        /// A switch.
        #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        on: bool,
    }

    fn given(args: &[&str]) -> Vec<String> {
        use clap::CommandFactory;
        let m = S::command()
            .try_get_matches_from(std::iter::once("s").chain(args.iter().copied()))
            .unwrap();
        let s = S::from_arg_matches(&m).unwrap();
        CommandLine::new(&s, &m)
            .unwrap()
            .keys()
            .map(String::from)
            .collect()
    }

    #[test]
    fn only_given_flags_are_a_layer() {
        assert!(given(&[]).is_empty());
        assert_eq!(
            given(&["--n", "7"]),
            ["n"],
            "given, even when equal to the default"
        );
        assert_eq!(given(&["--wait", "1s", "--on"]), ["on", "wait"]);
    }

    #[test]
    fn help_and_runbook_checks_find_gaps() {
        use clap::CommandFactory;
        let settings = serde_json::json!({"n": 7, "wait": "250ms", "on": false, "list": []});
        let help = S::command().render_long_help().to_string();
        assert_eq!(help_gaps(&help, &settings), ["--list: not in --help"]);
        let table = "| `n` | 7 | a |\n| `wait` | 250ms | b |\n| `on` | true | c |\n| `list` | (empty) | d |";
        assert_eq!(
            runbook_gaps(table, &settings),
            ["on: runbook says \"true\", the code \"false\""]
        );
        assert!(runbook_gaps("| `n` | 7 (auto) |", &serde_json::json!({"n": 7})).is_empty());
        assert!(runbook_gaps("| `w` | 60s |", &serde_json::json!({"w": "1m"})).is_empty());
        let runbook = "# R\n### a\n| `n` | 1 |\n## Configuration\ntext\n### a\n| `n` | 7 |\n### b\n| `n` | 8 |\n## Next\n";
        assert_eq!(runbook_table(runbook, "a"), "| `n` | 7 |");
        assert_eq!(runbook_table(runbook, "b"), "| `n` | 8 |");
        assert_eq!(runbook_table(runbook, "c"), "");
    }

    #[test]
    fn defaults_come_from_the_attributes() {
        let d: S = defaults();
        assert_eq!((d.n, d.wait, d.on), (7, Duration::from_millis(250), false));
        assert_eq!(human(Duration::from_secs(60)), "1m");
    }
}
