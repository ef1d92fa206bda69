//! What a caller may see: JSON answers filtered of secrets in one place, job payloads and stored
//! errors included.

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use conveyor_core::redact;

/// The largest answer filtered in memory (lists are at most 1,000 items; bigger answers are
/// not JSON documents of this API).
const MAX_FILTERED: usize = 64 * 1024 * 1024;

/// What [`redact_response`] takes out of an answer.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Filter {
    /// The credentials this process was configured with, wherever they appear.
    Credentials,
    /// Those, and every credential-like field, for callers who may see no secret.
    Secrets,
}

/// Filters a JSON answer: credential-like fields become `***`, webhook and Slack URLs their
/// origin and `…`, any other URL loses its password and secret query parameters (for
/// [`Filter::Secrets`]), and the process's registered credentials are masked (always). One
/// place, so every endpoint (job payloads and stored errors included) is covered.
pub(crate) async fn redact_response(res: Response, filter: Filter) -> Response {
    let is_json = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FILTERED).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "response too large to filter").into_response();
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if filter == Filter::Secrets {
        redact_value(&mut v, None);
    }
    scrub_value(&mut v);
    let out = serde_json::to_vec(&v).expect("JSON serializes");
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

fn scrub_value(v: &mut Value) {
    match v {
        Value::Object(map) => map.values_mut().for_each(scrub_value),
        Value::Array(items) => items.iter_mut().for_each(scrub_value),
        Value::String(s) => {
            let clean = redact::scrub(s);
            if clean != *s {
                *s = clean;
            }
        }
        _ => {}
    }
}

fn redact_value(v: &mut Value, key: Option<&str>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                redact_value(child, Some(k));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| redact_value(i, key)),
        Value::String(s) => {
            let k = key.unwrap_or("").to_ascii_lowercase();
            let secret_key =
                ["secret", "token", "password", "passwd", "api_key", "apikey", "credential", "authorization"].iter().any(|w| k.contains(w));
            let is_url = s.starts_with("http://") || s.starts_with("https://");
            if secret_key && !s.is_empty() {
                *s = redact::MASK.to_string();
            } else if is_url && (k.contains("webhook") || k.contains("slack") || k == "recipient" || k == "url") {
                *s = redact::origin(s);
            } else if s.contains("://") {
                *s = redact::text(s, &redact::Secrets::new());
            }
        }
        _ => {}
    }
}

/// The migrations of the server's own tables (dashboard sessions); `serve` and `migrate` run them.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_filtered_of_secrets_for_non_admins() {
        let mut v = serde_json::json!({"data": [{
            "webhook_url": "https://hooks.example.com/T0/B0/abc", "slack_webhook": "https://hooks.slack.com/services/X",
            "secret": "whsec_abc", "api_token": "t", "recipient": "ann@example.com",
            "payload": {"recipient": "https://u:p@partner.example/hook?key=k", "note": "see postgres://u:pw@db/x"}
        }]});
        redact_value(&mut v, None);
        let d = &v["data"][0];
        assert_eq!(d["webhook_url"], "https://hooks.example.com/…");
        assert_eq!(d["slack_webhook"], "https://hooks.slack.com/…");
        assert_eq!(d["secret"], "***");
        assert_eq!(d["api_token"], "***");
        assert_eq!(d["recipient"], "ann@example.com");
        assert_eq!(d["payload"]["recipient"], "https://partner.example/…");
        assert_eq!(d["payload"]["note"], "see postgres://u:***@db/x");
    }
}
