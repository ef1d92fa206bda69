//! The target partner: variants looked up, price and stock `PUT` with an idempotency key.

use super::*;

/// Which of a variant's values an update sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Price,
    Stock,
}

impl Field {
    pub fn as_str(&self) -> &'static str {
        match self {
            Field::Price => "price",
            Field::Stock => "stock",
        }
    }
}

/// The storefront.
#[derive(Clone)]
pub struct Target {
    config: TargetConfig,
    client: Client,
}

pub(super) fn fill(path: &str, sku: &str) -> String {
    let encoded: String = sku
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    path.replace("{sku}", &encoded)
}

impl Target {
    pub fn new(config: TargetConfig) -> Self {
        let client = client(config.timeout);
        Target { config, client }
    }

    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    fn url(&self, path: &str, sku: &str) -> String {
        format!("{}{}", self.config.url.trim_end_matches('/'), fill(path, sku))
    }

    fn authed(&self, req: Result<reqwest::RequestBuilder, OutboundError>) -> Result<reqwest::RequestBuilder, OutboundError> {
        req.map(|req| match &self.config.key {
            Some(k) => req.header(self.config.key_header.as_str(), k),
            None => req,
        })
    }

    /// Looks a variant up by SKU: `Ok(None)` when the target does not have it.
    pub async fn lookup(&self, sku: &str) -> (Result<Option<(i64, i64)>, CallError>, Audit) {
        let url = self.url(&self.config.variant_path, sku);
        let mut a = audit("target", "GET", &url);
        let out = match call(&self.client, self.authed(self.client.get(&url)), &mut a).await {
            Ok(resp) => match json_body(&self.client, resp).await {
                Ok(v) => {
                    let price = at(&v, &self.config.price_field).and_then(|p| money::parse_cents(&p.to_string()).ok());
                    let stock = at(&v, &self.config.stock_field).and_then(Value::as_i64);
                    match (price, stock) {
                        (Some(p), Some(s)) => Ok(Some((p, s))),
                        _ => Err(CallError::Permanent(format!(
                            "the target's variant lacks {} or {}",
                            self.config.price_field, self.config.stock_field
                        ))),
                    }
                }
                Err(e) => Err(CallError::Transient { error: format!("the target's answer is not JSON: {e}"), retry_after: None }),
            },
            Err(CallError::Permanent(e)) if a.status == Some(404) => {
                a.error = None;
                let _ = e;
                Ok(None)
            }
            Err(e) => Err(e),
        };
        (out, a)
    }

    /// `PUT` a new price (`value` in cents) or stock, with an idempotency key.
    pub async fn update(&self, sku: &str, field: Field, value: i64, idempotency_key: &str) -> (Result<(), CallError>, Audit) {
        let (path, name) = match field {
            Field::Price => (&self.config.price_path, &self.config.price_field),
            Field::Stock => (&self.config.stock_path, &self.config.stock_field),
        };
        let url = self.url(path, sku);
        let mut a = audit("target", "PUT", &url);
        let body = match field {
            Field::Price => serde_json::json!({ name.as_str(): money::to_major(value) }),
            Field::Stock => serde_json::json!({ name.as_str(): value }),
        };
        let req = self.authed(self.client.put(&url)).map(|r| r.header("Idempotency-Key", idempotency_key).json(&body));
        let out = call(&self.client, req, &mut a).await.map(|_| ());
        (out, a)
    }
}
