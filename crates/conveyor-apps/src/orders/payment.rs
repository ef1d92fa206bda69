//! The payment gateway: a trait a real gateway implements, and the built-in simulator.
//!
//! The simulator behaves like a gateway with idempotency keys: the first `charge` for a key
//! decides (approved with probability `success_rate`) and is remembered in its own ledger table;
//! any later `charge` with the same key returns that first result, so an order is charged at
//! most once however often its step is retried. The decision is a hash of the seed and the key,
//! so a seeded run is reproducible.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::backend::{QueueBackend, QueueBackendExt, RowExt};
use conveyor_core::clock::now_ms;

#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    pub reference: String,
    pub approved: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Worth retrying (timeouts, 5xx).
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Charges `amount_cents` once per `idempotency_key`.
    async fn charge(&self, idempotency_key: &str, amount_cents: i64) -> Result<Charge, GatewayError>;
    /// Refunds the charge made with `idempotency_key`, if one was approved; returns it (also
    /// when it was refunded before), or `None` when nothing was charged. Idempotent.
    async fn refund(&self, idempotency_key: &str) -> Result<Option<Charge>, GatewayError>;
}

#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    pub success_rate: f64,
    pub seed: u64,
    pub latency: Duration,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig { success_rate: 0.9, seed: rand::random(), latency: Duration::ZERO }
    }
}

pub struct Simulator {
    backend: Arc<dyn QueueBackend>,
    config: SimulatorConfig,
}

impl Simulator {
    pub fn new(backend: Arc<dyn QueueBackend>, config: SimulatorConfig) -> Self {
        Simulator { backend, config }
    }

    /// Uniform in [0, 1), from the seed and the key (FNV-1a, stable across builds).
    fn draw(&self, key: &str) -> f64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.config.seed;
        for b in key.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[async_trait]
impl PaymentGateway for Simulator {
    async fn charge(&self, key: &str, amount_cents: i64) -> Result<Charge, GatewayError> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let approved = self.draw(key) < self.config.success_rate;
        let key = key.to_string();
        let reference = format!("sim_{:016x}", (self.draw(&format!("ref:{key}")) * u64::MAX as f64) as u64);
        let status = if approved { "charged" } else { "declined" };
        self.backend
            .transact(move |tx| {
                tx.defer(
                    "INSERT INTO payment_gateway_charges (idempotency_key, reference, amount_cents, status, created_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
                    &[key.clone().into(), reference.into(), amount_cents.into(), status.into(), now_ms().into()],
                )?;
                let rows = tx.query("SELECT reference, status FROM payment_gateway_charges WHERE idempotency_key = $1", &[key.into()])?;
                let r = rows.first().ok_or_else(|| conveyor_core::BackendError::Other("charge vanished".into()))?;
                Ok(Charge { reference: r.text(0).unwrap_or_default().to_string(), approved: r.text(1) != Some("declined") })
            })
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))
    }

    async fn refund(&self, key: &str) -> Result<Option<Charge>, GatewayError> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let key = key.to_string();
        self.backend
            .transact(move |tx| {
                tx.defer(
                    "UPDATE payment_gateway_charges SET status = 'refunded' WHERE idempotency_key = $1 AND status = 'charged'",
                    &[key.clone().into()],
                )?;
                let rows = tx.query("SELECT reference, status FROM payment_gateway_charges WHERE idempotency_key = $1", &[key.into()])?;
                Ok(rows
                    .first()
                    .filter(|r| r.text(1) == Some("refunded"))
                    .map(|r| Charge { reference: r.text(0).unwrap_or_default().to_string(), approved: true }))
            })
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))
    }
}
