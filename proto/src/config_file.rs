//! The config-file loader every Detour binary shares: TOML, overridden by environment
//! variables, with every unknown key and every bad value reported at once.
//!
//! An environment variable `{PREFIX}{PATH}` overrides the key at `PATH`, where `PATH` is the
//! key's dotted path in upper case with `__` between levels: with the sidecar's prefix
//! `DETOUR_SIDECAR__`, `DETOUR_SIDECAR__ADMIN__LISTEN=127.0.0.1:9990` sets `[admin] listen`. The
//! value is read as a TOML value when it parses as one (`5`, `true`, `"x"`), else as a plain
//! string. Variables without the prefix are not looked at; one with the prefix that names no
//! key is reported as a warning, never as an error (only the file's own keys must all be
//! known).

use serde::de::DeserializeOwned;

/// Everything wrong with one config, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({source_name}):\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    /// Where the config came from (a file path, or "defaults").
    pub source_name: String,
    /// One line per problem.
    pub problems: Vec<String>,
}

/// A parsed config and the problems found on the way (unknown keys of the file, bad environment
/// variables): the caller adds its own validation problems and reports them all together.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The parsed value (unknown keys ignored).
    pub value: T,
    /// Problems that did not stop parsing.
    pub problems: Vec<String>,
    /// Environment variables with the prefix that name no key (to log; they stop nothing).
    pub warnings: Vec<String>,
}

impl<T> Loaded<T> {
    /// Merges the caller's validation of `value` with the problems found while loading.
    pub fn validate<C>(
        self,
        source_name: &str,
        check: impl FnOnce(T) -> Result<C, Vec<String>>,
    ) -> Result<C, ConfigError> {
        let mut problems = self.problems;
        match check(self.value) {
            Ok(c) if problems.is_empty() => Ok(c),
            Ok(_) => Err(ConfigError {
                source_name: source_name.to_owned(),
                problems,
            }),
            Err(more) => {
                problems.extend(more);
                Err(ConfigError {
                    source_name: source_name.to_owned(),
                    problems,
                })
            }
        }
    }

    /// [`Loaded::validate`], then gives the config the environment's warnings (`keep` stores
    /// them, to be logged at start).
    pub fn validate_keeping_warnings<C>(
        self,
        source_name: &str,
        check: impl FnOnce(T) -> Result<C, Vec<String>>,
        keep: impl FnOnce(&mut C, Vec<String>),
    ) -> Result<C, ConfigError> {
        let warnings = self.warnings.clone();
        let mut config = self.validate(source_name, check)?;
        keep(&mut config, warnings);
        Ok(config)
    }
}

/// The text of the config file at `path`, and the name its problems are reported under (the
/// path); a file that cannot be read is an error with that one problem.
pub fn read(path: &std::path::Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((name, text)),
        Err(e) => Err(ConfigError {
            source_name: name,
            problems: vec![format!("cannot read: {e}")],
        }),
    }
}

/// Parses `text` (TOML) as `T`, after applying environment overrides from `env` whose names
/// start with `prefix`. Unknown keys anywhere are collected in [`Loaded::problems`]; a value of
/// the wrong type or broken TOML is an error at once.
pub fn load<T: DeserializeOwned>(
    source_name: &str,
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    load_with(source_name, text, prefix, env, true)
}

/// [`load`] for a reader of *another* program's config (the watchdog reading the sidecar's
/// file): `T` names only the keys it needs, and every other key — of the file or the
/// environment — is the other program's business, so it is neither a problem nor a warning.
/// A known key with a bad value is still an error.
pub fn load_known<T: DeserializeOwned>(
    source_name: &str,
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    load_with(source_name, text, prefix, env, false)
}

