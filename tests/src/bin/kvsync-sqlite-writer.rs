//! A writer process for the SQLite multi-process and crash tests.
//!
//! `kvsync-sqlite-writer DB PREFIX COUNT` applies COUNT writes to IPPools `w-0` … `w-49` and
//! prints `ack SEQ REVISION` on stdout after each acknowledged write. The value of write SEQ
//! has the CIDR `10.A.B.0/24` with `SEQ = A * 256 + B`.
//!
//! `kvsync-sqlite-writer DB PREFIX COUNT txn` writes SEQ to all of `t-0` … `t-49` in one
//! transaction per SEQ instead.
//!
//! `kvsync-sqlite-writer DB PREFIX COUNT lease` writes `l-0` … `l-(COUNT-1)` under one lease
//! of 2 s that it keeps alive, prints `ack lease`, and then waits to be killed.

use std::io::Write;
use std::time::Duration;

use kvsync_backend::sqlite::{Durability, SqliteBackend, SqliteConfig};
use kvsync_backend::{Client, Txn, TxnOp};
use kvsync_model::{KVPair, ResourceKey};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (db, prefix, count, txn) = match args.as_slice() {
        [_, db, prefix, count] => (db, prefix, count, false),
        [_, db, prefix, count, mode] if mode == "txn" => (db, prefix, count, true),
        [_, db, prefix, count, mode] if mode == "lease" => {
            lease_holder(db, prefix, count.parse().unwrap_or(0)).await;
            return;
        }
        _ => {
            eprintln!("usage: kvsync-sqlite-writer DB PREFIX COUNT [txn]");
            std::process::exit(2);
        }
    };
    let count: u64 = count.parse().unwrap_or(0);
    let backend = match SqliteBackend::open(
        SqliteConfig::new(db, kvsync_model::demo::registry())
            .with_prefix(prefix.as_str())
            .with_poll_interval(Duration::from_millis(20))
            .with_durability(Durability::Normal),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("open {db}: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    for seq in 0..count {
        let value =
            serde_json::json!({"cidr": format!("10.{}.{}.0/24", (seq / 256) % 256, seq % 256)});
        let written = if txn {
            let puts = (0..50).map(|i| {
                let key = ResourceKey::cluster("IPPool", format!("t-{i}"));
                TxnOp::Put(KVPair::new(key, value.clone()))
            });
            backend
                .txn(Txn::new().and_then(puts))
                .await
                .map(|resp| resp.revision.to_string())
        } else {
            let key = ResourceKey::cluster("IPPool", format!("w-{}", seq % 50));
            backend
                .apply(KVPair::new(key, value))
                .await
                .map(|kvp| kvp.revision.map(|r| r.to_string()).unwrap_or_default())
        };
        match written {
            Ok(rev) => {
                if writeln!(out, "ack {seq} {rev}")
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                eprintln!("write {seq}: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Writes `count` keys under one kept-alive lease, says so, and waits to be killed.
async fn lease_holder(db: &str, prefix: &str, count: u64) {
    let backend = SqliteBackend::open(
        SqliteConfig::new(db, kvsync_model::demo::registry()).with_prefix(prefix),
    )
    .expect("open the database");
    let client: std::sync::Arc<dyn Client> = std::sync::Arc::new(backend);
    let lease = kvsync_backend::Lease::grant(client, Duration::from_secs(2))
        .await
        .expect("grant a lease");
    for i in 0..count {
        let key = ResourceKey::cluster("IPPool", format!("l-{i}"));
        lease
            .put(KVPair::new(key, serde_json::json!({"cidr": "10.0.0.0/16"})))
            .await
            .expect("write under the lease");
    }
    println!("ack lease");
    lease.lost().await;
    eprintln!("the lease was lost");
    std::process::exit(1);
}
