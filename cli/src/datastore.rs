//! Choosing and connecting to the datastore, as calicoctl does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kvsync_backend::etcd::{EtcdBackend, EtcdConfig, EtcdTls};
use kvsync_backend::kubernetes::{KubernetesBackend, KubernetesConfig};
use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{Client, MemoryBackend};

/// The kinds of datastore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatastoreType {
    /// A SQLite file (the default).
    Sqlite,
    /// An etcd v3 cluster.
    Etcd,
    /// A Kubernetes API server (CRDs).
    Kubernetes,
    /// In memory, for this process only.
    Memory,
}

/// Where the data is.
#[derive(Clone, Debug, Args)]
pub struct DatastoreArgs {
    /// The datastore type.
    #[arg(long = "datastore", env = "KVSYNC_DATASTORE_TYPE", value_enum, global = true, default_value_t = DatastoreType::Sqlite)]
    pub datastore_type: DatastoreType,

    /// The SQLite database file (default: kvsync.db in the platform's data directory).
    #[arg(long, env = "KVSYNC_DB", global = true)]
    pub db: Option<PathBuf>,

    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        global = true,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// The CA certificate that signed etcd's certificates.
    #[arg(long, env = "ETCD_CA_CERT_FILE", global = true)]
    pub etcd_ca_cert: Option<PathBuf>,

    /// The client certificate for etcd.
    #[arg(long, env = "ETCD_CERT_FILE", global = true)]
    pub etcd_cert: Option<PathBuf>,

    /// The client certificate's key.
    #[arg(long, env = "ETCD_KEY_FILE", global = true)]
    pub etcd_key: Option<PathBuf>,

    /// The etcd user name.
    #[arg(long, env = "ETCD_USERNAME", global = true)]
    pub etcd_username: Option<String>,

    /// The etcd password.
    #[arg(long, env = "ETCD_PASSWORD", global = true, hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// A kubeconfig file (kubernetes datastore).
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Read the initial state with paged LISTs only (kubernetes datastore). By default it is
    /// read with streaming watch-list requests where the API server serves them (Kubernetes
    /// 1.27+ with WatchList, etcd 3.4.31+ under it), and with paged LISTs where it does not.
    #[arg(long, env = "KVSYNC_KUBE_PAGED_LISTS", global = true)]
    pub kube_paged_lists: bool,

    /// Objects a page of a paged list asks for (kubernetes datastore; 2,000 by default, see
    /// BENCHMARKS.md).
    #[arg(long, env = "KVSYNC_KUBE_PAGE_SIZE", global = true,
          default_value_t = KubernetesConfig::DEFAULT_PAGE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_page_size: u32,

    /// Accepted for scripts written before watch-list requests became the default.
    #[arg(long, env = "KVSYNC_KUBE_WATCH_LIST", global = true, hide = true)]
    pub kube_watch_list: bool,

    /// The key prefix.
    #[arg(long, env = "KVSYNC_PREFIX", global = true, default_value = kvsync_model::DEFAULT_PREFIX)]
    pub prefix: String,

    /// How long one request may take, in seconds.
    #[arg(long, env = "KVSYNC_TIMEOUT", global = true, default_value_t = 10)]
    pub timeout: u64,
}

/// The default database file.
fn default_db() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("kvsync")
        .join("kvsync.db")
}

