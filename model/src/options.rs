//! List options and list results.

use crate::key::ResourceKey;
use crate::kvpair::KVPair;
use crate::revision::Revision;

/// Which keys a `list` or `watch` covers (one kind, optionally narrowed to a namespace, an
/// exact name or a name prefix) and at which revision.
///
/// The revision is where the call stands in the datastore's history: a `list` reads the
/// state as of that revision (the latest when `None`), a `watch` yields every change after it
/// (after the current revision when `None`). So `watch` with the options of a `list` and the
/// list's revision follows the list with no gap.
///
/// ```
/// use kvsync_model::{ListOptions, ResourceKey, Revision};
///
/// let opts = ListOptions::new("NetworkPolicy").with_namespace("prod").with_name_prefix("allow-");
/// assert!(opts.matches(&ResourceKey::namespaced("NetworkPolicy", "prod", "allow-dns")));
/// assert!(!opts.matches(&ResourceKey::namespaced("NetworkPolicy", "dev", "allow-dns")));
/// let at = opts.with_revision(Revision::from(42u64));
/// assert_eq!(at.revision, Some(Revision::from(42u64)));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ListOptions {
    /// The kind to list.
    pub kind: String,
    /// Only this namespace (namespaced kinds); all namespaces when `None`.
    pub namespace: Option<String>,
    /// Only the key with exactly this name.
    pub name: Option<String>,
    /// Only keys whose name starts with this.
    pub name_prefix: Option<String>,
    /// For `list`: read as of this revision (the latest when `None`). For `watch`: every
    /// change after this revision (after the current one when `None`).
    pub revision: Option<Revision>,
}

impl ListOptions {
    /// Every key of `kind`.
    pub fn new(kind: impl Into<String>) -> Self {
        ListOptions {
            kind: kind.into(),
            ..Default::default()
        }
    }

    /// Only keys in `namespace`.
    #[must_use]
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Only the key named `name`.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Only keys whose name starts with `prefix`.
    #[must_use]
    pub fn with_name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.name_prefix = Some(prefix.into());
        self
    }

    /// At `revision`: a list reads as of it, a watch starts after it.
    #[must_use]
    pub fn with_revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }

    /// At `revision` when given, at the latest otherwise.
    #[must_use]
    pub fn at(mut self, revision: Option<Revision>) -> Self {
        self.revision = revision;
        self
    }

    /// Whether `key` is one these options cover.
    pub fn matches(&self, key: &ResourceKey) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| key.namespace.as_ref() == Some(ns))
            && self.name.as_ref().is_none_or(|n| key.name == *n)
            && self
                .name_prefix
                .as_ref()
                .is_none_or(|p| key.name.starts_with(p.as_str()))
    }
}

/// The result of a `list`: the items, sorted by key path, and the revision they were read at.
///
/// Pass `revision` to `watch` to see every change after the list, with no gap.
#[derive(Clone, Debug, PartialEq)]
pub struct KVList<V = crate::Json> {
    /// The items, in path order.
    pub items: Vec<KVPair<V>>,
    /// The datastore revision the list was read at.
    pub revision: Revision,
    /// Entries under the listed prefix that did not decode (not in `items`).
    pub parse_failures: Vec<ParseFailure>,
}

/// A stored entry that could not be decoded: its raw key and bytes, and why.
///
/// `list` returns these beside the good items and `watch` reports them as events, so one bad
/// entry never hides the others. Where the path still parses, `key` names the resource: a
/// consumer should treat it as gone until a good value is written again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseFailure {
    /// The datastore key (path) as stored.
    pub raw_key: String,
    /// The stored bytes.
    pub raw_value: Vec<u8>,
    /// The key, if the path parses.
    pub key: Option<ResourceKey>,
    /// The revision of the write that stored the bytes.
    pub revision: Option<Revision>,
    /// Why the entry does not decode.
    pub reason: String,
}

/// Options of a `get`: which revision to read at.
///
/// ```
/// use kvsync_model::{GetOptions, Revision};
///
/// let latest = GetOptions::new();
/// let old = GetOptions::new().with_revision(Revision::from(7u64));
/// assert_eq!(latest.revision, None);
/// assert_eq!(old.revision.unwrap().as_u64(), Some(7));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GetOptions {
    /// Read the key as of this revision (the latest when `None`).
    pub revision: Option<Revision>,
}

impl GetOptions {
    /// The latest value.
    pub fn new() -> Self {
        GetOptions::default()
    }

    /// The value as of `revision`.
    #[must_use]
    pub fn with_revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }

    /// The value as of `revision` when given, the latest otherwise.
    #[must_use]
    pub fn at(mut self, revision: Option<Revision>) -> Self {
        self.revision = revision;
        self
    }
}

/// Options of a `delete`: its preconditions.
///
/// A delete with a revision removes the key only if nobody wrote it since that revision; with
/// a uid, only if it is still the same object (not one deleted and created again under the
/// same name). A failed precondition is a `Conflict` and deletes nothing.
///
/// ```
/// use kvsync_model::{DeleteOptions, Revision};
///
/// let opts = DeleteOptions::new().with_revision(Revision::from(12u64)).with_uid("0b7c...");
/// assert_eq!(opts.uid.as_deref(), Some("0b7c..."));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteOptions {
    /// Delete only if this is the key's current revision.
    pub revision: Option<Revision>,
    /// Delete only if this is the key's uid.
    pub uid: Option<String>,
}

impl DeleteOptions {
    /// No preconditions.
    pub fn new() -> Self {
        DeleteOptions::default()
    }

    /// Only if the key's current revision is `revision`.
    #[must_use]
    pub fn with_revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }

    /// Only if the key's uid is `uid`.
    #[must_use]
    pub fn with_uid(mut self, uid: impl Into<String>) -> Self {
        self.uid = Some(uid.into());
        self
    }

    /// The preconditions of a value read before: its revision and uid.
    pub fn matching<V>(kvp: &KVPair<V>) -> Self {
        DeleteOptions {
            revision: kvp.revision.clone(),
            uid: kvp.uid.clone(),
        }
    }
}
