//! The model's error type.

/// What went wrong while validating or decoding model data.
///
/// Every variant names what was wrong so that a caller can show it to a user as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of a key or value breaks a rule.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field that is wrong, e.g. `name`, `namespace`, `kind` or `spec.cidr`.
        field: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A datastore path that does not parse into a key.
    #[error("cannot parse datastore path {raw_key:?}: {reason}")]
    Parse {
        /// The path as it was read.
        raw_key: String,
        /// Why it does not parse.
        reason: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn parse(raw_key: &str, reason: impl Into<String>) -> Self {
        Error::Parse {
            raw_key: raw_key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The model's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
