//! The `Resource` trait that typed values implement, and its run-time description.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The API group of the demo kinds.
pub const DEMO_GROUP: &str = "kvsync.dev";

/// A typed resource value: the `spec` of one kind.
///
/// Implement it for your own types and register them with
/// [`Registry::register`](crate::Registry::register) to store them through any backend.
///
/// ```
/// use kvsync_model::{Registry, Resource};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct Tenant { owner: String }
///
/// impl Resource for Tenant {
///     const KIND: &'static str = "Tenant";
///     const PLURAL: &'static str = "tenants";
///     const NAMESPACED: bool = false;
///     const GROUP: &'static str = "example.com";
///     fn validate(&self) -> kvsync_model::Result<()> {
///         if self.owner.is_empty() {
///             return Err(kvsync_model::Error::invalid("spec.owner", "must not be empty"));
///         }
///         Ok(())
///     }
/// }
///
/// let mut registry = Registry::with_demo_kinds();
/// registry.register::<Tenant>();
/// assert!(registry.kind("Tenant").unwrap().validate(&serde_json::json!({"owner": ""})).is_err());
/// ```
pub trait Resource:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The kind, in UpperCamelCase, e.g. `IPPool`.
    const KIND: &'static str;
    /// The lower-case plural used in paths and URLs, e.g. `ippools`.
    const PLURAL: &'static str;
    /// Whether resources of this kind live in a namespace.
    const NAMESPACED: bool;
    /// The API group, e.g. `kvsync.dev`.
    const GROUP: &'static str = DEMO_GROUP;
    /// The API version, e.g. `v1`.
    const VERSION: &'static str = "v1";
    /// Short names that the CLI accepts, e.g. `["pool"]`.
    const SHORT_NAMES: &'static [&'static str] = &[];

    /// The OpenAPI v3 schema of the value, for the kind's CRD. By default any object; derive
    /// [`schemars::JsonSchema`] and return [`crate::crd::schema_of::<Self>()`] to have the API
    /// server check the fields.
    fn schema() -> serde_json::Value {
        crate::crd::any_object()
    }

    /// Checks the value's fields beyond what its type enforces.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field (as `spec.<field>`) and the rule.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// A kind as the registry knows it at run time.
#[derive(Clone)]
pub struct KindInfo {
    /// The kind, e.g. `IPPool`.
    pub kind: String,
    /// The plural, e.g. `ippools`.
    pub plural: String,
    /// The API group.
    pub group: String,
    /// The API version.
    pub version: String,
    /// Whether the kind is namespaced.
    pub namespaced: bool,
    /// Short names for the CLI.
    pub short_names: Vec<String>,
    validator: Option<fn(&serde_json::Value) -> Result<()>>,
    schema: fn() -> serde_json::Value,
}

impl fmt::Debug for KindInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindInfo")
            .field("kind", &self.kind)
            .field("plural", &self.plural)
            .field("group", &self.group)
            .field("version", &self.version)
            .field("namespaced", &self.namespaced)
            .finish_non_exhaustive()
    }
}

fn validate_as<R: Resource>(value: &serde_json::Value) -> Result<()> {
    let typed = R::deserialize(value).map_err(|e| Error::invalid("spec", e.to_string()))?;
    typed.validate()
}

impl KindInfo {
    /// The description of `R`, with its validator.
    pub fn of<R: Resource>() -> Self {
        KindInfo {
            kind: R::KIND.to_owned(),
            plural: R::PLURAL.to_owned(),
            group: R::GROUP.to_owned(),
            version: R::VERSION.to_owned(),
            namespaced: R::NAMESPACED,
            short_names: R::SHORT_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            validator: Some(validate_as::<R>),
            schema: R::schema,
        }
    }

    /// A kind with no typed value: any JSON value is accepted.
    pub fn untyped(kind: impl Into<String>, plural: impl Into<String>, namespaced: bool) -> Self {
        KindInfo {
            kind: kind.into(),
            plural: plural.into(),
            group: DEMO_GROUP.to_owned(),
            version: "v1".to_owned(),
            namespaced,
            short_names: Vec::new(),
            validator: None,
            schema: crate::crd::any_object,
        }
    }

    /// `group/version`, e.g. `kvsync.dev/v1`.
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    /// The lower-case kind, e.g. `ippool`.
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }

    /// The OpenAPI v3 schema of the kind's values.
    pub fn schema(&self) -> serde_json::Value {
        (self.schema)()
    }

    /// Checks a JSON value against the kind's type and rules.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field and the rule.
    pub fn validate(&self, value: &serde_json::Value) -> Result<()> {
        match self.validator {
            Some(v) => v(value),
            None => Ok(()),
        }
    }
}
