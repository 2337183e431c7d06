//! A candidate process for the election and lock fault tests.
//!
//! `kvsync-elector DATASTORE NAME IDENTITY` campaigns for NAME (lease 2 s, renew deadline
//! 1.5 s, retry 0.3 s). Leading, it prints `leading FENCE` and writes the Node `term` with
//! `asn: FENCE + 1` every 50 ms through its leadership, printing `wrote FENCE REVISION` for each
//! write that landed and `refused FENCE` for one refused; `stopped FENCE` when the leadership
//! tells it to stop.
//!
//! `kvsync-elector DATASTORE NAME IDENTITY count guarded|unguarded STOPFILE` increments the
//! Node `counter` under the lock NAME (TTL 2 s) until STOPFILE exists: take the lock, read
//! the counter, print `read N`, wait 300 ms (a window for the test to pause it), write N + 1
//! (through the guard, or a plain `apply` when unguarded) labelled with IDENTITY and a
//! sequence number, and print `acked N+1` once the write is acknowledged, `refused` when the
//! guard refused it, or `ambiguous` when its fate cannot be known. A write whose answer was
//! lost is read back while the lock still holds, to tell whether it landed.
//!
//! DATASTORE is `sqlite:PATH#PREFIX`, `etcd:URL[,URL...]#PREFIX` or `kubernetes:KUBECONFIG`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{
    Client, Election, ElectionOptions, Error, EtcdBackend, EtcdConfig, KubernetesBackend,
    KubernetesConfig, LockGuard, LockOptions, lock,
};
use kvsync_model::{KVPair, ResourceKey};

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

async fn connect(spec: &str) -> Arc<dyn Client> {
    let registry = kvsync_model::demo::registry();
    let (kind, rest) = spec.split_once(':').expect("DATASTORE is KIND:WHERE");
    let (place, prefix) = rest.split_once('#').unwrap_or((rest, ""));
    match kind {
        "sqlite" => Arc::new(
            SqliteBackend::open(
                SqliteConfig::new(place, registry)
                    .with_prefix(prefix)
                    .with_poll_interval(Duration::from_millis(20)),
            )
            .expect("open the database"),
        ),
        "etcd" => Arc::new(
            EtcdBackend::connect(
                EtcdConfig::new(place.split(','), registry)
                    .with_prefix(prefix)
                    .with_request_timeout(Duration::from_secs(2))
                    .with_connect_timeout(Duration::from_secs(1)),
            )
            .await
            .expect("connect to etcd"),
        ),
        "kubernetes" => Arc::new(
            KubernetesBackend::connect(KubernetesConfig::new(registry).with_kubeconfig(place))
                .await
                .expect("connect to the API server"),
        ),
        other => panic!("unknown datastore kind {other:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, spec, name, identity] => elect(connect(spec).await, name, identity).await,
        [_, spec, name, identity, count, mode, stop] if count == "count" => {
            let guarded = match mode.as_str() {
                "guarded" => true,
                "unguarded" => false,
                other => panic!("count guarded|unguarded, not {other:?}"),
            };
            let stop = std::path::PathBuf::from(stop);
            let client = connect(spec).await;
            count_under_lock(client, name, identity, guarded, &stop).await;
        }
        _ => {
            eprintln!(
                "usage: kvsync-elector DATASTORE NAME IDENTITY [count guarded|unguarded STOPFILE]"
            );
            std::process::exit(2);
        }
    }
}

async fn elect(client: Arc<dyn Client>, name: &str, identity: &str) {
    let options = ElectionOptions::new()
        .with_timing(
            Duration::from_secs(2),
            Duration::from_millis(1500),
            Duration::from_millis(300),
        )
        .expect("timing");
    let election = Election::new(client, name, identity, options);
    let result: Result<(), Error> = election
        .run(|leadership| async move {
            let fence = leadership.fence().as_u64().unwrap_or(0);
            say(format!("leading {fence}"));
            let watcher = leadership.clone();
            tokio::spawn(async move {
                watcher.cancelled().await;
                say(format!("stopped {fence}"));
            });
            let key = ResourceKey::cluster("Node", "term");
            loop {
                // AS number 0 is reserved, and a Lease's first fence is 0.
                let value = serde_json::json!({"asn": fence + 1});
                match leadership.put(KVPair::new(key.clone(), value)).await {
                    Ok(kvp) => say(format!(
                        "wrote {fence} {}",
                        kvp.revision.map(|r| r.to_string()).unwrap_or_default()
                    )),
                    Err(Error::NotHeld { .. }) => say(format!("refused {fence}")),
                    Err(e) => eprintln!("write: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    if let Err(e) = result {
        eprintln!("election: {e}");
        std::process::exit(1);
    }
}

/// The counter's value and who wrote it (`labels.by`).
async fn read_counter(client: &dyn Client, key: &ResourceKey) -> Result<(u64, String), Error> {
    let kvp = client.get(key, &Default::default()).await?;
    let v = kvp
        .value
        .as_value()
        .map_err(|e| Error::invalid("counter", e.to_string()))?;
    Ok((
        v["asn"].as_u64().unwrap_or(0),
        v["labels"]["by"].as_str().unwrap_or_default().to_owned(),
    ))
}

async fn count_under_lock(
    client: Arc<dyn Client>,
    name: &str,
    identity: &str,
    guarded: bool,
    stop: &std::path::Path,
) {
    let key = ResourceKey::cluster("Node", "counter");
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(2))
        .with_holder(identity)
        .with_timeout(Duration::from_secs(10));
    let mut seq = 0u64;
    while !stop.exists() {
        let guard = match lock(client.clone(), name, &opts).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("lock: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let n = match read_counter(&*client, &key).await {
            Ok((n, _)) => n,
            Err(e) => {
                eprintln!("read: {e}");
                continue;
            }
        };
        say(format!("read {n}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        seq += 1;
        let by = format!("{identity}-{seq}");
        let value = serde_json::json!({"asn": n + 1, "labels": {"by": by}});
        let kvp = KVPair::new(key.clone(), value);
        let written = if guarded {
            guard.put(kvp).await
        } else {
            client.apply(kvp).await
        };
        match written {
            Ok(_) => say(format!("acked {}", n + 1)),
            Err(Error::NotHeld { .. }) => say("refused".into()),
            Err(e) => {
                eprintln!("write: {e}");
                say(settle(&*client, &key, &guard, &by, n + 1).await);
            }
        }
        let _ = guard.release().await;
    }
}

/// Whether a write whose answer was lost landed: read back while the lock still holds (so
/// nobody else can have written since).
async fn settle(
    client: &dyn Client,
    key: &ResourceKey,
    guard: &LockGuard,
    by: &str,
    value: u64,
) -> String {
    for _ in 0..20 {
        if guard.is_lost() {
            break;
        }
        match read_counter(client, key).await {
            Ok((_, writer)) if !guard.is_lost() => {
                return if writer == by {
                    format!("acked {value}")
                } else {
                    "failed".into()
                };
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    "ambiguous".into()
}
