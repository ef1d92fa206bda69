//! Cron expressions for the scheduler: parsing them, and finding their fire times in a time zone.
//!
//! # Syntax
//!
//! Six fields `sec min hour day-of-month month day-of-week`, or five (seconds are then 0). A
//! seventh (year) field is not supported. Each field is `*`, a number, a range `a-b`, a step
//! `*/n`, `a-b/n` or `a/n` (from `a` to the field's maximum), or a comma list of those. `?` means
//! `*` and is allowed only in day-of-month and day-of-week. Months accept `JAN`-`DEC` and
//! weekdays `SUN`-`SAT`, case-insensitively; day-of-week 0 and 7 both mean Sunday, and `MON-SUN`
//! reads as Monday to Sunday.
//!
//! Macros: `@yearly`/`@annually`, `@monthly`, `@weekly` (Sunday), `@daily`/`@midnight`,
//! `@hourly`, and `@every <interval>` with units `s`, `m`, `h` (`30s`, `5m`, `1h30m`). `@every`
//! fires at multiples of the interval since the unix epoch, whatever the time zone, so every
//! process computes the same ticks.
//!
//! Day-of-month and day-of-week follow Vixie cron: when both are restricted (neither is `*` or
//! `?`), a day matches if either matches; otherwise the restricted one alone decides.
//!
//! # Time zones and daylight saving
//!
//! Fields match the wall-clock time in the schedule's zone. A wall time that does not exist
//! (skipped by a spring-forward gap) never fires, so `0 30 2 * * *` in Europe/Paris skips the
//! changeover day. A wall time that occurs twice (a fall-back overlap) fires once, at its first
//! occurrence. Fire times are always whole seconds.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;

