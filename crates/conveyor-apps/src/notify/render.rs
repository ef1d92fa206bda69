//! Rule conditions over an event's payload, and strict templates.

use std::sync::{Mutex, OnceLock};

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{path, op, value?}`: `path` is dotted (`customer.address.city`; a number indexes an array).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Condition {
    pub path: String,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

pub const OPS: [&str; 8] = ["eq", "ne", "in", "gt", "gte", "lt", "lte", "exists"];

impl Condition {
    /// Why this condition cannot be evaluated, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.path.trim().is_empty() {
            return Some("path: is empty".into());
        }
        if !OPS.contains(&self.op.as_str()) {
            return Some(format!("op: must be one of {}", OPS.join(", ")));
        }
        match (self.op.as_str(), &self.value) {
            ("exists", Some(v)) if !v.is_boolean() => Some("value: exists takes true or false (or nothing)".into()),
            ("exists", _) => None,
            ("in", Some(Value::Array(_))) => None,
            ("in", _) => Some("value: `in` needs an array".into()),
            (_, None) => Some(format!("value: `{}` needs a value", self.op)),
            _ => None,
        }
    }

    pub fn holds(&self, payload: &Value) -> bool {
        let found = lookup(payload, &self.path);
        match self.op.as_str() {
            "exists" => found.is_some_and(|v| !v.is_null()) == self.value.as_ref().and_then(Value::as_bool).unwrap_or(true),
            "eq" => found.zip(self.value.as_ref()).is_some_and(|(a, b)| same(a, b)),
            "ne" => !found.zip(self.value.as_ref()).is_some_and(|(a, b)| same(a, b)),
            "in" => match (found, &self.value) {
                (Some(a), Some(Value::Array(list))) => list.iter().any(|b| same(a, b)),
                _ => false,
            },
            op => match (found, &self.value) {
                (Some(a), Some(b)) => match order(a, b) {
                    Some(o) => match op {
                        "gt" => o.is_gt(),
                        "gte" => o.is_ge(),
                        "lt" => o.is_lt(),
                        "lte" => o.is_le(),
                        _ => false,
                    },
                    None => false,
                },
                _ => false,
            },
        }
    }
}

/// The value at a dotted path.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, key| match cur {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Equality that lets `1` equal `1.0` and `"5"`… no: numbers equal numbers, strings strings.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// The largest template text accepted (subject, body, recipient or digest key).
pub const MAX_SOURCE: usize = 64 * 1024;

/// The most a render may write; more is an error, not a truncated message.
pub const MAX_OUTPUT: usize = 256 * 1024;

/// The most instructions one render may run (MiniJinja's fuel). A welcome email takes a few
/// dozen, a digest of 1,000 events about 15,000; 200,000 burn in a few milliseconds, so a
/// template that loops without bound fails fast instead of holding a worker (or, before
/// rendering left it, the SQLite writer).
pub const FUEL: u64 = 200_000;

/// Renders `template` over `context`. Strict: a variable the context lacks is an error naming
/// it, never an empty string. `html` escapes the values (for an email's HTML part). Bounded:
/// over [`MAX_SOURCE`], [`FUEL`] or [`MAX_OUTPUT`] is an error saying which.
pub fn render(template: &str, context: &Value, html: bool) -> Result<String, String> {
    too_long(template)?;
    // Templates are compiled once and kept (keyed by their text) in one environment per
    // escaping mode: a rule's template is rendered for every event it matches.
    static ENVS: OnceLock<[Mutex<Environment<'static>>; 2]> = OnceLock::new();
    let envs = ENVS.get_or_init(|| [Mutex::new(environment(html_escape(false))), Mutex::new(environment(html_escape(true)))]);
    // The lock is held while rendering: renders are bounded by the fuel, and a per-render
    // clone of the environment would cost more than the wait.
    let mut env = envs[html as usize].lock().unwrap_or_else(|e| e.into_inner());
    if env.get_template(template).is_err() {
        if env.templates().count() >= 1_000 {
            env.clear_templates();
        }
        env.add_template_owned(template.to_string(), template.to_string()).map_err(|e| e.to_string())?;
    }
    let t = env.get_template(template).map_err(|e| e.to_string())?;
    let mut out = Capped(Vec::new());
    let result = t.render_captured_to(context, &mut out).map(drop);
    match result {
        Ok(_) => String::from_utf8(out.0).map_err(|_| "the rendered text is not UTF-8".to_string()),
        Err(e) if e.kind() == minijinja::ErrorKind::WriteFailure => Err(format!("the rendered text is over {} KiB", MAX_OUTPUT / 1024)),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            Err(format!("the template does too much work (over {FUEL} steps); loop over less"))
        }
        Err(e) => Err(describe(&e, template, context)),
    }
}

/// Checks that `template` parses and is not too long.
pub fn check(template: &str) -> Result<(), String> {
    too_long(template)?;
    let env = environment(html_escape(false));
    env.template_from_str(template).map(|_| ()).map_err(|e| e.to_string())
}

fn too_long(template: &str) -> Result<(), String> {
    if template.len() > MAX_SOURCE {
        return Err(format!("is over {} KiB", MAX_SOURCE / 1024));
    }
    Ok(())
}

fn html_escape(html: bool) -> impl Fn(&str) -> AutoEscape + Send + Sync + 'static {
    move |_| if html { AutoEscape::Html } else { AutoEscape::None }
}

fn environment(escape: impl Fn(&str) -> AutoEscape + Send + Sync + 'static) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(escape);
    env.set_fuel(Some(FUEL));
    env
}

/// A writer that refuses to grow past [`MAX_OUTPUT`]: the render stops at the first write
/// over it.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders done ahead of a transaction, so the transaction (on SQLite, the one writer thread
/// every job's acknowledgement waits for) only looks them up. A render asked for that was not
/// done ahead (a rule or user changed in between) is done then, bounded as every render is.
#[derive(Default)]
pub struct Prerendered(Vec<(String, bool, Value, Result<String, String>)>);

impl Prerendered {
    pub fn add(&mut self, template: &str, context: &Value, html: bool) {
        if !self.0.iter().any(|(t, h, c, _)| t == template && *h == html && c == context) {
            let result = render(template, context, html);
            self.0.push((template.to_string(), html, context.clone(), result));
        }
    }

    pub fn render(&self, template: &str, context: &Value, html: bool) -> Result<String, String> {
        match self.0.iter().find(|(t, h, c, _)| t == template && *h == html && c == context) {
            Some((.., result)) => result.clone(),
            None => {
                tracing::debug!("a template rendered in its transaction: it changed since it was prerendered");
                render(template, context, html)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A render error; for an undefined variable, the first `{{ path }}` the context lacks.
fn describe(e: &minijinja::Error, template: &str, context: &Value) -> String {
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        let missing = template.split("{{").skip(1).filter_map(|part| part.split("}}").next()).map(str::trim).find(|expr| {
            let path = expr.split('|').next().unwrap_or("").trim();
            !path.is_empty() && path.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.') && lookup(context, path).is_none()
        });
        if let Some(path) = missing {
            return format!("missing variable `{}`", path.split('|').next().unwrap_or("").trim());
        }
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(path: &str, op: &str, value: Option<Value>) -> Condition {
        Condition { path: path.into(), op: op.into(), value }
    }

    #[test]
    fn conditions_on_nested_paths() {
        let p = json!({ "order": { "total": 120.5, "country": "FR", "items": [{ "sku": "A" }] }, "vip": true });
        assert!(c("order.total", "gt", Some(json!(100))).holds(&p));
        assert!(!c("order.total", "lt", Some(json!(100))).holds(&p));
        assert!(c("order.total", "gte", Some(json!(120.5))).holds(&p));
        assert!(c("order.country", "in", Some(json!(["FR", "DE"]))).holds(&p));
        assert!(!c("order.country", "in", Some(json!(["US"]))).holds(&p));
        assert!(c("order.country", "eq", Some(json!("FR"))).holds(&p));
        assert!(c("order.country", "ne", Some(json!("US"))).holds(&p));
        assert!(c("order.items.0.sku", "eq", Some(json!("A"))).holds(&p));
        assert!(c("vip", "exists", None).holds(&p));
        assert!(c("missing.path", "exists", Some(json!(false))).holds(&p));
        assert!(!c("missing.path", "eq", Some(json!(1))).holds(&p));
        assert!(c("missing.path", "ne", Some(json!(1))).holds(&p), "a missing value is not equal to anything");
        assert!(!c("order.country", "gt", Some(json!(1))).holds(&p), "strings and numbers do not compare");
        assert_eq!(c("x", "near", Some(json!(1))).problem().unwrap(), "op: must be one of eq, ne, in, gt, gte, lt, lte, exists");
        assert!(c("x", "in", Some(json!(1))).problem().is_some());
    }

    #[test]
    fn templates_are_strict_and_escape_for_html() {
        let ctx = json!({ "name": "Ada <3", "customer": { "name": "Bo" } });
        assert_eq!(render("Hi {{ name }} & {{ customer.name }}", &ctx, false).unwrap(), "Hi Ada <3 & Bo");
        assert_eq!(render("Hi {{ name }}", &ctx, true).unwrap(), "Hi Ada &lt;3");
        let err = render("Hi {{ nickname }}", &ctx, false).unwrap_err();
        assert!(err.contains("nickname"), "{err}");
        let err = render("Hi {{ customer.age }}", &ctx, false).unwrap_err();
        assert!(err.contains("customer.age"), "{err}");
        assert!(check("{{ unclosed").is_err());
    }

    #[test]
    fn renders_are_bounded_in_work_output_and_size() {
        let ctx = json!({ "events": (0..1000).map(|i| json!({ "payload": { "order_id": i } })).collect::<Vec<_>>() });
        let digest = "{% for e in events %}- order {{ e.payload.order_id }}\n{% endfor %}";
        assert!(render(digest, &ctx, false).is_ok(), "a digest of 1,000 events fits the fuel");

        let started = std::time::Instant::now();
        let err = render("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", &ctx, false).unwrap_err();
        assert!(err.contains("too much work"), "{err}");
        let err = render("{% for i in range(1000000000) %}x{% endfor %}", &ctx, false).unwrap_err();
        assert!(err.contains("range") || err.contains("too much work"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "hostile templates fail fast: {:?}", started.elapsed());

        let err = render("{% for i in range(50000) %}{{ 'abcdefghij' }}{% endfor %}", &ctx, false).unwrap_err();
        assert!(err.contains("256 KiB"), "{err}");
        let err = render("{{ 'x' * 1000000 }}", &ctx, false).unwrap_err();
        assert!(err.contains("256 KiB"), "{err}");

        let long = "x".repeat(MAX_SOURCE + 1);
        assert_eq!(check(&long).unwrap_err(), "is over 64 KiB");
        assert!(render(&long, &ctx, false).is_err());
        assert!(check(&"x".repeat(MAX_SOURCE)).is_ok());
    }

    #[test]
    fn prerendered_renders_are_looked_up_and_others_rendered_then() {
        let ctx = json!({ "name": "Ada" });
        let mut pre = Prerendered::default();
        pre.add("Hi {{ name }}", &ctx, false);
        pre.add("Hi {{ name }}", &ctx, false);
        assert_eq!(pre.len(), 1, "the same render is done once");
        assert_eq!(pre.render("Hi {{ name }}", &ctx, false).unwrap(), "Hi Ada");
        assert_eq!(pre.render("Hi {{ name }}", &json!({ "name": "Bo" }), false).unwrap(), "Hi Bo", "another context renders then");
        assert!(pre.render("Hi {{ nickname }}", &ctx, false).is_err());
    }
}
