//! The parser thread: lines validated and grouped into orders, batches of orders handed over
//! with their rows built; dates read strictly.

use super::*;

pub(super) fn parse_orders<R: Read>(
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
                } else if bad.is_none() && crate::money::add_line(order_total(order), item.quantity, item.unit_price).is_none() {
                    let reason = format!("the order's total would exceed {}", crate::money::to_major(crate::money::MAX_ORDER_CENTS));
                    rejected.push(Rejected { line, reason: format!("quantity: {reason}") });
                    *bad = Some((line, reason));
                } else {
                    order.lines.push(item);
                }
            }
            (None, Ok((head, item))) => {
                let mut order = head;
                if crate::money::add_line(0, item.quantity, item.unit_price).is_none() {
                    let reason = format!("the order's total would exceed {}", crate::money::to_major(crate::money::MAX_ORDER_CENTS));
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
pub(super) fn parse_line(
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
pub(super) fn naive_date_time(t: &str) -> Option<DateTime> {
    // Fractional digits past the ninth are dropped, as they are in a time with a zone.
    let t = match t.rsplit_once('.') {
        Some((_, fraction)) if fraction.len() > 9 && fraction.bytes().all(|b| b.is_ascii_digit()) => &t[..t.len() - (fraction.len() - 9)],
        _ => t,
    };
    DateTime::strptime("%Y-%m-%dT%H:%M:%S%.f", t).or_else(|_| DateTime::strptime("%Y-%m-%d %H:%M:%S%.f", t)).ok()
}

/// The line of `order` that `item` (with its order fields `head`) repeats exactly, if any.
pub(super) fn repeats(order: &ParsedOrder, head: &ParsedOrder, item: &Line) -> Option<u64> {
    let same_order = head.customer_id == order.customer_id
        && head.customer_name == order.customer_name
        && head.customer_email == order.customer_email
        && head.order_date == order.order_date;
    let same = |l: &&Line| l.sku == item.sku && l.quantity == item.quantity && l.unit_price == item.unit_price;
    same_order.then(|| order.lines.iter().find(same).map(|l| l.at)).flatten()
}

pub(super) fn order_total(o: &ParsedOrder) -> i64 {
    // Bounded by construction: every line was admitted through `money::add_line`.
    o.lines.iter().map(|l| l.quantity * l.unit_price).sum()
}
