//! The partners of the product sync, over HTTP JSON: a [`Source`] (a supplier's paged product
//! catalogue) and a [`Target`] (a storefront that takes price and stock updates). URLs, auth,
//! paths, page size, timeouts and field names are configuration ([`SourceConfig`],
//! [`TargetConfig`]), so a real partner is wired without code. Every request yields an
//! [`Audit`] record (method, URL without secrets, status, duration, error), whatever happens.

mod source;
mod target;

pub use source::{product, Source};
pub use target::{Field, Target};

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::money;
use crate::outbound::{self, Client, OutboundError, Trust};

/// Where the source's fields are, as dotted paths into its JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceFields {
    /// The list of products in a page.
    pub data: String,
    /// Whether another page follows (a boolean); when absent, a full page means "maybe more".
    pub has_more: String,
    pub id: String,
    pub sku: String,
    pub title: String,
    /// RFC 3339 text, or unix seconds / milliseconds as a number.
    pub updated_at: String,
    pub variants: String,
    pub variant_sku: String,
    pub price: String,
    pub stock: String,
}

impl Default for SourceFields {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        SourceFields {
            data: s("data"),
            has_more: s("meta.has_more"),
            id: s("id"),
            sku: s("sku"),
            title: s("title"),
            updated_at: s("updated_at"),
            variants: s("variants"),
            variant_sku: s("sku"),
            price: s("price"),
            stock: s("stock"),
        }
    }
}

impl SourceFields {
    /// Overrides from `name=path` pairs separated by commas (`data=items,updated_at=modified`).
    pub fn parse_overrides(&mut self, text: &str) -> Result<(), String> {
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, path) = pair.split_once('=').ok_or_else(|| format!("expected name=path, got {pair:?}"))?;
            let (name, path) = (name.trim(), path.trim().to_string());
            if path.is_empty() {
                return Err(format!("{name}: empty path"));
            }
            let slot = match name {
                "data" => &mut self.data,
                "has_more" => &mut self.has_more,
                "id" => &mut self.id,
                "sku" => &mut self.sku,
                "title" => &mut self.title,
                "updated_at" => &mut self.updated_at,
                "variants" => &mut self.variants,
                "variant_sku" => &mut self.variant_sku,
                "price" => &mut self.price,
                "stock" => &mut self.stock,
                other => {
                    return Err(format!(
                        "unknown field {other:?} (data, has_more, id, sku, title, updated_at, variants, variant_sku, price, stock)"
                    ))
                }
            };
            *slot = path;
        }
        Ok(())
    }
}

#[derive(Clone, PartialEq)]
pub struct SourceConfig {
    /// Base URL, e.g. `https://supplier.example/api`.
    pub url: String,
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Appended to the base URL: `/products`.
    pub products_path: String,
    pub page_size: u32,
    pub timeout: Duration,
    pub fields: SourceFields,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("products_path", &self.products_path)
            .field("page_size", &self.page_size)
            .field("timeout", &self.timeout)
            .field("fields", &self.fields)
            .finish()
    }
}

