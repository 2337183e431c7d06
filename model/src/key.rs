//! Keys and the path codec that maps them to datastore paths and back.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::options::ListOptions;
use crate::resource::{KindInfo, Resource};
use crate::validation::{validate_name, validate_namespace};

/// The default path prefix: `/kvsync/v1`.
pub const DEFAULT_PREFIX: &str = "/kvsync/v1";

/// What every key can do: name its kind and convert to a datastore path.
///
/// Paths parse back with [`PathCodec::from_path`]; `Display` is unique per key.
pub trait Key: fmt::Display + fmt::Debug + Clone + Eq + std::hash::Hash + Send + Sync {
    /// The kind of resource the key names, e.g. `IPPool`.
    fn kind(&self) -> &str;

    /// The datastore path of the key under the codec's prefix.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the key breaks a rule of its kind (see [`PathCodec::validate`]).
    fn to_path(&self, codec: &PathCodec) -> Result<String>;
}

/// The key of a resource: its kind, its namespace (namespaced kinds only) and its name.
///
/// ```
/// use kvsync_model::{KindInfo, Key, PathCodec, Registry, ResourceKey};
///
/// let registry = Registry::new().with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", true));
/// let codec = PathCodec::with_registry(registry);
/// let key = ResourceKey::namespaced("Tenant", "prod", "acme");
/// let path = key.to_path(&codec).unwrap();
/// assert_eq!(path, "/kvsync/v1/tenants/prod/acme");
/// assert_eq!(codec.from_path(&path).unwrap(), key);
/// assert_eq!(key.to_string(), "Tenant(prod/acme)");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResourceKey {
    /// The kind, e.g. `NetworkPolicy`.
    pub kind: String,
    /// The namespace, for namespaced kinds; `None` for cluster-scoped ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name.
    pub name: String,
}

impl ResourceKey {
    /// A key of a cluster-scoped kind.
    pub fn cluster(kind: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceKey {
            kind: kind.into(),
            namespace: None,
            name: name.into(),
        }
    }

    /// A key of a namespaced kind.
    pub fn namespaced(
        kind: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ResourceKey {
            kind: kind.into(),
            namespace: Some(namespace.into()),
            name: name.into(),
        }
    }

    /// The key of a resource of type `R`, namespaced when `R` is.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `namespace` is given for a cluster-scoped kind or missing for a
    /// namespaced one.
    pub fn of<R: Resource>(namespace: Option<&str>, name: &str) -> Result<Self> {
        match (R::NAMESPACED, namespace) {
            (true, Some(ns)) => Ok(Self::namespaced(R::KIND, ns, name)),
            (false, None) => Ok(Self::cluster(R::KIND, name)),
            (true, None) => Err(Error::invalid(
                "namespace",
                format!("kind {} is namespaced: a namespace is required", R::KIND),
            )),
            (false, Some(_)) => Err(Error::invalid(
                "namespace",
                format!("kind {} is cluster-scoped: it takes no namespace", R::KIND),
            )),
        }
    }
}

impl Key for ResourceKey {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn to_path(&self, codec: &PathCodec) -> Result<String> {
        codec.to_path(self)
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}({}/{})", self.kind, ns, self.name),
            None => write!(f, "{}({})", self.kind, self.name),
        }
    }
}

impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The kinds a client knows: kind <-> plural <-> scope, and each kind's value validator.
///
/// [`Registry::new`] (and `Default`) is empty: users add their kinds by implementing
/// [`Resource`] and calling [`Registry::register`] (or [`Registry::with`]); kvsync itself never
/// needs editing. Every backend and [`PathCodec`] is built from the registry it serves and
/// knows only its kinds.
///
/// ```
/// use kvsync_model::{KindInfo, Registry};
///
/// let registry = Registry::new()
///     .with_kind(KindInfo::untyped("example.com", "Tenant", "tenants", false));
/// assert_eq!(registry.by_plural("tenants").unwrap().kind, "Tenant");
/// assert!(registry.kind("IPPool").is_err());
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    by_kind: HashMap<String, Arc<KindInfo>>,
    by_plural: HashMap<String, Arc<KindInfo>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self.by_kind.keys().collect();
        kinds.sort();
        f.debug_struct("Registry").field("kinds", &kinds).finish()
    }
}

impl Registry {
    /// A registry with no kinds.
    pub fn new() -> Self {
        Registry {
            by_kind: HashMap::new(),
            by_plural: HashMap::new(),
        }
    }

