//! The data model of kvsync: typed keys that round-trip to datastore paths, [`KVPair`]s with
//! revision, uid and ttl, [`ListOptions`], the [`Resource`] trait, validation, and a small
//! demo model ([`demo::IPPool`], [`demo::NetworkPolicy`], [`demo::Node`]).
//!
//! This crate does no I/O; the `kvsync-backend` crate stores these types.
//!
//! ```
//! use kvsync_model::{demo::IPPool, KVPair, PathCodec, ResourceKey, Resource};
//!
//! let codec = PathCodec::default();
//! let key = ResourceKey::of::<IPPool>(None, "pool-a").unwrap();
//! assert_eq!(codec.to_path(&key).unwrap(), "/kvsync/v1/ippools/pool-a");
//!
//! // Bad keys are refused with the field and the rule.
//! let err = codec.to_path(&ResourceKey::cluster("IPPool", "Pool_A")).unwrap_err();
//! assert!(err.to_string().starts_with("invalid name"));
//!
//! let pool = IPPool { cidr: "10.0.0.0/16".into(), block_size: 26, nat_outgoing: false, disabled: false };
//! let kvp = KVPair::of(key, pool);
//! assert!(kvp.value.validate().is_ok());
//! ```

pub mod crd;
pub mod demo;
mod error;
mod json;
mod key;
mod kvpair;
mod options;
mod resource;
mod revision;
pub mod validation;

pub use error::{Error, Result};
pub use json::Json;
pub use key::{DEFAULT_PREFIX, Key, PathCodec, Registry, ResourceKey};
pub use kvpair::KVPair;
pub use options::{KVList, ListOptions, ParseFailure};
pub use resource::{DEMO_GROUP, KindInfo, Resource};
pub use revision::Revision;
