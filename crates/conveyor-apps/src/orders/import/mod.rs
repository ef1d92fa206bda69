//! Streaming CSV import of orders (and products). The file is parsed and validated on a blocking
//! thread and handed over in batches of orders; each batch is one transaction that stores its
//! orders and starts their workflows, so memory stays constant whatever the file's size and an
//! order is never stored without its workflow.
//!
//! Lines of one order are contiguous. A bad line is reported with its number (the header is
//! line 1) and rejects its whole order; an order id already in the store (or earlier in the file)
//! counts as a duplicate and is skipped, so re-importing a file creates nothing twice.

mod input;
mod parse;
mod products;
mod store;

use input::*;
pub(crate) use parse::parse_date;
use parse::*;
pub use products::import_products;
use store::*;

use crate::email::valid_email;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::time::{Duration, Instant};

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::mpsc;

use conveyor_core::backend::{insert_many, BackendError, QueueBackendExt, RowExt, SqlValue, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::Conveyor;

use super::workflow;
use crate::money::parse_cents;
use conveyor_core::workflow::Starts;

const ORDER_COLUMNS: [&str; 8] =
    ["order_id", "customer_id", "customer_name", "customer_email", "sku", "quantity", "unit_price", "order_date"];
const PRODUCT_COLUMNS: [&str; 4] = ["sku", "name", "price", "stock"];
const BATCH_ORDERS: usize = 500;

/// How many rejected lines a report lists; the rest are counted (`rejected_total`), so a file
/// of bad lines cannot make the answer (and the memory behind it) grow with the file.
pub const MAX_REJECTED: usize = 1_000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ImportReport {
    /// Data lines read (the header excluded).
    pub rows: u64,
    /// Orders stored (or products created / updated).
    pub orders: u64,
    pub duplicates: u64,
    /// The first [`MAX_REJECTED`] rejected lines, by line number.
    pub rejected: Vec<Rejected>,
    /// Rejected lines in all (listed or not).
    pub rejected_total: u64,
}

/// Rejected lines as they are found: the [`MAX_REJECTED`] lowest line numbers kept (lines
/// are not always found in order: an order is judged when its last line is read, and split
/// orders when stored), the rest only counted.
#[derive(Default)]
struct Rejections {
    kept: std::collections::BinaryHeap<Rejected>,
    total: u64,
}

impl Rejections {
    fn push(&mut self, r: Rejected) {
        self.total += 1;
        self.kept.push(r);
        if self.kept.len() > MAX_REJECTED {
            self.kept.pop();
        }
    }

    fn extend(&mut self, other: Rejections) {
        let counted_only = other.total - other.kept.len() as u64;
        for r in other.kept {
            self.push(r);
        }
        self.total += counted_only;
    }

    fn report(self, report: &mut ImportReport) {
        report.rejected = self.kept.into_sorted_vec();
        report.rejected_total = self.total;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the header lacks required columns: {}", .0.join(", "))]
    MissingColumns(Vec<String>),
    #[error("cannot read the CSV: {0}")]
    Read(String),
    #[error(transparent)]
    Store(#[from] BackendError),
}

/// Progress, for a progress line: data lines read and bytes consumed so far.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub rows: u64,
    pub bytes: u64,
}

struct Line {
    sku: String,
    quantity: i64,
    unit_price: i64,
    /// Where it is in the file.
    at: u64,
}

struct ParsedOrder {
    id: String,
    customer_id: i64,
    customer_name: String,
    customer_email: String,
    order_date: String,
    order_day: String,
    lines: Vec<Line>,
    /// Where its lines are in the file, for reports found only when storing.
    line_numbers: Vec<u64>,
}

/// The order being read: its lines' numbers, and its first bad line with the reason.
type Pending = (ParsedOrder, Vec<u64>, Option<(u64, String)>);
/// sku, name, price in cents, stock.
type NewProduct = (String, String, i64, i64);

/// What the parser hands to the writer.
enum Batch {
    Orders(OrderRows),
    Done { rows: u64, rejected: Rejections },
    Failed(ImportError),
}

/// Imports orders from CSV `input`, calling `progress` about once a second.
pub async fn import_orders<R>(
    conveyor: &Conveyor,
    input: R,
    progress: impl Fn(Progress) + Send + 'static,
) -> Result<ImportReport, ImportError>
where
    R: Read + Send + 'static,
{
    let backend = conveyor.backend().clone();
    let known: HashSet<String> =
        backend.query("SELECT sku FROM products", vec![]).await?.iter().filter_map(|r| r.text(0).map(str::to_string)).collect();
    let (tx, mut rx) = mpsc::channel::<Batch>(4);
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = Counting { inner: input, seen: bytes.clone() };
    // Every order of this run gets the run's start as `created_at`: an id that conflicts with
    // an order of the same stamp was split within this file; an older one is a duplicate.
    let run = now_ms();
    let parser = tokio::task::spawn_blocking(move || parse_orders(counting, &known, &tx, bytes, progress, run));

    let mut report = ImportReport::default();
    let mut rejections = Rejections::default();
    // Two batches in flight, so a server such as PostgreSQL writes one while the next is sent
    // (one connection each). A batch that shares an order id with one in flight (an order split
    // within the file) waits for it first: the earlier lines are the ones stored, as when the
    // batches go one by one, and the two never lock each other's orders.
    let mut in_flight: VecDeque<(HashSet<String>, tokio::task::JoinHandle<StoreResult>)> = VecDeque::new();
    while let Some(batch) = rx.recv().await {
        match batch {
            Batch::Orders(rows) => {
                let ids: HashSet<String> = rows.orders.iter().map(|o| o.id.clone()).collect();
                let shared = in_flight.iter().any(|(other, _)| !other.is_disjoint(&ids));
                while !in_flight.is_empty() && (shared || in_flight.len() >= IN_FLIGHT) {
                    let (_, done) = in_flight.pop_front().expect("not empty");
                    tally(done.await, &mut report, &mut rejections)?;
                }
                let backend = backend.clone();
                // Rows are built by the parser and dropped after the transaction, so the
                // store's writer only writes.
                let store = tokio::spawn(async move { backend.transact(move |tx| store_orders(tx, rows, run)).await });
                in_flight.push_back((ids, store));
            }
            Batch::Done { rows, rejected } => {
                report.rows = rows;
                rejections.extend(rejected);
            }
            Batch::Failed(e) => return Err(e),
        }
    }
    for (_, done) in in_flight {
        tally(done.await, &mut report, &mut rejections)?;
    }
    parser.await.map_err(|e| ImportError::Read(e.to_string()))?;
    if report.orders >= ANALYZE_AFTER {
        // A bulk load leaves the tables' statistics behind until autovacuum comes by, and the
        // workflow's set-wise reads (`order_id IN (…)`) need them: without them PostgreSQL
        // estimates most of the table and scans it instead of the primary key. (`orders` and
        // `workflows` are read by their whole primary key, which is unique: no estimate needed.)
        for table in ["order_items", "workflow_steps"] {
            backend.transact(move |tx| tx.execute(&format!("ANALYZE {table}"), &[])).await?;
        }
    }
    rejections.report(&mut report);
    Ok(report)
}

/// Orders an import stores at least before it refreshes the tables' statistics.
const ANALYZE_AFTER: u64 = 1_000;

/// Batches of orders being written at once.
const IN_FLIGHT: usize = 2;

type StoreResult = Result<(u64, u64, Vec<Rejected>, OrderRows), BackendError>;

/// Adds a stored batch's outcome to the report.
fn tally(
    done: Result<StoreResult, tokio::task::JoinError>,
    report: &mut ImportReport,
    rejections: &mut Rejections,
) -> Result<(), ImportError> {
    let (stored, duplicates, split, rows) =
        done.map_err(|e| ImportError::Store(BackendError::Other(format!("an import batch failed: {e}"))))??;
    drop(rows);
    report.orders += stored;
    report.duplicates += duplicates;
    for r in split {
        rejections.push(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
