//! What a backend reports when an operation fails: a [`BackendError`] whose variant is its
//! [`ErrorKind`], so callers decide on kinds (a unique violation, an unreachable server) rather
//! than on message text, and whose [`Cause`] keeps the driver's own error as its source.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::job::JobId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The reservation this operation relied on is gone (the lease expired and the job was
    /// handed to someone else, or it was already acknowledged).
    #[error("lease lost for job {0}")]
    LeaseLost(JobId),
    /// A unique constraint (a primary key, a unique index) refused the write. Callers that
    /// race to insert one row treat it as "someone else was first", not as a failure. Shown
    /// as a storage error, as it was before it had a kind of its own.
    #[error("storage error: {0}")]
    Unique(#[source] Cause),
    #[error("storage error: {0}")]
    Storage(#[source] Cause),
    /// The server cannot be reached or cannot serve now; the same call may work later.
    #[error("backend unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("{0}")]
    Other(String),
}

/// The kind of a [`BackendError`], for callers that branch on what went wrong without
/// destructuring it. More kinds may come, hence `#[non_exhaustive]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    Invalid,
    NotFound,
    LeaseLost,
    Unique,
    Storage,
    Unavailable,
    Other,
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::Invalid(_) => ErrorKind::Invalid,
            BackendError::NotFound(_) => ErrorKind::NotFound,
            BackendError::LeaseLost(_) => ErrorKind::LeaseLost,
            BackendError::Unique(_) => ErrorKind::Unique,
            BackendError::Storage(_) => ErrorKind::Storage,
            BackendError::Unavailable(_) => ErrorKind::Unavailable,
            BackendError::Other(_) => ErrorKind::Other,
        }
    }

    /// Whether a unique constraint refused the write.
    pub fn is_unique(&self) -> bool {
        self.kind() == ErrorKind::Unique
    }
}

/// Why a storage operation failed: a message for people (what the operator sees, already
/// naming the server and what it said) and, when a driver produced the failure, the driver's
/// error as [`Error::source`]. The source is shared (`Arc`) so that [`BackendError`] stays
/// `Clone`: one failed group commit answers every request in the group with the same error.
#[derive(Clone)]
pub struct Cause {
    message: String,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl Cause {
    pub fn new(message: impl Into<String>) -> Self {
        Cause { message: message.into(), source: None }
    }

    /// Keeps `source` (the driver's error) behind this cause.
    pub fn with_source(mut self, source: impl Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The message alone: it already quotes the driver, and a chain printer shows the source too.
impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cause").field("message", &self.message).field("source", &self.source).finish()
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause::new(message)
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Cause::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("UNIQUE constraint failed: t.id")]
    struct DriverError;

    #[test]
    fn kind_follows_the_variant() {
        let cases = [
            (BackendError::Invalid("x".into()), ErrorKind::Invalid),
            (BackendError::NotFound("x".into()), ErrorKind::NotFound),
            (BackendError::LeaseLost(JobId::new()), ErrorKind::LeaseLost),
            (BackendError::Unique("x".into()), ErrorKind::Unique),
            (BackendError::Storage("x".into()), ErrorKind::Storage),
            (BackendError::Unavailable("x".into()), ErrorKind::Unavailable),
            (BackendError::Other("x".into()), ErrorKind::Other),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(e.is_unique(), kind == ErrorKind::Unique, "{e:?}");
        }
    }

    #[test]
    fn source_chain_reaches_the_driver_error() {
        let e = BackendError::Unique(Cause::new("UNIQUE constraint failed: t.id").with_source(DriverError));
        assert_eq!(e.to_string(), "storage error: UNIQUE constraint failed: t.id");
        let cause = e.source().expect("the cause is the source");
        assert_eq!(cause.to_string(), "UNIQUE constraint failed: t.id");
        let driver = cause.source().expect("the driver error is the cause's source");
        assert!(driver.is::<DriverError>(), "{driver:?}");
        assert!(driver.source().is_none());
    }

    #[test]
    fn a_clone_shares_the_source() {
        let e = BackendError::Storage(Cause::new("disk I/O error").with_source(DriverError));
        let copy = e.clone();
        let driver = copy.source().and_then(Error::source).expect("the clone keeps the source");
        assert!(driver.is::<DriverError>());
    }

    #[test]
    fn a_cause_from_text_has_no_source() {
        let e = BackendError::Unavailable("the SQLite writer has stopped".into());
        assert_eq!(e.to_string(), "backend unavailable: the SQLite writer has stopped");
        let cause = e.source().expect("the cause");
        assert!(cause.source().is_none());
        assert!(matches!(&e, BackendError::Unavailable(c) if c.message() == "the SQLite writer has stopped"));
    }
}
