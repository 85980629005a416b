//! Hot reload of a config file: which edits are refused, and what a reload
//! changed, for the log line.
//!
//! An editor that truncates a file and then writes it can be caught by the
//! poll in between, so an empty (or comment-only) file is a bad edit, never
//! "no keys, no routes". A file that really means to drop every key or every
//! route says so with a top-level `allowEmpty: true`, which belongs to the
//! file only: it is not part of the config the operator pushes, nor of its
//! version hash.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{ConfigError, GatewayConfig};

/// The file's switch that lets a reload remove every key or every route.
pub const ALLOW_EMPTY: &str = "allowEmpty";

/// A config file as read from disk.
#[derive(Debug)]
pub enum FileConfig {
    /// Empty, whitespace or comments only: nothing a reload may apply.
    Empty,
    Config {
        config: GatewayConfig,
        /// `allowEmpty: true`: removing every key or route is meant.
        allow_empty: bool,
    },
}

/// Parse a YAML (or JSON) config file, taking `allowEmpty` out of it.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    let parse = |e: serde_yaml::Error| ConfigError::Parse(e.to_string());
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(parse)?;
    let mut map = match value {
        serde_yaml::Value::Null => return Ok(FileConfig::Empty),
        serde_yaml::Value::Mapping(m) => m,
        _ => {
            return Err(ConfigError::Invalid(
                "the config file must be a mapping (keys:, backends:, models: ...)".into(),
            ))
        }
    };
    let allow_empty = match map.remove(ALLOW_EMPTY) {
        None => false,
        Some(serde_yaml::Value::Bool(b)) => b,
        Some(_) => {
            return Err(ConfigError::Invalid(format!(
                "{ALLOW_EMPTY} must be true or false"
            )))
        }
    };
    let config: GatewayConfig =
        serde_yaml::from_value(serde_yaml::Value::Mapping(map)).map_err(parse)?;
    config.validate()?;
    Ok(FileConfig::Config {
        config,
        allow_empty,
    })
}

/// Refuse a reload that would take away every key or every route unless the
/// file says it means it. Configs that had none to begin with pass.
pub fn check_reload(
    old: &GatewayConfig,
    new: &GatewayConfig,
    allow_empty: bool,
) -> Result<(), String> {
    if allow_empty {
        return Ok(());
    }
    let mut gone = Vec::new();
    if !old.keys.is_empty() && new.keys.is_empty() {
        gone.push(format!("every key ({})", old.keys.len()));
    }
    if !old.models.is_empty() && new.models.is_empty() {
        gone.push(format!("every model route ({})", old.models.len()));
    }
    if gone.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the new file removes {}; add `{ALLOW_EMPTY}: true` to it if that is meant",
            gone.join(" and ")
        ))
    }
}

/// What one kind of entry (keys, models, backends) did across a reload.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub total: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Delta {
    fn of<'a, T: PartialEq + 'a>(
        old: impl IntoIterator<Item = (&'a str, &'a T)>,
        new: impl IntoIterator<Item = (&'a str, &'a T)>,
    ) -> Delta {
        let old: BTreeMap<_, _> = old.into_iter().collect();
        let new: BTreeMap<_, _> = new.into_iter().collect();
        let mut d = Delta {
            total: new.len(),
            ..Delta::default()
        };
        for (name, entry) in &new {
            match old.get(name) {
                None => d.added.push((*name).to_owned()),
                Some(before) if before != entry => d.changed.push((*name).to_owned()),
                Some(_) => {}
            }
        }
        d.removed = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .map(|n| (*n).to_owned())
            .collect();
        d
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.total)?;
        for (sign, names) in [
            ("+", &self.added),
            ("-", &self.removed),
            ("~", &self.changed),
        ] {
            if !names.is_empty() {
                write!(f, " {sign}[{}]", names.join(","))?;
            }
        }
        Ok(())
    }
}

/// A reload's effect, by id: keys (their ids, never their hashes), public
/// model names and backend ids. `~` means the entry's settings changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Changes {
    pub keys: Delta,
    pub models: Delta,
    pub backends: Delta,
}

