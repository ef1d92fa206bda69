//! [`Tx`] on SQLite: SQL run by the writer inside the current group commit's savepoint.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use conveyor_core::backend::{Result, Row, SqlValue, Tx};
use conveyor_core::job::{EnqueueOutcome, NewJob};

use super::storage_err;
use super::writer::WriteCtx;

pub(crate) struct SqliteTx<'a> {
    pub(crate) ctx: &'a mut WriteCtx,
}

struct Param<'a>(&'a SqlValue);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
            SqlValue::Int(v) => ToSqlOutput::Owned(Value::Integer(*v)),
            SqlValue::Real(v) => ToSqlOutput::Owned(Value::Real(*v)),
            SqlValue::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            SqlValue::Blob(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
        })
    }
}

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        let p: Vec<Param<'_>> = params.iter().map(Param).collect();
        if sql.len() > ONE_OFF {
            let mut st = self.ctx.conn.prepare(&translate_placeholders(sql)).map_err(storage_err)?;
            return st.execute(rusqlite::params_from_iter(p.iter())).map(|n| n as u64).map_err(storage_err);
        }
        let sql = translated(&mut self.ctx.translated, sql);
        let mut st = self.ctx.conn.prepare_cached(sql).map_err(storage_err)?;
        st.execute(rusqlite::params_from_iter(p.iter())).map(|n| n as u64).map_err(storage_err)
    }

    fn query(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>> {
        if sql.len() > ONE_OFF {
            let mut st = self.ctx.conn.prepare(&translate_placeholders(sql)).map_err(storage_err)?;
            return rows_of(&mut st, params);
        }
        let sql = translated(&mut self.ctx.translated, sql).to_string();
        query_translated(&self.ctx.conn, &sql, params)
    }

    fn execute_script(&mut self, sql: &str) -> Result<()> {
        self.ctx.conn.execute_batch(sql).map_err(storage_err)
    }

    fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        for job in &jobs {
            job.validate().map_err(conveyor_core::BackendError::Invalid)?;
        }
        self.ctx.enqueue(jobs)
    }
}

/// The translation of `sql`, from the cache (bounded: cleared when it grows past 1,024 texts,
/// which only generated SQL would do).
fn translated<'a>(cache: &'a mut std::collections::HashMap<String, String>, sql: &str) -> &'a str {
    if !cache.contains_key(sql) {
        if cache.len() >= 1_024 {
            cache.clear();
        }
        cache.insert(sql.to_string(), translate_placeholders(sql));
    }
    &cache[sql]
}

pub(crate) fn query(conn: &rusqlite::Connection, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>> {
    query_translated(conn, &translate_placeholders(sql), params)
}

fn query_translated(conn: &rusqlite::Connection, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>> {
    let mut st = conn.prepare_cached(sql).map_err(storage_err)?;
    rows_of(&mut st, params)
}

/// SQL longer than this (generated multi-row statements) is prepared for one use, not cached:
/// such texts rarely repeat and would push the hot statements out of the cache.
const ONE_OFF: usize = 4096;

fn rows_of(st: &mut rusqlite::Statement<'_>, params: &[SqlValue]) -> Result<Vec<Row>> {
    let cols = st.column_count();
    let p: Vec<Param<'_>> = params.iter().map(Param).collect();
    let rows = st
        .query_map(rusqlite::params_from_iter(p.iter()), |r| {
            (0..cols)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => SqlValue::Null,
                        ValueRef::Integer(v) => SqlValue::Int(v),
                        ValueRef::Real(v) => SqlValue::Real(v),
                        ValueRef::Text(v) => SqlValue::Text(String::from_utf8_lossy(v).into_owned()),
                        ValueRef::Blob(v) => SqlValue::Blob(v.to_vec()),
                    })
                })
                .collect::<rusqlite::Result<Row>>()
        })
        .map_err(storage_err)?;
    rows.collect::<rusqlite::Result<Vec<Row>>>().map_err(storage_err)
}

/// Rewrites PostgreSQL-style `$1` placeholders to SQLite's `?1`, leaving string literals and
/// quoted identifiers alone, so applications write one SQL text for both databases.
pub(crate) fn translate_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    out.push(c);
                }
                '$' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('?'),
                _ => out.push(c),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::translate_placeholders;

    #[test]
    fn placeholders_outside_literals_are_rewritten() {
        assert_eq!(translate_placeholders("SELECT $1, '$2', \"$3\" WHERE a = $10"), "SELECT ?1, '$2', \"$3\" WHERE a = ?10");
    }
}
