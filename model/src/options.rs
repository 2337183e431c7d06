//! List options and list results.

use crate::key::ResourceKey;
use crate::kvpair::KVPair;
use crate::revision::Revision;

/// Which keys a `list` or `watch` covers: one kind, optionally narrowed to a namespace, an
/// exact name or a name prefix.
///
/// ```
/// use kvsync_model::{ListOptions, ResourceKey};
///
/// let opts = ListOptions::new("NetworkPolicy").with_namespace("prod").with_name_prefix("allow-");
/// assert!(opts.matches(&ResourceKey::namespaced("NetworkPolicy", "prod", "allow-dns")));
/// assert!(!opts.matches(&ResourceKey::namespaced("NetworkPolicy", "dev", "allow-dns")));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListOptions {
    /// The kind to list.
    pub kind: String,
    /// Only this namespace (namespaced kinds); all namespaces when `None`.
    pub namespace: Option<String>,
    /// Only the key with exactly this name.
    pub name: Option<String>,
    /// Only keys whose name starts with this.
    pub name_prefix: Option<String>,
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