/// How far ahead a search goes before concluding the expression cannot fire. Eight years rather
/// than five so that Feb 29 is still found across a century year that is not a leap year.
const SEARCH_YEARS: i16 = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("expected 5 or 6 fields (sec min hour day-of-month month day-of-week), got {0}")]
    FieldCount(usize),
    #[error("{field}: {value} is out of range {min}-{max}")]
    OutOfRange { field: &'static str, value: u32, min: u32, max: u32 },
    #[error("{field}: step must be at least 1")]
    ZeroStep { field: &'static str },
    #[error("{field}: range {lo}-{hi} is reversed")]
    ReversedRange { field: &'static str, lo: u32, hi: u32 },
    #[error("{field}: unknown name {name:?}")]
    UnknownName { field: &'static str, name: String },
    #[error("{field}: invalid value {value:?}")]
    InvalidValue { field: &'static str, value: String },
    #[error("unknown macro {0:?}")]
    UnknownMacro(String),
    #[error("@every: invalid interval {0:?}, expected e.g. 30s, 5m, 1h30m")]
    InvalidInterval(String),
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
}

/// A parsed cron expression bound to a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    tz_name: String,
    tz: TimeZone,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Fields(Fields),
    Every { interval_ms: i64 },
}

/// One bit per allowed value, indexed by the value itself (weekdays: Sunday = 0).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    /// Upper end for `*` and `a/n`; below `max` for day-of-week so 7 does not repeat Sunday.
    open_max: u32,
    names: &'static [&'static str],
    name_base: u32,
    question: bool,
}

const MONTHS: &[&str] = &["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const WEEKDAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const DOW: &str = "day-of-week";

const fn spec(name: &'static str, min: u32, max: u32, names: &'static [&'static str], question: bool) -> Spec {
    Spec { name, min, max, open_max: max, names, name_base: min, question }
}

const SPECS: [Spec; 6] = [
    spec("second", 0, 59, &[], false),
    spec("minute", 0, 59, &[], false),
    spec("hour", 0, 23, &[], false),
    spec("day-of-month", 1, 31, &[], true),
    spec("month", 1, 12, MONTHS, false),
    Spec { open_max: 6, ..spec(DOW, 0, 7, WEEKDAYS, true) },
];

impl CronSchedule {
    /// Parses `expr` in time zone `tz` (an IANA name like "Europe/Paris", or "UTC").
    pub fn parse(expr: &str, tz: &str) -> Result<CronSchedule, CronError> {
        let zone = if tz.eq_ignore_ascii_case("UTC") {
            TimeZone::UTC
        } else {
            TimeZone::get(tz).map_err(|_| CronError::UnknownTimeZone(tz.to_string()))?
        };
        let trimmed = expr.trim();
        let kind = match trimmed.strip_prefix('@') {
            Some(rest) => parse_macro(rest)?,
            None => Kind::Fields(parse_fields(trimmed)?),
        };
        Ok(CronSchedule { expr: expr.to_string(), tz_name: tz.to_string(), tz: zone, kind })
    }

    /// The first fire time strictly after `after` (unix milliseconds), as unix milliseconds;
    /// None if the expression can never fire again (e.g. Feb 30).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match &self.kind {
            Kind::Every { interval_ms } => after_ms.div_euclid(*interval_ms).checked_add(1)?.checked_mul(*interval_ms),
            Kind::Fields(fields) => self.next_wall_match(fields, after_ms),
        }
    }

    /// Every fire time in (from_ms, to_ms], oldest first, at most `limit` of them.
    pub fn fires_between(&self, from_ms: i64, to_ms: i64, limit: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let mut cursor = from_ms;
        while out.len() < limit {
            match self.next_after(cursor) {
                Some(t) if t <= to_ms => {
                    out.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        out
    }

    pub fn expression(&self) -> &str {
        &self.expr
    }

    pub fn timezone(&self) -> &str {
        &self.tz_name
    }

    fn next_wall_match(&self, fields: &Fields, after_ms: i64) -> Option<i64> {
        let start = Timestamp::from_second(after_ms.div_euclid(1000).checked_add(1)?).ok()?;
        let wall = self.tz.to_datetime(start);
        let limit = wall.year().saturating_add(SEARCH_YEARS);
        let (mut day, mut h, mut m, mut s) = (wall.date(), wall.hour() as u32, wall.minute() as u32, wall.second() as u32);
        loop {
            let candidate = fields.next_wall_time(day, h, m, s, limit)?;
            let resolved = self.tz.to_ambiguous_timestamp(candidate);
            // A wall time inside a gap never happens, so it must not fire. In an overlap the
            // earlier instant is the one that fires; if it is already past, the later one is a
            // repeat of a fire that happened (or was due) and is skipped too.
            if !matches!(resolved.offset(), AmbiguousOffset::Gap { .. }) {
                let ms = resolved.earlier().ok()?.as_millisecond();
                if ms > after_ms {
                    return Some(ms);
                }
            }
            (day, h, m, s) = (candidate.date(), candidate.hour() as u32, candidate.minute() as u32, candidate.second() as u32 + 1);
        }
    }
}

impl FromStr for CronSchedule {
    type Err = CronError;

    /// Parses an expression in UTC.
    fn from_str(expr: &str) -> Result<Self, Self::Err> {
        CronSchedule::parse(expr, "UTC")
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.expr, self.tz_name)
    }
}

impl Fields {
    /// The first matching wall time at or after `day h:m:s`. `h`, `m` and `s` may be one past
    /// their maximum; the lookups below then find nothing and carry into the next unit.
    fn next_wall_time(&self, mut day: Date, mut h: u32, mut m: u32, mut s: u32, limit: i16) -> Option<DateTime> {
        loop {
            if day.year() > limit {
                return None;
            }
            let month = day.month() as u32;
            match next_bit(self.months, month) {
                Some(next) if next == month => {}
                Some(next) => (day, h, m, s) = (Date::new(day.year(), next as i8, 1).ok()?, 0, 0, 0),
                None => {
                    (day, h, m, s) = (Date::new(day.year().checked_add(1)?, 1, 1).ok()?, 0, 0, 0);
                    continue;
                }
            }
            if !self.day_matches(day) {
                (day, h, m, s) = (day.tomorrow().ok()?, 0, 0, 0);
                continue;
            }
            match next_bit(self.hours, h) {
                Some(next) if next == h => {}
                Some(next) => (h, m, s) = (next, 0, 0),
                None => {
                    (day, h, m, s) = (day.tomorrow().ok()?, 0, 0, 0);
                    continue;
                }
            }
            match next_bit(self.minutes, m) {
                Some(next) if next == m => {}
                Some(next) => (m, s) = (next, 0),
                None => {
                    (h, m, s) = (h + 1, 0, 0);
                    continue;
                }
            }
            match next_bit(self.seconds, s) {
                Some(next) => s = next,
                None => {
                    (m, s) = (m + 1, 0);
                    continue;
                }
            }
            return DateTime::new(day.year(), day.month(), day.day(), h as i8, m as i8, s as i8, 0).ok();
        }
    }

    fn day_matches(&self, day: Date) -> bool {
        let dom = self.days & (1 << day.day()) != 0;
        let dow = self.weekdays & (1 << day.weekday().to_sunday_zero_offset()) != 0;
        // An unrestricted field has every bit set, so AND leaves the restricted one deciding.
        if self.days_restricted && self.weekdays_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }
}

/// The smallest set bit at or above `from`.
fn next_bit(bits: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let masked = bits & (u64::MAX << from);
    (masked != 0).then_some(masked.trailing_zeros())
}

fn parse_macro(rest: &str) -> Result<Kind, CronError> {
    let lower = rest.trim().to_ascii_lowercase();
    let fields = match lower.as_str() {
        "yearly" | "annually" => "0 0 0 1 1 *",
        "monthly" => "0 0 0 1 * *",
        "weekly" => "0 0 0 * * 0",
        "daily" | "midnight" => "0 0 0 * * *",
        "hourly" => "0 0 * * * *",
        _ => match lower.strip_prefix("every") {
            Some(arg) if arg.is_empty() || arg.starts_with(char::is_whitespace) => {
                return Ok(Kind::Every { interval_ms: parse_interval(arg.trim())? });
            }
            _ => return Err(CronError::UnknownMacro(format!("@{}", rest.trim()))),
        },
    };
    parse_fields(fields).map(Kind::Fields)
}

fn parse_interval(text: &str) -> Result<i64, CronError> {
    let bad = || CronError::InvalidInterval(text.to_string());
    let (mut total, mut number, mut digits) = (0i64, 0i64, false);
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            number = number.checked_mul(10).and_then(|n| n.checked_add(d.into())).ok_or_else(bad)?;
            digits = true;
            continue;
        }
        let unit_ms = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            _ => return Err(bad()),
        };
        if !digits {
            return Err(bad());
        }
        total = number.checked_mul(unit_ms).and_then(|n| total.checked_add(n)).ok_or_else(bad)?;
        (number, digits) = (0, false);
    }
    // Trailing digits without a unit are ambiguous, and a zero interval would never advance.
    if digits || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

fn parse_fields(expr: &str) -> Result<Fields, CronError> {
    let mut parts: Vec<&str> = expr.split_whitespace().collect();
    match parts.len() {
        6 => {}
        5 => parts.insert(0, "0"),
        n => return Err(CronError::FieldCount(n)),
    }
    let mut sets = [0u64; 6];
    for ((set, spec), text) in sets.iter_mut().zip(&SPECS).zip(&parts) {
        *set = parse_field(spec, text)?;
    }
    let unrestricted = |t: &str| t == "*" || t == "?";
    Ok(Fields {
        seconds: sets[0],
        minutes: sets[1],
        hours: sets[2],
        days: sets[3],
        months: sets[4],
        weekdays: (sets[5] | sets[5] >> 7) & 0x7f,
        days_restricted: !unrestricted(parts[3]),
        weekdays_restricted: !unrestricted(parts[5]),
    })
}

fn parse_field(spec: &Spec, text: &str) -> Result<u64, CronError> {
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(parse_step(spec, step)?)),
            None => (item, None),
        };
        let (lo, hi) = if range == "*" || (range == "?" && spec.question) {
            (spec.min, spec.open_max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (lo, hi) = (parse_value(spec, a, false)?, parse_value(spec, b, true)?);
            if lo > hi {
                return Err(CronError::ReversedRange { field: spec.name, lo, hi });
            }
            (lo, hi)
        } else {
            let value = parse_value(spec, range, false)?;
            (value, if step.is_some() { spec.open_max.max(value) } else { value })
        };
        bits |= (lo..=hi).step_by(step.unwrap_or(1)).fold(0, |acc, v| acc | 1 << v);
    }
    Ok(bits)
}