    /// A registry with the demo kinds ([`IPPool`](crate::demo::IPPool),
    /// [`NetworkPolicy`](crate::demo::NetworkPolicy), [`Node`](crate::demo::Node)).
    #[cfg(feature = "demo")]
    pub fn with_demo_kinds() -> Self {
        let mut r = Self::new();
        crate::demo::register(&mut r);
        r
    }

    /// Adds (or replaces) the kind of `R`.
    pub fn register<R: Resource>(&mut self) -> &mut Self {
        self.insert(KindInfo::of::<R>())
    }

    /// This registry with the kind of `R` added, for building one in an expression.
    #[must_use]
    pub fn with<R: Resource>(mut self) -> Self {
        self.register::<R>();
        self
    }

    /// This registry with a kind described at run time added.
    #[must_use]
    pub fn with_kind(mut self, info: KindInfo) -> Self {
        self.insert(info);
        self
    }

    /// Adds (or replaces) a kind described at run time.
    pub fn insert(&mut self, info: KindInfo) -> &mut Self {
        let info = Arc::new(info);
        if let Some(old) = self.by_kind.insert(info.kind.clone(), info.clone()) {
            self.by_plural.remove(&old.plural);
        }
        self.by_plural.insert(info.plural.clone(), info);
        self
    }

    /// The kind named `kind`.
    ///
    /// # Errors
    /// [`Error::Invalid`] with field `kind` when the kind is not registered.
    pub fn kind(&self, kind: &str) -> Result<&KindInfo> {
        self.by_kind.get(kind).map(|k| &**k).ok_or_else(|| {
            let mut known: Vec<_> = self.by_kind.keys().map(String::as_str).collect();
            known.sort_unstable();
            Error::invalid(
                "kind",
                format!("unknown kind {kind:?} (known: {})", known.join(", ")),
            )
        })
    }

    /// The kind whose plural, kind name or short form (case-insensitive) is `name`, as
    /// `kubectl get` resolves resource names.
    pub fn resolve(&self, name: &str) -> Option<&KindInfo> {
        let lower = name.to_ascii_lowercase();
        self.by_kind
            .values()
            .find(|k| {
                k.kind.eq_ignore_ascii_case(&lower)
                    || k.plural == lower
                    || k.singular() == lower
                    || k.short_names.contains(&lower)
            })
            .map(|k| &**k)
    }

    /// The kind stored under `plural`.
    pub fn by_plural(&self, plural: &str) -> Option<&KindInfo> {
        self.by_plural.get(plural).map(|k| &**k)
    }

    /// All kinds, sorted by name.
    pub fn kinds(&self) -> Vec<&KindInfo> {
        let mut v: Vec<_> = self.by_kind.values().map(|k| &**k).collect();
        v.sort_by(|a, b| a.kind.cmp(&b.kind));
        v
    }
}

/// Converts keys to datastore paths under a prefix and back, using a [`Registry`].
///
/// Paths are `<prefix>/<plural>/<namespace>/<name>` for namespaced kinds and
/// `<prefix>/<plural>/<name>` for cluster-scoped ones.
#[derive(Clone, Debug)]
pub struct PathCodec {
    prefix: String,
    registry: Arc<Registry>,
}

impl PathCodec {
    /// A codec with the default prefix ([`DEFAULT_PREFIX`]) over `registry`.
    pub fn with_registry(registry: impl Into<Arc<Registry>>) -> Self {
        PathCodec {
            prefix: DEFAULT_PREFIX.to_owned(),
            registry: registry.into(),
        }
    }

