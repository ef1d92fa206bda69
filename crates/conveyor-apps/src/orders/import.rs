//! Streaming CSV import of orders (and products). The file is parsed and validated on a blocking
//! thread and handed over in batches of orders; each batch is one transaction that stores its
//! orders and starts their workflows, so memory stays constant whatever the file's size and an
//! order is never stored without its workflow.
//!
//! Lines of one order are contiguous. A bad line is reported with its number (the header is
//! line 1) and rejects its whole order; an order id already in the store (or earlier in the file)
//! counts as a duplicate and is skipped, so re-importing a file creates nothing twice.

use crate::email::valid_email;
use std::collections::{HashMap, HashSet};
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

use super::money::parse_cents;
use super::workflow;
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

/// Counts bytes as the CSV reader pulls them, for progress and ETA.
struct Counting<R> {
    inner: R,
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn reader<R: Read>(input: R) -> csv::Reader<Lf<R>> {
    // `flexible`: a line with a wrong number of fields is reported, not fatal.
    csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(Lf::new(input))
}

/// Streams CRLF as LF, so the CSV reader numbers lines the way an editor shows them (with CRLF
/// it dates a record from the previous line's end).
struct Lf<R> {
    inner: R,
    chunk: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    /// A CR at the end of the last chunk: dropped if the next byte is an LF.
    held_cr: bool,
    eof: bool,
}

impl<R> Lf<R> {
    fn new(inner: R) -> Self {
        Lf { inner, chunk: vec![0; 64 * 1024], out: Vec::with_capacity(64 * 1024), pos: 0, held_cr: false, eof: false }
    }
}

impl<R: Read> Read for Lf<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.out.len() {
            if self.eof {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            let n = self.inner.read(&mut self.chunk)?;
            if n == 0 {
                self.eof = true;
                if std::mem::take(&mut self.held_cr) {
                    self.out.push(b'\r');
                }
                continue;
            }
            for &b in &self.chunk[..n] {
                if std::mem::take(&mut self.held_cr) && b != b'\n' {
                    self.out.push(b'\r');
                }
                if b == b'\r' {
                    self.held_cr = true;
                } else {
                    self.out.push(b);
                }
            }
        }
        let k = buf.len().min(self.out.len() - self.pos);
        buf[..k].copy_from_slice(&self.out[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

/// Column positions by name; a UTF-8 BOM on the first header is ignored.
fn columns(headers: &csv::StringRecord, required: &[&str]) -> Result<HashMap<String, usize>, ImportError> {
    let map: HashMap<String, usize> =
        headers.iter().enumerate().map(|(i, h)| (h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase(), i)).collect();
    let missing: Vec<String> = required.iter().filter(|c| !map.contains_key(**c)).map(|c| c.to_string()).collect();
    if missing.is_empty() {
        Ok(map)
    } else {
        Err(ImportError::MissingColumns(missing))
    }
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
    while let Some(batch) = rx.recv().await {
        match batch {
            Batch::Orders(rows) => {
                // Rows are built by the parser and dropped here, so the store's writer only
                // writes.
                let (stored, duplicates, split, rows) = backend.transact(move |tx| store_orders(tx, rows, run)).await?;
                drop(rows);
                report.orders += stored;
                report.duplicates += duplicates;
                for r in split {
                    rejections.push(r);
                }
            }
            Batch::Done { rows, rejected } => {
                report.rows = rows;
                rejections.extend(rejected);
            }
            Batch::Failed(e) => return Err(e),
        }
    }
    parser.await.map_err(|e| ImportError::Read(e.to_string()))?;
    rejections.report(&mut report);
    Ok(report)
}

fn parse_orders<R: Read>(
    input: R,
    known: &HashSet<String>,
    out: &mpsc::Sender<Batch>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    progress: impl Fn(Progress),
    run: i64,
) {
    let send = |orders: Vec<ParsedOrder>| {
        let batch = OrderRows::new(orders, run).map_or_else(|e| Batch::Failed(e.into()), Batch::Orders);
        out.blocking_send(batch).is_ok()
    };
    let mut rdr = reader(input);
    let cols = match rdr.headers().map_err(|e| ImportError::Read(e.to_string())).and_then(|h| columns(h, &ORDER_COLUMNS)) {
        Ok(c) => c,
        Err(e) => {
            let _ = out.blocking_send(Batch::Failed(e));
            return;
        }
    };
    let col = |name: &str| cols[name];
    let mut rows = 0u64;
    let mut rejected = Rejections::default();
    // Orders rejected so far (usually few): lines of one showing up again later are rejected
    // too, so no part of a rejected order is stored.
    let mut rejected_ids: HashMap<String, u64> = HashMap::new();
    let mut current: Option<Pending> = None;
    let mut batch = Vec::with_capacity(BATCH_ORDERS);
    let mut last_report = Instant::now();
    let mut record = csv::StringRecord::new();

    // Ends the order being read: stored if all its lines were good, reported whole otherwise.
    let close = |cur: Option<Pending>, batch: &mut Vec<ParsedOrder>, rejected: &mut Rejections, rejected_ids: &mut HashMap<String, u64>| {
        let Some((mut order, lines, bad)) = cur else { return };
        let earlier = rejected_ids.get(&order.id).copied();
        match (bad, earlier) {
            (None, None) => {
                order.line_numbers = lines;
                batch.push(order);
            }
            (None, Some(first)) => {
                for l in lines {
                    rejected.push(Rejected { line: l, reason: format!("order_id: order {} was rejected at line {first}", order.id) });
                }
            }
            (Some((bad_line, _)), _) => {
                for l in lines.iter().copied().filter(|l| *l != bad_line) {
                    rejected.push(Rejected { line: l, reason: format!("order_id: order {} rejected (see line {bad_line})", order.id) });
                }
                rejected_ids.entry(order.id).or_insert(bad_line);
            }
        }
    };

    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                // A malformed line (bad quoting, invalid UTF-8) is reported and rejects the order
                // being read (it most likely belonged to it); reading goes on.
                rejected.push(Rejected { line, reason: format!("line: {}", e.to_string().split(": ").last().unwrap_or("malformed")) });
                if let Some((_, lines, bad)) = &mut current {
                    lines.push(line);
                    bad.get_or_insert((line, "unreadable line".into()));
                }
                rows += 1;
                continue;
            }
        }
        rows += 1;
        let line = record.position().map_or(rows + 1, |p| p.line());
        let field = |name: &str| record.get(col(name)).unwrap_or("");
        let order_id = field("order_id").to_string();
        if current.as_ref().is_none_or(|(o, _, _)| o.id != order_id) {
            close(current.take(), &mut batch, &mut rejected, &mut rejected_ids);
        }
        let parsed = parse_line(&record, &col, known).map(|(head, item)| (head, Line { at: line, ..item }));
        match (&mut current, parsed) {
            (_, Err((field_name, reason))) => {
                rejected.push(Rejected { line, reason: format!("{field_name}: {reason}") });
                match &mut current {
                    Some((_, lines, bad)) => {
                        lines.push(line);
                        bad.get_or_insert((line, reason));
                    }
                    None => {
                        let stub = ParsedOrder {
                            id: order_id,
                            customer_id: 0,
                            customer_name: String::new(),
                            customer_email: String::new(),
                            order_date: String::new(),
                            order_day: String::new(),
                            lines: vec![],
                            line_numbers: vec![],
                        };
                        current = Some((stub, vec![line], Some((line, reason))));
                    }
                }
            }
            (Some((order, _, _)), Ok((head, item))) if repeats(order, &head, &item).is_some() => {
                // The same line again (a file exported twice over, a copy-paste): reported and
                // left out, the order is imported once with its other lines.
                let first = repeats(order, &head, &item).unwrap_or_default();
                rejected.push(Rejected { line, reason: format!("order_id: duplicate of line {first}, skipped") });
            }
            (Some((order, lines, bad)), Ok((head, item))) => {
                lines.push(line);
                if bad.is_none() && head.customer_id != order.customer_id && order.customer_id != 0 {
                    let reason = format!("differs from the order's first line ({})", order.customer_id);
                    rejected.push(Rejected { line, reason: format!("customer_id: {reason}") });
                    *bad = Some((line, reason));
                } else if order.customer_id == 0 {
                    // The order's first good line after a bad first line: nothing to store anyway.
                } else if bad.is_none() && super::money::add_line(order_total(order), item.quantity, item.unit_price).is_none() {
                    let reason = format!("the order's total would exceed {}", super::money::to_major(super::money::MAX_ORDER_CENTS));
                    rejected.push(Rejected { line, reason: format!("quantity: {reason}") });
                    *bad = Some((line, reason));
                } else {
                    order.lines.push(item);
                }
            }
            (None, Ok((head, item))) => {
                let mut order = head;
                if super::money::add_line(0, item.quantity, item.unit_price).is_none() {
                    let reason = format!("the order's total would exceed {}", super::money::to_major(super::money::MAX_ORDER_CENTS));
                    rejected.push(Rejected { line, reason: format!("quantity: {reason}") });
                    current = Some((order, vec![line], Some((line, reason))));
                } else {
                    order.lines.push(item);
                    current = Some((order, vec![line], None));
                }
            }
        }
        if batch.len() >= BATCH_ORDERS && !send(std::mem::take(&mut batch)) {
            return;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(Progress { rows, bytes: bytes.load(std::sync::atomic::Ordering::Relaxed) });
            last_report = Instant::now();
        }
    }
    close(current.take(), &mut batch, &mut rejected, &mut rejected_ids);
    if !batch.is_empty() && !send(batch) {
        return;
    }
    progress(Progress { rows, bytes: bytes.load(std::sync::atomic::Ordering::Relaxed) });
    let _ = out.blocking_send(Batch::Done { rows, rejected });
}

/// One line: the order's head (customer, date) and the item, or the first bad field and why.
fn parse_line(
    r: &csv::StringRecord,
    col: &impl Fn(&str) -> usize,
    known: &HashSet<String>,
) -> Result<(ParsedOrder, Line), (&'static str, String)> {
    let f = |name: &str| r.get(col(name)).unwrap_or("").trim();
    let order_id = f("order_id");
    if order_id.is_empty() || order_id.len() > 100 {
        return Err(("order_id", "must be 1 to 100 characters".into()));
    }
    let customer_id: i64 = f("customer_id")
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or(("customer_id", format!("{:?} is not a positive whole number", f("customer_id"))))?;
    let name = f("customer_name");
    if name.is_empty() {
        return Err(("customer_name", "is empty".into()));
    }
    let email = f("customer_email");
    if !valid_email(email) {
        return Err(("customer_email", format!("{email:?} is not an email address")));
    }
    let sku = f("sku");
    if !known.contains(sku) {
        return Err(("sku", format!("unknown SKU {sku:?}")));
    }
    let quantity: i64 = match f("quantity").parse::<i64>() {
        Ok(q) if q > 0 && q <= 1_000_000 => q,
        Ok(_) => return Err(("quantity", format!("must be a whole number from 1, got {}", f("quantity")))),
        Err(_) => return Err(("quantity", format!("{:?} is not a whole number", f("quantity")))),
    };
    let unit_price = parse_cents(f("unit_price")).map_err(|e| ("unit_price", e))?;
    let (order_date, order_day) =
        parse_date(f("order_date")).ok_or(("order_date", format!("{:?} is not an ISO 8601 date or date-time", f("order_date"))))?;
    let head = ParsedOrder {
        id: order_id.to_string(),
        customer_id,
        customer_name: name.to_string(),
        customer_email: email.to_string(),
        order_date,
        order_day,
        lines: Vec::new(),
        line_numbers: Vec::new(),
    };
    Ok((head, Line { sku: sku.to_string(), quantity, unit_price, at: 0 }))
}

/// An ISO 8601 date (`2026-11-23`) or date-time (with `Z`, an offset, or none = UTC) → the
/// normalized RFC 3339 UTC text and the UTC day.
pub(crate) fn parse_date(text: &str) -> Option<(String, String)> {
    let t = text.trim();
    let utc = if let Ok(day) = Date::strptime("%Y-%m-%d", t) {
        day.to_datetime(Time::midnight())
    } else if let Some(ms) = conveyor_core::clock::parse_rfc3339_ms(t) {
        // The text keeps whole seconds, so reading milliseconds loses nothing.
        TimeZone::UTC.to_datetime(Timestamp::from_millisecond(ms).ok()?)
    } else {
        naive_date_time(t)?
    };
    Some((format!("{utc:.0}Z"), utc.date().to_string()))
}

/// `2026-11-23T10:00:00` or `2026-11-23 10:00:00.5`: a date-time without a zone.
fn naive_date_time(t: &str) -> Option<DateTime> {
    // Fractional digits past the ninth are dropped, as they are in a time with a zone.
    let t = match t.rsplit_once('.') {
        Some((_, fraction)) if fraction.len() > 9 && fraction.bytes().all(|b| b.is_ascii_digit()) => &t[..t.len() - (fraction.len() - 9)],
        _ => t,
    };
    DateTime::strptime("%Y-%m-%dT%H:%M:%S%.f", t).or_else(|_| DateTime::strptime("%Y-%m-%d %H:%M:%S%.f", t)).ok()
}

/// The line of `order` that `item` (with its order fields `head`) repeats exactly, if any.
fn repeats(order: &ParsedOrder, head: &ParsedOrder, item: &Line) -> Option<u64> {
    let same_order = head.customer_id == order.customer_id
        && head.customer_name == order.customer_name
        && head.customer_email == order.customer_email
        && head.order_date == order.order_date;
    let same = |l: &&Line| l.sku == item.sku && l.quantity == item.quantity && l.unit_price == item.unit_price;
    same_order.then(|| order.lines.iter().find(same).map(|l| l.at)).flatten()
}

fn order_total(o: &ParsedOrder) -> i64 {
    // Bounded by construction: every line was admitted through `money::add_line`.
    o.lines.iter().map(|l| l.quantity * l.unit_price).sum()
}

/// A batch of orders as the rows that store them and the workflows that settle them.
struct OrderRows {
    orders: Vec<ParsedOrder>,
    rows: Vec<Vec<SqlValue>>,
    items: Vec<Vec<SqlValue>>,
    customers: Vec<Vec<SqlValue>>,
    workflows: Starts,
}

impl OrderRows {
    fn new(orders: Vec<ParsedOrder>, run: i64) -> Result<Self, BackendError> {
        let rows = orders
            .iter()
            .map(|o| {
                vec![
                    o.id.clone().into(),
                    o.customer_id.into(),
                    "pending".into(),
                    order_total(o).into(),
                    o.order_date.clone().into(),
                    o.order_day.clone().into(),
                    workflow::workflow_id(&o.id).into(),
                    run.into(),
                ]
            })
            .collect();
        let workflows = workflow::prepare_many(orders.iter().map(|o| o.id.as_str()))?;
        let mut this = OrderRows { orders, rows, items: Vec::new(), customers: Vec::new(), workflows };
        this.dependent_rows();
        Ok(this)
    }

