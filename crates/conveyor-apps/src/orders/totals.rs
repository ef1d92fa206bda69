//! The orders' totals and statuses that the payment and rollback steps read before they call
//! the gateway (outside any transaction, as a gateway call must not hold one open). Reads that
//! arrive while one runs are answered together by the next, one statement for all of them
//! ([`Gather`]), instead of one round trip per order.

use std::sync::Arc;

use conveyor_core::backend::{in_list, BackendError, QueueBackend, RowExt, SqlValue};
use conveyor_core::setwise::Gather;
use tokio::sync::oneshot;

/// An order as the steps that call the gateway need it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Total {
    pub(crate) total_cents: i64,
    pub(crate) status: String,
}

/// Orders read by one statement at most.
const READS: usize = 256;

/// The reads waiting for the next statement, and its runner.
pub(crate) struct Totals {
    reads: Gather<Read>,
}

struct Read {
    backend: Arc<dyn QueueBackend>,
    order_id: String,
    reply: oneshot::Sender<Result<Option<Total>, BackendError>>,
}

impl Totals {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Totals { reads: Gather::new(READS) })
    }

    /// The order's total and status; `None` when there is no such order.
    pub(crate) async fn get(self: &Arc<Self>, backend: &Arc<dyn QueueBackend>, order_id: &str) -> Result<Option<Total>, BackendError> {
        let (reply, answer) = oneshot::channel();
        if self.reads.push(Read { backend: backend.clone(), order_id: order_id.to_string(), reply }) {
            tokio::spawn(self.clone().run());
        }
        answer.await.map_err(|_| BackendError::Other("the orders' read ended without an answer".into()))?
    }

    /// Reads the waiting orders, a set of one backend's at a time, while reads wait.
    async fn run(self: Arc<Self>) {
        let _runner = self.reads.runner();
        while let Some(set) = self.reads.next(|a, b| Arc::ptr_eq(&a.backend, &b.backend)) {
            let mut ids: Vec<&str> = set.iter().map(|r| r.order_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            let (marks, params) = in_list(1, ids.iter().map(|i| SqlValue::from(*i)));
            let read = set[0].backend.query(&format!("SELECT id, total_cents, status FROM orders WHERE id IN ({marks})"), params).await;
            match read {
                Ok(rows) => {
                    let found: std::collections::HashMap<&str, Total> = rows
                        .iter()
                        .map(|r| {
                            (
                                r.text(0).unwrap_or_default(),
                                Total { total_cents: r.int(1), status: r.text(2).unwrap_or_default().to_string() },
                            )
                        })
                        .collect();
                    for r in set {
                        let _ = r.reply.send(Ok(found.get(r.order_id.as_str()).cloned()));
                    }
                }
                Err(e) => {
                    for r in set {
                        let _ = r.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::QueueBackendExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_at_once_each_get_their_own_order() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn QueueBackend> =
            Arc::new(SqliteBackend::open(SqliteOptions::new(dir.path().join("t.db").to_string_lossy().to_string())).unwrap());
        crate::migrate(backend.as_ref()).await.unwrap();
        backend
            .transact(|tx| {
                for i in 0..600i64 {
                    tx.execute(
                        "INSERT INTO orders (id, customer_id, status, total_cents, order_date, order_day, created_at)
                         VALUES ($1, 1, $2, $3, '2026-01-01T00:00:00Z', '2026-01-01', 0)",
                        &[format!("O{i}").into(), (if i % 2 == 0 { "processing" } else { "failed" }).into(), (1000 + i).into()],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let totals = Totals::new();
        // More reads than one statement takes, each order asked for twice, and a missing one.
        let reads: Vec<_> = (0..1200i64)
            .map(|n| {
                let (totals, backend) = (totals.clone(), backend.clone());
                tokio::spawn(async move { (n % 600, totals.get(&backend, &format!("O{}", n % 600)).await.unwrap()) })
            })
            .collect();
        for r in reads {
            let (i, got) = r.await.unwrap();
            let status = if i % 2 == 0 { "processing" } else { "failed" };
            assert_eq!(got, Some(Total { total_cents: 1000 + i, status: status.into() }), "order O{i}");
        }
        assert_eq!(totals.get(&backend, "missing").await.unwrap(), None);
    }
}
