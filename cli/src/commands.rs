//! The subcommands.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use kvsync_backend::{Client, Error, snapshot};
use kvsync_model::{KVPair, KindInfo, ListOptions, Registry, ResourceKey, Revision};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent, UpdateType};
use serde_json::{Value, json};

use crate::datastore::DatastoreArgs;
use crate::output;
use crate::{Cli, Command, Output, RestoreArgs, SnapshotCommand, WatchOutput};
use kvsync_cli::manifest::{self, Doc};
use kvsync_cli::usage;

/// Prints the client's version and, with a client, the datastore's backend and capabilities.
fn version(client: Option<&dyn Client>, output: Output) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let datastore = client.map(|c| {
        json!({
            "backend": c.backend_name(),
            "prefix": c.codec().prefix(),
            "capabilities": c.capabilities(),
        })
    });
    let all = json!({"client": {"version": version}, "datastore": datastore});
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&all)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&all)?),
        Output::Table | Output::Wide => {
            println!("Client Version: {version}");
            if let Some(c) = client {
                let caps = c.capabilities();
                let yes = |b: bool| if b { "yes" } else { "no" };
                println!(
                    "Datastore: {} (prefix {})",
                    c.backend_name(),
                    c.codec().prefix()
                );
                println!("  TTL:                    {}", yes(caps.ttl));
                println!("  reads at old revisions: {}", yes(caps.historical_reads));
                println!("  compaction:             {}", yes(caps.compaction));
                println!("  global revision:        {}", yes(caps.global_revision));
                println!("  raw bytes kept:         {}", yes(caps.raw_bytes));
                println!(
                    "  largest value:          {}",
                    caps.max_value_bytes
                        .map_or_else(|| "no limit".to_owned(), |n| format!("{n} bytes"))
                );
                println!(
                    "  transactions:           {}",
                    match (caps.transactions, caps.max_txn_ops) {
                        (false, _) => "no".to_owned(),
                        (true, None) => "yes".to_owned(),
                        (true, Some(n)) => format!("yes, up to {n} operations"),
                    }
                );
                println!("  leases:                 {}", yes(caps.leases));
            }
        }
    }
    Ok(())
}

/// Runs the command line.
pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Crds { out_dir } = &cli.command {
        return crds(&kvsync_model::demo::registry(), out_dir.as_deref());
    }
    if let Command::Version {
        client: true,
        output,
    } = &cli.command
    {
        return version(None, *output);
    }
    if let Command::Migrate {
        from,
        to,
        restore,
        kinds,
    } = &cli.command
    {
        return migrate(&cli.datastore, from.as_deref(), to, restore, kinds).await;
    }
    if let Command::Watch {
        kinds,
        namespace,
        output,
        once,
        server: Some(server),
        tls,
    } = &cli.command
    {
        let tls = follow_tls(server, tls)?;
        return watch_remote(server, tls, kinds, namespace.clone(), *output, *once).await;
    }
    let client = cli.datastore.connect().await?;
    match cli.command {
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => get(&client, &kind, name, namespace, all_namespaces, output).await,
        Command::Apply(files) => write(&client, &files.files, false).await,
        Command::Create(files) => write(&client, &files.files, true).await,
        Command::Delete {
            kind,
            name,
            namespace,
            files,
        } => delete(&client, kind, name, namespace, &files).await,
        Command::Watch {
            kinds,
            namespace,
            output,
            once,
            ..
        } => watch(client, &kinds, namespace, output, once).await,
        Command::Compact { revision } => compact(&client, revision).await,
        Command::Demo => demo(client, &cli.datastore.describe()).await,
        Command::Snapshot(SnapshotCommand::Save { file, kinds }) => {
            snapshot_save(client, &file, &kinds).await
        }
        Command::Snapshot(SnapshotCommand::Restore { file, restore }) => {
            snapshot_restore(&*client, &file, &restore).await
        }
        Command::Migrate { .. } => unreachable!("handled above"),
        Command::Crds { .. } => unreachable!("handled above"),
        Command::Version { output, .. } => version(Some(&*client), output),
        Command::Controller { kinds, listen } => {
            let opts = kind_options(&client, &kinds)?;
            crate::controller::run(client, opts, listen).await
        }
        Command::Serve {
            kinds,
            listen,
            http_listen,
            log_mib,
            log_seconds,
            max_catch_ups,
            target_connections,
            state_dir,
            sketches,
            tls,
        } => {
            let tls = serve_tls(&tls)?;
            let opts = kind_options(&client, &kinds)?;
            let args = crate::serve::ServeArgs {
                kinds: opts,
                listen,
                http_listen,
                log_bytes: log_mib << 20,
                log_age: std::time::Duration::from_secs(log_seconds),
                max_catch_ups,
                target_connections,
                state_dir,
                sketches: sketches.into(),
                tls,
            };
            crate::serve::run(client, args).await
        }
    }
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The server's TLS from the flags; `None` for `--plaintext`.
fn serve_tls(args: &crate::ServeTlsArgs) -> Result<Option<kvsync_server::ServerTls>> {
    match (&args.tls_cert, &args.tls_key, args.plaintext) {
        (Some(cert), Some(key), _) => {
            let mut tls = kvsync_server::ServerTls::new(read_pem(cert)?, read_pem(key)?);
            if let Some(ca) = &args.client_ca {
                tls = tls.with_client_auth(read_pem(ca)?, args.allowed_clients.clone());
            }
            Ok(Some(tls))
        }
        (_, _, true) => Ok(None),
        _ => Err(usage(
            "kvsync serve needs TLS (--tls-cert and --tls-key) or --plaintext",
        )),
    }
}

