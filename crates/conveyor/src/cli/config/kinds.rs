//! `[[kinds]]` tables: HTTP kinds (with `url`), and entries without one that set the defaults
//! (queue, attempts, timeout) of another kind's jobs (built-in, Rust or remote).

use std::time::Duration;

use anyhow::{bail, Context};
use conveyor_apps::kinds::HttpKind;
use conveyor_core::ratelimit::RateLimit;
use conveyor_core::KindOptions;

use super::source::{parse_duration, scalar_text};

/// Defaults set without a URL for another kind's jobs ([`conveyor_core::Registry::route`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KindDefaults {
    pub(crate) kind: String,
    pub(crate) options: KindOptions,
}

const HTTP_KEYS: &[&str] = &[
    "name",
    "url",
    "queue",
    "timeout",
    "secret",
    "listen",
    "concurrency",
    "rate_limit",
    "breaker_failures",
    "breaker_open_for",
    "max_attempts",
    "concurrency_key",
    "concurrency_limit",
    "fairness_key",
];

/// The keys of an entry without `url`.
const DEFAULT_KEYS: &[&str] = &["name", "queue", "max_attempts", "timeout", "concurrency_key", "concurrency_limit", "fairness_key"];

pub(crate) fn kinds(file: &toml::Table) -> anyhow::Result<(Vec<HttpKind>, Vec<KindDefaults>)> {
    let Some(list) = file.get("kinds") else { return Ok((Vec::new(), Vec::new())) };
    let list = list.as_array().context("kinds: expected [[kinds]] tables")?;
    let (mut http, mut queues) = (Vec::new(), Vec::<KindDefaults>::new());
    for (i, item) in list.iter().enumerate() {
        let t = item.as_table().with_context(|| format!("kinds[{i}]: expected a table"))?;
        for key in t.keys() {
            if !HTTP_KEYS.contains(&key.as_str()) {
                bail!("kinds[{i}].{key}: unknown key (expected one of {})", HTTP_KEYS.join(", "));
            }
        }
        let text = |key: &str| -> anyhow::Result<Option<String>> {
            match t.get(key) {
                None => Ok(None),
                Some(v) => v.as_str().map(|s| Some(s.to_string())).with_context(|| format!("kinds[{i}].{key}: expected a string")),
            }
        };
        let name = text("name")?.with_context(|| format!("kinds[{i}].name: required"))?;
        let attempts = match t.get("max_attempts") {
            None => None,
            Some(v) => Some(
                v.as_integer()
                    .filter(|n| (1..=1000).contains(n))
                    .with_context(|| format!("kinds[{i}].max_attempts: expected a whole number from 1 to 1000"))? as u32,
            ),
        };
        // `concurrency_key`: a dotted path into the payload; `concurrency_limit`: 1 unless set.
        let rule = match (text("concurrency_key")?, t.get("concurrency_limit")) {
            (None, None) => None,
            (None, Some(_)) => bail!("kinds[{i}].concurrency_limit: needs concurrency_key"),
            (Some(path), limit) => {
                let limit = match limit {
                    None => 1,
                    Some(v) => v.as_integer().filter(|n| (1..=conveyor_core::flow::MAX_LIMIT as i64).contains(n)).with_context(|| {
                        format!("kinds[{i}].concurrency_limit: expected a whole number from 1 to {}", conveyor_core::flow::MAX_LIMIT)
                    })? as u32,
                };
                Some(conveyor_core::flow::Rule::new(path, limit).map_err(|e| anyhow::anyhow!("kinds[{i}].concurrency_key: {e}"))?)
            }
        };
        // `fairness_key`: a dotted path into the payload (`conveyor_core::fair`).
        let fairness = text("fairness_key")?;
        if let Some(path) = &fairness {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                bail!("kinds[{i}].fairness_key: expected a dotted path into the payload such as customer_id, got {path:?}");
            }
        }
        let Some(url) = text("url")? else {
            if let Some(key) = t.keys().find(|k| !DEFAULT_KEYS.contains(&k.as_str())) {
                bail!("kinds[{i}].{key}: only an HTTP kind (with url) has it");
            }
            let queue = text("queue")?;
            if let Some(q) = &queue {
                conveyor_core::job::validate_queue_name(q).map_err(|e| anyhow::anyhow!("kinds[{i}].queue: {e}"))?;
            }
            let timeout = match t.get("timeout") {
                None => None,
                Some(v) => {
                    Some(parse_duration(&scalar_text(v)).with_context(|| format!("kinds[{i}].timeout: expected a duration like 30s"))?)
                }
            };
            if queue.is_none() && attempts.is_none() && timeout.is_none() && rule.is_none() && fairness.is_none() {
                bail!(
                    "kinds[{i}]: without url, an entry sets queue, max_attempts, timeout, concurrency_key or fairness_key for the kind's jobs"
                );
            }
            if queues.iter().any(|q| q.kind == name) {
                bail!("kinds[{i}].name: {name:?} is declared twice");
            }
            queues.push(KindDefaults {
                kind: name,
                options: KindOptions { queue, max_attempts: attempts, timeout, concurrency: rule, fairness },
            });
            continue;
        };
        let mut k = HttpKind::new(name, url);
        k.max_attempts = attempts;
        k.concurrency_key = rule;
        k.fairness_key = fairness;
        if let Some(q) = text("queue")? {
            k.queue = q;
        }
        if let Some(v) = t.get("timeout") {
            k.timeout = parse_duration(&scalar_text(v)).with_context(|| format!("kinds[{i}].timeout: expected a duration like 30s"))?;
        }
        if let Some(v) = t.get("breaker_open_for") {
            k.breaker_open_for =
                parse_duration(&scalar_text(v)).with_context(|| format!("kinds[{i}].breaker_open_for: expected a duration like 30s"))?;
        }
        k.secrets = match t.get("secret") {
            None => Vec::new(),
            Some(toml::Value::String(s)) => vec![s.clone()],
            Some(toml::Value::Array(a)) => a
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("kinds[{i}].secret: expected a string or a list of strings"))?,
            Some(_) => bail!("kinds[{i}].secret: expected a string or a list of strings"),
        };
        k.listen = match t.get("listen") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                .with_context(|| format!("kinds[{i}].listen: expected a list of event names"))?,
        };
        let int = |key: &str| -> anyhow::Result<Option<i64>> {
            match t.get(key) {
                None => Ok(None),
                Some(v) => {
                    v.as_integer().filter(|n| *n >= 1).map(Some).with_context(|| format!("kinds[{i}].{key}: expected a positive integer"))
                }
            }
        };
        if let Some(n) = int("concurrency")? {
            k.concurrency = n as usize;
        }
        if let Some(n) = int("breaker_failures")? {
            k.breaker_failures = n.min(u32::MAX as i64) as u32;
        }
        if let Some(v) = t.get("rate_limit") {
            k.rate_limit = Some(RateLimit::parse(&scalar_text(v)).map_err(|e| anyhow::anyhow!("kinds[{i}].rate_limit: {e}"))?);
        }
        k.timeout = k.timeout.max(Duration::from_millis(1));
        k.validate().map_err(|e| anyhow::anyhow!("kinds[{i}].{e}"))?;
        http.push(k);
    }
    for (i, k) in http.iter().enumerate() {
        if http[..i].iter().any(|o| o.name == k.name) || queues.iter().any(|q| q.kind == k.name) {
            bail!("kinds: {:?} is declared twice", k.name);
        }
    }
    Ok((http, queues))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<(Vec<HttpKind>, Vec<KindDefaults>)> {
        kinds(&text.parse().unwrap())
    }

    #[test]
    fn http_kinds_read_with_their_defaults_and_errors_name_the_field() {
        let (http, queues) = parse(
            "[[kinds]]\nname = \"send_receipt\"\nurl = \"http://127.0.0.1:9000/jobs\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nlisten = [\"order.placed\"]\nrate_limit = \"50/1\"\ntimeout = \"5s\"\n\
             [[kinds]]\nname = \"resize\"\nqueue = \"images\"\nmax_attempts = 7\ntimeout = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(http.len(), 1);
        let k = &http[0];
        assert_eq!((k.name.as_str(), k.queue.as_str(), k.concurrency), ("send_receipt", "send_receipt", 64));
        assert_eq!(k.timeout, Duration::from_secs(5));
        assert_eq!(k.listen, vec!["order.placed"]);
        assert_eq!(k.rate_limit.unwrap().limit, 50);
        let options = KindOptions {
            queue: Some("images".into()),
            max_attempts: Some(7),
            timeout: Some(Duration::from_secs(120)),
            concurrency: None,
            fairness: None,
        };
        assert_eq!(queues, vec![KindDefaults { kind: "resize".into(), options }]);

        // A concurrency key on an HTTP kind and on another kind's defaults; the limit is 1
        // unless set.
        let (http, queues) = parse(
            "[[kinds]]\nname = \"call\"\nurl = \"http://127.0.0.1:9000/\"\nconcurrency_key = \"shop.id\"\nconcurrency_limit = 3\n\
             [[kinds]]\nname = \"resize\"\nconcurrency_key = \"customer_id\"\n",
        )
        .unwrap();
        assert_eq!(http[0].concurrency_key, Some(conveyor_core::flow::Rule::new("shop.id", 3).unwrap()));
        assert_eq!(queues[0].options.concurrency, Some(conveyor_core::flow::Rule::new("customer_id", 1).unwrap()));

        // A fairness key (a payload path) on an HTTP kind and on another kind's defaults.
        let (http, queues) = parse(
            "[[kinds]]\nname = \"call\"\nurl = \"http://127.0.0.1:9000/\"\nfairness_key = \"shop.id\"\n\
             [[kinds]]\nname = \"resize\"\nfairness_key = \"customer_id\"\n",
        )
        .unwrap();
        assert_eq!(http[0].fairness_key.as_deref(), Some("shop.id"));
        assert_eq!(queues[0].options.fairness.as_deref(), Some("customer_id"));

        for (text, field) in [
            ("[[kinds]]\nurl = \"http://x\"\n", "kinds[0].name"),
            ("[[kinds]]\nname = \"a\"\nurl = \"ftp://x\"\n", "kinds[0].url"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nsecret = \"hunter2\"\n", "kinds[0].secret[0]"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nconcurrency = 0\n", "kinds[0].concurrency"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\ntimeout = \"soon\"\n", "kinds[0].timeout"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nrate_limit = \"fast\"\n", "kinds[0].rate_limit"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nretries = 3\n", "kinds[0].retries: unknown key"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nconcurrency_key = \"c..d\"\n", "kinds[0].concurrency_key"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nconcurrency_limit = 2\n", "kinds[0].concurrency_limit: needs concurrency_key"),
            ("[[kinds]]\nname = \"a\"\nconcurrency_key = \"c\"\nconcurrency_limit = 0\n", "kinds[0].concurrency_limit"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\nfairness_key = \"c.\"\n", "kinds[0].fairness_key: expected a dotted path"),
            ("[[kinds]]\nname = \"a\"\nqueue = \"q\"\nlisten = [\"e\"]\n", "kinds[0].listen: only an HTTP kind"),
            ("[[kinds]]\nname = \"a\"\nmax_attempts = 0\n", "kinds[0].max_attempts"),
            ("[[kinds]]\nname = \"a\"\n", "kinds[0]: without url"),
            ("[[kinds]]\nname = \"conveyor.x\"\nurl = \"http://x\"\n", "kinds[0].name"),
            ("[[kinds]]\nname = \"a\"\nurl = \"http://x\"\n[[kinds]]\nname = \"a\"\nurl = \"http://y\"\n", "declared twice"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text:?}: {e}");
        }
    }
}