impl DatastoreArgs {
    /// Connects to the chosen datastore. Settings that can never work (a bad prefix,
    /// endpoint, kubeconfig or TLS file) are [`Usage`](kvsync_cli::Usage) errors.
    pub async fn connect(&self) -> Result<Arc<dyn Client>> {
        self.open().await.map_err(|e| {
            let bad_setting = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<kvsync_backend::Error>(),
                    Some(kvsync_backend::Error::Invalid { .. })
                )
            });
            if bad_setting {
                let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
                kvsync_cli::usage(chain.join(": "))
            } else {
                e
            }
        })
    }

    async fn open(&self) -> Result<Arc<dyn Client>> {
        let timeout = Duration::from_secs(self.timeout.max(1));
        Ok(match self.datastore_type {
            DatastoreType::Memory => Arc::new(
                MemoryBackend::builder(kvsync_model::demo::registry())
                    .prefix(self.prefix.clone())
                    .build()
                    .context("memory datastore")?,
            ),
            DatastoreType::Sqlite => {
                let path = self.db.clone().unwrap_or_else(default_db);
                let backend = SqliteBackend::open(
                    SqliteConfig::new(&path, kvsync_model::demo::registry())
                        .with_prefix(self.prefix.clone()),
                )
                .with_context(|| format!("cannot open the SQLite datastore {}", path.display()))?;
                Arc::new(backend)
            }
            DatastoreType::Etcd => {
                let mut config =
                    EtcdConfig::new(self.etcd_endpoints.clone(), kvsync_model::demo::registry())
                        .with_prefix(self.prefix.clone())
                        .with_request_timeout(timeout)
                        .with_connect_timeout(timeout.min(Duration::from_secs(5)));
                if self.etcd_ca_cert.is_some()
                    || self.etcd_cert.is_some()
                    || self.etcd_key.is_some()
                {
                    config = config.with_tls(EtcdTls::from_files(
                        self.etcd_ca_cert.as_deref(),
                        self.etcd_cert.as_deref(),
                        self.etcd_key.as_deref(),
                    )?);
                }
                match (&self.etcd_username, &self.etcd_password) {
                    (Some(u), Some(p)) => config = config.with_user(u.clone(), p.clone()),
                    (None, None) => {}
                    _ => {
                        return Err(kvsync_cli::usage(
                            "--etcd-username and --etcd-password go together",
                        ));
                    }
                }
                let endpoints = self.etcd_endpoints.join(",");
                let backend = tokio::time::timeout(timeout, EtcdBackend::connect(config))
                    .await
                    .with_context(|| {
                        format!("etcd at {endpoints} did not answer within {timeout:?}")
                    })?
                    .with_context(|| format!("cannot connect to etcd at {endpoints}"))?;
                Arc::new(backend)
            }
            DatastoreType::Kubernetes => {
                let mut config = KubernetesConfig::new(kvsync_model::demo::registry())
                    .with_watch_list(!self.kube_paged_lists)
                    .with_page_size(self.kube_page_size);
                if let Some(path) = &self.kubeconfig {
                    config = config.with_kubeconfig(path.clone());
                }
                let backend = tokio::time::timeout(timeout, KubernetesBackend::connect(config))
                    .await
                    .context("the Kubernetes configuration could not be loaded in time")?
                    .context("cannot use the kubernetes datastore")?;
                Arc::new(backend)
            }
        })
    }

    /// These settings with the datastore `spec` names instead (for `migrate --from/--to`):
    /// `sqlite:PATH`, `etcd:URL[,URL...]`, `kubernetes[:KUBECONFIG]` or `memory`. TLS, user,
    /// prefix and timeout stay as the flags set them.
    ///
    /// # Errors
    /// A [`Usage`](kvsync_cli::Usage) error for a spec of another form.
    pub fn with_spec(&self, spec: &str) -> Result<DatastoreArgs> {
        let mut args = self.clone();
        let (kind, rest) = match spec.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (spec, None),
        };
        let rest = rest.filter(|r| !r.is_empty());
        match (kind, rest) {
            ("sqlite", Some(path)) => {
                args.datastore_type = DatastoreType::Sqlite;
                args.db = Some(PathBuf::from(path));
            }
            ("etcd", Some(urls)) => {
                args.datastore_type = DatastoreType::Etcd;
                args.etcd_endpoints = urls.split(',').map(str::to_owned).collect();
            }
            ("kubernetes", kubeconfig) => {
                args.datastore_type = DatastoreType::Kubernetes;
                if let Some(k) = kubeconfig {
                    args.kubeconfig = Some(PathBuf::from(k));
                }
            }
            ("memory", None) => args.datastore_type = DatastoreType::Memory,
            _ => {
                return Err(kvsync_cli::usage(format!(
                    "datastore {spec:?}: expected sqlite:PATH, etcd:URL[,URL...], \
                     kubernetes[:KUBECONFIG] or memory"
                )));
            }
        }
        Ok(args)
    }

    /// A short description of the datastore, for messages.
    pub fn describe(&self) -> String {
        match self.datastore_type {
            DatastoreType::Memory => "memory".to_owned(),
            DatastoreType::Sqlite => format!(
                "sqlite {}",
                self.db.clone().unwrap_or_else(default_db).display()
            ),
            DatastoreType::Etcd => format!("etcd {}", self.etcd_endpoints.join(",")),
            DatastoreType::Kubernetes => "kubernetes".to_owned(),
        }
    }
}
