//! Money as integer cents: parsed from decimal text exactly, shown as a number with two decimals.

/// `"19.99"` → 1999. At most two decimals; no sign, exponent or thousands separator.
pub fn parse_cents(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{t:?} is not a decimal amount like 19.99"));
    }
    if frac.len() > 2 {
        return Err(format!("{t:?} has more than two decimals"));
    }
    let whole: i64 = whole.parse().map_err(|_| format!("{t:?} is too large"))?;
    let frac: i64 = format!("{frac:0<2}").parse().unwrap_or(0);
    whole
        .checked_mul(100)
        .and_then(|c| c.checked_add(frac))
        .filter(|c| *c <= 1_000_000_000_000)
        .ok_or_else(|| format!("{t:?} is too large"))
}

/// The largest order total accepted, in cents (10 billion in major units): far beyond any real
/// order, and small enough that sums over millions of orders stay exact in 64-bit integers.
pub const MAX_ORDER_CENTS: i64 = 1_000_000_000_000;

/// `quantity × unit_price` added to `total`, or `None` past [`MAX_ORDER_CENTS`].
pub fn add_line(total: i64, quantity: i64, unit_price: i64) -> Option<i64> {
    quantity.checked_mul(unit_price).and_then(|l| total.checked_add(l)).filter(|t| *t <= MAX_ORDER_CENTS)
}

/// 5997 → 59.97 (a JSON number, exact to the cent for any amount below 2^53 cents).
pub fn to_major(cents: i64) -> f64 {
    (cents as f64) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_cents("19.99"), Ok(1999));
        assert_eq!(parse_cents("19.9"), Ok(1990));
        assert_eq!(parse_cents("19"), Ok(1900));
        assert_eq!(parse_cents("0.07"), Ok(7));
        assert!(parse_cents("-1").is_err());
        assert!(parse_cents("1.999").is_err());
        assert!(parse_cents("1e3").is_err());
        assert!(parse_cents("").is_err());
        assert!(parse_cents(".5").is_err());
        assert_eq!(to_major(5997), 59.97);
    }
}