/// A follower's TLS from the flags; `None` without `--server-ca` (plain TCP).
fn follow_tls(
    server: &str,
    args: &crate::FollowTlsArgs,
) -> Result<Option<kvsync_server::ClientTls>> {
    let Some(ca) = &args.server_ca else {
        return Ok(None);
    };
    let name = match &args.server_name {
        Some(n) => n.clone(),
        None => server
            .rsplit_once(':')
            .map_or(server, |(host, _)| host)
            .trim_matches(['[', ']'])
            .to_owned(),
    };
    let mut tls = kvsync_server::ClientTls::new(read_pem(ca)?, name);
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        tls = tls.with_identity(read_pem(cert)?, read_pem(key)?);
    }
    Ok(Some(tls))
}

/// The list options of the kinds named (every kind of the registry when none is).
fn kind_options(client: &Arc<dyn Client>, kinds: &[String]) -> Result<Vec<ListOptions>> {
    let registry = client.codec().registry().clone();
    if kinds.is_empty() {
        return Ok(registry
            .kinds()
            .iter()
            .map(|k| ListOptions::new(&k.kind))
            .collect());
    }
    kinds
        .iter()
        .map(|k| Ok(ListOptions::new(&resolve(&registry, k)?.kind)))
        .collect()
}

/// Checks list options built from flags against the kind (namespace rules, DNS names).
fn check_flags(client: &dyn Client, opts: &ListOptions) -> Result<()> {
    client
        .codec()
        .list_prefix(opts)
        .map(|_| ())
        .map_err(|e| usage(e.to_string()))
}

/// The kind a user named (`ippools`, `ippool`, `pool`, `IPPool`).
fn resolve<'a>(registry: &'a Registry, name: &str) -> Result<&'a KindInfo> {
    registry.resolve(name).ok_or_else(|| {
        let known: Vec<&str> = registry.kinds().iter().map(|k| k.plural.as_str()).collect();
        usage(format!(
            "the server doesn't have a resource type {name:?} (known: {})",
            known.join(", ")
        ))
    })
}

