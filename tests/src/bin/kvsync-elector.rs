//! A candidate process for the election fault tests.
//!
//! `kvsync-elector DB PREFIX NAME IDENTITY` campaigns for NAME on the SQLite database DB
//! (lease 2 s, renew deadline 1.5 s, retry 0.3 s). Leading, it prints `leading FENCE` and
//! writes the Node `term` with `asn: FENCE` every 50 ms through its leadership, printing
//! `wrote FENCE REVISION` for each write that landed and `refused FENCE` for one refused;
//! `stopped FENCE` when the leadership tells it to stop.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{Client, Election, ElectionOptions, Error};
use kvsync_model::{KVPair, ResourceKey};

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, db, prefix, name, identity] = args.as_slice() else {
        eprintln!("usage: kvsync-elector DB PREFIX NAME IDENTITY");
        std::process::exit(2);
    };
    let backend = SqliteBackend::open(
        SqliteConfig::new(db, kvsync_model::demo::registry())
            .with_prefix(prefix.as_str())
            .with_poll_interval(Duration::from_millis(20)),
    )
    .expect("open the database");
    let client: Arc<dyn Client> = Arc::new(backend);
    let options = ElectionOptions::new()
        .with_timing(
            Duration::from_secs(2),
            Duration::from_millis(1500),
            Duration::from_millis(300),
        )
        .expect("timing");
    let election = Election::new(client, name.as_str(), identity.as_str(), options);
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
                let value = serde_json::json!({"asn": fence});
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
