//! Lists page by page: by number up to [`MAX_DEPTH`] rows deep, or after a [`Cursor`] (keyset
//! paging, whose cost does not depend on the depth).

use serde::Serialize;

use super::{BackendError, Result, SqlValue};
use crate::job::JobId;

/// The deepest row an offset page may reach (`page × per_page`), and how far lists count:
/// an offset page costs the rows before it, so deeper reads go by [`Cursor`], whose cost does
/// not depend on the depth.
pub const MAX_DEPTH: u64 = 10_000;

/// Where a keyset page starts: the sort key of the last row of the page before it (`at` a
/// time or number, `id` the tie-breaker). Callers see it only encoded ([`Cursor::encode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub at: i64,
    pub id: String,
}

impl Cursor {
    pub fn new(at: i64, id: impl Into<String>) -> Self {
        Cursor { at, id: id.into() }
    }

    /// Opaque to callers (URL-safe base64), so its shape may change without breaking them.
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", self.at, self.id))
    }

    /// `None` for anything [`Cursor::encode`] did not produce.
    pub fn decode(s: &str) -> Option<Cursor> {
        use base64::Engine;
        if s.len() > 512 {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (at, id) = text.split_once('.')?;
        Some(Cursor { at: at.parse().ok()?, id: id.to_string() })
    }
}

/// Which page of a list: by number (`page` from 1), or after a cursor (then `page` is unused).
#[derive(Clone, Debug)]
pub struct Page {
    /// From 1.
    pub page: u32,
    pub per_page: u32,
    pub after: Option<Cursor>,
}

impl Page {
    pub fn new(page: u32, per_page: u32) -> Self {
        Page { page, per_page, after: None }
    }

    pub fn after(cursor: Cursor, per_page: u32) -> Self {
        Page { page: 1, per_page, after: Some(cursor) }
    }

    /// Rows skipped before this page; none after a cursor, whose condition does the skipping.
    pub fn offset(&self) -> u64 {
        if self.after.is_some() {
            return 0;
        }
        (self.page.max(1) as u64 - 1) * self.per_page as u64
    }

    /// The job id a page of jobs starts after (job lists are ordered by id, or by a time
    /// and then id).
    pub fn after_job(&self) -> Result<Option<JobId>> {
        self.after
            .as_ref()
            .map(|c| c.id.parse::<JobId>().map_err(|_| BackendError::Invalid("cursor: not a cursor of this list".into())))
            .transpose()
    }

    /// Rows to read: the page and one more, which says whether another page follows.
    pub fn limit(&self) -> u64 {
        self.per_page as u64 + 1
    }

    /// For a list ordered by `(at_col DESC, id_col DESC)` (or by `at_col DESC` alone): the
    /// condition (` AND …`, empty without a cursor) that starts this page after its cursor,
    /// and ` LIMIT … OFFSET …`, with their parameters numbered from `$first`.
    pub fn sql(&self, at_col: &str, id_col: Option<&str>, first: usize) -> (String, String, Vec<SqlValue>) {
        let mut params = Vec::new();
        let mut n = first;
        let cond = match (&self.after, id_col) {
            (None, _) => String::new(),
            (Some(c), None) => {
                params.push(c.at.into());
                n += 1;
                format!(" AND {at_col} < ${}", n - 1)
            }
            (Some(c), Some(id_col)) => {
                params.push(c.at.into());
                params.push(c.id.clone().into());
                n += 2;
                format!(" AND ({at_col}, {id_col}) < (${}, ${})", n - 2, n - 1)
            }
        };
        params.push((self.limit() as i64).into());
        params.push((self.offset() as i64).into());
        (cond, format!(" LIMIT ${n} OFFSET ${}", n + 1), params)
    }
}

impl Default for Page {
    fn default() -> Self {
        Page::new(1, 50)
    }
}

/// One page of a list. `total` counts the whole list up to [`MAX_DEPTH`] (`total_capped`
/// beyond); `next` is where the following page starts, when one follows.
#[derive(Clone, Debug, Serialize)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub total: u64,
    pub total_capped: bool,
    #[serde(skip)]
    pub next: Option<Cursor>,
}

impl<T> Paged<T> {
    /// A page from the rows read for it (up to [`Page::limit`], in list order) and the list's
    /// count (read with [`count_sql`], so at most `MAX_DEPTH + 1`); `key` gives a row's cursor.
    pub fn from_rows(mut rows: Vec<T>, page: &Page, count: u64, key: impl Fn(&T) -> Cursor) -> Self {
        let more = rows.len() as u64 > page.per_page as u64;
        rows.truncate(page.per_page as usize);
        let next = if more { rows.last().map(key) } else { None };
        Paged { items: rows, total: count.min(MAX_DEPTH), total_capped: count > MAX_DEPTH, next }
    }
}

/// `SELECT count(*)` over `from_where` (`FROM … WHERE …`) that stops counting past
/// [`MAX_DEPTH`]: a count of a large table costs its whole index, and nobody pages that far.
pub fn count_sql(from_where: &str) -> String {
    format!("SELECT count(*) FROM (SELECT 1 {from_where} LIMIT {}) counted", MAX_DEPTH + 1)
}
