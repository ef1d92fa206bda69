//! Where a setting comes from: the environment first (`CONVEYOR_SECTION_KEY`), then the
//! configuration file; errors name the variable or the file's key.

use std::time::Duration;

use anyhow::{bail, Context};

/// Looks a key up in the environment first, then in the file.
pub(super) struct Source {
    pub(super) file: toml::Table,
}

impl Source {
    pub(super) fn env_name(section: &str, key: &str) -> String {
        if section.is_empty() {
            format!("CONVEYOR_{}", key.to_uppercase())
        } else {
            format!("CONVEYOR_{}_{}", section.to_uppercase(), key.to_uppercase())
        }
    }

    /// The raw value and the name to blame if it is wrong.
    pub(super) fn get(&self, section: &str, key: &str) -> Option<(String, String)> {
        let env = Self::env_name(section, key);
        if let Ok(v) = std::env::var(&env) {
            return Some((v, env));
        }
        let table = if section.is_empty() { Some(&self.file) } else { self.file.get(section)?.as_table() };
        let text = scalar_text(table?.get(key)?);
        let name = if section.is_empty() { key.to_string() } else { format!("[{section}] {key}") };
        Some((text, format!("{name} in the configuration file")))
    }

    pub(super) fn string(&self, section: &str, key: &str, default: &str) -> String {
        self.get(section, key).map(|(v, _)| v).unwrap_or_else(|| default.to_string())
    }

    /// A key whose variable does not follow the `CONVEYOR_SECTION_KEY` rule (the role tokens:
    /// `CONVEYOR_READ_TOKEN` is `[api] read_token`).
    pub(super) fn named(&self, env: &str, section: &str, key: &str) -> Option<String> {
        if let Ok(v) = std::env::var(env) {
            return Some(v).filter(|v| !v.is_empty());
        }
        let text = scalar_text(self.file.get(section)?.as_table()?.get(key)?);
        Some(text).filter(|v| !v.is_empty())
    }

    pub(super) fn optional(&self, section: &str, key: &str) -> Option<String> {
        self.get(section, key).map(|(v, _)| v).filter(|v| !v.is_empty())
    }

    pub(super) fn parsed<T: std::str::FromStr>(&self, section: &str, key: &str, default: T, what: &str) -> anyhow::Result<T> {
        match self.get(section, key) {
            None => Ok(default),
            Some((v, name)) => v.trim().parse::<T>().map_err(|_| anyhow::anyhow!("{name}: expected {what}, got {v:?}")),
        }
    }

    pub(super) fn duration(&self, section: &str, key: &str, default: Duration) -> anyhow::Result<Duration> {
        match self.get(section, key) {
            None => Ok(default),
            Some((v, name)) => parse_duration(&v).with_context(|| format!("{name}: expected a duration like 30s, 15m or 1h, got {v:?}")),
        }
    }
}

/// A scalar's text, as an environment variable would carry it.
pub(super) fn scalar_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// `30` (seconds), `500ms`, `30s`, `15m`, `1h`.
pub(crate) fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (num, unit) = t.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((t, ""), |i| t.split_at(i));
    let n: f64 = num.parse().with_context(|| format!("not a number: {num:?}"))?;
    if !n.is_finite() || n < 0.0 {
        bail!("must be a positive number");
    }
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => bail!("unknown unit {other:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}
