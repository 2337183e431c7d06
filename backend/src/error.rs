//! The one error type of every backend.

use kvsync_model::{ResourceKey, Revision};

/// A boxed error from a datastore's own client, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a datastore call. Each variant is a decision the caller makes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key does not exist.
    #[error("{key} not found")]
    NotFound {
        /// The key.
        key: ResourceKey,
    },
    /// `create` found the key already there.
    #[error("{key} already exists")]
    AlreadyExists {
        /// The key.
        key: ResourceKey,
    },
    /// A precondition (revision or uid) failed; nothing was written.
    #[error("conflict on {key}: {}", conflict_detail(expected.as_ref(), actual.as_ref()))]
    Conflict {
        /// The revision the caller gave; `None` when another precondition failed (the uid of
        /// a delete: the key is another object now).
        expected: Option<Revision>,
        /// The key's current revision; `None` if it is gone or the backend could not tell.
        actual: Option<Revision>,
        /// The key.
        key: ResourceKey,
    },
    /// The requested revision is no longer in the datastore's history: list again.
    #[error("revision {requested} has been compacted{}", compacted.as_ref().map_or_else(String::new, |c| format!(" (history starts at {c})")))]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// Where the kept history starts, when the datastore says (the Kubernetes API
        /// answers only "410 Gone").
        compacted: Option<Revision>,
    },
    /// The datastore could not be reached or did not answer in time. Retry.
    #[error("datastore unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The datastore client's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A key, value or option breaks a rule; nothing was written.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, e.g. `name` or `spec.cidr`.
        field: String,
        /// The rule.
        reason: String,
    },
    /// Stored data that does not decode: the raw key and value are kept.
    #[error("cannot decode stored entry {raw_key:?}: {source}")]
    Parse {
        /// The datastore key (path) as stored.
        raw_key: String,
        /// The stored bytes.
        raw_value: Vec<u8>,
        /// Why it does not decode.
        #[source]
        source: BoxError,
    },
    /// The lease has expired or was revoked (its keys are gone, or going): grant a new one.
    #[error("lease {lease} has expired or was revoked")]
    LeaseLost {
        /// The lease.
        lease: crate::LeaseId,
    },
    /// A lock guard's write was refused because the lock is no longer held by it (its lease
    /// expired or was revoked, and another may hold the lock now); nothing was written.
    #[error("lock {lock:?} is no longer held by this guard; nothing was written")]
    NotHeld {
        /// The lock's name.
        lock: String,
    },
    /// A wait ended before what it waited for came.
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
    },
    /// The datastore refused the credentials or the operation.
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// What the datastore said.
        message: String,
    },
    /// The backend cannot do this.
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported {
        /// The operation, e.g. `ttl`.
        op: String,
        /// The backend's name.
        backend: &'static str,
    },
}

fn conflict_detail(expected: Option<&Revision>, actual: Option<&Revision>) -> String {
    let actual = actual.map_or_else(|| "none (deleted)".to_owned(), ToString::to_string);
    match expected {
        Some(e) => format!("expected revision {e}, found {actual}"),
        None => format!("the key is another object now (uid precondition), at revision {actual}"),
    }
}

impl Error {
    /// Whether the same call may succeed if tried again later (the datastore was
    /// unreachable or timed out).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// How long the datastore asked the caller to wait before trying again (a Kubernetes API
    /// server's `429 Too Many Requests` with `Retry-After`), if it did: the source of an
    /// [`Error::Unavailable`] is then a [`RetryAfter`]. Retry loops wait at least this long.
    ///
    /// ```
    /// use std::time::Duration;
    /// use kvsync_backend::{Error, RetryAfter};
    ///
    /// let e = Error::Unavailable {
    ///     message: "too many requests".into(),
    ///     source: Some(Box::new(RetryAfter::new(Duration::from_secs(3), "throttled"))),
    /// };
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    /// assert_eq!(Error::unavailable("down").retry_after(), None);
    /// ```
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Unavailable {
                source: Some(s), ..
            } => s.downcast_ref::<RetryAfter>().map(|r| r.after),
            _ => None,
        }
    }

    /// An [`Error::Unavailable`] with a message and no source.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<kvsync_model::Error> for Error {
    fn from(e: kvsync_model::Error) -> Self {
        match e {
            kvsync_model::Error::Invalid { field, reason } => Error::Invalid { field, reason },
            kvsync_model::Error::Parse { raw_key, reason } => Error::Parse {
                raw_key,
                raw_value: Vec::new(),
                source: reason.into(),
            },
            other => Error::Invalid {
                field: "key".into(),
                reason: other.to_string(),
            },
        }
    }
}

/// The datastore's request to wait before trying again: the source of an
/// [`Error::Unavailable`] (see [`Error::retry_after`]).
#[derive(Debug, thiserror::Error)]
#[error("{message} (retry after {after:?})")]
pub struct RetryAfter {
    /// How long to wait.
    pub after: std::time::Duration,
    /// What the datastore said.
    pub message: String,
}

impl RetryAfter {
    /// A request to wait `after`, with the datastore's message.
    pub fn new(after: std::time::Duration, message: impl Into<String>) -> Self {
        RetryAfter {
            after,
            message: message.into(),
        }
    }
}

/// The backend's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
