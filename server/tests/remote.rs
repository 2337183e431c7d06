//! The RemoteSyncer against a server over the memory backend: the consumer's map equals the
//! datastore at every InSync, through dropped connections, server restarts, a client stalled
//! past the log window, bad peers, and fifty clients at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, MemoryBackend};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_server::{RemoteSyncer, Server, ServerConfig};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus};
use kvsync_tests::checker::{CheckingConsumer, datastore_state, diff};
use kvsync_tests::proxy::Proxy;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

fn kinds() -> Vec<ListOptions> {
    vec![
        ListOptions::new("IPPool"),
        ListOptions::new("NetworkPolicy"),
    ]
}

fn types() -> Vec<ResourceType> {
    kinds().into_iter().map(ResourceType::new).collect()
}

fn pool(i: usize) -> KVPair {
    KVPair::new(
        ResourceKey::cluster("IPPool", format!("pool-{i}")),
        json!({"cidr": format!("10.{}.{}.0/24", i / 256 % 256, i % 256)}),
    )
}

fn remote(addr: impl ToString) -> RemoteSyncer {
    RemoteSyncer::new(addr.to_string())
        .with_retry_policy(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
        .with_ping_interval(Duration::from_millis(500))
}

async fn serve(store: Arc<dyn Client>, addr: SocketAddr, config: ServerConfig) -> Server {
    Server::bind(addr, store, types(), config)
        .await
        .expect("bind")
}

/// A memory datastore with `n` pools and a plain-TCP server over it.
async fn start(n: usize) -> (Arc<dyn Client>, Server) {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    write(&*store, 0, n).await;
    let server = serve(
        store.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new().with_plaintext(),
    )
    .await;
    (store, server)
}

async fn in_sync(consumer: &CheckingConsumer, store: &dyn Client) -> Result<(), String> {
    let expected = datastore_state(store, &kinds()).await;
    if consumer
        .wait_for(WAIT, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await
    {
        Ok(())
    } else {
        Err(consumer.with(|s| format!("{:?}: {}", s.status(), diff(&expected, &s.cache))))
    }
}

async fn write(store: &dyn Client, from: usize, n: usize) {
    for i in from..from + n {
        store.apply(pool(i)).await.expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_syncer_holds_what_the_datastore_holds_at_every_in_sync() {
    let (store, server) = start(20).await;
    let consumer = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    in_sync(&consumer, &*store).await.expect("first sync");
    write(&*store, 10, 20).await;
    for i in 0..5 {
        store
            .delete(&pool(i).key, &Default::default())
            .await
            .expect("delete");
    }
    in_sync(&consumer, &*store).await.expect("follows");
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!(server.stats().snapshots, 1, "{:?}", server.stats());
    server.shutdown().await;
}

/// Connections cut between client and server: the client resumes from the log (nothing sent
/// twice, nothing missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_from_the_log() {
    let (store, server) = start(10).await;
    let proxy = Proxy::start(server.local_addr()).await;
    let consumer = CheckingConsumer::start_stream(remote(proxy.addr()).stream());
    in_sync(&consumer, &*store).await.expect("first sync");
    for round in 0..3 {
        proxy.cut();
        write(&*store, 10 + round * 10, 10).await;
        in_sync(&consumer, &*store).await.expect("after a cut");
    }
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let stats = server.stats();
    assert!(stats.resumes >= 3, "{stats:?}");
    assert_eq!(stats.snapshots, 1, "only the first connection: {stats:?}");
    server.shutdown().await;
}

/// A server restart (a new epoch): the client resyncs by digests and is sent only the buckets
/// that differ, with deletions for what went away meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_only_differing_buckets_are_resent() {
    let (store, server) = start(300).await;
    let addr = server.local_addr();
    let consumer = CheckingConsumer::start_stream(remote(addr).stream());
    in_sync(&consumer, &*store).await.expect("first sync");
    let updates_before: usize = consumer.with(|s| s.batch_sizes.iter().sum());
    server.shutdown().await;
    // While it is down: 3 keys change, 2 go.
    write(&*store, 0, 3).await;
    store
        .apply(pool(0).clone())
        .await
        .expect("same value, new revision");
    for i in [100, 200] {
        store
            .delete(&pool(i).key, &Default::default())
            .await
            .expect("delete");
    }
    let server = serve(store.clone(), addr, ServerConfig::new().with_plaintext()).await;
    in_sync(&consumer, &*store)
        .await
        .expect("after the restart");
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let stats = server.stats();
    assert_eq!((stats.resyncs, stats.snapshots), (1, 0), "{stats:?}");
    let resent = seen.batch_sizes.iter().sum::<usize>() - updates_before;
    assert!(
        resent <= 15,
        "only the differing buckets came again: {resent} updates for 5 changed keys of 300"
    );
    server.shutdown().await;
}

/// Clients that stop reading are moved to a resync once they fall off the log (their writers,
/// blocked, let go of the frames when the log drops them): the log stays within its bound,
/// the others go on, and the stalled ones converge once they read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_falls_behind_resyncs_and_never_holds_memory() {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    let bound = 256 << 10;
    let config = ServerConfig::new()
        .with_plaintext()
        .with_log(bound, Duration::from_secs(300));
    let server = serve(store.clone(), "127.0.0.1:0".parse().unwrap(), config).await;
    let stalled: Vec<CheckingConsumer> = (0..3)
        .map(|_| CheckingConsumer::start_stream(remote(server.local_addr()).stream()))
        .collect();
    let other = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    for c in &stalled {
        in_sync(c, &*store).await.expect("first sync");
        // It stops reading: its socket fills, and the log moves on past it.
        c.pause(true);
    }
    for i in 0..5000 {
        store
            .apply(KVPair::new(
                ResourceKey::namespaced("NetworkPolicy", "ns", format!("p{}", i % 2000)),
                json!({"order": i as f64, "selector": format!("a == '{}'", noise(i, 4000))}),
            ))
            .await
            .expect("write");
        if i % 500 == 0 {
            assert!(
                server.log_bytes() <= bound + (64 << 10),
                "the log stays within its bound: {}",
                server.log_bytes()
            );
        }
    }
    in_sync(&other, &*store).await.expect("the others go on");
    // Each stalled writer let go of its frames (and its connection) once the log dropped them.
    let stats = server.stats();
    assert!(stats.fell_behind >= 3, "{stats:?}");
    for c in &stalled {
        c.pause(false);
        in_sync(c, &*store)
            .await
            .expect("the stalled ones converge");
    }
    for c in stalled.into_iter().chain([other]) {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// Bad peers are refused with a reason, and the server goes on serving the good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_others_are_served() {
    let (store, server) = start(5).await;
    let good = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    in_sync(&good, &*store).await.expect("first sync");
    let answer = |bytes: Vec<u8>| {
        let addr = server.local_addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(&bytes).await.expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let framed = |body: &str| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body.as_bytes());
        f
    };
    let cases = [
        (
            framed(r#"{"type":"hello","version":99,"client":"x"}"#),
            "version 99",
        ),
        ((u32::MAX).to_be_bytes().to_vec(), "over the limit"),
        (framed("not json at all"), "not a message"),
        (framed(r#"{"type":"ping","nonce":1}"#), "must be a hello"),
        // A client holding 3 keys is asked for digests of 2 bits (5 keys at the server).
        (
            [
                framed(r#"{"type":"hello","version":2,"client":"x","holds":3}"#),
                framed(r#"{"type":"digests","bits":2,"digests":"not base64!"}"#),
            ]
            .concat(),
            "bad digests",
        ),
        (
            [
                framed(r#"{"type":"hello","version":2,"client":"x","holds":3}"#),
                framed(r#"{"type":"digests","bits":2,"digests":"AAAA"}"#),
            ]
            .concat(),
            "where 2 bits need 32",
        ),
    ];
    for (bytes, reason) in cases {
        let text = answer(bytes).await;
        assert!(
            text.contains("refused") && text.contains(reason),
            "expected a refusal naming {reason:?}, got {text:?}"
        );
    }
    write(&*store, 5, 5).await;
    in_sync(&good, &*store)
        .await
        .expect("the good client is still served");
    good.stop().await;
    server.shutdown().await;
}

/// Fifty clients, the server restarted under load: every client comes back and converges; the
/// server says how each was brought up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_come_back_after_a_restart_under_load() {
    let (store, server) = start(200).await;
    let addr = server.local_addr();
    let clients: Vec<CheckingConsumer> = (0..50)
        .map(|i| CheckingConsumer::start_stream(remote(addr).with_name(format!("c{i}")).stream()))
        .collect();
    for c in &clients {
        in_sync(c, &*store).await.expect("first sync");
    }
    let first = server.stats();
    assert_eq!(first.snapshots, 50);
    assert!(first.snapshot_builds <= 3, "shared snapshots: {first:?}");
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { write(&*store, 150, 200).await })
    };
    server.shutdown().await;
    let server = serve(store.clone(), addr, ServerConfig::new().with_plaintext()).await;
    writer.await.expect("writer");
    for c in &clients {
        in_sync(c, &*store).await.expect("back in sync");
    }
    let stats = server.stats();
    eprintln!(
        "after the restart: {} resumed, {} resynced, {} snapshots ({} built)",
        stats.resumes, stats.resyncs, stats.snapshots, stats.snapshot_builds
    );
    assert_eq!(
        stats.resyncs + stats.resumes + stats.snapshots,
        50,
        "{stats:?}"
    );
    assert_eq!(stats.snapshots, 0, "every client held its state: {stats:?}");
    for c in clients {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// Resyncs and snapshots are capped (`max_catch_ups`): a client needing one waits while the
/// places are taken, here by a client that asked for a snapshot and stopped reading it; a
/// client resuming from the log never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_ups_are_capped_and_resumes_do_not_wait() {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    // A snapshot far larger than the socket buffers: its writer blocks on a client that
    // does not read it.
    for i in 0..5000 {
        store
            .apply(KVPair::new(
                ResourceKey::namespaced("NetworkPolicy", "ns", format!("p{i}")),
                json!({"order": i as f64, "selector": format!("a == '{}'", noise(i, 4000))}),
            ))
            .await
            .expect("write");
    }
    let config = ServerConfig::new().with_plaintext().with_max_catch_ups(1);
    let server = serve(store.clone(), "127.0.0.1:0".parse().unwrap(), config).await;
    let proxy = Proxy::start(server.local_addr()).await;
    let resuming = CheckingConsumer::start_stream(remote(proxy.addr()).stream());
    in_sync(&resuming, &*store).await.expect("first sync");

    // The hog: a hello asking for a snapshot, then nothing read.
    let mut hog = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let hello = br#"{"type":"hello","version":2,"client":"hog"}"#;
    let mut f = (hello.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(hello);
    hog.write_all(&f).await.expect("hello");
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.stats().snapshots < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hog never got its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A new client waits for the place...
    let waiting = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    while server.stats().catch_ups_waited < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new client never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while a client that resumes goes straight through.
    proxy.cut();
    store
        .apply(KVPair::new(
            ResourceKey::namespaced("NetworkPolicy", "ns", "late"),
            json!({"order": 1.0, "selector": "all()"}),
        ))
        .await
        .expect("write");
    in_sync(&resuming, &*store)
        .await
        .expect("resumed while the place was taken");
    assert!(
        waiting.with(|s| s.status() != Some(SyncStatus::InSync)),
        "the snapshot client still waits"
    );
    // The hog goes: the waiting client gets its place.
    drop(hog);
    in_sync(&waiting, &*store)
        .await
        .expect("the waiting client's turn");
    let stats = server.stats();
    assert_eq!(stats.most_catch_ups_at_once, 1, "{stats:?}");
    assert!(stats.resumes >= 1, "{stats:?}");
    for c in [resuming, waiting] {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// Over its connection target the server sheds clients, one a tick, each told where to
/// resume: they come back (here to the same server, resuming from its log) and hold what the
/// datastore holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_the_target_are_shed_and_resume() {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    write(&*store, 0, 50).await;
    let config = ServerConfig::new()
        .with_plaintext()
        .with_target_connections(2, Duration::from_millis(100));
    let server = serve(store.clone(), "127.0.0.1:0".parse().unwrap(), config).await;
    let clients: Vec<_> = (0..4)
        .map(|_| CheckingConsumer::start_stream(remote(server.local_addr()).stream()))
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.stats().shed < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write(&*store, 50, 20).await;
    for c in &clients {
        in_sync(c, &*store).await.expect("in sync after being shed");
    }
    let stats = server.stats();
    assert!(stats.resumes >= 3, "shed clients resume: {stats:?}");
    for c in clients {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// `len` characters that do not compress (frames of them stay large when compressed).
fn noise(seed: usize, len: usize) -> String {
    let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Reads one whole frame (its length word, then its body).
async fn read_whole_frame(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.expect("length");
    let word = u32::from_be_bytes(len);
    let mut f = len.to_vec();
    f.resize(4 + (word & !(1 << 31)) as usize, 0);
    s.read_exact(&mut f[4..]).await.expect("body");
    f
}

/// Large frames go compressed to a client that speaks LZ4 and plain to one that does not; both
/// read the same content, in catch-ups and in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_compressed_only_for_clients_that_speak_lz4() {
    use kvsync_server::protocol::{self, Message};
    let (store, server) = start(3000).await;
    // Reads raw frames up to the first in-sync status: (compressed frames, bytes on the wire,
    // pools received, the welcome's features).
    let follow = |features: Vec<String>| {
        let addr = server.local_addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let hello = protocol::frame(&Message::Hello {
                version: protocol::VERSION,
                client: "raw".into(),
                features,
                resume: None,
                holds: 0,
            });
            s.write_all(&hello).await.expect("hello");
            let (mut compressed, mut wire, mut pools, mut agreed) = (0, 0, 0, Vec::new());
            loop {
                let f = read_whole_frame(&mut s).await;
                wire += f.len();
                if protocol::is_compressed(&f) {
                    compressed += 1;
                }
                let plain = protocol::plain(&f).expect("decompresses").into_owned();
                match protocol::Incoming::decode(&plain[4..]).expect("a message") {
                    protocol::Incoming::Buckets { entries, .. } => pools += entries.len(),
                    protocol::Incoming::Control(Message::Welcome { features, .. }) => {
                        agreed = features;
                    }
                    protocol::Incoming::Control(Message::Status {
                        status: protocol::WireStatus::InSync,
                        ..
                    }) => return (s, compressed, wire, pools, agreed),
                    _ => {}
                }
            }
        }
    };
    let (mut s_lz4, c_lz4, wire_lz4, pools_lz4, agreed) =
        follow(vec![protocol::FEATURE_LZ4.into()]).await;
    let (mut s_plain, c_plain, wire_plain, pools_plain, none) = follow(Vec::new()).await;
    let (mut s_plain2, ..) = follow(Vec::new()).await;
    assert_eq!(agreed, [protocol::FEATURE_LZ4]);
    assert!(none.is_empty());
    assert_eq!((pools_lz4, pools_plain), (3000, 3000));
    assert!(c_lz4 > 0, "the snapshot's frames are compressed");
    assert_eq!(c_plain, 0, "nothing compressed to a client without lz4");
    assert!(
        wire_lz4 * 2 < wire_plain,
        "compressed: {wire_lz4} bytes, plain: {wire_plain}"
    );
    // Updates of every pool at once: the log's frames are large enough to be compressed.
    write(&*store, 0, 3000).await;
    // (compressed frames, updates) read until all 3,000 updates came.
    let updates = async |s: &mut tokio::net::TcpStream| {
        let (mut compressed, mut updates) = (0, 0);
        while updates < 3000 {
            let f = read_whole_frame(s).await;
            compressed += usize::from(protocol::is_compressed(&f));
            let plain = protocol::plain(&f).expect("decompresses").into_owned();
            if let protocol::Incoming::Updates { updates: u, .. } =
                protocol::Incoming::decode(&plain[4..]).expect("a message")
            {
                updates += u.len();
            }
        }
        (compressed, updates)
    };
    let (lz4_log, _) = updates(&mut s_lz4).await;
    assert!(lz4_log > 0, "some of the log's frames are compressed");
    // Two clients without LZ4 share one plain copy of each compressed frame.
    for s in [&mut s_plain, &mut s_plain2] {
        assert_eq!(updates(s).await, (0, 3000));
    }
    server.shutdown().await;
}

/// A `RemoteSyncer` that does not offer LZ4 is sent everything decompressed (a snapshot and
/// large batches, each decompressed once for all such clients) and holds what the datastore
/// holds, beside one that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_syncer_without_lz4_holds_the_datastore() {
    let (store, server) = start(3000).await;
    let plain =
        CheckingConsumer::start_stream(remote(server.local_addr()).with_lz4(false).stream());
    let plain2 =
        CheckingConsumer::start_stream(remote(server.local_addr()).with_lz4(false).stream());
    let lz4 = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    for c in [&plain, &plain2, &lz4] {
        in_sync(c, &*store).await.expect("first sync");
    }
    // Every pool at once: batches large enough to be compressed in the log.
    write(&*store, 0, 3000).await;
    for c in [&plain, &plain2, &lz4] {
        in_sync(c, &*store).await.expect("follows");
    }
    for c in [plain, plain2, lz4] {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// With a state directory, a restarted server takes up its saved log and positions: clients
/// resume across the restart (neither resync nor snapshot) and get what changed meanwhile,
/// deletions included. The saved state is read once; one that does not read is a new epoch
/// and its clients resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_state_dir_clients_resume_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    write(&*store, 0, 300).await;
    let config = || {
        ServerConfig::new()
            .with_plaintext()
            .with_state_dir(dir.path())
    };
    let server = serve(store.clone(), "127.0.0.1:0".parse().unwrap(), config()).await;
    let (addr, epoch) = (server.local_addr(), server.epoch());
    let clients: Vec<CheckingConsumer> = (0..20)
        .map(|i| CheckingConsumer::start_stream(remote(addr).with_name(format!("c{i}")).stream()))
        .collect();
    for c in &clients {
        in_sync(c, &*store).await.expect("first sync");
    }
    server.shutdown().await;
    let file = dir.path().join("kvsync-server.state");
    assert!(file.exists(), "the state is saved");
    // While it is down: 50 keys change, 3 go, 10 come.
    write(&*store, 0, 50).await;
    for i in [7, 70, 170] {
        store
            .delete(&pool(i).key, &Default::default())
            .await
            .expect("delete");
    }
    write(&*store, 300, 10).await;
    let server = serve(store.clone(), addr, config()).await;
    assert_eq!(
        server.epoch(),
        epoch,
        "the same epoch: positions still mean something"
    );
    assert!(!file.exists(), "the saved state is read once");
    for c in &clients {
        in_sync(c, &*store).await.expect("after the restart");
    }
    let stats = server.stats();
    assert_eq!(
        (stats.resumes, stats.resyncs, stats.snapshots),
        (20, 0, 0),
        "{stats:?}"
    );

    // A saved state that does not read: a new epoch, and the clients resync.
    server.shutdown().await;
    std::fs::write(&file, b"\0\0\0\x05hello").expect("corrupt it");
    write(&*store, 0, 5).await;
    let server = serve(store.clone(), addr, config()).await;
    assert_ne!(server.epoch(), epoch);
    for c in &clients {
        in_sync(c, &*store)
            .await
            .expect("after a restart from nothing");
    }
    let stats = server.stats();
    assert_eq!((stats.resyncs, stats.snapshots), (20, 0), "{stats:?}");
    for c in clients {
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    server.shutdown().await;
}

/// A client cut off until it fell off the log holds 20,000 keys: the server, which knows how
/// many updates it missed, asks for a sketch sized for them and sends exactly the keys that
/// changed and deletions of the keys that went, a fraction of what the bucket digests would
/// have cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_log_is_resynced_by_a_sketch_of_what_it_missed() {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    write(&*store, 0, 20_000).await;
    // A log that keeps only its newest frame: two frames after the client's position and it
    // can no longer resume.
    let mut registry = prometheus_client::registry::Registry::default();
    let config = ServerConfig::new()
        .with_plaintext()
        .with_log(1, Duration::from_secs(300))
        .with_metrics(kvsync_server::ServerMetrics::new(&mut registry));
    let server = serve(store.clone(), "127.0.0.1:0".parse().unwrap(), config).await;
    let proxy = Proxy::start(server.local_addr()).await;
    let consumer = CheckingConsumer::start_stream(remote(proxy.addr()).stream());
    in_sync(&consumer, &*store).await.expect("first sync");
    let updates_before: usize = consumer.with(|s| s.batch_sizes.iter().sum());
    proxy.refuse(true);
    proxy.cut();
    // While it is away: 100 keys change, 20 go, 30 come; then one policy is written 200
    // times. A client connected directly says when the server has taken in each part, so
    // that each part is a frame of its own at least.
    let watcher = CheckingConsumer::start_stream(remote(server.local_addr()).stream());
    write(&*store, 0, 100).await;
    for i in 100..120 {
        store
            .delete(&pool(i).key, &Default::default())
            .await
            .expect("delete");
    }
    write(&*store, 20_000, 30).await;
    in_sync(&watcher, &*store)
        .await
        .expect("the server is up to date");
    for i in 0..200 {
        store
            .apply(KVPair::new(
                ResourceKey::namespaced("NetworkPolicy", "ns", "busy"),
                json!({"order": i as f64}),
            ))
            .await
            .expect("write");
    }
    in_sync(&watcher, &*store)
        .await
        .expect("the server is up to date");
    watcher.stop().await;
    let before = server.stats();
    proxy.take_bytes();
    proxy.refuse(false);
    in_sync(&consumer, &*store).await.expect("after the resync");
    let (up, down) = proxy.take_bytes();
    let stats = server.stats();
    assert_eq!(
        (
            stats.resumes - before.resumes,
            stats.resyncs - before.resyncs,
            stats.reconciled - before.reconciled,
            stats.snapshots - before.snapshots,
        ),
        (0, 1, 1, 0),
        "{stats:?}"
    );
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let resent = seen.batch_sizes.iter().sum::<usize>() - updates_before;
    assert_eq!(
        resent, 151,
        "100 updated, 30 new, 1 policy, 20 deleted and nothing else"
    );
    // The digests of 20,000 keys are 128 KiB (170 KiB in base64); the sketch for 351 missed
    // updates is 1,536 cells (20 KiB, 27 KiB in base64), and what comes down is about the 131
    // entries.
    assert!(up < 32 << 10, "{up} bytes up");
    // The metrics say so too (the watcher, which falls off this log too, included).
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let metric = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        metric(r#"kvsync_server_sketches_total{outcome="peeled"} "#),
        stats.reconciled,
        "{text}"
    );
    assert!(
        metric("kvsync_server_resync_bytes_received_total ") > 10_000,
        "{text}"
    );
    assert!(down < 64 << 10, "{down} bytes down");
    server.shutdown().await;
}

/// After a restart (a new epoch: the server cannot tell what a client missed), a small
/// difference is found by the first sketch; one too large for the sketches the digests would
/// pay for goes to the digests. A sketch that is not one is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_sketches_find_small_differences_and_digests_large_ones() {
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    write(&*store, 0, 20_000).await;
    let server = serve(
        store.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new().with_plaintext(),
    )
    .await;
    let addr = server.local_addr();
    let consumer = CheckingConsumer::start_stream(remote(addr).stream());
    in_sync(&consumer, &*store).await.expect("first sync");
    let mut updates_before: usize = consumer.with(|s| s.batch_sizes.iter().sum());
    let mut server = server;
    for (round, (changed, by_sketch)) in [(40, true), (2_500, false)].into_iter().enumerate() {
        server.shutdown().await;
        write(&*store, 0, changed).await;
        for i in [19_990 + 2 * round, 19_991 + 2 * round] {
            store
                .delete(&pool(i).key, &Default::default())
                .await
                .expect("delete");
        }
        server = serve(store.clone(), addr, ServerConfig::new().with_plaintext()).await;
        in_sync(&consumer, &*store)
            .await
            .expect("after the restart");
        let stats = server.stats();
        assert_eq!((stats.resyncs, stats.snapshots), (1, 0), "{stats:?}");
        assert_eq!(stats.reconciled == 1, by_sketch, "{stats:?}");
        assert_eq!(stats.sketches_too_small > 0, !by_sketch, "{stats:?}");
        let now: usize = consumer.with(|s| s.batch_sizes.iter().sum());
        assert_eq!(
            now - updates_before,
            changed + 2,
            "{changed} changed and 2 deleted, nothing else"
        );
        updates_before = now;
    }

    // Sketches that are not sketches: refused with a reason.
    let framed = |body: &str| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body.as_bytes());
        f
    };
    let hello =
        framed(r#"{"type":"hello","version":2,"client":"x","holds":3,"features":["reconcile"]}"#);
    for (sketch, reason) in [
        (
            r#"{"type":"sketch","cells":1536,"sketch":"not base64!"}"#,
            "bad sketch",
        ),
        (
            r#"{"type":"sketch","cells":1536,"sketch":"AAAA"}"#,
            "bad sketch",
        ),
        (
            r#"{"type":"sketch","cells":3,"sketch":"AAAA"}"#,
            "expected a sketch of 1536",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&[hello.clone(), framed(sketch)].concat())
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("send_sketch") && text.contains("refused") && text.contains(reason),
            "expected a refusal naming {reason:?}, got {text:?}"
        );
    }
    write(&*store, 0, 3).await;
    in_sync(&consumer, &*store)
        .await
        .expect("the good client is still served");
    let seen = consumer.stop().await;
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    server.shutdown().await;
}

/// A resync whose result does not add up to the server's digest is never InSync: the client
/// closes, and comes back without offering `reconcile`, for a resync by digests. (A peer that
/// speaks the protocol by hand plays a server whose first answer is wrong.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_that_does_not_add_up_to_the_servers_digest_is_never_in_sync() {
    use kvsync_server::protocol::{
        FEATURE_RECONCILE, Message, Mode, VERSION, WireStatus, frame, read_frame,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (hellos_tx, hellos_rx) = tokio::sync::oneshot::channel();
    let fake = tokio::spawn(async move {
        let mut hellos = Vec::new();
        let mut open = Vec::new();
        // First a digest that the client's empty map cannot have, then the right one (0).
        for digest in [0x1234_5678_u64, 0] {
            let (mut s, _) = listener.accept().await.expect("accept");
            let hello = read_frame(&mut s, 1 << 20).await.expect("a hello");
            hellos.push(serde_json::from_slice::<Message>(&hello).expect("a message"));
            for m in [
                Message::Welcome {
                    version: VERSION,
                    epoch: 7,
                    position: 1,
                    mode: Mode::Snapshot,
                    features: Vec::new(),
                },
                Message::ResyncDone {
                    position: 1,
                    digest: Some(digest),
                },
                Message::Status {
                    position: 1,
                    status: WireStatus::InSync,
                },
            ] {
                let _ = s.write_all(&frame(&m)).await;
            }
            open.push(s);
        }
        let _ = hellos_tx.send(hellos);
        // Holds the good connection open until the test ends.
        std::future::pending::<()>().await;
        drop(open);
    });
    let consumer = CheckingConsumer::start_stream(remote(addr).stream());
    assert!(
        consumer
            .wait_for(WAIT, |s| s.status() == Some(SyncStatus::InSync))
            .await,
        "in sync on the second connection"
    );
    let hellos = hellos_rx.await.expect("two hellos");
    let features = |m: &Message| match m {
        Message::Hello { features, .. } => features.clone(),
        other => panic!("not a hello: {other:?}"),
    };
    assert!(features(&hellos[0]).iter().any(|f| f == FEATURE_RECONCILE));
    assert!(
        !features(&hellos[1]).iter().any(|f| f == FEATURE_RECONCILE),
        "after a mismatch the client asks for digests: {:?}",
        hellos[1]
    );
    let seen = consumer.stop().await;
    assert_eq!(
        seen.statuses
            .iter()
            .filter(|s| **s == SyncStatus::InSync)
            .count(),
        1,
        "InSync once, on the connection whose resync added up: {:?}",
        seen.statuses
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    fake.abort();
}
