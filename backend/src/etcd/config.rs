//! Connection settings of the etcd backend.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use kvsync_model::{DEFAULT_PREFIX, Registry};

use crate::error::{Error, Result};

/// TLS material for etcd, as PEM.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA that signed the servers' certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// The client certificate, for mutual TLS.
    pub cert_pem: Option<Vec<u8>>,
    /// The client certificate's key.
    pub key_pem: Option<Vec<u8>>,
    /// The name to check the servers' certificates against (default: the endpoint's host).
    pub domain: Option<String>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("cert", &self.cert_pem.is_some())
            .field("key", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl EtcdTls {
    /// Reads the CA, certificate and key from files, as `--cacert`, `--cert` and `--key`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the file that cannot be read.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self> {
        let read = |field: &str, p: Option<&std::path::Path>| -> Result<Option<Vec<u8>>> {
            p.map(|p| {
                std::fs::read(p)
                    .map_err(|e| Error::invalid(field, format!("cannot read {}: {e}", p.display())))
            })
            .transpose()
        };
        Ok(EtcdTls {
            ca_pem: read("etcd_ca_cert", ca)?,
            cert_pem: read("etcd_cert", cert)?,
            key_pem: read("etcd_key", key)?,
            domain: None,
        })
    }
}

/// How to reach etcd.
///
/// ```
/// use std::time::Duration;
/// use kvsync_backend::etcd::EtcdConfig;
///
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"], kvsync_model::Registry::new())
///     .with_prefix("/my-app/v1")
///     .with_user("app", "secret")
///     .with_request_timeout(Duration::from_secs(5));
/// assert_eq!(config.endpoints.len(), 1);
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix (default `/kvsync/v1`).
    pub prefix: String,
    /// The kinds the backend serves.
    pub registry: Arc<Registry>,
    /// TLS settings; endpoints must then be `https://`.
    pub tls: Option<EtcdTls>,
    /// User name and password.
    pub user: Option<(String, String)>,
    /// How long etcd may take to answer one request: a write, a read, one page of a list, or
    /// the opening of a watch (not the watch's stream, which runs as long as it is read).
    /// Default 10 s.
    pub request_timeout: Duration,
    /// How long connecting may take (default 5 s).
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive interval and timeout (default 10 s and 5 s).
    pub keep_alive: Option<(Duration, Duration)>,
    /// How lists are read (the defaults are measured: see BENCHMARKS.md).
    pub list_reads: EtcdListReads,
}

/// How the etcd backend reads a list: a first page, then the rest split into parts read side
/// by side, each page by page.
///
/// etcd 3.4 walks its index from a range's start to its end on every range request (about
/// 0.3 µs a key on the development VM), so a list read as many pages of one range pays that
/// walk again for every page, and one request keeps etcd to one core. The rest of a list is
/// therefore split at keys estimated from the first page's (see the `split` module's notes)
/// and its parts are read at the same revision, at the same time; pages are handed on in key
/// order. Memory: each part holds at most about three pages (one fetched, one decoded, one
/// waiting), so a list holds at most about `3 * max_parts` pages of about 8 MiB in flight.
///
/// ```
/// use kvsync_backend::etcd::{EtcdConfig, EtcdListReads};
///
/// // One range read page after page, as most clients do.
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"], kvsync_model::Registry::new())
///     .with_list_reads(EtcdListReads { max_parts: 1, ..EtcdListReads::default() });
/// assert_eq!(config.list_reads.first_page_keys, 10_000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdListReads {
    /// Keys asked for in the first page (default 10,000): enough to estimate where to split
    /// the rest, small enough to come back soon.
    pub first_page_keys: usize,
    /// Keys left after the first page for each part (default 10,000): fewer left, fewer parts.
    pub part_keys: usize,
    /// The most parts a list is split into (default 8; 1 reads the rest as one range).
    pub max_parts: usize,
    /// The most range requests of one list at etcd at once (default 2): parts start in key
    /// order as earlier ones come back, so the first keys are handed on while etcd reads the
    /// rest.
    pub parallel_reads: usize,
}

impl Default for EtcdListReads {
    fn default() -> Self {
        EtcdListReads {
            first_page_keys: 10_000,
            part_keys: 10_000,
            max_parts: 8,
            parallel_reads: 2,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdConfig {
    /// Settings for `endpoints` holding the kinds of `registry`, with the defaults above.
    pub fn new<I, S>(endpoints: I, registry: impl Into<Arc<Registry>>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            registry: registry.into(),
            tls: None,
            user: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            list_reads: EtcdListReads::default(),
        }
    }

    /// Sets how lists are read.
    #[must_use]
    pub fn with_list_reads(mut self, list_reads: EtcdListReads) -> Self {
        self.list_reads = list_reads;
        self
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Uses TLS.
    #[must_use]
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticates as `user`.
    #[must_use]
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Sets how long etcd may take to answer one request (see
    /// [`EtcdConfig::request_timeout`]).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub(crate) fn connect_options(&self) -> Result<ConnectOptions> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid(
                "endpoints",
                "at least one etcd endpoint is needed",
            ));
        }
        for e in &self.endpoints {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            if !scheme_ok {
                return Err(Error::invalid(
                    "endpoints",
                    format!("{e:?} must start with http:// or https://"),
                ));
            }
            if self.tls.is_some() != e.starts_with("https://") {
                return Err(Error::invalid(
                    "endpoints",
                    format!("{e:?}: use https:// exactly when TLS settings are given"),
                ));
            }
        }
        let mut opts = ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout);
        if let Some((interval, timeout)) = self.keep_alive {
            opts = opts
                .with_keep_alive(interval, timeout)
                .with_keep_alive_while_idle(true);
        }
        if let Some((user, password)) = &self.user {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            match (&tls.cert_pem, &tls.key_pem) {
                (Some(c), Some(k)) => t = t.identity(Identity::from_pem(c, k)),
                (None, None) => {}
                _ => {
                    return Err(Error::invalid(
                        "etcd_cert",
                        "a client certificate needs its key, and a key its certificate",
                    ));
                }
            }
            if let Some(d) = &tls.domain {
                t = t.domain_name(d.clone());
            }
            opts = opts.with_tls(t);
        }
        Ok(opts)
    }
}
