//! The data model of kvsync: typed keys that round-trip to datastore paths, [`KVPair`]s with
//! revision, uid and ttl, [`ListOptions`], the [`Resource`] trait for your own kinds,
//! validation, and CRD generation.
//!
//! This crate does no I/O; the `kvsync-backend` crate stores these types.
//!
//! ```
//! # #[cfg(feature = "derive")] {
//! use kvsync_model::{KVPair, PathCodec, Registry, Resource, ResourceKey, Validate};
//! use serde::{Deserialize, Serialize};
//!
//! /// A tenant of the platform (your own kind).
//! #[derive(Clone, Debug, Serialize, Deserialize, Resource)]
//! #[resource(group = "example.com", version = "v1", kind = "Tenant", plural = "tenants")]
//! struct Tenant { owner: String }
//!
//! impl Validate for Tenant {
//!     fn validate(&self) -> kvsync_model::Result<()> {
//!         if self.owner.is_empty() {
//!             return Err(kvsync_model::Error::invalid("spec.owner", "must not be empty"));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let codec = PathCodec::with_registry(Registry::new().with::<Tenant>());
//! let key = ResourceKey::of::<Tenant>(None, "acme").unwrap();
//! assert_eq!(codec.to_path(&key).unwrap(), "/kvsync/v1/tenants/acme");
//!
//! // Bad keys are refused with the field and the rule.
//! let err = codec.to_path(&ResourceKey::cluster("Tenant", "Acme_Corp")).unwrap_err();
//! assert!(err.to_string().starts_with("invalid name"));
//!
//! let kvp = KVPair::of(key, Tenant { owner: String::new() });
//! assert!(Resource::validate(&kvp.value).is_err());
//! # }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `derive` | yes | `#[derive(Resource)]` (the `kvsync-derive` crate) |
//! | `demo` | no | the demo kinds [`demo::IPPool`], [`demo::NetworkPolicy`], [`demo::Node`], for examples and tests |

pub mod coordination;
pub mod crd;
#[cfg(feature = "demo")]
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
pub use options::{DeleteOptions, GetOptions, KVList, ListOptions, ParseFailure};
pub use resource::{KindInfo, Resource, Validate};

/// `#[derive(Resource)]`: see the `kvsync-derive` crate.
#[cfg(feature = "derive")]
pub use kvsync_derive::Resource;

/// What the code that `#[derive(Resource)]` writes refers to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use serde_json;

    use std::marker::PhantomData;

    /// Chooses, for a concrete type, its `JsonSchema` schema when it has one, else any object
    /// (autoref specialization: the `&Probe` impl wins when its bound holds).
    pub struct Probe<T>(pub PhantomData<T>);

    /// The schema from `schemars`, for types that derive `JsonSchema`.
    pub trait ViaJsonSchema {
        /// The schema.
        fn kvsync_schema(&self) -> serde_json::Value;
    }
    impl<T: schemars::JsonSchema> ViaJsonSchema for &Probe<T> {
        fn kvsync_schema(&self) -> serde_json::Value {
            crate::crd::schema_of::<T>()
        }
    }

    /// Any object, for types without a schema.
    pub trait ViaAnyObject {
        /// The schema.
        fn kvsync_schema(&self) -> serde_json::Value;
    }
    impl<T> ViaAnyObject for Probe<T> {
        fn kvsync_schema(&self) -> serde_json::Value {
            crate::crd::any_object()
        }
    }

    /// The type's own rules, for types that implement [`Validate`](crate::Validate).
    pub trait ViaValidate<T> {
        /// Checks `value`.
        fn kvsync_validate(&self, value: &T) -> crate::Result<()>;
    }
    impl<T: crate::Validate> ViaValidate<T> for &Probe<T> {
        fn kvsync_validate(&self, value: &T) -> crate::Result<()> {
            value.validate()
        }
    }

    /// No rules beyond the type's, for types without [`Validate`](crate::Validate).
    pub trait ViaNoRules<T> {
        /// Accepts `value`.
        fn kvsync_validate(&self, value: &T) -> crate::Result<()>;
    }
    impl<T> ViaNoRules<T> for Probe<T> {
        fn kvsync_validate(&self, _value: &T) -> crate::Result<()> {
            Ok(())
        }
    }
}
pub use revision::Revision;
