//! What a Redis must be set up for to hold the queue. Under `maxmemory` with a policy other than
//! `noeviction`, Redis drops keys to make room, and a queue's keys are jobs: they would vanish
//! without a trace, so such a Redis is refused at open. A Redis that persists nothing (no AOF,
//! no RDB save points) loses every queued job when it restarts; that may be a deliberate choice
//! (a disposable queue), so it is a warning, logged at open and shown by the health check.

use redis::{Connection, RedisResult, Value};

use conveyor_core::backend::{BackendError, Result};

use super::conn::{pairs, text};

/// What was read of the server's configuration; `None` where it could not be read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) maxmemory_policy: Option<String>,
    /// Whether the server writes anything to disk (an AOF or RDB save points).
    pub(crate) persists: Option<bool>,
    /// How the settings were read, for messages.
    pub(crate) appendonly: Option<String>,
    pub(crate) save: Option<String>,
}

/// Reads the settings with `CONFIG GET`, or from `INFO` where `CONFIG` is renamed or disabled
/// (managed Redis services often do that).
pub(crate) fn read(c: &mut Connection) -> RedisResult<Settings> {
    let config = (|| -> RedisResult<(Option<String>, Option<String>, Option<String>)> {
        Ok((config_get(c, "maxmemory-policy")?, config_get(c, "appendonly")?, config_get(c, "save")?))
    })();
    match config {
        Ok((policy, appendonly, save)) => {
            let persists = match (&appendonly, &save) {
                (Some(a), Some(s)) => Some(a == "yes" || !s.trim().is_empty()),
                _ => None,
            };
            Ok(Settings { maxmemory_policy: policy, persists, appendonly, save })
        }
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => Err(e),
        Err(_) => {
            let policy = info_field(c, "memory", "maxmemory_policy")?;
            // INFO tells whether an AOF is on but not the RDB save points: without the AOF,
            // whether anything persists is unknown, and nothing is claimed.
            let aof = info_field(c, "persistence", "aof_enabled")?;
            let persists = (aof.as_deref() == Some("1")).then_some(true);
            Ok(Settings { maxmemory_policy: policy, persists, appendonly: None, save: None })
        }
    }
}

/// Refuses a Redis that may evict keys; returns the warnings for one that persists nothing.
/// `shown` is the server's URL as it may be shown.
pub(crate) fn judge(settings: &Settings, shown: &str) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    match settings.maxmemory_policy.as_deref() {
        Some("noeviction") => {}
        Some(policy) => {
            return Err(BackendError::Invalid(format!(
                "Redis at {shown}: maxmemory-policy is {policy}: queued jobs would be evicted silently; set maxmemory-policy noeviction"
            )))
        }
        None => warnings.push(format!(
            "Redis at {shown}: could not read maxmemory-policy (CONFIG and INFO refused); it must be noeviction, or queued jobs may be evicted silently"
        )),
    }
    if settings.persists == Some(false) {
        let save = settings.save.as_deref().unwrap_or_default();
        warnings.push(format!(
            "Redis at {shown} persists nothing (appendonly no, save \"{save}\"): a restart of Redis loses every queued job; set appendonly yes"
        ));
    }
    Ok(warnings)
}

fn config_get(c: &mut Connection, name: &str) -> RedisResult<Option<String>> {
    let v: Value = redis::cmd("CONFIG").arg("GET").arg(name).query(c)?;
    Ok(pairs(v).into_iter().find(|(k, _)| k == name).map(|(_, v)| text(&v)))
}

fn info_field(c: &mut Connection, section: &str, field: &str) -> RedisResult<Option<String>> {
    let info: String = redis::cmd("INFO").arg(section).query(c)?;
    let prefix = format!("{field}:");
    Ok(info.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::{judge, Settings};

    fn settings(policy: Option<&str>, persists: Option<bool>) -> Settings {
        Settings { maxmemory_policy: policy.map(String::from), persists, appendonly: Some("no".into()), save: Some(String::new()) }
    }

    #[test]
    fn eviction_is_refused_and_no_persistence_warned_about() {
        let err = judge(&settings(Some("allkeys-lru"), Some(true)), "redis://h:6379").unwrap_err().to_string();
        assert!(err.contains("maxmemory-policy is allkeys-lru") && err.contains("set maxmemory-policy noeviction"), "{err}");
        assert_eq!(judge(&settings(Some("noeviction"), Some(true)), "r").unwrap(), Vec::<String>::new());
        let w = judge(&settings(Some("noeviction"), Some(false)), "r").unwrap();
        assert!(w.len() == 1 && w[0].contains("persists nothing"), "{w:?}");
        // Unknown persistence (CONFIG disabled, no AOF) claims nothing; an unknown policy warns.
        assert!(judge(&settings(Some("noeviction"), None), "r").unwrap().is_empty());
        assert_eq!(judge(&settings(None, None), "r").unwrap().len(), 1);
    }
}
