//! Wall-clock time as unix milliseconds, the unit every backend stores, and the RFC 3339 text
//! that partners and API clients send it as.

use std::time::{SystemTime, UNIX_EPOCH};

use jiff::civil::{Date, Time};
use jiff::tz::Offset;

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Unix microseconds, for rates of thousands a second (rate limits).
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Unix milliseconds of an RFC 3339 time: `2026-11-23T10:00:00Z`, `2026-11-23 10:00:00.5+02:00`.
///
/// The grammar is RFC 3339's and no wider: a four-digit year and two-digit fields, `T`, `t` or a
/// space between date and time, any number of fractional digits (nine are kept), then `Z`, `z` or
/// an offset `±HH:MM` up to 23:59 (`−`, U+2212, also reads as minus). jiff's own parser takes
/// more (`+0200`, `+02`, `[Europe/Paris]`, `T10Z`); what the API and the partner feeds accept
/// should not widen with a library's leniency.
///
/// A leap second (`:60`) reads as `:59`. Milliseconds are rounded down, not toward zero, so
/// times before 1970 keep their order.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let two = |i: usize| (b[i].is_ascii_digit() && b[i + 1].is_ascii_digit()).then(|| ((b[i] - b'0') * 10 + (b[i + 1] - b'0')) as i8);
    let date = Date::new(i16::from(two(0)?) * 100 + i16::from(two(2)?), two(5)?, two(8)?).ok()?;
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    if second > 60 {
        return None;
    }
    // Bytes 0..19 are ASCII, so 19 is a character boundary.
    let mut rest = &text[19..];
    let mut nanos = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &fraction[..digits.min(9)];
        nanos = kept.parse::<i32>().ok()? * 10i32.pow(9 - kept.len() as u32);
        rest = &fraction[digits..];
    }
    let time = Time::new(hour, minute, second.min(59), nanos).ok()?;
    let offset = match rest {
        "Z" | "z" => Offset::UTC,
        _ => {
            let (sign, hh_mm) = if let Some(r) = rest.strip_prefix('+') {
                (1, r)
            } else {
                (-1, rest.strip_prefix('-').or_else(|| rest.strip_prefix('\u{2212}'))?)
            };
            let o = hh_mm.as_bytes();
            if o.len() != 5 || o[2] != b':' {
                return None;
            }
            let field = |i: usize| {
                (o[i].is_ascii_digit() && o[i + 1].is_ascii_digit()).then(|| i32::from(o[i] - b'0') * 10 + i32::from(o[i + 1] - b'0'))
            };
            let (hours, minutes) = (field(0)?, field(3)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).ok()?
        }
    };
    let at = offset.to_timestamp(date.to_datetime(time)).ok()?;
    i64::try_from(at.as_nanosecond().div_euclid(1_000_000)).ok()
}

/// `2026-11-23T10:00:00.000Z`: unix milliseconds as RFC 3339 in UTC, always with three fractional
/// digits; `None` past the year 9999.
pub fn format_rfc3339_ms(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms).ok().map(|t| format!("{t:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_reads_utc_offsets_and_fractions() {
        let ten = 1_795_428_000_000; // 2026-11-23T10:00:00Z
        for (text, ms) in [
            ("2026-11-23T10:00:00Z", ten),
            ("2026-11-23t10:00:00z", ten),
            ("2026-11-23T10:00:00-00:00", ten),
            ("2026-11-23 10:00:00+02:00", ten - 2 * 3_600_000),
            ("2026-11-23T10:00:00\u{2212}02:30", ten + 9_000_000),
            ("2026-11-23T10:00:00+23:59", ten - 86_340_000),
            ("2026-11-23T10:00:00.5Z", ten + 500),
            ("2026-01-02T03:04:05.678Z", 1_767_323_045_678),
            // Digits past the ninth are read and dropped.
            ("2026-11-23T10:00:00.1234567891Z", ten + 123),
            ("1969-12-31T23:59:59.9999Z", -1),
            ("0000-01-01T00:00:00Z", -62_167_219_200_000),
            // A leap second is the second before it.
            ("2026-11-23T23:59:60Z", ten + 50_399_000),
        ] {
            assert_eq!(parse_rfc3339_ms(text), Some(ms), "{text}");
        }
    }

    #[test]
    fn rfc3339_refuses_everything_else() {
        for text in [
            "",
            "2026-11-23",
            "2026-11-23T10:00:00",
            "2026-11-23T10:00Z",
            "2026-1-23T10:00:00Z",
            "2026-11-23T10:00:00+0200",
            "2026-11-23T10:00:00+02",
            "2026-11-23T10:00:00+24:00",
            "2026-11-23T10:00:00+02:60",
            "2026-11-23T10:00:00Z[UTC]",
            "2026-11-23T10:00:00,5Z",
            "2026-11-23T10:00:00.Z",
            "2026-02-29T10:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:00:61Z",
            " 2026-11-23T10:00:00Z",
            "2026-11-23T10:00:00Z ",
            "2026-11-23T10:00:\u{2212}0Z",
        ] {
            assert_eq!(parse_rfc3339_ms(text), None, "{text:?}");
        }
    }

    #[test]
    fn rfc3339_text_has_milliseconds_and_z() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (1_767_323_045_678, "2026-01-02T03:04:05.678Z"),
            (1_795_428_000_000, "2026-11-23T10:00:00.000Z"),
        ] {
            assert_eq!(format_rfc3339_ms(ms).as_deref(), Some(text));
            assert_eq!(parse_rfc3339_ms(text), Some(ms));
        }
        assert_eq!(format_rfc3339_ms(i64::MAX), None);
    }
}
