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

/// Renders `template` over `context`. Strict: a variable the context lacks is an error naming
/// it, never an empty string. `html` escapes the values (for an email's HTML part).
pub fn render(template: &str, context: &Value, html: bool) -> Result<String, String> {
    // Templates are compiled once and kept (keyed by their text) in one environment per
    // escaping mode: a rule's template is rendered for every event it matches.
    static ENVS: OnceLock<[Mutex<Environment<'static>>; 2]> = OnceLock::new();
    let envs = ENVS.get_or_init(|| {
        let make = |html: bool| {
            let mut env = Environment::new();
            env.set_undefined_behavior(UndefinedBehavior::Strict);
            env.set_auto_escape_callback(move |_| if html { AutoEscape::Html } else { AutoEscape::None });
            Mutex::new(env)
        };
        [make(false), make(true)]
    });
    let mut env = envs[html as usize].lock().unwrap_or_else(|e| e.into_inner());
    if env.get_template(template).is_err() {
        if env.templates().count() >= 1_000 {
            env.clear_templates();
        }
        env.add_template_owned(template.to_string(), template.to_string()).map_err(|e| e.to_string())?;
    }
    let t = env.get_template(template).map_err(|e| e.to_string())?;
    t.render(context).map_err(|e| describe(&e, template, context))
}

/// Checks that `template` parses.
pub fn check(template: &str) -> Result<(), String> {
    let env = Environment::new();
    env.template_from_str(template).map(|_| ()).map_err(|e| e.to_string())
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
}