impl SourceConfig {
    pub fn new(url: impl Into<String>, token: Option<String>) -> Self {
        SourceConfig {
            url: url.into(),
            token,
            products_path: "/products".into(),
            page_size: 100,
            timeout: Duration::from_secs(10),
            fields: SourceFields::default(),
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct TargetConfig {
    pub url: String,
    pub key: Option<String>,
    /// The header the key goes in.
    pub key_header: String,
    /// Paths with `{sku}` (URL-encoded when filled in).
    pub variant_path: String,
    pub price_path: String,
    pub stock_path: String,
    /// The JSON fields of the update bodies (and of the lookup's answer).
    pub price_field: String,
    pub stock_field: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("url", &redact_url(&self.url))
            .field("key", &self.key.as_ref().map(|_| "***"))
            .field("key_header", &self.key_header)
            .field("variant_path", &self.variant_path)
            .field("price_path", &self.price_path)
            .field("stock_path", &self.stock_path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TargetConfig {
    pub fn new(url: impl Into<String>, key: Option<String>) -> Self {
        TargetConfig {
            url: url.into(),
            key,
            key_header: "X-Api-Key".into(),
            variant_path: "/variants/{sku}".into(),
            price_path: "/variants/{sku}/price".into(),
            stock_path: "/variants/{sku}/stock".into(),
            price_field: "price".into(),
            stock_field: "stock".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A product as the sync handles it: validated, prices in cents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Product {
    pub id: String,
    pub sku: String,
    pub title: String,
    /// As the source wrote it (passed back as `updated_since`).
    pub updated_at: String,
    /// The same in unix ms (for ordering).
    pub updated_ms: i64,
    pub variants: Vec<Variant>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Variant {
    pub sku: String,
    pub price_cents: i64,
    pub stock: i64,
}

impl Product {
    /// The position in the source's order `(updated_at, id)`.
    pub fn key(&self) -> (i64, &str) {
        (self.updated_ms, self.id.as_str())
    }
}

/// A record the source sent that cannot be used: which one (its id when it has one, else its
/// place in the page), why (naming the field), and the record itself.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRecord {
    pub id: Option<String>,
    pub index: usize,
    pub reason: String,
    pub raw: Value,
}

/// One page of the source.
#[derive(Debug)]
pub struct SourcePage {
    pub products: Vec<Product>,
    pub bad: Vec<BadRecord>,
    pub has_more: bool,
    /// Records in the page, good and bad.
    pub len: usize,
}

/// One external request, for the audit log.
#[derive(Clone, Debug, PartialEq)]
pub struct Audit {
    /// `source` or `target`.
    pub partner: &'static str,
    pub method: &'static str,
    /// Without credentials.
    pub url: String,
    /// `None` when no answer came (timeout, connection refused).
    pub status: Option<u16>,
    pub duration_ms: i64,
    pub error: Option<String>,
    /// Unix ms, when the request started.
    pub at: i64,
}

/// Why a request did not do its job.
#[derive(Clone, Debug, PartialEq)]
pub enum CallError {
    /// 429: come back later; not the partner's failure.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, 408, a timeout or a lost connection: worth retrying; counts against the breaker.
    Transient { error: String, retry_after: Option<Duration> },
    /// Any other 4xx or an unusable answer: retrying will not help.
    Permanent(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::RateLimited { retry_after } => write!(f, "rate limited (HTTP 429, retry after {retry_after:?})"),
            CallError::Transient { error, .. } | CallError::Permanent(error) => f.write_str(error),
        }
    }
}

/// The URL as it may be logged (kept for callers of the old name): see
/// [`conveyor_core::redact::url`].
pub use conveyor_core::redact::url as redact_url;

/// The most a partner's answer may weigh: a page of a thousand products with their variants
/// fits many times over; anything larger is refused rather than read into memory.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The partners are the operator's configuration: trusted destinations, but no redirects and
/// capped answers, like every outbound call.
fn client(timeout: Duration) -> Client {
    let settings = outbound::Settings { timeout, connect_timeout: timeout.min(Duration::from_secs(5)), body_limit: BODY_LIMIT };
    Client::new(Trust::Operator, outbound::Policy::default(), settings)
}

use crate::outbound::retry_after;
pub use crate::outbound::MAX_RETRY_AFTER;
use conveyor_core::telemetry::SYNC_REQUESTS;

/// Sends a request and classifies the answer; the audit record is filled in either way.
async fn call(
    client: &Client,
    req: Result<reqwest::RequestBuilder, OutboundError>,
    audit: &mut Audit,
) -> Result<reqwest::Response, CallError> {
    let started = Instant::now();
    let result = match req {
        Ok(req) => client.send(req).await,
        Err(e) => Err(e),
    };
    audit.duration_ms = started.elapsed().as_millis() as i64;
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            // A stored error: the outbound layer keeps internal detail out; credentials of
            // this process are masked in case a server quoted them.
            let error = conveyor_core::redact::scrub(&e.to_string());
            audit.error = Some(error.clone());
            if let OutboundError::Redirect(status) = e {
                audit.status = Some(status);
            }
            let status = audit.status.map_or_else(|| "error".to_string(), |s| s.to_string());
            SYNC_REQUESTS.inc(&[audit.partner, &status]);
            return Err(if e.is_transient() { CallError::Transient { error, retry_after: None } } else { CallError::Permanent(error) });
        }
    };
    let status = resp.status();
    audit.status = Some(status.as_u16());
    SYNC_REQUESTS.inc(&[audit.partner, status.as_str()]);
    if status.is_success() {
        return Ok(resp);
    }
    let after = retry_after(resp.headers());
    let body = outbound::excerpt(resp, 4096, 200).await;
    audit.duration_ms = started.elapsed().as_millis() as i64;
    // A partner's error page may quote what it was sent (our credentials included).
    let error = conveyor_core::redact::scrub(&format!("HTTP {}: {}", status.as_u16(), body));
    audit.error = Some(error.clone());
    Err(match status.as_u16() {
        429 => CallError::RateLimited { retry_after: after },
        408 => CallError::Transient { error, retry_after: after },
        s if s >= 500 => CallError::Transient { error, retry_after: after },
        _ => CallError::Permanent(error),
    })
}

/// A partner's JSON answer, read up to the cap.
async fn json_body(client: &Client, resp: reqwest::Response) -> Result<Value, String> {
    let bytes = client.body(resp).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn audit(partner: &'static str, method: &'static str, url: &str) -> Audit {
    Audit { partner, method, url: redact_url(url), status: None, duration_ms: 0, error: None, at: conveyor_core::clock::now_ms() }
}

/// A value at a dotted path (`meta.has_more`).
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

#[cfg(test)]
mod tests {
    use super::target::fill;
    use super::*;

    #[test]
    fn retry_after_is_capped_at_an_hour() {
        let of = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, v.parse().unwrap());
            retry_after(&h)
        };
        assert_eq!(of("120"), Some(Duration::from_secs(120)));
        assert_eq!(of("99999999999"), Some(MAX_RETRY_AFTER));
        let far = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(30 * 24);
        let far = jiff::fmt::rfc2822::to_string(&far.to_zoned(jiff::tz::TimeZone::UTC)).unwrap();
        assert_eq!(of(&far), Some(MAX_RETRY_AFTER));
        assert_eq!(of("soon"), None);
    }
    use serde_json::json;

    #[test]
    fn records_validate_naming_the_field() {
        let f = SourceFields::default();
        let good = json!({"id": "P1", "sku": "S", "title": "T", "updated_at": "2026-01-02T03:04:05.678Z",
                          "variants": [{"sku": "S-1", "price": 12.5, "stock": 3}, {"sku": "S-2", "price": "0.99", "stock": 0}]});
        let p = product(&f, &good).unwrap();
        assert_eq!(
            p.variants,
            [Variant { sku: "S-1".into(), price_cents: 1250, stock: 3 }, Variant { sku: "S-2".into(), price_cents: 99, stock: 0 }]
        );
        assert_eq!(p.updated_ms, 1_767_323_045_678);
        let bad = |patch: Value| {
            let mut v = good.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            product(&f, &v).unwrap_err()
        };
        assert_eq!(bad(json!({"id": ""})), "id: required (a non-empty string or number)");
        assert!(bad(json!({"updated_at": "yesterday"})).starts_with("updated_at: expected an RFC 3339 time"));
        assert_eq!(bad(json!({"variants": [{"sku": "A", "price": -1, "stock": 1}]})), "variants[0].price: must not be negative");
        assert_eq!(bad(json!({"variants": [{"sku": "A", "price": 1, "stock": 1.5}]})), "variants[0].stock: required (a whole number)");
        assert_eq!(bad(json!({"variants": [{"sku": "A", "price": 1, "stock": -2}]})), "variants[0].stock: must not be negative");
        assert_eq!(bad(json!({"variants": []})), "variants: at least one variant is required");
        assert!(bad(json!({"variants": [{"sku": "A", "price": 1, "stock": 1}, {"sku": "A", "price": 1, "stock": 1}]}))
            .contains("appears twice"));
        assert!(bad(json!({"variants": [{"sku": "A", "price": "1.234", "stock": 1}]})).starts_with("variants[0].price"));
    }

    #[test]
    fn field_mapping_follows_configuration() {
        let mut f = SourceFields::default();
        f.parse_overrides("data=items, updated_at=meta.modified, price=amount").unwrap();
        assert_eq!((f.data.as_str(), f.updated_at.as_str(), f.price.as_str()), ("items", "meta.modified", "amount"));
        assert!(f.parse_overrides("colour=x").unwrap_err().contains("unknown field"));
        let raw = json!({"id": 7, "meta": {"modified": 1_700_000_000}, "variants": [{"sku": "A", "amount": 2, "stock": 1}]});
        let p = product(&f, &raw).unwrap();
        assert_eq!((p.id.as_str(), p.updated_ms, p.variants[0].price_cents), ("7", 1_700_000_000_000, 200));
    }

    #[test]
    fn urls_are_logged_without_credentials() {
        assert_eq!(
            redact_url("https://u:pw@h.example/p?page=2&api_key=s3cret&token=t"),
            "https://u:***@h.example/p?page=2&api_key=***&token=***"
        );
        assert_eq!(fill("/variants/{sku}/price", "A B/1"), "/variants/A%20B%2F1/price");
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn the_target_looks_variants_up_by_sku_and_audits_the_call() {
        let app = axum::Router::new().route(
            "/variants/{sku}",
            get(|axum::extract::Path(sku): axum::extract::Path<String>, h: axum::http::HeaderMap| async move {
                if h.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("k") {
                    return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({}))).into_response();
                }
                match sku.as_str() {
                    "A 1" => axum::Json(serde_json::json!({ "sku": sku, "price": 12.5, "stock": 3 })).into_response(),
                    _ => (axum::http::StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "error": "no such variant" }))).into_response(),
                }
            }),
        );
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let target = Target::new(TargetConfig::new(url.clone(), Some("k".into())));
        let (found, audit) = target.lookup("A 1").await;
        assert_eq!(found, Ok(Some((1250, 3))));
        assert_eq!((audit.method, audit.status, audit.url.as_str()), ("GET", Some(200), format!("{url}/variants/A%201").as_str()));
        let (missing, audit) = target.lookup("B").await;
        assert_eq!((missing, audit.status, audit.error), (Ok(None), Some(404), None), "a missing variant is an answer, not an error");
        let wrong = Target::new(TargetConfig::new(url, Some("nope".into())));
        let (refused, audit) = wrong.lookup("A 1").await;
        assert!(matches!(refused, Err(CallError::Permanent(ref e)) if e.starts_with("HTTP 401")), "{refused:?}");
        assert_eq!(audit.status, Some(401));
    }
}