fn parse_step(spec: &Spec, text: &str) -> Result<usize, CronError> {
    match text.parse::<usize>() {
        Ok(0) => Err(CronError::ZeroStep { field: spec.name }),
        Ok(step) if text.bytes().all(|b| b.is_ascii_digit()) => Ok(step),
        _ => Err(CronError::InvalidValue { field: spec.name, value: text.to_string() }),
    }
}

fn parse_value(spec: &Spec, text: &str, range_end: bool) -> Result<u32, CronError> {
    let value = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u32>().map_err(|_| CronError::InvalidValue { field: spec.name, value: text.to_string() })?
    } else if let Some(i) = spec.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        let value = spec.name_base + i as u32;
        // So that `MON-SUN` is Monday through Sunday rather than a reversed range.
        if range_end && spec.name == DOW && value == 0 {
            7
        } else {
            value
        }
    } else if !spec.names.is_empty() && !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(CronError::UnknownName { field: spec.name, name: text.to_string() });
    } else {
        return Err(CronError::InvalidValue { field: spec.name, value: text.to_string() });
    };
    if value < spec.min || value > spec.max {
        return Err(CronError::OutOfRange { field: spec.name, value, min: spec.min, max: spec.max });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<Timestamp>().expect("test timestamp").as_millisecond()
    }

    fn sched(expr: &str, tz: &str) -> CronSchedule {
        CronSchedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    fn fields(expr: &str) -> Fields {
        match sched(expr, "UTC").kind {
            Kind::Fields(f) => f,
            other => panic!("{expr}: expected fields, got {other:?}"),
        }
    }

    fn bits(values: &[u32]) -> u64 {
        values.iter().fold(0, |acc, v| acc | 1 << v)
    }

    fn err(expr: &str) -> String {
        expr.parse::<CronSchedule>().expect_err(expr).to_string()
    }

    /// The next `n` fire times after `after`, as wall time with offset in the schedule's zone.
    fn next_n(s: &CronSchedule, after: &str, n: usize) -> Vec<String> {
        let mut t = ms(after);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap_or_else(|| panic!("{} stopped firing", s.expression()));
                let zoned = Timestamp::from_millisecond(t).expect("in range").to_zoned(s.tz.clone());
                zoned.strftime("%Y-%m-%d %H:%M:%S%:z").to_string()
            })
            .collect()
    }

    #[test]
    fn parses_every_field_form() {
        let all = fields("* * * * * *");
        assert_eq!((all.seconds, all.minutes, all.hours), (bits(&(0..60).collect::<Vec<_>>()), all.seconds, (1 << 24) - 1));
        assert_eq!((all.days, all.months, all.weekdays), ((1 << 32) - 2, (1 << 13) - 2, 0x7f));
        assert!(!all.days_restricted && !all.weekdays_restricted);

        let f = fields("5 4 3 2 1 0");
        assert_eq!([f.seconds, f.minutes, f.hours, f.days, f.months, f.weekdays], [bits(&[5]), bits(&[4]), 8, 4, 2, 1]);
        assert!(f.days_restricted && f.weekdays_restricted);

        assert_eq!(fields("1-5 * * * * *").seconds, bits(&[1, 2, 3, 4, 5]));
        assert_eq!(fields("*/15 * * * * *").seconds, bits(&[0, 15, 30, 45]));
        assert_eq!(fields("10-30/10 * * * * *").seconds, bits(&[10, 20, 30]));
        assert_eq!(fields("50/5 * * * * *").seconds, bits(&[50, 55]));
        assert_eq!(fields("1,3-4,*/30 * * * * *").seconds, bits(&[0, 1, 3, 4, 30]));
        assert_eq!(fields("0 0 */6 * * *").hours, bits(&[0, 6, 12, 18]));
        assert_eq!(fields("0 0 0 1/10 * *").days, bits(&[1, 11, 21, 31]));

        let q = fields("0 0 0 ? * ?");
        assert!(!q.days_restricted && !q.weekdays_restricted);
        assert_eq!((q.days, q.weekdays), (all.days, 0x7f));

        assert_eq!(fields("0 0 0 * JAN-MAR *").months, bits(&[1, 2, 3]));
        assert_eq!(fields("0 0 0 * jan,Dec *").months, bits(&[1, 12]));
        assert_eq!(fields("0 0 0 * * mon-FRI").weekdays, bits(&[1, 2, 3, 4, 5]));
        assert_eq!(fields("0 0 0 * * MON-SUN").weekdays, 0x7f);
        assert_eq!(fields("0 0 0 * * 7").weekdays, bits(&[0]));
        assert_eq!(fields("0 0 0 * * 5-7").weekdays, bits(&[0, 5, 6]));
        assert_eq!(fields("0 0 0 * * */2").weekdays, bits(&[0, 2, 4, 6]));
        assert_eq!(fields("0 0 0 * * SUN,sat").weekdays, bits(&[0, 6]));

        let five = fields("30 2 * * *");
        assert_eq!((five.seconds, five.minutes, five.hours), (1, bits(&[30]), bits(&[2])));
        assert_eq!(fields("  0  0  *  *  *  "), fields("0 0 0 * * *"));
    }

    #[test]
    fn parses_macros() {
        assert_eq!(fields("@yearly"), fields("0 0 0 1 1 *"));
        assert_eq!(fields("@annually"), fields("0 0 0 1 1 *"));
        assert_eq!(fields("@monthly"), fields("0 0 0 1 * *"));
        assert_eq!(fields("@weekly"), fields("0 0 0 * * SUN"));
        assert_eq!(fields("@daily"), fields("0 0 0 * * *"));
        assert_eq!(fields("@MIDNIGHT"), fields("0 0 0 * * *"));
        assert_eq!(fields("@hourly"), fields("0 0 * * * *"));
        for (expr, interval_ms) in [("@every 30s", 30_000), ("@every 5m", 300_000), ("@every 1h", 3_600_000), ("@every 1h30m", 5_400_000)] {
            assert_eq!(sched(expr, "UTC").kind, Kind::Every { interval_ms }, "{expr}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("61 * * * *", "minute: 61 is out of range 0-59"),
            ("60 * * * * *", "second: 60 is out of range 0-59"),
            ("0 24 * * *", "hour: 24 is out of range 0-23"),
            ("0 0 32 * *", "day-of-month: 32 is out of range 1-31"),
            ("0 0 0 * *", "day-of-month: 0 is out of range 1-31"),
            ("0 0 * 13 *", "month: 13 is out of range 1-12"),
            ("0 0 * * 8", "day-of-week: 8 is out of range 0-7"),
            ("*/0 * * * *", "minute: step must be at least 1"),
            ("0 0 * * 1-5/0", "day-of-week: step must be at least 1"),
            ("*/x * * * *", "minute: invalid value \"x\""),
            ("0 0 * FOO *", "month: unknown name \"FOO\""),
            ("0 0 * * FUN", "day-of-week: unknown name \"FUN\""),
            ("MON * * * *", "minute: invalid value \"MON\""),
            ("30-10 * * * *", "minute: range 30-10 is reversed"),
            ("0 0 * * FRI-MON", "day-of-week: range 5-1 is reversed"),
            ("? * * * *", "minute: invalid value \"?\""),
            ("1,,2 * * * *", "minute: invalid value \"\""),
            ("1-2-3 * * * *", "minute: invalid value \"2-3\""),
            ("-1 * * * *", "minute: invalid value \"\""),
            ("99999999999 * * * *", "minute: invalid value \"99999999999\""),
            ("0 0 0 * * * 2024", "expected 5 or 6 fields (sec min hour day-of-month month day-of-week), got 7"),
            ("* * * *", "expected 5 or 6 fields (sec min hour day-of-month month day-of-week), got 4"),
            ("", "expected 5 or 6 fields (sec min hour day-of-month month day-of-week), got 0"),
            ("@fortnightly", "unknown macro \"@fortnightly\""),
            ("@everyday", "unknown macro \"@everyday\""),
        ];
        for (expr, message) in cases {
            assert_eq!(err(expr), message, "{expr}");
        }
        for bad in ["@every", "@every 0s", "@every 5", "@every 5x", "@every h", "@every 1h 2m", "@every 99999999999999999999s"] {
            assert!(err(bad).starts_with("@every: invalid interval"), "{bad}: {}", err(bad));
        }
        let tz = CronSchedule::parse("* * * * *", "Mars/Olympus_Mons").expect_err("bad zone");
        assert_eq!(tz.to_string(), "unknown time zone \"Mars/Olympus_Mons\"");
    }

    #[test]
    fn every_fifteen_seconds() {
        let s: CronSchedule = "*/15 * * * * *".parse().expect("valid");
        let got = next_n(&s, "2024-01-01T00:00:00Z", 5);
        let want = ["00:00:15", "00:00:30", "00:00:45", "00:01:00", "00:01:15"].map(|t| format!("2024-01-01 {t}+00:00"));
        assert_eq!(got, want);
        // Strictly after, and sub-second offsets round to the next whole second.
        assert_eq!(s.next_after(ms("2024-01-01T00:00:14.999Z")), Some(ms("2024-01-01T00:00:15Z")));
        assert_eq!(s.next_after(ms("2024-01-01T00:00:15Z")), Some(ms("2024-01-01T00:00:30Z")));
    }

    #[test]
    fn weekdays_skip_weekends() {
        let s = sched("0 0 9 * * MON-FRI", "UTC");
        // 2024-01-05 is a Friday.
        let got = next_n(&s, "2024-01-05T10:00:00Z", 6);
        let want = ["08", "09", "10", "11", "12", "15"].map(|d| format!("2024-01-{d} 09:00:00+00:00"));
        assert_eq!(got, want);
    }

    #[test]
    fn day_31_skips_short_months() {
        let s = sched("0 0 0 31 * *", "UTC");
        let got = next_n(&s, "2024-01-31T00:00:00Z", 7);
        let want = ["2024-03", "2024-05", "2024-07", "2024-08", "2024-10", "2024-12", "2025-01"].map(|m| format!("{m}-31 00:00:00+00:00"));
        assert_eq!(got, want);
    }

    #[test]
    fn feb_29_only_in_leap_years() {
        let s = sched("0 0 12 29 FEB *", "UTC");
        assert_eq!(next_n(&s, "2024-03-01T00:00:00Z", 2), ["2028-02-29 12:00:00+00:00", "2032-02-29 12:00:00+00:00"]);
        // 2100 is not a leap year: the next one after 2096 is eight years away.
        assert_eq!(next_n(&s, "2096-03-01T00:00:00Z", 1), ["2104-02-29 12:00:00+00:00"]);
    }

    #[test]
    fn day_of_month_and_weekday_or_rule() {
        // September 2024 starts on a Sunday; the 13th is a Friday, October 13th a Sunday.
        let either = sched("0 0 0 13 * FRI", "UTC");
        let got = next_n(&either, "2024-09-01T00:00:00Z", 8);
        let days = ["09-06", "09-13", "09-20", "09-27", "10-04", "10-11", "10-13", "10-18"];
        assert_eq!(got, days.map(|d| format!("2024-{d} 00:00:00+00:00")));

        let dom_only = sched("0 0 0 13 * ?", "UTC");
        assert_eq!(next_n(&dom_only, "2024-09-01T00:00:00Z", 2), ["2024-09-13 00:00:00+00:00", "2024-10-13 00:00:00+00:00"]);
        for expr in ["0 0 0 ? * FRI", "0 0 0 * * 5"] {
            let dow_only = sched(expr, "UTC");
            assert_eq!(next_n(&dow_only, "2024-09-01T00:00:00Z", 2), ["2024-09-06 00:00:00+00:00", "2024-09-13 00:00:00+00:00"]);
        }
    }

    #[test]
    fn every_interval_aligns_to_epoch() {
        let s = sched("@every 30s", "UTC");
        assert_eq!(s.next_after(12_345), Some(30_000));
        assert_eq!(s.next_after(30_000), Some(60_000));
        assert_eq!(s.next_after(-1), Some(0));
        assert_eq!(s.next_after(-30_001), Some(-30_000));
        assert_eq!(s.fires_between(0, 120_000, 10), [30_000, 60_000, 90_000, 120_000]);
        assert_eq!(s.next_after(i64::MAX), None);
        // The zone does not shift ticks: an hourly interval in a +05:30 zone stays on UTC hours.
        let kolkata = sched("@every 1h", "Asia/Kolkata");
        assert_eq!(kolkata.next_after(ms("2024-05-01T10:15:00Z")), Some(ms("2024-05-01T11:00:00Z")));
    }

    #[test]
    fn spring_forward_skips_missing_wall_times() {
        // Paris jumps from 02:00 CET to 03:00 CEST on 2024-03-31.
        let daily = sched("0 30 2 * * *", "Europe/Paris");
        assert_eq!(daily.next_after(ms("2024-03-30T12:00:00+01:00")), Some(ms("2024-04-01T02:30:00+02:00")));
        let half_hourly = sched("0 */30 * * * *", "Europe/Paris");
        let got = half_hourly.fires_between(ms("2024-03-31T01:00:00+01:00"), ms("2024-03-31T03:30:00+02:00"), 10);
        assert_eq!(got, [ms("2024-03-31T01:30:00+01:00"), ms("2024-03-31T03:00:00+02:00"), ms("2024-03-31T03:30:00+02:00")]);
        // New York jumps from 02:00 EST to 03:00 EDT on 2024-03-10.
        let hourly = sched("0 0 * * * *", "America/New_York");
        assert_eq!(hourly.next_after(ms("2024-03-10T01:30:00-05:00")), Some(ms("2024-03-10T03:00:00-04:00")));
    }

    #[test]
    fn fall_back_fires_once() {
        // Paris repeats 02:00-03:00 on 2024-10-27: first at +02:00, then at +01:00.
        let daily = sched("0 30 2 * * *", "Europe/Paris");
        assert_eq!(daily.next_after(ms("2024-10-26T12:00:00+02:00")), Some(ms("2024-10-27T02:30:00+02:00")));
        assert_eq!(daily.next_after(ms("2024-10-27T02:30:00+02:00")), Some(ms("2024-10-28T02:30:00+01:00")));

        let half_hourly = sched("0 */30 * * * *", "Europe/Paris");
        let got = half_hourly.fires_between(ms("2024-10-27T01:45:00+02:00"), ms("2024-10-27T03:00:00+01:00"), 10);
        assert_eq!(got, [ms("2024-10-27T02:00:00+02:00"), ms("2024-10-27T02:30:00+02:00"), ms("2024-10-27T03:00:00+01:00")]);
        // Starting inside the repeated hour does not re-fire its wall times.
        assert_eq!(half_hourly.next_after(ms("2024-10-27T02:10:00+01:00")), Some(ms("2024-10-27T03:00:00+01:00")));

        let hourly = sched("0 0 * * * *", "America/New_York");
        let got = hourly.fires_between(ms("2024-11-03T00:30:00-04:00"), ms("2024-11-03T03:00:00-05:00"), 10);
        assert_eq!(got, [ms("2024-11-03T01:00:00-04:00"), ms("2024-11-03T02:00:00-05:00"), ms("2024-11-03T03:00:00-05:00")]);
    }

    #[test]
    fn fires_between_bounds_and_limit() {
        let s = sched("0 * * * * *", "UTC");
        let (from, to) = (ms("2024-01-01T00:00:00Z"), ms("2024-01-01T00:10:00Z"));
        let all = s.fires_between(from, to, 100);
        assert_eq!(all.len(), 10);
        assert_eq!((all[0], all[9]), (ms("2024-01-01T00:01:00Z"), to), "from is exclusive, to inclusive");
        assert!(all.windows(2).all(|w| w[1] - w[0] == 60_000));
        assert_eq!(s.fires_between(from, to, 3), all[..3]);
        assert!(s.fires_between(from, to, 0).is_empty());
        assert!(s.fires_between(to, from, 10).is_empty());
        assert!(s.fires_between(from, from + 59_999, 10).is_empty());
    }

    #[test]
    fn impossible_expressions_end_quickly() {
        let started = Instant::now();
        for expr in ["0 0 0 30 2 *", "0 0 0 31 4,6,9,11 *", "0 0 0 30 FEB ?"] {
            let s = sched(expr, "Europe/Paris");
            assert_eq!(s.next_after(0), None, "{expr}");
            assert!(s.fires_between(0, i64::MAX, 10).is_empty(), "{expr}");
        }
        assert!(started.elapsed().as_millis() < 1_000, "took {:?}", started.elapsed());
        // Out-of-range instants give None rather than panicking.
        assert_eq!(sched("* * * * * *", "UTC").next_after(i64::MAX), None);
        assert_eq!(sched("* * * * * *", "UTC").next_after(i64::MIN), None);
    }

    #[test]
    fn accessors_and_time_zones() {
        let utc: CronSchedule = "@daily".parse().expect("valid");
        assert_eq!((utc.expression(), utc.timezone()), ("@daily", "UTC"));
        assert_eq!(utc.to_string(), "@daily (UTC)");
        assert_eq!(utc.next_after(-1), Some(0), "pre-epoch instants work");

        let tokyo = sched("0 0 9 * * *", "Asia/Tokyo");
        assert_eq!(tokyo.timezone(), "Asia/Tokyo");
        assert_eq!(tokyo.next_after(ms("2024-06-01T00:00:00Z")), Some(ms("2024-06-02T00:00:00Z")));
        assert_eq!(tokyo.next_after(ms("2024-05-31T23:59:59Z")), Some(ms("2024-06-01T00:00:00Z")));
    }
}
