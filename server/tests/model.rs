//! The Syncer's randomized fault model with a server in between: random writes and deletes,
//! the upstream's faults (broken watches, outages, failed calls) and faults between server and
//! client (cut connections, server restarts, a client that stops reading past the log's
//! window). After every case the faults heal, and at InSync the client's map must equal the
//! datastore, key for key and revision for revision, with no rule of the Syncer's broken.
//!
//! `KVSYNC_SERVER_MODEL_CASES` sets the number of cases (40 by default); `KVSYNC_SEED` the
//! first seed.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, FaultyClient, MemoryBackend};
use kvsync_model::KVPair;
use kvsync_server::{RemoteSyncer, Server, ServerConfig, Sketches};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus};
use kvsync_tests::checker::{CheckingConsumer, datastore_state, diff};
use kvsync_tests::proxy::Proxy;
use kvsync_tests::syncer_model::{kinds, random_key, random_value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

async fn bind(
    store: Arc<dyn Client>,
    addr: std::net::SocketAddr,
    log_bytes: usize,
    state_dir: Option<&std::path::Path>,
    sketches: Sketches,
) -> Server {
    let mut config = ServerConfig::new()
        .with_plaintext()
        .with_sketches(sketches)
        .with_log(log_bytes, Duration::from_secs(60))
        .with_ping_interval(Duration::from_millis(300));
    if let Some(dir) = state_dir {
        config = config.with_state_dir(dir);
    }
    Server::bind(
        addr,
        store,
        kinds().into_iter().map(ResourceType::new).collect(),
        config,
    )
    .await
    .expect("bind")
}

/// How clients were brought up to date over every case.
#[derive(Default)]
struct Totals {
    resumes: u64,
    resyncs: u64,
    snapshots: u64,
    reconciled: u64,
    fell_behind: u64,
}

impl Totals {
    fn add(&mut self, s: kvsync_server::HubStats) {
        self.resumes += s.resumes;
        self.resyncs += s.resyncs;
        self.snapshots += s.snapshots;
        self.reconciled += s.reconciled;
        self.fell_behind += s.fell_behind;
    }
}

async fn run_case(seed: u64, totals: &mut Totals) {
    let mut rng = StdRng::seed_from_u64(seed);
    let memory: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    let faulty = Arc::new(FaultyClient::new(memory.clone()));
    let faults = faulty.faults();
    for _ in 0..rng.random_range(0..8) {
        let key = random_key(&mut rng);
        let value = random_value(&mut rng, &key);
        memory.apply(KVPair::new(key, value)).await.expect("seed");
    }
    // A small log, so that pauses and outages push clients off its end now and then.
    let log_bytes = rng.random_range(512..8192);
    // Half the cases save the server's state at each restart and take it up again.
    let state_dir = rng
        .random_bool(0.5)
        .then(|| tempfile::tempdir().expect("temp dir"));
    let state = state_dir.as_ref().map(|d| d.path());
    // Resyncs by sketch or by digests: with the model's few keys, Auto picks digests.
    let sketches = if rng.random_bool(0.5) {
        Sketches::Always
    } else {
        Sketches::Auto
    };
    let mut server = bind(
        faulty.clone(),
        "127.0.0.1:0".parse().unwrap(),
        log_bytes,
        state,
        sketches,
    )
    .await;
    let addr = server.local_addr();
    let proxy = Proxy::start(addr).await;
    let consumer = CheckingConsumer::start_stream(
        RemoteSyncer::new(proxy.addr().to_string())
            .with_retry_policy(Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(50),
            ))
            .with_ping_interval(Duration::from_millis(300))
            .with_lz4(rng.random_bool(0.5))
            .stream(),
    );
    let mut log = Vec::new();
    let ops = rng.random_range(1..=40);
    for _ in 0..ops {
        let key = random_key(&mut rng);
        match rng.random_range(0..100) {
            0..=39 => {
                let v = random_value(&mut rng, &key);
                let r = memory.apply(KVPair::new(key.clone(), v)).await;
                log.push(format!("apply {key}: {:?}", r.map(|k| k.revision)));
            }
            40..=59 => {
                let r = memory.delete(&key, &Default::default()).await;
                log.push(format!("delete {key}: {}", r.is_ok()));
            }
            60..=66 => {
                faults.break_watches();
                log.push("upstream: break watches".into());
            }
            67..=71 => {
                let down = !faults.is_unavailable();
                faults.set_unavailable(down);
                log.push(format!("upstream: outage {down}"));
            }
            72..=79 => {
                proxy.cut();
                log.push("cut the client's connection".into());
            }
            80..=83 => {
                totals.add(server.stats());
                server.shutdown().await;
                server = bind(faulty.clone(), addr, log_bytes, state, sketches).await;
                log.push(format!(
                    "restart the server (state saved: {})",
                    state.is_some()
                ));
            }
            84..=89 => {
                consumer.pause(true);
                let n = rng.random_range(1..30);
                for _ in 0..n {
                    let key = random_key(&mut rng);
                    let v = random_value(&mut rng, &key);
                    let _ = memory.apply(KVPair::new(key, v)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
                consumer.pause(false);
                log.push(format!("the client stops reading for {n} writes"));
            }
            _ => {
                let ms = rng.random_range(0..5);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.push(format!("sleep {ms}ms"));
            }
        }
    }
    faults.set_unavailable(false);
    let expected = datastore_state(memory.as_ref(), &kinds()).await;
    let converged = consumer
        .wait_for(Duration::from_secs(20), |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await;
    let stats = server.stats();
    totals.add(stats);
    let seen = consumer.stop().await;
    server.shutdown().await;
    let why = if !converged {
        Some(format!(
            "did not converge: {}",
            diff(&expected, &seen.cache)
        ))
    } else if !seen.violations.is_empty() {
        Some("rules broken".to_owned())
    } else {
        None
    };
    if let Some(why) = why {
        panic!(
            "case with seed {seed} failed: {why}\nviolations: {:#?}\nstatuses: {:?}\nserver: {stats:?}\noperations:\n  {}",
            seen.violations,
            seen.statuses,
            log.join("\n  ")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_model_holds_through_the_server() {
    let cases: u64 = std::env::var("KVSYNC_SERVER_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("KVSYNC_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7365_7276);
    let mut totals = Totals::default();
    for case in 0..cases {
        run_case(seed.wrapping_add(case), &mut totals).await;
    }
    eprintln!(
        "{cases} cases: {} resumes, {} resyncs ({} by sketch), {} snapshots, {} clients fell \
         behind the log",
        totals.resumes, totals.resyncs, totals.reconciled, totals.snapshots, totals.fell_behind
    );
    // Every way of catching up was exercised (falling off the log on a live connection needs
    // more bytes than the sockets buffer: remote.rs's stalled client covers it).
    assert!(
        cases < 40
            || (totals.resumes > 0
                && totals.resyncs > totals.reconciled
                && totals.reconciled > 0
                && totals.snapshots > 0),
        "a way of catching up was never exercised"
    );
}
