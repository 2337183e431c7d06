//! Key/value pairs with their revision metadata.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Json;
use crate::key::ResourceKey;
use crate::revision::Revision;

/// A key, its value and the datastore's metadata about them.
///
/// `V` is [`Json`] (JSON decoded lazily) for the raw client and a
/// [`Resource`](crate::Resource) type for typed access.
///
/// The revision contract: `revision` is the revision of the last write to the key (etcd's
/// `mod_revision`, Kubernetes' `resourceVersion`). Pass a KVPair back to `update` with its
/// revision set to write only if nobody wrote the key since; leave it `None` to write
/// unconditionally. `uid` is assigned on create and kept across updates; a key that is deleted
/// and created again gets a new uid.
///
/// ```
/// use kvsync_model::{KVPair, ResourceKey, Revision};
/// use serde_json::json;
///
/// let kvp = KVPair::new(ResourceKey::cluster("IPPool", "pool-a"), json!({"cidr": "10.0.0.0/16"}))
///     .with_revision(Revision::from(12u64));
/// assert_eq!(kvp.revision.as_ref().and_then(Revision::as_u64), Some(12));
/// assert_eq!(kvp.value.as_value().unwrap()["cidr"], "10.0.0.0/16");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KVPair<V = Json> {
    /// The key.
    pub key: ResourceKey,
    /// The value.
    pub value: V,
    /// The revision of the last write (set by the datastore; a precondition when given to
    /// `update` or `delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// The revision that created the key, where the backend knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_revision: Option<Revision>,
    /// A unique id assigned when the key was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The key expires this long after the write, if set.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub ttl: Option<Duration>,
}

impl KVPair {
    /// A pair with no metadata; `value` is JSON (a [`serde_json::Value`] or [`Json`]).
    pub fn new(key: ResourceKey, value: impl Into<Json>) -> Self {
        KVPair::of(key, value.into())
    }
}

impl<V> KVPair<V> {
    /// A pair of any value type (a [`Resource`](crate::Resource) for typed access) with no
    /// metadata.
    pub fn of(key: ResourceKey, value: V) -> Self {
        KVPair {
            key,
            value,
            revision: None,
            create_revision: None,
            uid: None,
            ttl: None,
        }
    }

    /// Sets the revision (a precondition for `update`).
    #[must_use]
    pub fn with_revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }

    /// Sets the time to live.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The same metadata with another value.
    pub fn map<W>(self, f: impl FnOnce(V) -> W) -> KVPair<W> {
        KVPair {
            key: self.key,
            value: f(self.value),
            revision: self.revision,
            create_revision: self.create_revision,
            uid: self.uid,
            ttl: self.ttl,
        }
    }

    /// The same metadata with a value that may fail to convert.
    ///
    /// # Errors
    /// Whatever `f` returns.
    pub fn try_map<W, E>(self, f: impl FnOnce(V) -> Result<W, E>) -> Result<KVPair<W>, E> {
        Ok(KVPair {
            value: f(self.value)?,
            key: self.key,
            revision: self.revision,
            create_revision: self.create_revision,
            uid: self.uid,
            ttl: self.ttl,
        })
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let secs = Option::<f64>::deserialize(d)?;
        secs.map(|s| Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}
