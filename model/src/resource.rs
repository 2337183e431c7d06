//! The `Resource` trait that typed values implement, and its run-time description.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Json;
use crate::error::{Error, Result};

/// A typed resource value: the `spec` of one kind.
///
/// Implement it for your own types (most easily with `#[derive(Resource)]`, feature `derive`)
/// and register them with [`Registry::register`](crate::Registry::register) to store them
/// through any backend. Written by hand:
///
/// ```
/// use kvsync_model::{Json, Registry, Resource};
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
/// let registry = Registry::new().with::<Tenant>();
/// let empty_owner = Json::from(serde_json::json!({"owner": ""}));
/// assert!(registry.kind("Tenant").unwrap().validate(&empty_owner).is_err());
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
    /// The API group, e.g. `example.com`. Every kind names its own: there is no default.
    const GROUP: &'static str;
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

/// A value's own rules, beyond what its type enforces.
///
/// `#[derive(Resource)]` uses it for [`Resource::validate`] when the type implements it (and
/// accepts every value that decodes when it does not).
pub trait Validate {
    /// Checks the value.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field (as `spec.<field>`) and the rule.
    fn validate(&self) -> Result<()>;
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
    validator: Option<fn(&Json) -> Result<()>>,
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

fn validate_as<R: Resource>(value: &Json) -> Result<()> {
    let typed: R = value.decode_at_path().map_err(|(path, e)| {
        // The field that failed, as `spec.<path>`: `spec.natOutgoing`, `spec.ingress[0].ports`.
        let field = match path.as_str() {
            "" | "." => "spec".to_owned(),
            p => format!("spec.{p}"),
        };
        Error::invalid(field, e.to_string())
    })?;
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

    /// A kind with no typed value, in API group `group` at version `v1`: any JSON value is
    /// accepted.
    pub fn untyped(
        group: impl Into<String>,
        kind: impl Into<String>,
        plural: impl Into<String>,
        namespaced: bool,
    ) -> Self {
        KindInfo {
            kind: kind.into(),
            plural: plural.into(),
            group: group.into(),
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
    pub fn validate(&self, value: &Json) -> Result<()> {
        // Every kind's value is a spec object; serde's derive alone would also take an array
        // for a struct.
        if !value.is_object() {
            return Err(Error::invalid(
                "spec",
                format!("must be an object, not {}", value.kind_name()),
            ));
        }
        match self.validator {
            Some(v) => v(value),
            None => Ok(()),
        }
    }
}
