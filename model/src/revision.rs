//! Opaque datastore revisions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A datastore revision: opaque to callers, who only pass it back.
///
/// Backends define what it holds. The memory, SQLite and etcd backends use one global,
/// increasing integer counter (etcd's `mod_revision`); the Kubernetes backend uses the
/// object's `resourceVersion`, which must be treated as an opaque string. Integer revisions
/// are stored inline, so a `Revision` of a counting backend costs no allocation.
///
/// ```
/// use kvsync_model::Revision;
///
/// let r = Revision::from(42u64);
/// assert_eq!(r.to_string(), "42");
/// assert_eq!(r.as_u64(), Some(42));
/// assert_eq!("42".parse::<Revision>().unwrap(), r);
/// assert_eq!(Revision::from("abc").as_u64(), None);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Revision(Repr);

// 16 bytes: the opaque form is boxed twice so that its pointer is thin, because a Syncer
// keeps one revision per key it tracks.
#[derive(Clone, PartialEq, Eq, Hash)]
#[allow(clippy::box_collection)] // the box keeps the pointer thin: 16 bytes, not 24
enum Repr {
    Int(u64),
    Opaque(Box<String>),
}

impl Revision {
    /// The revision as an integer, if the backend counts revisions.
    pub fn as_u64(&self) -> Option<u64> {
        match &self.0 {
            Repr::Int(n) => Some(*n),
            Repr::Opaque(_) => None,
        }
    }
}

impl From<u64> for Revision {
    fn from(n: u64) -> Self {
        Revision(Repr::Int(n))
    }
}

impl From<&str> for Revision {
    fn from(s: &str) -> Self {
        // Only the canonical decimal form is stored as an integer, so that Display gives back
        // exactly the string that came in.
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        match canonical.then(|| s.parse::<u64>().ok()).flatten() {
            Some(n) => Revision(Repr::Int(n)),
            None => Revision(Repr::Opaque(Box::new(s.to_owned()))),
        }
    }
}

impl From<String> for Revision {
    fn from(s: String) -> Self {
        Revision::from(s.as_str())
    }
}

impl std::str::FromStr for Revision {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Revision::from(s))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Int(n) => write!(f, "{n}"),
            Repr::Opaque(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revision({self})")
    }
}

impl Serialize for Revision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Revision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Revision::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_canonical_numbers_stay_opaque() {
        for s in ["007", "", "-1", "1e3", "18446744073709551616"] {
            let r = Revision::from(s);
            assert_eq!(r.as_u64(), None, "{s}");
            assert_eq!(r.to_string(), s);
        }
        assert_eq!(Revision::from("0").as_u64(), Some(0));
    }

    #[test]
    fn a_revision_is_two_words() {
        assert_eq!(std::mem::size_of::<Revision>(), 16);
    }

    #[test]
    fn revision_serializes_as_string() {
        let r = Revision::from(7u64);
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"7\"");
        let back: Revision = serde_json::from_str("\"7\"").unwrap();
        assert_eq!(back, r);
    }
}