    /// Items and customers of the orders kept (again after some were refused).
    fn dependent_rows(&mut self) {
        self.items = self
            .orders
            .iter()
            .flat_map(|o| {
                o.lines.iter().enumerate().map(|(i, l)| {
                    vec![o.id.clone().into(), (i as i64 + 1).into(), l.sku.clone().into(), l.quantity.into(), l.unit_price.into()]
                })
            })
            .collect();
        // A customer once per statement (the last line's name and email win).
        let mut customers: HashMap<i64, (&str, &str)> = HashMap::new();
        for o in &self.orders {
            customers.insert(o.customer_id, (&o.customer_name, &o.customer_email));
        }
        let mut customers: Vec<(i64, (&str, &str))> = customers.into_iter().collect();
        customers.sort_by_key(|c| c.0);
        self.customers = customers.into_iter().map(|(id, (name, email))| vec![id.into(), name.into(), email.into()]).collect();
    }
}

/// Stores a batch of orders and starts their workflows; returns (stored, duplicates, the
/// lines of orders whose id this same run stored before — lines that were not contiguous —
/// and the rows, for the caller to drop outside the transaction).
fn store_orders(tx: &mut dyn Tx, mut b: OrderRows, run: i64) -> Result<(u64, u64, Vec<Rejected>, OrderRows), BackendError> {
    let (mut duplicates, mut split) = (0, Vec::new());
    // One multi-row statement per table: an import batch is a handful of round trips.
    let mut inserted: HashSet<String> = insert_many(
        tx,
        "INSERT INTO orders (id, customer_id, status, total_cents, order_date, order_day, workflow_id, created_at)",
        &b.rows,
        "ON CONFLICT (id) DO NOTHING RETURNING id",
    )?
    .iter()
    .filter_map(|r| r.text(0).map(str::to_string))
    .collect();
    if inserted.len() < b.orders.len() {
        // An id twice in one batch (a split order) was inserted for its first lines only.
        let (stored, refused): (Vec<ParsedOrder>, Vec<ParsedOrder>) =
            std::mem::take(&mut b.orders).into_iter().partition(|o| inserted.remove(&o.id));
        for o in refused {
            // Already stored: by an earlier import (a duplicate) or earlier in this file (split).
            let same_run = tx.query("SELECT 1 FROM orders WHERE id = $1 AND created_at = $2", &[o.id.clone().into(), run.into()])?;
            if same_run.is_empty() {
                duplicates += 1;
            } else {
                for l in &o.line_numbers {
                    split.push(Rejected {
                        line: *l,
                        reason: format!("order_id: lines of order {} are not contiguous (it was stored from earlier lines)", o.id),
                    });
                }
            }
        }
        b.orders = stored;
        // The first of two same ids is the one stored: its workflow alone starts.
        let mut seen = HashSet::new();
        let first: Vec<bool> = b.workflows.ids().iter().map(|id| seen.insert(id.clone())).collect();
        let kept: HashSet<String> = b.orders.iter().map(|o| workflow::workflow_id(&o.id)).collect();
        let mut i = 0;
        b.workflows.retain(|id| {
            i += 1;
            first[i - 1] && kept.contains(id)
        });
        b.dependent_rows();
    }
    insert_many(
        tx,
        "INSERT INTO customers (id, name, email)",
        &b.customers,
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email",
    )?;
    insert_many(tx, "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents)", &b.items, "")?;
    b.workflows.start_in(tx)?;
    Ok((b.orders.len() as u64, duplicates, split, b))
}

/// Creates or updates products from CSV `sku,name,price,stock` (stock sets what can be sold).
pub async fn import_products<R: Read + Send + 'static>(conveyor: &Conveyor, input: R) -> Result<ImportReport, ImportError> {
    let parsed = tokio::task::spawn_blocking(move || -> Result<(Vec<NewProduct>, ImportReport), ImportError> {
        let mut rdr = reader(input);
        let headers = rdr.headers().map_err(|e| ImportError::Read(e.to_string()))?.clone();
        let cols = columns(&headers, &PRODUCT_COLUMNS)?;
        let mut report = ImportReport::default();
        let mut rejected = Rejections::default();
        let mut products = Vec::new();
        for rec in rdr.records() {
            report.rows += 1;
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    rejected.push(Rejected { line: e.position().map_or(0, |p| p.line()), reason: format!("line: {e}") });
                    continue;
                }
            };
            let line = rec.position().map_or(report.rows + 1, |p| p.line());
            let f = |n: &str| rec.get(cols[n]).unwrap_or("").trim().to_string();
            let sku = f("sku");
            let name = f("name");
            let check = || -> Result<(i64, i64), String> {
                if sku.is_empty() || sku.len() > 100 {
                    return Err("sku: must be 1 to 100 characters".into());
                }
                if name.is_empty() {
                    return Err("name: is empty".into());
                }
                let price = parse_cents(&f("price")).map_err(|e| format!("price: {e}"))?;
                let stock = f("stock")
                    .parse::<i64>()
                    .ok()
                    .filter(|s| *s >= 0)
                    .ok_or(format!("stock: {:?} is not a whole number from 0", f("stock")))?;
                Ok((price, stock))
            };
            match check() {
                Ok((price, stock)) => products.push((sku, name, price, stock)),
                Err(reason) => rejected.push(Rejected { line, reason }),
            }
        }
        rejected.report(&mut report);
        Ok((products, report))
    })
    .await
    .map_err(|e| ImportError::Read(e.to_string()))??;
    let (products, mut report) = parsed;
    for chunk in products.chunks(1_000) {
        let chunk = chunk.to_vec();
        report.orders += conveyor
            .backend()
            .transact(move |tx| {
                let now = now_ms();
                for (sku, name, price, stock) in chunk.iter() {
                    tx.execute(
                        "INSERT INTO products (sku, name, price_cents, stock, reserved, updated_at) VALUES ($1, $2, $3, $4, 0, $5)
                         ON CONFLICT (sku) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents,
                                                         stock = excluded.stock, updated_at = excluded.updated_at",
                        &[sku.as_str().into(), name.as_str().into(), (*price).into(), (*stock).into(), now.into()],
                    )?;
                }
                Ok(chunk.len() as u64)
            })
            .await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::parse_date;

    #[test]
    fn order_dates_become_utc_text_and_day() {
        for (text, at, day) in [
            ("2026-11-23", "2026-11-23T00:00:00Z", "2026-11-23"),
            (" 2026-1-5 ", "2026-01-05T00:00:00Z", "2026-01-05"),
            ("9999-12-31", "9999-12-31T00:00:00Z", "9999-12-31"),
            ("2026-11-23T10:00:00Z", "2026-11-23T10:00:00Z", "2026-11-23"),
            ("2026-11-23t10:00:00z", "2026-11-23T10:00:00Z", "2026-11-23"),
            ("2026-11-23 10:00:00+02:00", "2026-11-23T08:00:00Z", "2026-11-23"),
            // The day is the UTC day, not the sender's.
            ("2026-11-23T00:30:00+01:00", "2026-11-22T23:30:00Z", "2026-11-22"),
            ("2026-11-23T23:30:00-01:00", "2026-11-24T00:30:00Z", "2026-11-24"),
            // Fractions are cut, not rounded.
            ("2026-11-23T10:00:00.987654Z", "2026-11-23T10:00:00Z", "2026-11-23"),
            // No zone is UTC.
            ("2026-11-23T10:00:00", "2026-11-23T10:00:00Z", "2026-11-23"),
            ("2026-11-23 10:00:00.5", "2026-11-23T10:00:00Z", "2026-11-23"),
            ("2026-11-23T10:00:00.1234567891", "2026-11-23T10:00:00Z", "2026-11-23"),
            ("2026-11-23T1:2:3", "2026-11-23T01:02:03Z", "2026-11-23"),
        ] {
            assert_eq!(parse_date(text), Some((at.to_string(), day.to_string())), "{text:?}");
        }
        for text in [
            "",
            "tomorrow",
            "23/11/2026",
            "2026-02-30",
            "2026-11-23T10:00",
            "2026-11-23T25:00:00",
            "2026-11-23T10:00:00.Z",
            "2026-11-23T10:00:00+0200",
            "2026-11-23T10:00:00Z[UTC]",
        ] {
            assert_eq!(parse_date(text), None, "{text:?}");
        }
    }

    #[test]
    fn crlf_becomes_lf_and_lone_crs_stay() {
        let mut s = String::new();
        super::Lf::new(std::io::Cursor::new(b"a\r\nb\rc\r\n\r".to_vec())).read_to_string(&mut s).unwrap();
        assert_eq!(s, "a\nb\rc\n\r");
    }
}