pub fn diff(old: &GatewayConfig, new: &GatewayConfig) -> Changes {
    Changes {
        keys: Delta::of(
            old.keys.iter().map(|k| (k.id.as_str(), k)),
            new.keys.iter().map(|k| (k.id.as_str(), k)),
        ),
        models: Delta::of(
            old.models.iter().map(|m| (m.name.as_str(), m)),
            new.models.iter().map(|m| (m.name.as_str(), m)),
        ),
        backends: Delta::of(
            old.backends.iter().map(|b| (b.id.as_str(), b)),
            new.backends.iter().map(|b| (b.id.as_str(), b)),
        ),
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "keys {}; models {}; backends {}",
            self.keys, self.models, self.backends
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "keys:\n  - { id: team-a, sha256: \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" }\nbackends:\n  - { id: b0, url: \"http://127.0.0.1:1\" }\nmodels:\n  - { name: m, targets: [{ backend: b0 }] }\n";

    fn config(text: &str) -> (GatewayConfig, bool) {
        match parse_file(text).unwrap() {
            FileConfig::Config {
                config,
                allow_empty,
            } => (config, allow_empty),
            FileConfig::Empty => panic!("parsed as empty: {text:?}"),
        }
    }

    #[test]
    fn empty_and_comment_only_files_are_empty_not_a_config() {
        for text in ["", "\n\n", "   ", "# just a comment\n# another\n", "---\n"] {
            assert!(
                matches!(parse_file(text).unwrap(), FileConfig::Empty),
                "{text:?}"
            );
        }
    }

    #[test]
    fn allow_empty_is_taken_out_of_the_file_and_must_be_a_bool() {
        let (c, allow) = config("allowEmpty: true\nkeys: []\n");
        assert!(allow && c.keys.is_empty());
        let (_, allow) = config(FULL);
        assert!(!allow);
        assert!(parse_file("allowEmpty: yes please\n").is_err());
        // Anything else unknown is still refused.
        assert!(parse_file("allowEmpty: true\nkeyz: []\n").is_err());
    }

    #[test]
    fn removing_every_key_or_route_needs_the_switch() {
        let (old, _) = config(FULL);
        let (no_keys, _) = config(&FULL.replace(
            "keys:\n  - { id: team-a, sha256: \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" }\n",
            "",
        ));
        let err = check_reload(&old, &no_keys, false).unwrap_err();
        assert!(
            err.contains("every key (1)") && err.contains("allowEmpty: true"),
            "{err}"
        );
        assert!(check_reload(&old, &no_keys, true).is_ok());
        let (bare, _) = config("backends: []\n");
        let err = check_reload(&old, &bare, false).unwrap_err();
        assert!(
            err.contains("every key") && err.contains("every model route"),
            "{err}"
        );
        // Nothing to remove: a first config, or one that had no keys.
        assert!(check_reload(&GatewayConfig::default(), &bare, false).is_ok());
        assert!(check_reload(&old, &old, false).is_ok());
    }

    #[test]
    fn diff_names_what_was_added_removed_and_changed() {
        let (old, _) = config(FULL);
        let new_text = FULL
            .replace("id: team-a", "id: team-b")
            .replace("http://127.0.0.1:1", "http://127.0.0.1:2")
            + "  - { name: m2, targets: [{ backend: b0 }] }\n";
        let (new, _) = config(&new_text);
        let d = diff(&old, &new);
        assert_eq!(d.keys.added, ["team-b"]);
        assert_eq!(d.keys.removed, ["team-a"]);
        assert_eq!(d.models.added, ["m2"]);
        assert_eq!(d.backends.changed, ["b0"]);
        assert_eq!(
            d.to_string(),
            "keys 1 +[team-b] -[team-a]; models 2 +[m2]; backends 1 ~[b0]"
        );
        // Key material never appears, only ids.
        assert!(!d.to_string().contains("aaaa"));
        assert!(diff(&old, &old).keys.is_empty());
    }
}
