//! `kvsync`: a kubectl/calicoctl-style tool for kvsync datastores.
//!
//! Exit codes: 0 on success, 1 when an operation fails (not found, conflict, invalid input,
//! unreachable datastore), 2 for usage errors. Errors are one line on stderr.

mod commands;
mod controller;
mod datastore;
mod endpoints;
mod output;
mod serve;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::datastore::DatastoreArgs;

/// kvsync: get, apply, delete and watch resources in a kvsync datastore.
#[derive(Debug, Parser)]
#[command(name = "kvsync", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    datastore: DatastoreArgs,

    #[command(subcommand)]
    command: Command,
}

/// Output formats of `get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A table of the main fields.
    Table,
    /// A table with revision and uid too.
    Wide,
    /// YAML manifests.
    Yaml,
    /// JSON manifests.
    Json,
}

/// Output formats of `watch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WatchOutput {
    /// One readable line per status change or update.
    Text,
    /// One JSON object per line.
    Json,
}

/// `serve --sketches`: when clients are resynced by sketch ([`kvsync_server::Sketches`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SketchesArg {
    /// When the sketches cost less than the digests.
    Auto,
    /// Always (up to three sketches), then the digests.
    Always,
    /// Digests only.
    Never,
}

impl From<SketchesArg> for kvsync_server::Sketches {
    fn from(s: SketchesArg) -> Self {
        match s {
            SketchesArg::Auto => kvsync_server::Sketches::Auto,
            SketchesArg::Always => kvsync_server::Sketches::Always,
            SketchesArg::Never => kvsync_server::Sketches::Never,
        }
    }
}

#[derive(Debug, Args)]
struct FileArgs {
    /// A manifest file, a directory of them, or `-` for standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
}

/// `kvsync snapshot ...`.
#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Write every resource of the kinds, read at one revision, to FILE (JSON lines).
    Save {
        /// The file to write (`-` for standard output).
        file: String,
        /// Only these kinds (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
    /// Write the resources of a snapshot FILE into the datastore.
    Restore {
        /// The snapshot file (`-` for standard input).
        file: String,
        #[command(flatten)]
        restore: RestoreArgs,
    },
}

/// How `kvsync serve` secures its connections: TLS (`--tls-cert`, `--tls-key`; with
/// `--client-ca`, mutual TLS, and `--allowed-clients` to name who may connect), or plain TCP
/// asked for with `--plaintext`.
#[derive(Debug, Args)]
struct ServeTlsArgs {
    /// The server's certificate chain (PEM).
    #[arg(long, requires = "tls_key", conflicts_with = "plaintext")]
    tls_cert: Option<std::path::PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Client certificates must chain to this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// With --client-ca: the common names or URI SANs a client certificate must carry.
    #[arg(long, value_delimiter = ',', requires = "client_ca")]
    allowed_clients: Vec<String>,
    /// Serve over plain TCP (a trusted network only).
    #[arg(long)]
    plaintext: bool,
}

/// How `kvsync watch --server` verifies the server (TLS) and proves who it is (mutual TLS).
#[derive(Debug, Args)]
struct FollowTlsArgs {
    /// The CA the server's certificate must chain to (PEM): connect over TLS.
    #[arg(long, requires = "server")]
    server_ca: Option<std::path::PathBuf>,
    /// The server's name in its certificate (default: the host of --server).
    #[arg(long, requires = "server_ca")]
    server_name: Option<String>,
    /// The client's certificate chain (PEM), for mutual TLS.
    #[arg(long, requires = "client_key", requires = "server_ca")]
    client_cert: Option<std::path::PathBuf>,
    /// The client's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
}

