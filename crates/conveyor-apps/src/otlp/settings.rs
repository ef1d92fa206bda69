//! The exporter's configuration from the standard OpenTelemetry variables
//! ([`Settings::from_vars`]), and why it cannot start ([`OtlpError`]).

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};

use super::{SCOPE, VERSION};

/// Why the exporter cannot start: which variable is wrong, and how. Never a header's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtlpError {
    /// A variable's value is malformed or out of range.
    #[error("{var}: {reason}")]
    Invalid { var: String, reason: String },
    /// `grpc`, `http/json` or another protocol than `http/protobuf`.
    #[error("{var}={value:?} is not supported: traces are exported over OTLP/HTTP with protobuf (`http/protobuf`) only")]
    UnsupportedProtocol { var: String, value: String },
    /// `OTEL_TRACES_EXPORTER` names an exporter other than `otlp` or `none`.
    #[error("{var}={value:?} is not supported: `otlp` or `none`")]
    UnsupportedExporter { var: String, value: String },
    /// Called outside a Tokio runtime.
    #[error("the OTLP exporter needs a Tokio runtime to run on")]
    NoRuntime,
    /// The HTTP client could not be built.
    #[error("the OTLP exporter's HTTP client: {0}")]
    Client(String),
    /// Another exporter was installed first.
    #[error("a trace exporter is already installed")]
    AlreadyInstalled,
}

pub(super) fn invalid(var: &str, reason: impl Into<String>) -> OtlpError {
    OtlpError::Invalid { var: var.to_string(), reason: reason.into() }
}

/// What the exporter is configured with. `Debug` shows header names, never their values.
#[derive(Clone)]
pub struct Settings {
    /// The URL spans are `POST`ed to (`…/v1/traces`).
    pub endpoint: String,
    /// Extra request headers (an API key…), by lower-case name.
    pub headers: Vec<(String, String)>,
    /// How long one request may take.
    pub timeout: Duration,
    /// How long one batch may take, retries included.
    pub export_timeout: Duration,
    /// How often queued spans are sent (at least every [`MIN_SCHEDULE_DELAY`]).
    pub schedule_delay: Duration,
    /// The most spans waiting; more are dropped.
    pub max_queue_size: usize,
    /// The most spans in one request.
    pub max_export_batch_size: usize,
    /// The resource's attributes (`service.name` first).
    pub resource: Vec<(String, String)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &redact_url(&self.endpoint))
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("export_timeout", &self.export_timeout)
            .field("schedule_delay", &self.schedule_delay)
            .field("max_queue_size", &self.max_queue_size)
            .field("max_export_batch_size", &self.max_export_batch_size)
            .field("resource", &self.resource)
            .finish()
    }
}

// The variables read (OpenTelemetry's names).
const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
const TRACES_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION";
const SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
const EXPORT_TIMEOUT: &str = "OTEL_BSP_EXPORT_TIMEOUT";
const MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";

impl Settings {
    /// Defaults (OpenTelemetry's, but `service.name` is `conveyor`) for `endpoint`, the full URL.
    pub fn new(endpoint: impl Into<String>) -> Settings {
        Settings {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            export_timeout: Duration::from_secs(30),
            schedule_delay: Duration::from_secs(5),
            max_queue_size: 2048,
            max_export_batch_size: 512,
            resource: vec![
                ("service.name".into(), "conveyor".into()),
                ("service.version".into(), VERSION.into()),
                ("telemetry.sdk.name".into(), SCOPE.into()),
                ("telemetry.sdk.language".into(), "rust".into()),
                ("telemetry.sdk.version".into(), VERSION.into()),
            ],
        }
    }

