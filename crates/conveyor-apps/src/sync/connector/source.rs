//! The source partner: pages of its catalogue, each record mapped through the configured
//! paths into a validated `Product` (a bad record set aside with the field it fails on).

use super::*;

/// The supplier's catalogue.
#[derive(Clone)]
pub struct Source {
    config: SourceConfig,
    client: Client,
}

impl Source {
    pub fn new(config: SourceConfig) -> Self {
        let client = client(config.timeout);
        Source { config, client }
    }

    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// `GET {url}{products_path}?page=&per_page=&updated_since=`.
    pub async fn page(&self, page: u32, updated_since: Option<&str>) -> (Result<SourcePage, CallError>, Audit) {
        let base = format!("{}{}", self.config.url.trim_end_matches('/'), self.config.products_path);
        let mut url = match reqwest::Url::parse(&base) {
            Ok(u) => u,
            Err(e) => {
                let mut a = audit("source", "GET", &base);
                a.error = Some(format!("bad source URL: {e}"));
                return (Err(CallError::Permanent(format!("bad source URL {}: {e}", redact_url(&base)))), a);
            }
        };
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("page", &page.to_string()).append_pair("per_page", &self.config.page_size.to_string());
            if let Some(since) = updated_since {
                q.append_pair("updated_since", since);
            }
        }
        let mut a = audit("source", "GET", url.as_str());
        let req = self.client.get(url.as_str()).map(|r| match &self.config.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        });
        let resp = match call(&self.client, req, &mut a).await {
            Ok(r) => r,
            Err(e) => return (Err(e), a),
        };
        let started = Instant::now();
        let body = json_body(&self.client, resp).await;
        a.duration_ms += started.elapsed().as_millis() as i64;
        let out = match body {
            Ok(v) => self.parse_page(&v),
            Err(e) => Err(CallError::Transient { error: format!("the source's answer is not JSON: {e}"), retry_after: None }),
        };
        if let Err(e) = &out {
            a.error = Some(e.to_string());
        }
        (out, a)
    }

    /// Maps a page's JSON into products; a record that does not validate is set aside.
    pub fn parse_page(&self, v: &Value) -> Result<SourcePage, CallError> {
        let f = &self.config.fields;
        let Some(list) = at(v, &f.data).and_then(Value::as_array) else {
            return Err(CallError::Permanent(format!("the source's answer has no list at {:?}", f.data)));
        };
        let has_more = match at(v, &f.has_more) {
            Some(Value::Bool(b)) => *b,
            _ => list.len() as u32 >= self.config.page_size,
        };
        let (mut products, mut bad) = (Vec::new(), Vec::new());
        for (index, raw) in list.iter().enumerate() {
            match product(f, raw) {
                Ok(p) => products.push(p),
                Err(reason) => bad.push(BadRecord { id: at(raw, &f.id).and_then(scalar), index, reason, raw: raw.clone() }),
            }
        }
        Ok(SourcePage { products, bad, has_more, len: list.len() })
    }
}

pub(super) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Validates one record, naming the field that is wrong.
pub fn product(f: &SourceFields, raw: &Value) -> Result<Product, String> {
    if !raw.is_object() {
        return Err("record: expected an object".into());
    }
    let text = |path: &str| at(raw, path).and_then(scalar);
    let id = text(&f.id).ok_or_else(|| format!("{}: required (a non-empty string or number)", f.id))?;
    let sku = text(&f.sku).unwrap_or_default();
    let title = at(raw, &f.title).and_then(Value::as_str).unwrap_or_default().to_string();
    let (updated_at, updated_ms) = match at(raw, &f.updated_at) {
        Some(Value::String(s)) => {
            let ms = conveyor_core::clock::parse_rfc3339_ms(s.trim())
                .ok_or_else(|| format!("{}: expected an RFC 3339 time, got {s:?}", f.updated_at))?;
            (s.trim().to_string(), ms)
        }
        Some(Value::Number(n)) if n.as_i64().is_some_and(|n| n >= 0) => {
            let n = n.as_i64().unwrap_or_default();
            // Seconds until the year 5138, milliseconds after.
            (n.to_string(), if n < 100_000_000_000 { n * 1000 } else { n })
        }
        _ => return Err(format!("{}: required (an RFC 3339 time)", f.updated_at)),
    };
    let list = at(raw, &f.variants).and_then(Value::as_array).ok_or_else(|| format!("{}: required (a list)", f.variants))?;
    let mut variants: Vec<Variant> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let name = |field: &str| format!("{}[{i}].{field}", f.variants);
        let sku = at(v, &f.variant_sku).and_then(scalar).ok_or_else(|| format!("{}: required", name(&f.variant_sku)))?;
        if variants.iter().any(|x| x.sku == sku) {
            return Err(format!("{}: {sku:?} appears twice", name(&f.variant_sku)));
        }
        let price_cents = match at(v, &f.price) {
            Some(Value::Number(n)) if n.as_f64().is_some_and(|x| x < 0.0) => Err("must not be negative".into()),
            Some(Value::Number(n)) => money::parse_cents(&n.to_string()),
            Some(Value::String(s)) => money::parse_cents(s),
            _ => Err("required".into()),
        }
        .map_err(|e| format!("{}: {e}", name(&f.price)))?;
        let stock = at(v, &f.stock)
            .and_then(|s| s.as_i64().or_else(|| s.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)))
            .ok_or_else(|| format!("{}: required (a whole number)", name(&f.stock)))?;
        if stock < 0 {
            return Err(format!("{}: must not be negative", name(&f.stock)));
        }
        variants.push(Variant { sku, price_cents, stock });
    }
    if variants.is_empty() {
        return Err(format!("{}: at least one variant is required", f.variants));
    }
    Ok(Product { id, sku, title, updated_at, updated_ms, variants })
}