/// What a restore does with resources that exist already.
#[derive(Debug, Args)]
struct RestoreArgs {
    /// Go on with an interrupted restore: resources that hold the snapshot's value already are
    /// skipped (others that exist are an error).
    #[arg(long)]
    resume: bool,
    /// Replace resources that exist (by default a target that holds any of the snapshot's
    /// kinds is refused).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Check everything, write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show resources of a kind.
    Get {
        /// The kind (e.g. ippools, ippool, pool, IPPool).
        kind: String,
        /// Only this resource.
        name: Option<String>,
        /// The namespace (namespaced kinds).
        #[arg(short, long)]
        namespace: Option<String>,
        /// All namespaces.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
        /// The output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create or update the resources of manifests.
    Apply(FileArgs),
    /// Create the resources of manifests; fails if one exists.
    Create(FileArgs),
    /// Delete a resource, or the resources of manifests.
    Delete {
        /// The kind.
        kind: Option<String>,
        /// The name.
        name: Option<String>,
        /// The namespace (namespaced kinds).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Manifests naming the resources to delete.
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        files: Vec<String>,
    },
    /// Follow kinds with a Syncer: print status changes and updates as they arrive.
    Watch {
        /// The kinds to follow.
        #[arg(required = true)]
        kinds: Vec<String>,
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// The output format.
        #[arg(short, long, value_enum, default_value_t = WatchOutput::Text)]
        output: WatchOutput,
        /// Exit after the first InSync.
        #[arg(long)]
        once: bool,
        /// Follow a `kvsync serve` at this address (`host:port`) instead of the datastore.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        tls: FollowTlsArgs,
    },
    /// Compact the datastore's history (at its current revision unless given).
    Compact {
        /// The revision to compact at.
        #[arg(long)]
        revision: Option<String>,
    },
    /// Print the CustomResourceDefinitions of the kinds, as YAML.
    Crds {
        /// Write one file per kind into this directory instead.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Write demo resources and show a Syncer following them.
    Demo,
    /// Save every resource of some kinds at one revision to a file, or restore one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Copy every resource from one datastore to another (e.g. from the embedded SQLite to
    /// etcd), checking the counts at the end.
    Migrate {
        /// The datastore to copy from (default: the one the global flags choose):
        /// `sqlite:PATH`, `etcd:URL[,URL...]`, `kubernetes[:KUBECONFIG]` or `memory`.
        #[arg(long)]
        from: Option<String>,
        /// The datastore to copy to, in the same form; TLS, user, prefix and timeout come from
        /// the global flags.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        restore: RestoreArgs,
        /// Only these kinds (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
    /// Run as a controller: follow the kinds through a Syncer into memory and serve
    /// `/metrics` (Prometheus), `/healthz` (the process works) and `/readyz` (in sync with the
    /// datastore) until SIGTERM or Ctrl-C. What deploy/deployment.yaml runs.
    Controller {
        /// The kinds to follow (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Where to serve the endpoints (`127.0.0.1:0` picks a free port; the address is
        /// printed on stderr).
        #[arg(long, env = "KVSYNC_LISTEN", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
    },
    /// Serve the kinds to many followers (`kvsync watch --server`, `RemoteSyncer`): one Syncer
    /// upstream, clients resuming from a log of recent changes instead of relisting. Also
    /// serves `/metrics`, `/healthz` and `/readyz` (in sync). Stops on SIGTERM or Ctrl-C,
    /// telling clients where to resume.
    Serve {
        /// The kinds to serve (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Where clients connect (plain TCP).
        #[arg(long, env = "KVSYNC_SERVE_LISTEN", default_value = "0.0.0.0:7878")]
        listen: std::net::SocketAddr,
        /// Where `/metrics`, `/healthz` and `/readyz` are served.
        #[arg(long, env = "KVSYNC_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
        http_listen: std::net::SocketAddr,
        /// The most recent changes kept for resuming clients, in MiB.
        #[arg(long, default_value_t = 64)]
        log_mib: usize,
        /// The oldest change kept for resuming clients, in seconds.
        #[arg(long, default_value_t = 300)]
        log_seconds: u64,
        /// The most resyncs and snapshots sent at once (clients resuming from the log never
        /// wait for one).
        #[arg(long, default_value_t = 64)]
        max_catch_ups: usize,
        /// Shed clients (one a second, each told where to resume) while more than this many
        /// are connected, so that they spread over the replicas behind a Service.
        #[arg(long, env = "KVSYNC_TARGET_CONNECTIONS")]
        target_connections: Option<usize>,
        /// Save the state and the log here on shutdown and take them up on start, so that
        /// clients resume across a restart (an emptyDir volume keeps it across container
        /// restarts).
        #[arg(long, env = "KVSYNC_STATE_DIR")]
        state_dir: Option<std::path::PathBuf>,
        /// When a client outside the log's window is resynced by a sketch of what it holds
        /// (sized for the difference) rather than by per-bucket digests: `auto` when it costs
        /// less, `always`, or `never`.
        #[arg(long, value_enum, default_value_t = SketchesArg::Auto)]
        sketches: SketchesArg,
        #[command(flatten)]
        tls: ServeTlsArgs,
    },
    /// Print the client's version and what the datastore can do (its capabilities), as
    /// `kubectl version` prints the server's.
    Version {
        /// Only the client's version: do not open the datastore.
        #[arg(long)]
        client: bool,
        /// The output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn main() -> ExitCode {
    // A closed stdout (`kvsync crds | head -1`) ends the process as it ends `cat`: by
    // SIGPIPE, quietly, instead of a panic on the write that fails.
    sigpipe::reset();
    let cli = Cli::parse();
    if std::env::var_os("KVSYNC_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("KVSYNC_LOG"))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    } else if matches!(
        cli.command,
        Command::Controller { .. } | Command::Serve { .. }
    ) {
        // A long-running process logs what it does by default.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Blocking tasks still running (a SQLite watch's poll) do not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut line = format!("error: {e}");
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            eprintln!("{}", line.replace('\n', " "));
            if e.downcast_ref::<kvsync_cli::Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