    /// The settings the OpenTelemetry variables among `vars` (name, value) give; `None` when
    /// export is off: no endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. An
    /// empty value counts as unset, as OpenTelemetry specifies.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Option<Settings>, OtlpError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(_, v)| !v.as_ref().trim().is_empty())
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().trim().to_string()))
            .collect();
        let get = |name: &str| vars.get(name).map(String::as_str);
        // The more specific variable wins, and is the one an error names.
        let either = |specific: &'static str, general: &'static str| match get(specific) {
            Some(v) => Some((specific, v)),
            None => get(general).map(|v| (general, v)),
        };

        if let Some(v) = get(SDK_DISABLED) {
            match v.to_ascii_lowercase().as_str() {
                "true" => return Ok(None),
                "false" => {}
                _ => return Err(invalid(SDK_DISABLED, "must be true or false")),
            }
        }
        if let Some(v) = get(TRACES_EXPORTER) {
            let names: Vec<String> = v.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect();
            if let Some(other) = names.iter().find(|n| *n != "otlp" && *n != "none") {
                return Err(OtlpError::UnsupportedExporter { var: TRACES_EXPORTER.into(), value: other.clone() });
            }
            if !names.iter().any(|n| n == "otlp") {
                return Ok(None);
            }
        }
        let endpoint = match (get(TRACES_ENDPOINT), get(ENDPOINT)) {
            (Some(url), _) => {
                check_url(TRACES_ENDPOINT, url)?;
                url.to_string()
            }
            (None, Some(base)) => {
                check_url(ENDPOINT, base)?;
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        if let Some((var, v)) = either(TRACES_PROTOCOL, PROTOCOL) {
            if v != "http/protobuf" {
                return Err(OtlpError::UnsupportedProtocol { var: var.into(), value: v.into() });
            }
        }
        if let Some((var, v)) = either(TRACES_COMPRESSION, COMPRESSION) {
            match v {
                "none" => {}
                "gzip" => tracing::warn!("{var}=gzip: traces are sent uncompressed (only `none` is supported)"),
                _ => return Err(invalid(var, "must be none or gzip")),
            }
        }

        let mut s = Settings::new(endpoint);
        for var in [HEADERS, TRACES_HEADERS] {
            if let Some(v) = get(var) {
                for (k, v) in pairs(var, v)? {
                    let k = k.to_ascii_lowercase();
                    header(var, &k, &v)?;
                    s.headers.retain(|(name, _)| *name != k);
                    s.headers.push((k, v));
                }
            }
        }
        if let Some((var, v)) = either(TRACES_TIMEOUT, TIMEOUT) {
            s.timeout = positive(var, millis(var, v)?)?;
        }
        if let Some(v) = get(EXPORT_TIMEOUT) {
            s.export_timeout = positive(EXPORT_TIMEOUT, millis(EXPORT_TIMEOUT, v)?)?;
        }
        if let Some(v) = get(SCHEDULE_DELAY) {
            s.schedule_delay = millis(SCHEDULE_DELAY, v)?;
        }
        if let Some(v) = get(MAX_QUEUE_SIZE) {
            s.max_queue_size = count(MAX_QUEUE_SIZE, v)?;
        }
        if let Some(v) = get(MAX_EXPORT_BATCH_SIZE) {
            s.max_export_batch_size = count(MAX_EXPORT_BATCH_SIZE, v)?;
        }
        // A batch is never larger than the queue (OpenTelemetry's rule).
        s.max_export_batch_size = s.max_export_batch_size.min(s.max_queue_size);
        if let Some(v) = get(RESOURCE_ATTRIBUTES) {
            for (k, v) in pairs(RESOURCE_ATTRIBUTES, v)? {
                set_attr(&mut s.resource, k, v);
            }
        }
        if let Some(v) = get(SERVICE_NAME) {
            set_attr(&mut s.resource, "service.name".into(), v.to_string());
        }
        Ok(Some(s))
    }

    /// `endpoint` without user information or query, for logs.
    pub fn endpoint_for_logs(&self) -> String {
        redact_url(&self.endpoint)
    }
}

fn set_attr(attrs: &mut Vec<(String, String)>, k: String, v: String) {
    match attrs.iter_mut().find(|(name, _)| *name == k) {
        Some(slot) => slot.1 = v,
        None => attrs.push((k, v)),
    }
}

pub(super) fn check_url(var: &str, v: &str) -> Result<(), OtlpError> {
    let url = url::Url::parse(v).map_err(|e| invalid(var, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(var, "must be an http:// or https:// URL"));
    }
    Ok(())
}

fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

fn millis(var: &str, v: &str) -> Result<Duration, OtlpError> {
    v.parse::<u64>().map(Duration::from_millis).map_err(|_| invalid(var, "must be a whole number of milliseconds"))
}

fn positive(var: &str, d: Duration) -> Result<Duration, OtlpError> {
    if d.is_zero() {
        return Err(invalid(var, "must be above 0"));
    }
    Ok(d)
}

fn count(var: &str, v: &str) -> Result<usize, OtlpError> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid(var, "must be a whole number above 0")),
    }
}

/// `k=v,k2=v2` (W3C Baggage without properties), keys and values percent-decoded. Errors name
/// the entry by position, never by content (a header's value is a secret).
fn pairs(var: &str, list: &str) -> Result<Vec<(String, String)>, OtlpError> {
    let mut out = Vec::new();
    for (i, item) in list.split(',').enumerate().filter(|(_, item)| !item.trim().is_empty()) {
        let n = i + 1;
        let (k, v) = item.split_once('=').ok_or_else(|| invalid(var, format!("entry {n} is not key=value")))?;
        let k = percent_decode(k.trim()).ok_or_else(|| invalid(var, format!("entry {n}: the key is not valid percent-encoded UTF-8")))?;
        let v = percent_decode(v.trim()).ok_or_else(|| invalid(var, format!("entry {n}: the value is not valid percent-encoded UTF-8")))?;
        if k.is_empty() {
            return Err(invalid(var, format!("entry {n} has an empty key")));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A header as sent; the error names the header, never its value.
pub(super) fn header(var: &str, k: &str, v: &str) -> Result<(HeaderName, HeaderValue), OtlpError> {
    let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| invalid(var, format!("{k:?} is not a valid header name")))?;
    let value = HeaderValue::from_str(v).map_err(|_| invalid(var, format!("the value of header {k:?} is not a valid header value")))?;
    Ok((name, value))
}
