//! The JSON-Schema subset a source declares for its events' payloads.

use super::*;

/// Checks `value` against the parts of JSON Schema an event source uses: `type` (one or a
/// list), `required`, `properties`, `items`, `enum`, `minimum`/`maximum`, `minLength`/`maxLength`.
/// Returns the path and reason of the first violation.
pub fn validate(schema: &Value, value: &Value, path: &str) -> Result<(), (String, String)> {
    let fail = |reason: String| Err((path.to_string(), reason));
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let is = |t: &str| match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => true,
        };
        if !types.is_empty() && !types.iter().any(|t| is(t)) {
            return fail(format!("must be {}", types.join(" or ")));
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(value) {
            return fail(format!("must be one of {}", Value::Array(options.clone())));
        }
    }
    if let (Some(n), Some(min)) = (value.as_f64(), schema.get("minimum").and_then(Value::as_f64)) {
        if n < min {
            return fail(format!("must be at least {min}"));
        }
    }
    if let (Some(n), Some(max)) = (value.as_f64(), schema.get("maximum").and_then(Value::as_f64)) {
        if n > max {
            return fail(format!("must be at most {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|m| len < m) {
            return fail("is too short".into());
        }
        if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| len > m) {
            return fail("is too long".into());
        }
    }
    if let Value::Object(obj) = value {
        if let Some(Value::Array(req)) = schema.get("required") {
            for k in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(k) {
                    return Err((format!("{path}.{k}"), "is required".into()));
                }
            }
        }
        if let Some(Value::Object(props)) = schema.get("properties") {
            for (k, s) in props {
                if let Some(v) = obj.get(k) {
                    validate(s, v, &format!("{path}.{k}"))?;
                }
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(s, v, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}