fn key_for(
    client: &dyn Client,
    info: &KindInfo,
    name: &str,
    namespace: Option<String>,
) -> Result<ResourceKey> {
    let key = match (info.namespaced, namespace) {
        (true, ns) => {
            ResourceKey::namespaced(&info.kind, ns.unwrap_or_else(|| "default".into()), name)
        }
        (false, None) => ResourceKey::cluster(&info.kind, name),
        (false, Some(_)) => {
            return Err(usage(format!(
                "kind {} is cluster-scoped: it takes no namespace",
                info.kind
            )));
        }
    };
    client
        .codec()
        .validate(&key)
        .map_err(|e| usage(e.to_string()))?;
    Ok(key)
}

/// `ippool/pool-a`, as kubectl names resources in its messages.
fn display(kvp_key: &ResourceKey) -> String {
    match &kvp_key.namespace {
        Some(ns) => format!(
            "{}/{} -n {ns}",
            kvp_key.kind.to_ascii_lowercase(),
            kvp_key.name
        ),
        None => format!("{}/{}", kvp_key.kind.to_ascii_lowercase(), kvp_key.name),
    }
}

async fn get(
    client: &Arc<dyn Client>,
    kind: &str,
    name: Option<String>,
    namespace: Option<String>,
    all_namespaces: bool,
    out: Output,
) -> Result<()> {
    let info = resolve(client.codec().registry(), kind)?.clone();
    if !info.namespaced && namespace.is_some() {
        return Err(usage(format!(
            "kind {} is cluster-scoped: it takes no namespace",
            info.kind
        )));
    }
    let items = match &name {
        Some(name) => {
            let key = key_for(&**client, &info, name, namespace)?;
            match client.get(&key, &kvsync_model::GetOptions::new()).await {
                Ok(kvp) => vec![kvp],
                Err(Error::NotFound { .. }) => bail!("{} {name:?} not found", info.plural),
                Err(e) => return Err(e.into()),
            }
        }
        None => {
            let mut opts = ListOptions::new(&info.kind);
            if info.namespaced && !all_namespaces {
                opts.namespace = Some(namespace.unwrap_or_else(|| "default".into()));
            }
            check_flags(&**client, &opts)?;
            client.list(&opts).await?.items
        }
    };
    let mut stdout = std::io::stdout().lock();
    match out {
        Output::Table | Output::Wide => {
            if items.is_empty() {
                eprintln!("No resources found.");
            } else {
                write!(
                    stdout,
                    "{}",
                    output::table(&info, &items, out == Output::Wide)
                )?;
            }
        }
        Output::Yaml | Output::Json => {
            let value = if name.is_some() {
                output::manifest(&info, &items[0])
            } else {
                json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": items.iter().map(|k| output::manifest(&info, k)).collect::<Vec<_>>(),
                })
            };
            if out == Output::Yaml {
                write!(stdout, "{}", output::yaml(&value)?)?;
            } else {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
            }
        }
    }
    Ok(())
}

