//! The payment gateway: a trait a real gateway implements, and the built-in simulator.
//!
//! The simulator behaves like a gateway with idempotency keys: the first `charge` for a key
//! decides (approved with probability `success_rate`) and is remembered in its own ledger table;
//! any later `charge` with the same key returns that first result, so an order is charged at
//! most once however often its step is retried. The decision is a hash of the seed and the key,
//! so a seeded run is reproducible. Calls that arrive while the ledger's transaction runs are
//! written together by the next one (a group commit, [`Gather`]); each call is answered once
//! its row is committed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::backend::{in_list, insert_many, QueueBackend, QueueBackendExt, RowExt, SqlValue};
use conveyor_core::clock::now_ms;
use conveyor_core::setwise::Gather;
use tokio::sync::oneshot;

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
    config: SimulatorConfig,
    ledger: Arc<Ledger>,
}

/// The simulator's ledger and the calls waiting for its next transaction.
struct Ledger {
    backend: Arc<dyn QueueBackend>,
    calls: Gather<Call>,
}

/// A call waiting for the ledger: a charge of (reference, amount, status), or a refund.
struct Call {
    key: String,
    charge: Option<(String, i64, &'static str)>,
    reply: oneshot::Sender<Result<Option<Charge>, GatewayError>>,
}

/// Most calls one ledger transaction writes.
const CALLS: usize = 256;

impl Simulator {
    pub fn new(backend: Arc<dyn QueueBackend>, config: SimulatorConfig) -> Self {
        Simulator { config, ledger: Arc::new(Ledger { backend, calls: Gather::new(CALLS) }) }
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

    async fn call(&self, key: &str, charge: Option<(String, i64, &'static str)>) -> Result<Option<Charge>, GatewayError> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let (reply, answer) = oneshot::channel();
        if self.ledger.calls.push(Call { key: key.to_string(), charge, reply }) {
            tokio::spawn(self.ledger.clone().run());
        }
        answer.await.map_err(|_| GatewayError::Unavailable("the ledger's transaction ended without an answer".into()))?
    }
}

impl Ledger {
    /// Writes the waiting calls, charges and refunds in sets of their own, while calls wait.
    async fn run(self: Arc<Self>) {
        let _runner = self.calls.runner();
        while let Some(set) = self.calls.next(|a, b| a.charge.is_some() == b.charge.is_some()) {
            let keys: Vec<String> = set.iter().map(|c| c.key.clone()).collect();
            let charges: Vec<Vec<SqlValue>> = set
                .iter()
                .filter_map(|c| c.charge.as_ref().map(|(r, a, s)| (c, r, a, s)))
                .map(|(c, reference, amount, status)| {
                    vec![c.key.as_str().into(), reference.as_str().into(), (*amount).into(), (*status).into(), now_ms().into()]
                })
                .collect();
            let refund = charges.is_empty();
            let written = self
                .backend
                .transact(move |tx| {
                    let (marks, params) = in_list(1, keys.iter().map(|k| SqlValue::from(k.as_str())));
                    if refund {
                        tx.defer(
                            &format!("UPDATE payment_gateway_charges SET status = 'refunded' WHERE status = 'charged' AND idempotency_key IN ({marks})"),
                            &params,
                        )?;
                    } else {
                        // The first charge of a key decides; a key twice in one set is one row.
                        let mut seen = std::collections::HashSet::new();
                        let rows: Vec<Vec<SqlValue>> = charges.into_iter().filter(|r| seen.insert(r[0].as_str().map(str::to_string))).collect();
                        insert_many(
                            tx,
                            "INSERT INTO payment_gateway_charges (idempotency_key, reference, amount_cents, status, created_at)",
                            &rows,
                            "ON CONFLICT (idempotency_key) DO NOTHING",
                        )?;
                    }
                    let rows = tx.query(&format!("SELECT idempotency_key, reference, status FROM payment_gateway_charges WHERE idempotency_key IN ({marks})"), &params)?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.text(0).unwrap_or_default().to_string(), (r.text(1).unwrap_or_default().to_string(), r.text(2).unwrap_or_default().to_string())))
                        .collect::<std::collections::HashMap<_, _>>())
                })
                .await;
            for call in set {
                let answer = match &written {
                    Err(e) => Err(GatewayError::Unavailable(e.to_string())),
                    Ok(rows) => match (rows.get(&call.key), call.charge.is_some()) {
                        (Some((reference, status)), true) => {
                            Ok(Some(Charge { reference: reference.clone(), approved: status != "declined" }))
                        }
                        (None, true) => Err(GatewayError::Unavailable("charge vanished".into())),
                        (Some((reference, status)), false) if status == "refunded" => {
                            Ok(Some(Charge { reference: reference.clone(), approved: true }))
                        }
                        (_, false) => Ok(None),
                    },
                };
                let _ = call.reply.send(answer);
            }
        }
    }
}

#[async_trait]
impl PaymentGateway for Simulator {
    async fn charge(&self, key: &str, amount_cents: i64) -> Result<Charge, GatewayError> {
        let approved = self.draw(key) < self.config.success_rate;
        let reference = format!("sim_{:016x}", (self.draw(&format!("ref:{key}")) * u64::MAX as f64) as u64);
        let status = if approved { "charged" } else { "declined" };
        let charged = self.call(key, Some((reference, amount_cents, status))).await?;
        charged.ok_or_else(|| GatewayError::Unavailable("charge vanished".into()))
    }

    async fn refund(&self, key: &str) -> Result<Option<Charge>, GatewayError> {
        self.call(key, None).await
    }
}