fn load_with<T: DeserializeOwned>(
    source_name: &str,
    text: &str,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
    report_unknown: bool,
) -> Result<Loaded<T>, ConfigError> {
    let fail = |problems| ConfigError {
        source_name: source_name.to_owned(),
        problems,
    };
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(vec![e.to_string()]))?;
    let mut problems = Vec::new();
    let mut from_env: Vec<(String, String)> = Vec::new();
    for (name, value) in env {
        let Some(path) = name.strip_prefix(prefix) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            problems.push(format!("environment variable {name}: empty key"));
            continue;
        }
        let parsed = parse_env_value(&value);
        if let Err(e) = set_path(&mut root, &keys, parsed) {
            problems.push(format!("environment variable {name}: {e}"));
        }
        from_env.push((keys.join("."), name));
    }
    let mut unknown = Vec::new();
    let value = toml::Value::Table(root);
    let result: Result<T, _> = serde_ignored::deserialize(value, |path| {
        unknown.push(path.to_string());
    });
    let mut warnings = Vec::new();
    if !report_unknown {
        unknown.clear();
    }
    for path in unknown {
        // An unknown table made by a variable is reported by its own path or a parent's.
        let var = from_env.iter().find(|(p, _)| {
            *p == path || p.starts_with(&format!("{path}.")) || path.starts_with(&format!("{p}."))
        });
        match var {
            Some((_, name)) => warnings.push(format!(
                "environment variable {name} names no configuration key (ignored)"
            )),
            None => problems.push(format!("unknown key `{path}`")),
        }
    }
    match result {
        Ok(value) => Ok(Loaded {
            value,
            problems,
            warnings,
        }),
        Err(e) => {
            problems.push(e.to_string());
            Err(fail(problems))
        }
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.to_owned())),
        Err(_) => toml::Value::String(value.to_owned()),
    }
}

fn set_path(root: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut table = root;
    for k in parents {
        let entry = table
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a table"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Admin {
        listen: String,
        port: u16,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Cfg {
        host: String,
        admin: Admin,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file() {
        let cfg: Cfg = load(
            "t",
            "host = \"a\"\n[admin]\nlisten = \"x\"\n",
            "D_",
            env(&[("D_ADMIN__PORT", "99"), ("D_HOST", "b"), ("OTHER", "1")]),
        )
        .unwrap()
        .validate("t", Ok)
        .unwrap();
        assert_eq!(cfg.host, "b");
        assert_eq!(cfg.admin.listen, "x");
        assert_eq!(cfg.admin.port, 99);
    }

    #[test]
    fn every_unknown_key_of_the_file_is_reported_and_the_environment_only_warns() {
        let loaded = load::<Cfg>(
            "t",
            "hots = \"a\"\n[admin]\nlisten = \"x\"\nlsten = 1\n",
            "D_",
            env(&[("D_ADMN__X", "1"), ("D_ADMIN__PRT", "2"), ("D_HOST", "h")]),
        )
        .unwrap();
        let warnings = loaded.warnings.join("\n");
        for v in ["D_ADMN__X", "D_ADMIN__PRT"] {
            assert!(warnings.contains(v), "{v} missing from {warnings}");
        }
        let err = loaded
            .validate("t", |_| Err::<(), _>(vec!["own check".to_string()]))
            .unwrap_err();
        let text = err.to_string();
        for k in ["hots", "admin.lsten", "own check"] {
            assert!(text.contains(k), "{k} missing from {text}");
        }
        assert!(!text.contains("ADMN") && !text.contains("admn"), "{text}");
    }

    #[test]
    fn a_reader_of_known_keys_ignores_the_others() {
        let loaded = load_known::<Cfg>(
            "t",
            "host = \"a\"\nnew_key = 1\n[new_section]\nx = 2\n[admin]\nlisten = \"x\"\nlater = true\n",
            "D_",
            env(&[("D_OTHER__KEY", "1"), ("D_HOST", "b")]),
        )
        .unwrap();
        assert!(loaded.problems.is_empty() && loaded.warnings.is_empty());
        assert_eq!(loaded.value.host, "b");
        assert!(load_known::<Cfg>("t", "[admin]\nport = \"no\"\n", "D_", env(&[])).is_err());
    }

    #[test]
    fn bad_values_and_syntax_are_reported() {
        let err = load::<Cfg>("t", "[admin]\nport = \"nope\"\n", "D_", env(&[])).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = load::<Cfg>("t", "host = ", "D_", env(&[])).unwrap_err();
        assert_eq!(err.problems.len(), 1);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_one_problem_named_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let e = read(&missing).unwrap_err();
        assert_eq!(e.source_name, missing.display().to_string());
        assert_eq!(e.problems.len(), 1);
        assert!(e.problems[0].starts_with("cannot read: "), "{e:?}");
        let there = dir.path().join("there.toml");
        std::fs::write(&there, "a = 1\n").unwrap();
        let (name, text) = read(&there).unwrap();
        assert_eq!(
            (name.as_str(), text.as_str()),
            (there.to_str().unwrap(), "a = 1\n")
        );
    }
}