fn progress(total: usize) -> Option<indicatif::ProgressBar> {
    (total > 20 && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Reports the invalid documents of `loaded` as kubectl does (a line each, the others go
/// on), and says how many of the documents failed in all. A single document's own error is
/// the whole message.
fn invalid_first(loaded: &manifest::Loaded) -> Result<()> {
    if loaded.docs.is_empty() && loaded.invalid.len() == 1 {
        bail!("{}", loaded.invalid[0]);
    }
    for message in &loaded.invalid {
        eprintln!("error: {message}");
    }
    Ok(())
}

/// The end of a multi-document command: success, or how many documents failed.
fn outcome(failed: usize, total: usize) -> Result<()> {
    match failed {
        0 => Ok(()),
        n => bail!("{n} of {total} documents failed"),
    }
}

async fn write(client: &Arc<dyn Client>, files: &[String], create_only: bool) -> Result<()> {
    let loaded = manifest::load(client.codec(), files)?;
    invalid_first(&loaded)?;
    let total = loaded.docs.len() + loaded.invalid.len();
    let docs: Vec<Doc> = loaded.docs;
    let invalid = loaded.invalid.len();
    let bar = progress(docs.len());
    let mut failures = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for doc in docs {
        let what = display(&doc.kvp.key);
        let result = if create_only {
            client.create(doc.kvp).await.map(|_| "created")
        } else {
            // Created, or configured: told by the create that fails when the resource exists
            // (the Kubernetes API has no create revision to compare).
            match client.create(doc.kvp.clone()).await {
                Ok(_) => Ok("created"),
                Err(kvsync_backend::Error::AlreadyExists { .. }) => {
                    client.apply(doc.kvp).await.map(|_| "configured")
                }
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(verb) => {
                let line = format!("{what} {verb}");
                match &bar {
                    Some(b) => b.println(line),
                    None => writeln!(stdout, "{line}")?,
                }
            }
            Err(e) if e.is_retryable() => {
                return Err(anyhow!(e)).with_context(|| format!("{}: {what}", doc.origin));
            }
            // Each document says what happened to it, and the others go on, as with kubectl.
            Err(e) => {
                let line = format!("error: {}: {what}: {e}", doc.origin);
                match &bar {
                    Some(b) => b.println(&line),
                    None => eprintln!("{line}"),
                }
                failures.push(line);
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    outcome(failures.len() + invalid, total)
}

async fn delete(
    client: &Arc<dyn Client>,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    files: &[String],
) -> Result<()> {
    let mut invalid = 0;
    let keys: Vec<ResourceKey> = if files.is_empty() {
        let (Some(kind), Some(name)) = (kind, name) else {
            return Err(usage("give KIND NAME or -f FILE"));
        };
        let info = resolve(client.codec().registry(), &kind)?;
        vec![key_for(&**client, info, &name, namespace)?]
    } else {
        let loaded = manifest::load(client.codec(), files)?;
        invalid_first(&loaded)?;
        invalid = loaded.invalid.len();
        loaded.docs.into_iter().map(|d| d.kvp.key).collect()
    };
    let total = keys.len() + invalid;
    let mut failed = invalid;
    let mut stdout = std::io::stdout().lock();
    for key in keys {
        match client
            .delete(&key, &kvsync_model::DeleteOptions::new())
            .await
        {
            Ok(_) => writeln!(stdout, "{} deleted", display(&key))?,
            // One resource named on the command line: its error is the whole message.
            Err(Error::NotFound { .. }) if total == 1 => bail!("{} not found", display(&key)),
            Err(e) if e.is_retryable() => return Err(e.into()),
            // Each document says what happened to it, and the others go on.
            Err(Error::NotFound { .. }) => {
                eprintln!("error: {} not found", display(&key));
                failed += 1;
            }
            Err(e) => {
                eprintln!("error: {}: {e}", display(&key));
                failed += 1;
            }
        }
    }
    outcome(failed, total)
}

fn update_json(u: &kvsync_syncer::Update, registry: &Registry) -> Value {
    let object = registry
        .kind(&u.kvp.key.kind)
        .map(|info| output::manifest(info, &u.kvp))
        .unwrap_or_else(|_| json!({"key": u.kvp.key.to_string(), "spec": u.kvp.value}));
    json!({
        "type": u.update_type.to_string(),
        "key": u.kvp.key.to_string(),
        "revision": u.kvp.revision.as_ref().map(ToString::to_string),
        "object": object,
    })
}

/// The list options of the kinds named on the command line, checked against `client`'s
/// codec when there is one.
fn watch_options(
    registry: &Registry,
    client: Option<&dyn Client>,
    kinds: &[String],
    namespace: &Option<String>,
) -> Result<Vec<ListOptions>> {
    let mut all = Vec::new();
    for k in kinds {
        let info = resolve(registry, k)?;
        let mut opts = ListOptions::new(&info.kind);
        match (info.namespaced, namespace) {
            (true, ns) => opts.namespace = ns.clone(),
            (false, Some(_)) if kinds.len() == 1 => {
                return Err(usage(format!(
                    "kind {} is cluster-scoped: it takes no namespace",
                    info.kind
                )));
            }
            // With several kinds, -n narrows the namespaced ones.
            (false, _) => {}
        }
        // Checked before the Syncer starts: it would retry options that can never work.
        if let Some(c) = client {
            check_flags(c, &opts)?;
        }
        all.push(opts);
    }
    Ok(all)
}

async fn watch(
    client: Arc<dyn Client>,
    kinds: &[String],
    namespace: Option<String>,
    out: WatchOutput,
    once: bool,
) -> Result<()> {
    let registry = client.codec().registry().clone();
    let mut syncer = Syncer::new(client.clone());
    for opts in watch_options(&registry, Some(&*client), kinds, &namespace)? {
        syncer = syncer.with_resource(ResourceType::new(opts));
    }
    let mut events = syncer.stream();
    print_events(&mut events, &registry, out, once, |_| true).await?;
    events.stop().await;
    Ok(())
}

/// `kvsync watch --server ADDR`: the same, from a `kvsync serve` (which serves its own kinds:
/// the ones asked for are picked out here).
pub async fn watch_remote(
    server: &str,
    tls: Option<kvsync_server::ClientTls>,
    kinds: &[String],
    namespace: Option<String>,
    out: WatchOutput,
    once: bool,
) -> Result<()> {
    let registry = kvsync_model::demo::registry();
    let wanted = watch_options(&registry, None, kinds, &namespace)?;
    let mut remote = kvsync_server::RemoteSyncer::new(server);
    if let Some(tls) = tls {
        remote = remote.with_tls(tls);
    }
    let mut events = remote.stream();
    print_events(&mut events, &registry, out, once, |k| {
        wanted.iter().any(|o| o.matches(k))
    })
    .await
}

/// Prints events as they come until Ctrl-C (or the first InSync with `once`); only the
/// updates of keys `wanted` says yes to.
async fn print_events<S>(
    events: &mut S,
    registry: &Registry,
    out: WatchOutput,
    once: bool,
    wanted: impl Fn(&kvsync_model::ResourceKey) -> bool,
) -> Result<()>
where
    S: futures::Stream<Item = SyncerEvent> + Unpin,
{
    let mut stdout = std::io::stdout().lock();
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(ev) = ev else { break };
        match (&ev, out) {
            (SyncerEvent::Status(s), WatchOutput::Text) => writeln!(stdout, "status {s}")?,
            (SyncerEvent::Status(s), WatchOutput::Json) => {
                writeln!(
                    stdout,
                    "{}",
                    json!({"type": "Status", "status": s.to_string()})
                )?;
            }
            (SyncerEvent::Updates(batch), WatchOutput::Text) => {
                for u in batch.iter().filter(|u| wanted(&u.kvp.key)) {
                    let rev = u
                        .kvp
                        .revision
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    let value = if u.update_type == UpdateType::Deleted {
                        String::new()
                    } else {
                        format!(" {}", u.kvp.value)
                    };
                    writeln!(
                        stdout,
                        "{:<8} {} @{rev}{value}",
                        u.update_type.to_string(),
                        u.kvp.key
                    )?;
                }
            }
            (SyncerEvent::Updates(batch), WatchOutput::Json) => {
                for u in batch.iter().filter(|u| wanted(&u.kvp.key)) {
                    writeln!(stdout, "{}", update_json(u, registry))?;
                }
            }
            (SyncerEvent::ParseFailed(f), _) => {
                eprintln!("warning: cannot decode {}: {}", f.raw_key, f.reason);
            }
            (SyncerEvent::Error(e), _) => eprintln!("warning: {e} (retrying)"),
        }
        stdout.flush()?;
        if once && matches!(ev, SyncerEvent::Status(SyncStatus::InSync)) {
            break;
        }
    }
    Ok(())
}

async fn compact(client: &Arc<dyn Client>, revision: Option<String>) -> Result<()> {
    let at = match revision {
        Some(r) => Revision::from(r),
        None => client.current_revision().await?,
    };
    client.compact(&at).await?;
    println!("compacted at revision {at}");
    Ok(())
}

/// The kinds named on the command line (any of their names), as the registry spells them.
fn kind_names(registry: &Registry, names: &[String]) -> Result<Vec<String>> {
    names
        .iter()
        .map(|n| resolve(registry, n).map(|k| k.kind.clone()))
        .collect()
}

fn restore_options(args: &RestoreArgs) -> snapshot::RestoreOptions {
    let existing = if args.resume {
        snapshot::Existing::Resume
    } else if args.overwrite {
        snapshot::Existing::Overwrite
    } else {
        snapshot::Existing::Refuse
    };
    snapshot::RestoreOptions::new()
        .with_existing(existing)
        .with_dry_run(args.dry_run)
}

/// Says what a save left out (entries that do not decode), and fails if it left out any.
fn report_left_out(left_out: &[kvsync_model::ParseFailure]) -> Result<()> {
    for f in left_out {
        eprintln!("left out {}: {}", f.raw_key, f.reason);
    }
    if !left_out.is_empty() {
        bail!(
            "{} stored entries do not decode and are not in the snapshot",
            left_out.len()
        );
    }
    Ok(())
}

async fn snapshot_save(client: Arc<dyn Client>, file: &str, kinds: &[String]) -> Result<()> {
    let kinds = kind_names(client.codec().registry(), kinds)?;
    let summary = if file == "-" {
        snapshot::save(client, &kinds, tokio::io::stdout()).await?
    } else {
        // Written beside the target and renamed into place: never a half-written snapshot.
        let tmp = format!("{file}.partial");
        let out = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot create {tmp}"))?;
        let mut out = tokio::io::BufWriter::new(out);
        let summary = snapshot::save(client, &kinds, &mut out).await;
        let summary = match summary {
            Ok(s) => {
                out.into_inner()
                    .sync_all()
                    .await
                    .with_context(|| format!("cannot write {tmp}"))?;
                s
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
        };
        tokio::fs::rename(&tmp, file)
            .await
            .with_context(|| format!("cannot rename {tmp} to {file}"))?;
        summary
    };
    let at = summary.revision.as_ref().map_or_else(
        || "each kind's own revision".to_owned(),
        |r| format!("revision {r}"),
    );
    eprintln!(
        "saved {} resources of {} kinds at {at}",
        summary.count,
        summary.per_kind.len()
    );
    report_left_out(&summary.left_out)
}

async fn snapshot_restore(client: &dyn Client, file: &str, args: &RestoreArgs) -> Result<()> {
    let entries = if file == "-" {
        snapshot::read(tokio::io::BufReader::new(tokio::io::stdin()))
    } else {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {file}"))?;
        snapshot::read(tokio::io::BufReader::new(f))
    };
    let summary = restore_into(client, entries, args)
        .await
        .with_context(|| format!("restore of {file}"))?;
    print_restored(&summary, args.dry_run);
    Ok(())
}

/// Restores with a progress line on a terminal.
async fn restore_into(
    client: &dyn Client,
    entries: snapshot::SnapshotStream,
    args: &RestoreArgs,
) -> Result<snapshot::RestoreSummary> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} resources {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let mut tick = |n: u64| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    };
    let summary =
        snapshot::restore_with_progress(client, entries, &restore_options(args), &mut tick).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match summary {
        Err(Error::AlreadyExists { key }) => Err(anyhow!(
            "the target holds {key} already: restore into an empty datastore, or pass \
             --resume or --overwrite"
        )),
        Err(Error::Conflict { key, .. }) => Err(anyhow!(
            "{key} exists with another value: pass --overwrite to replace it"
        )),
        other => Ok(other?),
    }
}

fn print_restored(summary: &snapshot::RestoreSummary, dry_run: bool) {
    let verb = if dry_run { "would write" } else { "wrote" };
    let how = if summary.atomic {
        " (one transaction)"
    } else {
        ""
    };
    println!(
        "{verb} {} of {} resources{how}; {} held the same value already",
        summary.written, summary.read, summary.unchanged
    );
}

async fn migrate(
    flags: &DatastoreArgs,
    from: Option<&str>,
    to: &str,
    args: &RestoreArgs,
    kinds: &[String],
) -> Result<()> {
    let source_args = match from {
        Some(spec) => flags.with_spec(spec)?,
        None => flags.clone(),
    };
    let target_args = flags.with_spec(to)?;
    let source = source_args
        .connect()
        .await
        .context("the datastore to copy from")?;
    let target = target_args
        .connect()
        .await
        .context("the datastore to copy to")?;
    let kinds = kind_names(source.codec().registry(), kinds)?;
    let (entries, left_out) = snapshot::entries(source.clone(), &kinds).await?;
    eprintln!(
        "copying from {} to {}{}",
        source_args.describe(),
        target_args.describe(),
        if args.dry_run { " (dry run)" } else { "" }
    );
    let summary = restore_into(&*target, entries, args).await?;
    report_left_out(&left_out.await.unwrap_or_default())?;
    print_restored(&summary, args.dry_run);
    if args.dry_run {
        return Ok(());
    }
    // The count check: the target holds every resource the source had (exactly as many where
    // it started empty).
    for (kind, count) in &summary.per_kind {
        let have = target
            .list(&ListOptions::new(kind.as_str()))
            .await?
            .items
            .len() as u64;
        let fine = if args.resume || args.overwrite {
            have >= *count
        } else {
            have == *count
        };
        if !fine {
            bail!("count check: the source had {count} {kind} resources, the target holds {have}");
        }
        println!("  {kind}: {count} in the source, {have} in the target");
    }
    Ok(())
}

fn crds(registry: &Registry, out_dir: Option<&std::path::Path>) -> Result<()> {
    let mut all = String::new();
    for info in registry.kinds() {
        let text = output::yaml(&kvsync_model::crd::crd(info))?;
        match out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let path = dir.join(format!("{}.{}.yaml", info.plural, info.group));
                std::fs::write(&path, &text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => {
                all.push_str("---\n");
                all.push_str(&text);
            }
        }
    }
    print!("{all}");
    Ok(())
}

/// The demo resources: (key, spec).
fn demo_resources() -> Vec<KVPair> {
    let pool = |name: &str, cidr: &str| {
        KVPair::new(
            ResourceKey::cluster("IPPool", name),
            json!({"cidr": cidr, "blockSize": 26, "natOutgoing": true}),
        )
    };
    let policy = |ns: &str, name: &str, order: f64, port: u16| {
        KVPair::new(
            ResourceKey::namespaced("NetworkPolicy", ns, name),
            json!({
                "order": order,
                "selector": format!("app == '{name}'"),
                "ingress": [{"action": "Allow", "protocol": "TCP", "ports": [port]}],
                "egress": [{"action": "Allow", "nets": ["10.0.0.0/8"]}],
            }),
        )
    };
    let node = |name: &str, ip: &str, asn: u32| {
        KVPair::new(
            ResourceKey::cluster("Node", name),
            json!({"addresses": [ip], "labels": {"zone": "a"}, "asn": asn}),
        )
    };
    vec![
        pool("demo-pool-a", "10.10.0.0/16"),
        pool("demo-pool-b", "10.20.0.0/16"),
        policy("demo-prod", "web", 100.0, 443),
        policy("demo-prod", "db", 200.0, 5432),
        policy("demo-dev", "web", 100.0, 8080),
        node("demo-node-1", "192.168.0.11", 64512),
        node("demo-node-2", "192.168.0.12", 64512),
    ]
}

async fn demo(client: Arc<dyn Client>, datastore: &str) -> Result<()> {
    println!("kvsync demo on {datastore}");
    let kinds = ["IPPool", "NetworkPolicy", "Node"];
    let mut syncer = Syncer::new(client.clone());
    for k in kinds {
        syncer = syncer.with_resource(ResourceType::new(ListOptions::new(k)));
    }
    let mut events = syncer.stream();
    let mut cache = Cache::new();
    // The initial sync.
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .context("the Syncer did not reach InSync within 30 s")?
            .ok_or_else(|| anyhow!("the Syncer stopped"))?;
        let in_sync = matches!(ev, SyncerEvent::Status(SyncStatus::InSync));
        apply_event(&mut cache, ev);
        if in_sync {
            break;
        }
    }
    // Writes, while the Syncer follows them.
    let mut script: Vec<(String, KVPair)> = demo_resources()
        .into_iter()
        .map(|k| (format!("apply  {}", k.key), k))
        .collect();
    let disabled = KVPair::new(
        ResourceKey::cluster("IPPool", "demo-pool-b"),
        json!({"cidr": "10.20.0.0/16", "blockSize": 26, "natOutgoing": true, "disabled": true}),
    );
    script.push(("update IPPool(demo-pool-b): disabled".into(), disabled));
    for (what, kvp) in script {
        client.apply(kvp).await.with_context(|| what.clone())?;
        println!("[writer] {what}");
        drain(&mut events, &mut cache).await;
    }
    let gone = ResourceKey::cluster("Node", "demo-node-2");
    if client
        .delete(&gone, &kvsync_model::DeleteOptions::new())
        .await
        .is_ok()
    {
        println!("[writer] delete {gone}");
    }
    // Wait until the cache holds exactly the datastore's state.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        drain(&mut events, &mut cache).await;
        let mut truth = BTreeMap::new();
        for k in kinds {
            for kvp in client.list(&ListOptions::new(k)).await?.items {
                truth.insert(kvp.key, (kvp.value.into_value()?, kvp.revision));
            }
        }
        if truth == cache {
            println!(
                "the Syncer's cache matches the datastore: {} resources",
                cache.len()
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the Syncer's cache did not converge within 30 s");
        }
    }
    events.stop().await;
    let registry = client.codec().registry().clone();
    for k in kinds {
        let info = registry.kind(k)?;
        let items = client.list(&ListOptions::new(k)).await?.items;
        println!("\n{}:", info.plural);
        print!("{}", output::table(info, &items, false));
    }
    println!("\nnext: kvsync get ippools -o yaml; kvsync watch ippools networkpolicies");
    Ok(())
}

type Cache = BTreeMap<ResourceKey, (Value, Option<Revision>)>;

/// Prints a Syncer event and applies it to the demo's cache.
fn apply_event(cache: &mut Cache, ev: SyncerEvent) {
    match ev {
        SyncerEvent::Status(s) => println!("  [syncer] status {s}"),
        SyncerEvent::Updates(batch) => {
            for u in batch {
                println!("  [syncer] {:<8} {}", u.update_type.to_string(), u.kvp.key);
                match u.update_type {
                    UpdateType::Deleted => {
                        cache.remove(&u.kvp.key);
                    }
                    _ => match u.kvp.value.into_value() {
                        Ok(v) => {
                            cache.insert(u.kvp.key, (v, u.kvp.revision));
                        }
                        Err(e) => println!("  [syncer] cannot read {}: {e}", u.kvp.key),
                    },
                }
            }
        }
        SyncerEvent::ParseFailed(f) => println!("  [syncer] cannot decode {}", f.raw_key),
        SyncerEvent::Error(e) => println!("  [syncer] retrying after: {e}"),
    }
}

/// Applies whatever the Syncer has delivered within a short while.
async fn drain(events: &mut kvsync_syncer::SyncerStream, cache: &mut Cache) {
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(150), events.next()).await {
        apply_event(cache, ev);
    }
}
