//! [`Tx`] on SQLite: SQL run by the writer inside the current group commit's savepoint.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use conveyor_core::backend::{Result, Row, SqlValue, Tx};
use conveyor_core::job::{EnqueueOutcome, NewJob};

use super::storage_err;
use super::writer::{InsertKey, WriteCtx};

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

    fn insert_rows(&mut self, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
        // Statements of a few fixed sizes, so their texts repeat and are parsed once per
        // process (a text per batch size costs more to parse than to run). Not a statement per
        // row: every statement in the writer's savepoint pays for a statement journal.
        let width = rows.first().map(Vec::len).unwrap_or(0);
        let mut out = Vec::new();
        let mut rest = rows;
        while !rest.is_empty() {
            let n = INSERT_CHUNKS.iter().copied().find(|&n| n <= rest.len()).unwrap_or(1);
            let (chunk, tail_rows) = rest.split_at(n);
            rest = tail_rows;
            let sql = insert_sql(&mut self.ctx.insert_sql, head, width, n, tail);
            let mut st = self.ctx.conn.prepare_cached(sql).map_err(storage_err)?;
            let params = chunk.iter().flatten().map(Param);
            if st.column_count() > 0 {
                let cols = st.column_count();
                let mut found = st.query(rusqlite::params_from_iter(params)).map_err(storage_err)?;
                while let Some(r) = found.next().map_err(storage_err)? {
                    out.push((0..cols).map(|i| r.get_ref(i).map(value_of)).collect::<rusqlite::Result<Row>>().map_err(storage_err)?);
                }
            } else {
                st.execute(rusqlite::params_from_iter(params)).map_err(storage_err)?;
            }
        }
        Ok(out)
    }

    fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        for job in &jobs {
            job.validate().map_err(conveyor_core::BackendError::Invalid)?;
        }
        crate::relational::lifecycle::enqueue(self.ctx, jobs)
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

/// Rows per statement of `insert_rows`, largest first (at most 128 × width parameters).
const INSERT_CHUNKS: [usize; 5] = [128, 32, 8, 2, 1];

/// [`multi_row_sql`] from the cache (bounded like the translations').
fn insert_sql<'a>(
    cache: &'a mut std::collections::HashMap<u64, Vec<(InsertKey, String)>>,
    head: &str,
    width: usize,
    rows: usize,
    tail: &str,
) -> &'a str {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (head, tail, width, rows).hash(&mut h);
    let key = h.finish();
    let same = |k: &InsertKey| k.0 == head && k.1 == tail && k.2 == width && k.3 == rows;
    if !cache.get(&key).is_some_and(|v| v.iter().any(|(k, _)| same(k))) {
        if cache.len() >= 1_024 {
            cache.clear();
        }
        let made = ((head.to_string(), tail.to_string(), width, rows), multi_row_sql(head, width, rows, tail));
        cache.entry(key).or_default().push(made);
    }
    let found = cache[&key].iter().find(|(k, _)| same(k)).expect("inserted above");
    &found.1
}

/// `head VALUES (?1, …), (…) tail` for `rows` rows of `width` values.
fn multi_row_sql(head: &str, width: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * width * 6 + 16);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    let mut n = 0;
    for i in 0..rows {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for j in 0..width {
            n += 1;
            sql.push_str(if j == 0 { "?" } else { ", ?" });
            sql.push_str(&n.to_string());
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(tail);
    sql
}

fn value_of(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(v) => SqlValue::Int(v),
        ValueRef::Real(v) => SqlValue::Real(v),
        ValueRef::Text(v) => SqlValue::Text(String::from_utf8_lossy(v).into_owned()),
        ValueRef::Blob(v) => SqlValue::Blob(v.to_vec()),
    }
}

/// SQL longer than this (generated multi-row statements) is prepared for one use, not cached:
/// such texts rarely repeat and would push the hot statements out of the cache.
const ONE_OFF: usize = 4096;

fn rows_of(st: &mut rusqlite::Statement<'_>, params: &[SqlValue]) -> Result<Vec<Row>> {
    let cols = st.column_count();
    let p: Vec<Param<'_>> = params.iter().map(Param).collect();
    let rows = st
        .query_map(rusqlite::params_from_iter(p.iter()), |r| {
            (0..cols).map(|i| r.get_ref(i).map(value_of)).collect::<rusqlite::Result<Row>>()
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
