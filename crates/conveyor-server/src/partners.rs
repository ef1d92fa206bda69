//! The partner simulator (`conveyor dev partners`): a supplier's catalogue API (the sync's
//! source) and a storefront API (its target) on one port, with fault knobs, so the product sync
//! runs end to end without any external account. SPEC.md gives the shapes.
//!
//! - Source: `GET /source/products?page=&per_page=&updated_since=` (bearer token), products
//!   with variants ordered by `(updated_at, id)`, `updated_since` inclusive;
//!   `POST /source/products/{id}/touch {price?, stock?}` changes a product (every variant, or
//!   the values given) and moves its `updated_at` to now, for incremental runs.
//! - Target: `GET /target/variants/{sku}`, `PUT /target/variants/{sku}/price {price}`,
//!   `PUT /target/variants/{sku}/stock {stock}` (`X-Api-Key`; a repeated `Idempotency-Key` is
//!   not applied again). Every variant starts present but stale.
//! - Faults: latency and a 500 rate on both; on the target a per-second rate limit answering
//!   429 with `Retry-After`, and an outage window answering 503.
//! - `GET /stats`: the target's variants (price, stock, updates applied), its requests by
//!   status, and the most requests it received in one wall-clock second.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use conveyor_core::clock::{format_rfc3339_ms, now_ms, parse_rfc3339_ms};

/// The knobs of `conveyor dev partners`.
#[derive(Clone, Debug)]
pub struct PartnerConfig {
    pub products: usize,
    pub variants: usize,
    pub latency: Duration,
    /// Share of requests (source and target) answered 500, 0.0–1.0.
    pub error_rate: f64,
    /// The most target requests per wall-clock second before 429s (0: no limit).
    pub rate_limit: u32,
    /// The target answers 503 from `start` to `start + len` after the simulator starts.
    pub outage: Option<(Duration, Duration)>,
    pub source_token: String,
    pub target_key: String,
    pub seed: u64,
}

impl Default for PartnerConfig {
    fn default() -> Self {
        PartnerConfig {
            products: 1_000,
            variants: 3,
            latency: Duration::ZERO,
            error_rate: 0.0,
            rate_limit: 0,
            outage: None,
            source_token: "src".into(),
            target_key: "tgt".into(),
            seed: 42,
        }
    }
}

#[derive(Clone, Debug)]
struct Product {
    id: String,
    sku: String,
    title: String,
    /// Unix ms.
    updated_at: i64,
    variants: Vec<(String, f64, i64)>,
}

#[derive(Default)]
struct TargetVariant {
    price: f64,
    stock: i64,
    updates: u64,
}

struct Sim {
    config: PartnerConfig,
    started: Instant,
    /// By id, with the source's order `(updated_at, id)` kept beside it.
    products: Mutex<Catalogue>,
    target: Mutex<HashMap<String, TargetVariant>>,
    seen_keys: Mutex<HashSet<String>>,
    requests: Mutex<BTreeMap<u16, u64>>,
    /// (second, requests in it), and the peak.
    window: Mutex<(u64, u32, u32)>,
    rng: Mutex<u64>,
}

type Shared = Arc<Sim>;

#[derive(Default)]
struct Catalogue {
    by_id: BTreeMap<String, Product>,
    order: std::collections::BTreeSet<(i64, String)>,
}

