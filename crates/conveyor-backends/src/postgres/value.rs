//! [`SqlValue`] to and from PostgreSQL's types. The engine and the applications pass loosely
//! typed values (`Int`, `Text`, …) in SQL written once for both databases; PostgreSQL knows the
//! type each parameter must have (from the prepared statement), so a value is converted to that
//! type here — an `Int` bound to an `INTEGER` column is sent as `int4`, to a `TEXT` one as its
//! decimal text — and results are read back by their column types.

use std::error::Error;

use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::Row as PgRow;

use conveyor_core::backend::{BackendError, Cause, Result, Row, SqlValue};

type BoxError = Box<dyn Error + Sync + Send>;

/// A parameter, converted to whatever type the statement expects.
#[derive(Debug)]
pub(crate) struct Param<'a>(pub(crate) &'a SqlValue);

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut postgres::types::private::BytesMut) -> std::result::Result<IsNull, BoxError> {
        let v = self.0;
        if matches!(v, SqlValue::Null) {
            return Ok(IsNull::Yes);
        }
        let bad = || -> BoxError { format!("cannot pass {v:?} as {ty}").into() };
        match *ty {
            Type::INT8 => int(v).ok_or_else(bad)?.to_sql(ty, out),
            Type::INT4 => i32::try_from(int(v).ok_or_else(bad)?).map_err(|_| bad())?.to_sql(ty, out),
            Type::INT2 => i16::try_from(int(v).ok_or_else(bad)?).map_err(|_| bad())?.to_sql(ty, out),
            Type::FLOAT8 => real(v).ok_or_else(bad)?.to_sql(ty, out),
            Type::FLOAT4 => (real(v).ok_or_else(bad)? as f32).to_sql(ty, out),
            Type::BOOL => (int(v).ok_or_else(bad)? != 0).to_sql(ty, out),
            Type::BYTEA => match v {
                SqlValue::Blob(b) => b.to_sql(ty, out),
                SqlValue::Text(t) => t.as_bytes().to_sql(ty, out),
                _ => Err(bad()),
            },
            Type::NUMERIC => Err(format!("pass {v:?} to a NUMERIC parameter through a cast, e.g. $1::bigint").into()),
            _ if !text_like(ty) => Err(format!("cannot pass {v:?} as {ty}: cast the parameter, e.g. $1::text").into()),
            _ => {
                // Text-like (TEXT, VARCHAR, NAME, JSON, unknown): the value's text.
                let text = match v {
                    SqlValue::Text(t) => t.clone(),
                    SqlValue::Int(i) => i.to_string(),
                    SqlValue::Real(r) => r.to_string(),
                    SqlValue::Blob(b) => String::from_utf8_lossy(b).into_owned(),
                    SqlValue::Null => unreachable!("handled above"),
                };
                if *ty == Type::JSONB {
                    // jsonb's binary form is a version byte then the text.
                    out.extend_from_slice(&[1]);
                    out.extend_from_slice(text.as_bytes());
                    Ok(IsNull::No)
                } else {
                    text.as_str().to_sql(&Type::TEXT, out)
                }
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A parameter that owns its value, for a statement queued to go out later (see [`super::pipe`]).
#[derive(Debug)]
pub(crate) struct OwnedParam(pub(crate) SqlValue);

impl ToSql for OwnedParam {
    fn to_sql(&self, ty: &Type, out: &mut postgres::types::private::BytesMut) -> std::result::Result<IsNull, BoxError> {
        Param(&self.0).to_sql(ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn int(v: &SqlValue) -> Option<i64> {
    match v {
        SqlValue::Int(i) => Some(*i),
        SqlValue::Real(r) if r.fract() == 0.0 => Some(*r as i64),
        SqlValue::Text(t) => t.parse().ok(),
        _ => None,
    }
}

fn real(v: &SqlValue) -> Option<f64> {
    match v {
        SqlValue::Int(i) => Some(*i as f64),
        SqlValue::Real(r) => Some(*r),
        SqlValue::Text(t) => t.parse().ok(),
        _ => None,
    }
}

pub(crate) fn params(values: &[SqlValue]) -> Vec<Param<'_>> {
    values.iter().map(Param).collect()
}

pub(crate) fn refs<'a>(p: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    p.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// PostgreSQL's NUMERIC (what `sum(bigint)` and `avg` return), read as an integer when it has
/// no fraction and fits, else as a float.
struct Numeric(SqlValue);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        if raw.len() < 8 {
            return Err("a truncated NUMERIC".into());
        }
        let word = |i: usize| i16::from_be_bytes([raw[i], raw[i + 1]]);
        let (ndigits, weight, sign, dscale) = (word(0) as usize, word(2) as i32, u16::from_be_bytes([raw[4], raw[5]]), word(6));
        match sign {
            0xC000 => return Ok(Numeric(SqlValue::Real(f64::NAN))),
            0xD000 => return Ok(Numeric(SqlValue::Real(f64::INFINITY))),
            0xF000 => return Ok(Numeric(SqlValue::Real(f64::NEG_INFINITY))),
            _ => {}
        }
        if raw.len() < 8 + 2 * ndigits {
            return Err("a truncated NUMERIC".into());
        }
        let digits: Vec<i64> = (0..ndigits).map(|i| word(8 + 2 * i) as i64).collect();
        let negative = sign == 0x4000;
        // Base-10000 digits; digit i is worth 10000^(weight - i).
        let exact = dscale == 0 && weight < 8 && digits.len() as i32 <= weight + 1;
        if exact {
            let mut v: i128 = 0;
            for i in 0..=weight {
                v = v * 10_000 + digits.get(i as usize).copied().unwrap_or(0) as i128;
            }
            let v = if negative { -v } else { v };
            if let Ok(v) = i64::try_from(v) {
                return Ok(Numeric(SqlValue::Int(v)));
            }
        }
        let mut f = 0f64;
        for (i, d) in digits.iter().enumerate() {
            f += *d as f64 * 10_000f64.powi(weight - i as i32);
        }
        Ok(Numeric(SqlValue::Real(if negative { -f } else { f })))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

fn cell(row: &PgRow, i: usize) -> std::result::Result<SqlValue, postgres::Error> {
    let ty = row.columns()[i].type_().clone();
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map_or(SqlValue::Null, SqlValue::Int),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map_or(SqlValue::Null, |v| SqlValue::Int(v as i64)),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map_or(SqlValue::Null, |v| SqlValue::Int(v as i64)),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map_or(SqlValue::Null, |v| SqlValue::Int(v as i64)),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map_or(SqlValue::Null, SqlValue::Real),
        Type::FLOAT4 => row.try_get::<_, Option<f32>>(i)?.map_or(SqlValue::Null, |v| SqlValue::Real(v as f64)),
        Type::NUMERIC => row.try_get::<_, Option<Numeric>>(i)?.map_or(SqlValue::Null, |n| n.0),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map_or(SqlValue::Null, SqlValue::Blob),
        Type::JSONB => row.try_get::<_, Option<Jsonb>>(i)?.map_or(SqlValue::Null, |j| SqlValue::Text(j.0)),
        _ => row.try_get::<_, Option<Text>>(i)?.map_or(SqlValue::Null, |t| SqlValue::Text(t.0)),
    })
}

/// Types whose binary form is their text (TEXT, VARCHAR, NAME, JSON, enums…).
fn text_like(ty: &Type) -> bool {
    matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::JSON | Type::UNKNOWN | Type::XML)
        || matches!(ty.kind(), postgres::types::Kind::Enum(_))
}

struct Text(String);

impl<'a> FromSql<'a> for Text {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        Ok(Text(String::from_utf8_lossy(raw).into_owned()))
    }
    /// Other types (timestamps, uuids, arrays) would read as garbage: the query must cast them
    /// (`::text`), and says so.
    fn accepts(ty: &Type) -> bool {
        text_like(ty)
    }
}

struct Jsonb(String);

impl<'a> FromSql<'a> for Jsonb {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        Ok(Jsonb(String::from_utf8_lossy(raw.get(1..).unwrap_or_default()).into_owned()))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

pub(crate) fn row(r: &PgRow) -> Result<Row> {
    (0..r.len()).map(|i| cell(r, i).map_err(pg_err)).collect()
}

/// A driver error as the engine's, the driver's error kept as the source: a lost connection is
/// `Unavailable` (retry later), a unique violation (SQLSTATE 23505) `Unique`, anything else
/// `Storage` with the server's message.
pub(crate) fn pg_err(e: postgres::Error) -> BackendError {
    if e.is_closed() {
        let msg = format!("PostgreSQL connection lost: {e}");
        return BackendError::Unavailable(Cause::new(msg).with_source(e));
    }
    let (kind, msg): (fn(Cause) -> BackendError, String) = match e.as_db_error() {
        Some(db) => {
            let mut msg = format!("{}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                msg.push_str(&format!(" ({d})"));
            }
            // Errors a new connection cures: the server shutting down or restarting, a lost
            // link, a database gone, a read-only (demoted) server after a failover.
            let code = db.code().code();
            let kind: fn(Cause) -> BackendError = if code == "23505" {
                BackendError::Unique
            } else if code.starts_with("08") || code.starts_with("57P") || code == "25006" || code == "53300" {
                BackendError::Unavailable
            } else {
                BackendError::Storage
            };
            (kind, msg)
        }
        None => {
            let text = with_causes(&e);
            let kind: fn(Cause) -> BackendError = if e.source().is_some_and(|s| s.is::<std::io::Error>()) || text.contains("connection") {
                BackendError::Unavailable
            } else {
                BackendError::Storage
            };
            (kind, format!("PostgreSQL: {text}"))
        }
    };
    kind(Cause::new(msg).with_source(e))
}

/// The driver's message followed by its causes: the driver says only "error performing TLS
/// handshake" or "error connecting to server"; the cause says which certificate or address.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [ndigits.to_be_bytes(), weight.to_be_bytes(), sign.to_be_bytes(), dscale.to_be_bytes()] {
            v.extend_from_slice(&w);
        }
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numerics_read_as_integers_when_whole() {
        let n = |raw: Vec<u8>| Numeric::from_sql(&Type::NUMERIC, &raw).unwrap().0;
        // 123456789 = 1|2345|6789, weight 2.
        assert_eq!(n(numeric(3, 2, 0, 0, &[1, 2345, 6789])), SqlValue::Int(123_456_789));
        // 20000 = 2 × 10000^1 with trailing zero digits elided.
        assert_eq!(n(numeric(1, 1, 0, 0, &[2])), SqlValue::Int(20_000));
        assert_eq!(n(numeric(1, 0, 0x4000, 0, &[42])), SqlValue::Int(-42));
        assert_eq!(n(numeric(0, 0, 0, 0, &[])), SqlValue::Int(0));
        // 12.5 = 12 . 5000, weight 0, dscale 1.
        assert_eq!(n(numeric(2, 0, 0, 1, &[12, 5000])), SqlValue::Real(12.5));
    }
}