    /// A codec with `prefix` (e.g. `/kvsync/v1`) over `registry`.
    ///
    /// # Errors
    /// [`Error::Invalid`] with field `prefix` unless the prefix starts with `/`, does not end
    /// with `/` and has no empty, `.` or `..` segments.
    pub fn new(prefix: impl Into<String>, registry: impl Into<Arc<Registry>>) -> Result<Self> {
        let registry = registry.into();
        let prefix = prefix.into();
        let bad = !prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix[1..]
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".." || s.chars().any(char::is_control));
        if bad {
            return Err(Error::invalid(
                "prefix",
                format!(
                    "{prefix:?} must start with '/', not end with '/', and have no empty, '.' or \
                     '..' segments"
                ),
            ));
        }
        Ok(PathCodec { prefix, registry })
    }

    /// The prefix, e.g. `/kvsync/v1`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Checks a key: its kind is registered, it has a namespace exactly when its kind is
    /// namespaced, and name and namespace follow the DNS-1123 rules.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field and the rule.
    pub fn validate(&self, key: &ResourceKey) -> Result<&KindInfo> {
        let info = self.registry.kind(&key.kind)?;
        match (&key.namespace, info.namespaced) {
            (Some(ns), true) => validate_namespace(ns)?,
            (None, false) => {}
            (None, true) => {
                return Err(Error::invalid(
                    "namespace",
                    format!("kind {} is namespaced: a namespace is required", key.kind),
                ));
            }
            (Some(_), false) => {
                return Err(Error::invalid(
                    "namespace",
                    format!("kind {} is cluster-scoped: it takes no namespace", key.kind),
                ));
            }
        }
        validate_name(&key.name)?;
        Ok(info)
    }

    /// The path of `key`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the key is invalid (see [`PathCodec::validate`]).
    pub fn to_path(&self, key: &ResourceKey) -> Result<String> {
        let info = self.validate(key)?;
        Ok(match &key.namespace {
            Some(ns) => format!("{}/{}/{}/{}", self.prefix, info.plural, ns, key.name),
            None => format!("{}/{}/{}", self.prefix, info.plural, key.name),
        })
    }

    /// Parses a datastore path back into a key.
    ///
    /// # Errors
    /// [`Error::Parse`] when the path is not under the prefix, names an unknown plural, has
    /// the wrong number of segments for its kind's scope, or holds an invalid name.
    pub fn from_path(&self, path: &str) -> Result<ResourceKey> {
        let rest = path
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| Error::parse(path, format!("not under prefix {:?}", self.prefix)))?;
        // One pass, no lookups beyond the plural's: lists parse every key they read.
        let (plural, segs) = match rest.split_once('/') {
            Some((plural, segs)) => (plural, Some(segs)),
            None => (rest, None),
        };
        let info = self
            .registry
            .by_plural(plural)
            .ok_or_else(|| Error::parse(path, format!("unknown resource type {plural:?}")))?;
        let bad = |e: Error| Error::parse(path, e.to_string());
        match (info.namespaced, segs) {
            (true, Some(segs)) => match segs.split_once('/') {
                Some((ns, name)) if !name.contains('/') => {
                    validate_namespace(ns).map_err(bad)?;
                    validate_name(name).map_err(bad)?;
                    Ok(ResourceKey::namespaced(&info.kind, ns, name))
                }
                _ => Err(Error::parse(
                    path,
                    format!("{} is namespaced: expected <namespace>/<name>", info.kind),
                )),
            },
            (false, Some(name)) if !name.contains('/') => {
                validate_name(name).map_err(bad)?;
                Ok(ResourceKey::cluster(&info.kind, name))
            }
            (true, None) => Err(Error::parse(
                path,
                format!("{} is namespaced: expected <namespace>/<name>", info.kind),
            )),
            (false, _) => Err(Error::parse(
                path,
                format!("{} is cluster-scoped: expected <name>", info.kind),
            )),
        }
    }

    /// A path prefix under which lies every key that `opts` matches. Keys under it may still
    /// fail to match (a name prefix across all namespaces, or `a` against `a-2`): filter them
    /// with [`ListOptions::matches`].
    ///
    /// # Errors
    /// [`Error::Invalid`] when the options name an unknown kind, give a namespace for a
    /// cluster-scoped kind, or hold an invalid namespace or name.
    pub fn list_prefix(&self, opts: &ListOptions) -> Result<String> {
        let info = self.registry.kind(&opts.kind)?;
        if let Some(ns) = &opts.namespace {
            if !info.namespaced {
                return Err(Error::invalid(
                    "namespace",
                    format!(
                        "kind {} is cluster-scoped: it takes no namespace",
                        opts.kind
                    ),
                ));
            }
            validate_namespace(ns)?;
        }
        if let Some(name) = &opts.name {
            validate_name(name)?;
        }
        if let Some(p) = &opts.name_prefix
            && (p.contains('/') || p.chars().any(char::is_control))
        {
            return Err(Error::invalid(
                "name_prefix",
                "must not contain '/' or control characters",
            ));
        }
        let mut path = format!("{}/{}/", self.prefix, info.plural);
        if info.namespaced {
            match &opts.namespace {
                Some(ns) => {
                    path.push_str(ns);
                    path.push('/');
                }
                None => return Ok(path),
            }
        }
        if let Some(name) = &opts.name {
            path.push_str(name);
        } else if let Some(p) = &opts.name_prefix {
            path.push_str(p);
        }
        Ok(path)
    }
}