fn iso(ms: i64) -> String {
    format_rfc3339_ms(ms).unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

impl Sim {
    fn new(config: PartnerConfig) -> Sim {
        let mut state = config.seed | 1;
        let mut next = move || {
            // xorshift64*: deterministic per seed.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let base = now_ms() - 86_400_000;
        let mut products = Catalogue::default();
        let mut target = HashMap::new();
        for i in 0..config.products {
            let id = format!("P{i:06}");
            let variants: Vec<(String, f64, i64)> = (0..config.variants.max(1))
                .map(|v| (format!("SKU-{i:06}-{v}"), (100 + next() % 9_900) as f64 / 100.0, (next() % 200) as i64))
                .collect();
            for (sku, price, stock) in &variants {
                // Present but stale: another price, another stock.
                target.insert(sku.clone(), TargetVariant { price: (price * 0.9 * 100.0).round() / 100.0, stock: stock + 5, updates: 0 });
            }
            let updated_at = base + i as i64 * 10;
            products.order.insert((updated_at, id.clone()));
            products
                .by_id
                .insert(id.clone(), Product { sku: format!("SKU-{i:06}"), title: format!("Product {i}"), updated_at, id, variants });
        }
        Sim {
            config,
            started: Instant::now(),
            products: Mutex::new(products),
            target: Mutex::new(target),
            seen_keys: Mutex::default(),
            requests: Mutex::default(),
            window: Mutex::default(),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn chance(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        let mut s = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        ((*s >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Counts a target request in its second; returns whether the rate limit refuses it.
    fn count_target(&self) -> bool {
        let now_s = (now_ms() / 1000) as u64;
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != now_s {
            *w = (now_s, 0, w.2);
        }
        w.1 += 1;
        w.2 = w.2.max(w.1);
        self.config.rate_limit > 0 && w.1 > self.config.rate_limit
    }

    fn record(&self, status: StatusCode) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(status.as_u16()).or_default() += 1;
    }
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

pub fn router(config: PartnerConfig) -> Router {
    let sim: Shared = Arc::new(Sim::new(config));
    Router::new()
        .route("/source/products", get(list_products))
        .route("/source/products/{id}/touch", post(touch))
        .route("/target/variants/{sku}", get(get_variant))
        .route("/target/variants/{sku}/price", put(put_price))
        .route("/target/variants/{sku}/stock", put(put_stock))
        .route("/stats", get(stats))
        .with_state(sim)
}

/// Latency, then the 500 rate; `None` means go on.
async fn faults(sim: &Sim) -> Option<Response> {
    if !sim.config.latency.is_zero() {
        tokio::time::sleep(sim.config.latency).await;
    }
    sim.chance(sim.config.error_rate).then(|| error(StatusCode::INTERNAL_SERVER_ERROR, "simulated failure"))
}

#[derive(Deserialize)]
struct ListQuery {
    page: Option<usize>,
    per_page: Option<usize>,
    updated_since: Option<String>,
}

async fn list_products(State(sim): State<Shared>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if headers.get("authorization").and_then(|h| h.to_str().ok()) != Some(&format!("Bearer {}", sim.config.source_token)) {
        return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    if let Some(r) = faults(&sim).await {
        return r;
    }
    let since = match q.updated_since.as_deref().filter(|s| !s.is_empty()) {
        None => i64::MIN,
        Some(s) => match parse_rfc3339_ms(s) {
            Some(ms) => ms,
            None => return error(StatusCode::BAD_REQUEST, "updated_since must be an RFC 3339 time"),
        },
    };
    let (page, per_page) = (q.page.unwrap_or(1).max(1), q.per_page.unwrap_or(100).clamp(1, 1000));
    let catalogue = sim.products.lock().unwrap_or_else(|e| e.into_inner());
    let from = (since, String::new());
    let total = catalogue.order.range(from.clone()..).count();
    let data: Vec<Value> = catalogue
        .order
        .range(from..)
        .skip((page - 1) * per_page)
        .take(per_page)
        .filter_map(|(_, id)| catalogue.by_id.get(id))
        .map(|p| {
            json!({
                "id": p.id, "sku": p.sku, "title": p.title, "updated_at": iso(p.updated_at),
                "variants": p.variants.iter().map(|(sku, price, stock)| json!({ "sku": sku, "price": price, "stock": stock })).collect::<Vec<_>>(),
            })
        })
        .collect();
    drop(catalogue);
    Json(json!({ "data": data, "meta": { "page": page, "per_page": per_page, "total": total, "has_more": page * per_page < total } }))
        .into_response()
}

#[derive(Deserialize, Default)]
struct Touch {
    price: Option<f64>,
    stock: Option<i64>,
}

async fn touch(State(sim): State<Shared>, Path(id): Path<String>, body: Option<Json<Touch>>) -> Response {
    let t = body.map(|b| b.0).unwrap_or_default();
    let mut catalogue = sim.products.lock().unwrap_or_else(|e| e.into_inner());
    let Catalogue { by_id, order } = &mut *catalogue;
    let Some(p) = by_id.get_mut(&id) else { return error(StatusCode::NOT_FOUND, "no such product") };
    for v in &mut p.variants {
        v.1 = t.price.unwrap_or(((v.1 + 1.0) * 100.0).round() / 100.0);
        v.2 = t.stock.unwrap_or(v.2 + 1);
    }
    order.remove(&(p.updated_at, p.id.clone()));
    p.updated_at = now_ms().max(p.updated_at + 1);
    order.insert((p.updated_at, p.id.clone()));
    Json(json!({ "id": p.id, "updated_at": iso(p.updated_at) })).into_response()
}

/// Auth, faults, rate limit and outage of a target request; `None` means go on.
async fn target_gate(sim: &Sim, headers: &HeaderMap) -> Option<Response> {
    let refused = sim.count_target();
    let r = if headers.get("x-api-key").and_then(|h| h.to_str().ok()) != Some(sim.config.target_key.as_str()) {
        Some(error(StatusCode::UNAUTHORIZED, "a valid X-Api-Key is required"))
    } else if sim.config.outage.is_some_and(|(start, len)| {
        let t = sim.started.elapsed();
        t >= start && t < start + len
    }) {
        Some(error(StatusCode::SERVICE_UNAVAILABLE, "the storefront is down"))
    } else if refused {
        Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], Json(json!({ "error": "rate limit" }))).into_response())
    } else {
        faults(sim).await
    };
    if let Some(resp) = &r {
        sim.record(resp.status());
    }
    r
}

async fn get_variant(State(sim): State<Shared>, headers: HeaderMap, Path(sku): Path<String>) -> Response {
    if let Some(r) = target_gate(&sim, &headers).await {
        return r;
    }
    let target = sim.target.lock().unwrap_or_else(|e| e.into_inner());
    let resp = match target.get(&sku) {
        Some(v) => Json(json!({ "sku": sku, "price": v.price, "stock": v.stock })).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such variant"),
    };
    sim.record(resp.status());
    resp
}

async fn update(sim: &Sim, headers: &HeaderMap, sku: &str, body: &Value, field: &str) -> Response {
    if let Some(r) = target_gate(sim, headers).await {
        return r;
    }
    let key = headers.get("idempotency-key").and_then(|h| h.to_str().ok()).map(str::to_string);
    let resp = {
        let mut target = sim.target.lock().unwrap_or_else(|e| e.into_inner());
        match target.get_mut(sku) {
            None => error(StatusCode::NOT_FOUND, "no such variant"),
            Some(v) => {
                let fresh = key.is_none_or(|k| sim.seen_keys.lock().unwrap_or_else(|e| e.into_inner()).insert(k));
                let ok = match (field, body.get(field)) {
                    ("price", Some(p)) if p.as_f64().is_some_and(|p| p >= 0.0) => {
                        if fresh {
                            v.price = p.as_f64().unwrap_or_default();
                        }
                        true
                    }
                    ("stock", Some(s)) if s.as_i64().is_some_and(|s| s >= 0) => {
                        if fresh {
                            v.stock = s.as_i64().unwrap_or_default();
                        }
                        true
                    }
                    _ => false,
                };
                if !ok {
                    error(StatusCode::UNPROCESSABLE_ENTITY, &format!("{field} must be a number from 0"))
                } else {
                    if fresh {
                        v.updates += 1;
                    }
                    Json(json!({ "sku": sku, "price": v.price, "stock": v.stock, "replayed": !fresh })).into_response()
                }
            }
        }
    };
    sim.record(resp.status());
    resp
}

async fn put_price(State(sim): State<Shared>, headers: HeaderMap, Path(sku): Path<String>, Json(body): Json<Value>) -> Response {
    update(&sim, &headers, &sku, &body, "price").await
}

async fn put_stock(State(sim): State<Shared>, headers: HeaderMap, Path(sku): Path<String>, Json(body): Json<Value>) -> Response {
    update(&sim, &headers, &sku, &body, "stock").await
}

async fn stats(State(sim): State<Shared>) -> Response {
    let variants: BTreeMap<String, Value> = sim
        .target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(sku, v)| (sku.clone(), json!({ "price": v.price, "stock": v.stock, "updates": v.updates })))
        .collect();
    let requests: BTreeMap<String, u64> =
        sim.requests.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let peak = sim.window.lock().unwrap_or_else(|e| e.into_inner()).2;
    Json(json!({ "variants": variants, "requests": requests, "peak_rps": peak })).into_response()
}
