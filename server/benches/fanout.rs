//! The fan-out server under load, with the naive alternative in the same run.
//!
//! Setup: the memory backend with `KVSYNC_BENCH_KEYS` Nodes of about 200 bytes (100,000), a
//! server on loopback, `KVSYNC_BENCH_CLIENTS` clients (1,000) in the same process, on this
//! machine's cores. Most clients check framing only: they read every frame whole and find the
//! write time stamped in the first update of each batch (no JSON decoding); `KVSYNC_BENCH_FULL`
//! of them (4) are `RemoteSyncer`s decoding everything into a map.
//!
//! 1. Cold start: every client connects at once and holds nothing: time until all are in
//!    sync, and how many snapshots were built.
//! 2. Steady state: `KVSYNC_BENCH_RATE` updates/s (1,000) for `KVSYNC_BENCH_SECONDS` (10):
//!    delivery latency p50/p99 (write to arrival at a client), the process's CPU (server and
//!    clients together) and peak memory.
//!    Then the raw baseline in the same run (`KVSYNC_BENCH_RAW=0` leaves it out): the same
//!    number of plain TCP connections on loopback, written to by one thread with blocking
//!    writes in rounds of every update produced at the same rate since the last round, read
//!    by clients as the framing clients read; no datastore, Syncer or hub. Its latency is
//!    the floor that TCP over loopback sets on these cores for this many connections.
//!    `KVSYNC_BENCH_RAW_WRITERS` (1) threads share its writes; with the clients apart,
//!    `KVSYNC_BENCH_RAW_CLIENT_RUNTIME=current` runs the raw clients on one thread.
//!    2b. `KVSYNC_BENCH_STALLED_ROUNDS` (3) rounds of half as long without and then with
//!    `KVSYNC_BENCH_STALLED` (10) more clients that stopped reading once in sync: the others'
//!    latency with them against without them (interleaved, so that the machine's drift over
//!    the run falls on both), and the process's memory.
//! 3. An outage: the server stops (saving its state to a temp dir), 5,000 updates
//!    (`KVSYNC_BENCH_OUTAGE_UPDATES`) are written over the 10 s it is down, and it starts again
//!    on the same address: how the clients came back (resumed from the log, resynced,
//!    snapshots) and how long until all are in sync.
//! 4. Resync bytes: one `RemoteSyncer`, through a byte-counting proxy, cut off while 1% of the
//!    keys change: (a) beyond the log window of the same server (a server with an 8 KiB log,
//!    so that the changes push the client out of it), (b) across a restart without saved
//!    state (a new epoch: outside any log). The bytes of its resync against those of its
//!    snapshot, each way, and how it was done (by sketch or by bucket digests).
//! 5. The naive alternative: `KVSYNC_BENCH_NAIVE` (1,000) Syncers each listing and watching the
//!    memory backend directly, at the same update rate: their latency and the time to be in
//!    sync. As with the server's clients, `KVSYNC_BENCH_FULL` of their consumers keep the
//!    whole map and the rest only measure.
//!
//! With `KVSYNC_BENCH_FRAMING_LZ4=0` the framing clients do not offer LZ4 and are sent plain
//! frames (the server compresses for the 4 decoding clients only): at high update rates the
//! framing clients' decompression, which real clients do on their own machines, otherwise
//! takes a core of the two.
//!
//! Run with `cargo bench -p kvsync-server --bench fanout` (`KVSYNC_BENCH_LINGER_US` sets the
//! server's batch linger). With `KVSYNC_BENCH_CLIENT_PROCESS=1` the clients run in a second
//! process (this binary again), as they would on other machines: the server's own CPU and
//! memory are then measured apart from theirs (the two processes still share the 2 cores).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvsync_backend::{Client, MemoryBackend};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_server::protocol::{Message, VERSION, frame, read_frame};
use kvsync_server::{HubStats, RemoteSyncer, Server, ServerConfig};
use kvsync_syncer::{ResourceType, SyncStatus, Syncer, SyncerEvent};
use tokio::io::AsyncWriteExt;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node(i: usize, stamp: u64) -> KVPair {
    KVPair::new(
        ResourceKey::cluster("Node", format!("node-{i:06}")),
        serde_json::json!({
            "addresses": [format!("10.{}.{}.1", i / 256 % 256, i % 256), "fd00::1"],
            "labels": {"t": stamp.to_string(), "zone": "zone-a", "rack": format!("r{}", i % 64),
                       "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
            "asn": 64512
        }),
    )
}

/// Nanoseconds of the wall clock: the stamp a write carries (the same clock in both
/// processes when the clients run apart).
fn now(_base: Instant) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The clients of a run and what they report.
struct Clients {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    in_sync: Arc<AtomicUsize>,
    latencies: Arc<Mutex<Vec<u64>>>,
    full_latencies: Arc<Mutex<Vec<u64>>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
}

/// Connects `clients` clients to `addr`, `full` of them `RemoteSyncer`s decoding everything,
/// the rest framing only.
fn spawn_clients(
    addr: std::net::SocketAddr,
    clients: usize,
    full: usize,
    base: Instant,
) -> Clients {
    let c = Clients {
        tasks: Vec::new(),
        in_sync: Arc::new(AtomicUsize::new(0)),
        latencies: Arc::new(Mutex::new(Vec::new())),
        full_latencies: Arc::new(Mutex::new(Vec::new())),
        measuring: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let mut tasks = Vec::new();
    for _ in 0..clients.saturating_sub(full) {
        tasks.push(tokio::spawn(framing_client(
            addr,
            base,
            c.in_sync.clone(),
            c.latencies.clone(),
            c.measuring.clone(),
        )));
    }
    for i in 0..full {
        tasks.push(tokio::spawn(consume(
            RemoteSyncer::new(addr.to_string())
                .with_name(format!("full-{i}"))
                .stream(),
            true,
            base,
            c.in_sync.clone(),
            c.full_latencies.clone(),
            c.measuring.clone(),
        )));
    }
    Clients { tasks, ..c }
}

/// The clients' process: connects them all, says `INSYNC <seconds>` once all are in sync,
/// measures until a line on stdin, then says `LAT <p50> <p99> <n> <full p50> <full p99>
/// <cpu cores> <peak rss MiB>`.
async fn clients_process(addr: std::net::SocketAddr, clients: usize, full: usize) {
    let base = Instant::now();
    let Clients {
        tasks,
        in_sync,
        latencies,
        full_latencies,
        measuring,
    } = spawn_clients(addr, clients, full, base);
    while in_sync.load(Ordering::SeqCst) < clients && base.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("INSYNC {}", base.elapsed().as_secs_f64());
    measuring.store(true, Ordering::SeqCst);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    measuring.store(false, Ordering::SeqCst);
    let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let (p50, p99, n, fp50, fp99) = take_percentiles(&latencies, &full_latencies);
    println!(
        "LAT {p50} {p99} {n} {fp50} {fp99} {cpu} {}",
        kvsync_tests::process::peak_rss_mib(None)
    );
    for t in tasks {
        t.abort();
    }
}

/// Cold start and steady state with the clients in a second process.
#[allow(clippy::too_many_arguments)]
async fn apart(
    server: &Server,
    store: Arc<dyn Client>,
    clients: usize,
    full: usize,
    keys: usize,
    rate: usize,
    secs: usize,
    rss_before_server: f64,
) {
    use std::io::{BufRead, Write};
    let t0 = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .env("KVSYNC_BENCH_ROLE", "clients")
        .env("KVSYNC_BENCH_ADDR", server.local_addr().to_string())
        .env("KVSYNC_BENCH_CLIENTS", clients.to_string())
        .env("KVSYNC_BENCH_FULL", full.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the clients' process");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = move || tokio::task::block_in_place(|| out.next()).and_then(Result::ok);
    let insync = loop {
        match next() {
            Some(l) if l.starts_with("INSYNC ") => break l,
            Some(_) => {}
            None => panic!("the clients' process ended"),
        }
    };
    let stats = server.stats();
    println!(
        "1. cold start (clients in another process): all {clients} in sync after {:.2} s (the clients' own count: {} s); {} snapshots sent, {} built",
        t0.elapsed().as_secs_f64(),
        &insync["INSYNC ".len()..],
        stats.snapshots,
        stats.snapshot_builds
    );
    let cpu0 = cpu_seconds();
    let w0 = Instant::now();
    writer(store, keys, rate, secs, Instant::now()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = (cpu_seconds() - cpu0) / w0.elapsed().as_secs_f64();
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = writeln!(stdin, "stop");
    let lat = loop {
        match next() {
            Some(l) if l.starts_with("LAT ") => break l,
            Some(_) => {}
            None => panic!("the clients' process ended without its figures"),
        }
    };
    let f: Vec<f64> = lat[4..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    let peak = kvsync_tests::process::peak_rss_mib(None);
    println!(
        "2. {rate} updates/s: framing clients p50 {:.2} ms, p99 {:.2} ms ({} samples); full-decode clients p50 {:.2} ms, p99 {:.2} ms",
        f[0], f[1], f[2], f[3], f[4]
    );
    println!(
        "   server process (server and writer): CPU {cpu:.2} cores, peak RSS {peak:.0} MiB, of which {:.0} MiB the memory datastore held before the server started; clients' process: CPU {:.2} cores, peak RSS {:.0} MiB",
        rss_before_server, f[5], f[6]
    );
    let _ = child.wait();
    if env("KVSYNC_BENCH_RAW", 1) == 1 {
        raw_step(clients, rate, secs, keys, true).await;
    }
}

/// The stamp of the first update in a batch frame, found without decoding the frame.
fn first_stamp(body: &[u8]) -> Option<u64> {
    let pat = b"\"t\":\"";
    let at = body.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let end = body[at..].iter().position(|b| *b == b'"')? + at;
    std::str::from_utf8(&body[at..end]).ok()?.parse().ok()
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1e6
}

/// Takes the latencies gathered so far: p50 and p99 (ms) and the count of the framing
/// clients', then p50 and p99 of the decoding clients'.
fn take_percentiles(
    framing: &Mutex<Vec<u64>>,
    decoding: &Mutex<Vec<u64>>,
) -> (f64, f64, usize, f64, f64) {
    let mut lat = std::mem::take(&mut *framing.lock().expect("lock"));
    let mut flat = std::mem::take(&mut *decoding.lock().expect("lock"));
    (
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        lat.len(),
        percentile(&mut flat, 0.5),
        percentile(&mut flat, 0.99),
    )
}

/// The CPU seconds of this process.
fn cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/self/stat")
}

/// utime + stime, in seconds, of a `/proc/.../stat` file.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// The raw baseline: the same fan-out with nothing of kvsync in it. One OS thread accepts
/// `clients` loopback TCP connections, then, as fast as it can, writes every update produced
/// (at `rate`, from the moment all are connected) since its last round as one
/// length-prefixed frame (the updates' JSON, uncompressed, each stamped with the time it was
/// produced) to each connection in turn, with blocking writes. No datastore, no Syncer, no
/// hub, no task per client: the floor that TCP over loopback sets for this many connections
/// on these cores. Returns the listener's address and a handle that yields the thread's
/// rounds, CPU (cores) and connections once it has written for `secs` and closed every connection.
fn raw_server(
    clients: usize,
    rate: usize,
    secs: usize,
    keys: usize,
    writers: usize,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<(u64, f64, usize)>,
) {
    use std::io::Write;
    // A backlog that holds every client connecting at once, as the server's listener has
    // (std's 128 drops handshakes, and those clients would wait for a server that never
    // accepted them).
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind the raw listener");
    let listener = socket
        .listen(4096)
        .and_then(tokio::net::TcpListener::into_std)
        .expect("listen");
    let addr = listener.local_addr().expect("its address");
    let handle = std::thread::spawn(move || {
        // Whoever has connected within a minute; the rest are reset when the listener goes.
        let _ = listener.set_nonblocking(true);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut socks: Vec<std::net::TcpStream> = Vec::with_capacity(clients);
        while socks.len() < clients && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    socks.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        drop(listener);
        let connected = socks.len();
        let cpu0 = thread_cpu_seconds();
        let t0 = Instant::now();
        let wall0 = now(t0);
        let period = 1e9 / rate as f64;
        let (mut produced, mut rounds) = (0u64, 0u64);
        let mut body = Vec::new();
        while t0.elapsed() < Duration::from_secs(secs as u64) {
            let due = (t0.elapsed().as_nanos() as f64 / period) as u64 + 1;
            if due <= produced {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            body.clear();
            body.push(b'[');
            for n in produced..due {
                let stamp = wall0 + (n as f64 * period) as u64;
                let i = (n as usize * 7919) % keys;
                if n > produced {
                    body.push(b',');
                }
                body.extend_from_slice(node(i, stamp).value.to_string().as_bytes());
            }
            body.push(b']');
            produced = due;
            let mut frame = Vec::with_capacity(4 + body.len());
            frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
            if writers <= 1 {
                socks.retain_mut(|s| s.write_all(&frame).is_ok());
            } else {
                let part = socks.len().div_ceil(writers).max(1);
                std::thread::scope(|scope| {
                    for chunk in socks.chunks_mut(part) {
                        let frame = &frame;
                        scope.spawn(move || {
                            for s in chunk {
                                let _ = s.write_all(frame);
                            }
                        });
                    }
                });
            }
            rounds += 1;
        }
        let cpu = (thread_cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
        drop(socks);
        (rounds, cpu, connected)
    });
    (addr, handle)
}

/// A raw baseline client: reads length-prefixed frames through a 64 KiB buffer until the
/// server closes, and reports the latency of the first update of each (found as the framing
/// clients find it).
async fn raw_client(addr: std::net::SocketAddr, latencies: Arc<Mutex<Vec<u64>>>) {
    use tokio::io::AsyncReadExt;
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, stream);
    let mut body = Vec::new();
    let mut mine = Vec::new();
    while let Ok(len) = r.read_u32().await {
        body.resize(len as usize, 0);
        if r.read_exact(&mut body).await.is_err() {
            break;
        }
        let arrived = now(Instant::now());
        if let Some(t) = first_stamp(&body) {
            mine.push(arrived.saturating_sub(t));
        }
    }
    latencies.lock().expect("lock").append(&mut mine);
}

/// Runs the raw clients here until the raw server closes them: p50 and p99 (ms) and the
/// sample count.
async fn raw_clients(addr: std::net::SocketAddr, clients: usize) -> (f64, f64, usize) {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(raw_client(addr, latencies.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let mut l = std::mem::take(&mut *latencies.lock().expect("lock"));
    (percentile(&mut l, 0.5), percentile(&mut l, 0.99), l.len())
}

/// The raw baseline at `rate` for `secs`, its clients here or (`apart`) in a second process
/// (this binary again), and its figures printed.
async fn raw_step(clients: usize, rate: usize, secs: usize, keys: usize, apart: bool) {
    let writers = env("KVSYNC_BENCH_RAW_WRITERS", 1);
    let (addr, server) = raw_server(clients, rate, secs, keys, writers);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let (p50, p99, n, clients_cpu) = if apart {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(std::env::current_exe().expect("this binary"))
                .env("KVSYNC_BENCH_ROLE", "raw-clients")
                .env("KVSYNC_BENCH_ADDR", addr.to_string())
                .env("KVSYNC_BENCH_CLIENTS", clients.to_string())
                .output()
        })
        .expect("the raw clients' process");
        let out = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = out
            .lines()
            .find_map(|l| l.strip_prefix("RAW "))
            .expect("the raw clients' figures")
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        (f[0], f[1], f[2] as usize, f[3])
    } else {
        let (p50, p99, n) = raw_clients(addr, clients).await;
        (p50, p99, n, f64::NAN)
    };
    let (rounds, thread_cpu, connected) =
        tokio::task::block_in_place(|| server.join()).expect("the raw server");
    // More than one writing thread: this process's CPU over the step (its kvsync server is
    // idle by then), which tells theirs apart from the clients' only when those are apart.
    let process_cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let (server_cpu, clients_cpu) = match (writers > 1, apart) {
        (false, true) => (thread_cpu, clients_cpu),
        (false, false) => (thread_cpu, process_cpu - thread_cpu),
        (true, true) => (process_cpu, clients_cpu),
        (true, false) => (f64::NAN, f64::NAN),
    };
    println!(
        "   raw baseline ({writers} writing thread(s), {connected} of {clients} plain TCP connections, clients {}; no kvsync): {rate} updates/s: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} samples); {rounds} rounds ({:.2} ms each); writing {server_cpu:.2} cores; clients {clients_cpu:.2} cores",
        if apart {
            "in another process"
        } else {
            "in this one"
        },
        (secs * 1000) as f64 / rounds.max(1) as f64,
    );
}

/// The server's address a clients' process is given (`KVSYNC_BENCH_ADDR`).
fn bench_addr() -> std::net::SocketAddr {
    std::env::var("KVSYNC_BENCH_ADDR")
        .ok()
        .and_then(|a| a.parse().ok())
        .expect("KVSYNC_BENCH_ADDR")
}

/// The CPU seconds of the calling thread.
fn thread_cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/thread-self/stat")
}

/// The number after `"position":` in a frame's body (the first: the frame's own).
fn position_of(body: &[u8]) -> Option<u64> {
    let pat = b"\"position\":";
    let at = body.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let end = body[at..]
        .iter()
        .position(|b| !b.is_ascii_digit())
        .map_or(body.len(), |e| e + at);
    std::str::from_utf8(&body[at..end]).ok()?.parse().ok()
}

/// A framing-only client: hello, then every frame read whole; counts itself in `in_sync`
/// while it is in sync, and reports the latency of the first update of each batch. It
/// reconnects as a `RemoteSyncer` does (at once after a go-away, then backing off to 3 s with
/// jitter), resuming from the last position it read; it holds no state, so where the server
/// cannot resume it, it gets a snapshot.
async fn framing_client(
    addr: std::net::SocketAddr,
    base: Instant,
    in_sync: Arc<AtomicUsize>,
    latencies: Arc<Mutex<Vec<u64>>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
) {
    use kvsync_server::protocol::{Mode, Resume};
    let mut resume: Option<Resume> = None;
    let mut attempt = 0u32;
    let mut mine = Vec::new();
    loop {
        if attempt > 0 {
            let full = Duration::from_millis(100)
                .saturating_mul(1 << (attempt - 1).min(10))
                .min(Duration::from_secs(3));
            let jitter = rand::random::<f64>();
            tokio::time::sleep(full / 2 + (full / 2).mul_f64(jitter)).await;
        }
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            attempt += 1;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (r, mut w) = tokio::io::split(stream);
        // Buffered, as a `RemoteSyncer` reads.
        let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
        let hello = frame(&Message::Hello {
            version: VERSION,
            client: "bench".into(),
            // `KVSYNC_BENCH_FRAMING_LZ4=0`: plain frames, so that 996 clients decompressing
            // every frame on the server's 2 cores do not hide the server's own limit.
            features: if env("KVSYNC_BENCH_FRAMING_LZ4", 1) == 0 {
                Vec::new()
            } else {
                vec![kvsync_server::protocol::FEATURE_LZ4.into()]
            },
            resume,
            holds: 0,
        });
        if w.write_all(&hello).await.is_err() {
            attempt += 1;
            continue;
        }
        let mut synced = false;
        let mut epoch = None;
        let mut went_away = false;
        while let Ok(body) = read_frame(&mut r, 64 << 20).await {
            if body.starts_with(b"{\"type\":\"updates\"") {
                if synced
                    && measuring.load(Ordering::Relaxed)
                    && let Some(t) = first_stamp(&body)
                {
                    mine.push(now(base).saturating_sub(t));
                }
            } else if body.starts_with(b"{\"type\":\"status\"") {
                if !synced && body.windows(9).any(|x| x == b"\"in_sync\"") {
                    synced = true;
                    in_sync.fetch_add(1, Ordering::SeqCst);
                }
            } else if body.starts_with(b"{\"type\":\"ping\"") {
                let _ = w.write_all(&frame(&Message::Pong { nonce: 0 })).await;
                continue;
            } else if body.starts_with(b"{\"type\":\"buckets\"") {
                continue;
            } else {
                match serde_json::from_slice::<Message>(&body) {
                    Ok(Message::Welcome { epoch: e, mode, .. }) => {
                        epoch = Some(e);
                        attempt = 0;
                        if mode != Mode::Resume {
                            resume = None;
                        }
                        continue;
                    }
                    Ok(Message::GoAway { .. }) => {
                        went_away = true;
                        break;
                    }
                    _ => {}
                }
            }
            // Updates, statuses and the end of a resync carry the position reached.
            if let (Some(epoch), Some(position)) = (epoch, position_of(&body)) {
                resume = Some(Resume { epoch, position });
            }
            if mine.len() >= 16 {
                latencies.lock().expect("lock").append(&mut mine);
            }
        }
        if synced {
            in_sync.fetch_sub(1, Ordering::SeqCst);
        }
        if !went_away {
            attempt += 1;
        }
        latencies.lock().expect("lock").append(&mut mine);
    }
}

/// A client that reads up to its first in-sync status and then stops reading, holding its
/// connection open.
async fn stalled_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let hello = frame(&Message::Hello {
        version: VERSION,
        client: "stalled".into(),
        features: vec![kvsync_server::protocol::FEATURE_LZ4.into()],
        resume: None,
        holds: 0,
    });
    stream.write_all(&hello).await.expect("hello");
    while let Ok(body) = read_frame(&mut stream, 64 << 20).await {
        if body.starts_with(b"{\"type\":\"status\"") && body.windows(9).any(|x| x == b"\"in_sync\"")
        {
            break;
        }
    }
    stream
}

/// A consumer that decodes everything into a map: reports when it is in sync and the
/// latency of the first update of each batch while measuring.
async fn consume<S>(
    mut events: S,
    keep: bool,
    base: Instant,
    in_sync: Arc<AtomicUsize>,
    lat: Arc<Mutex<Vec<u64>>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
) where
    S: futures::Stream<Item = SyncerEvent> + Unpin,
{
    let mut map = std::collections::HashMap::new();
    let mut synced = false;
    while let Some(ev) = events.next().await {
        match ev {
            SyncerEvent::Status(SyncStatus::InSync) if !synced => {
                synced = true;
                in_sync.fetch_add(1, Ordering::SeqCst);
            }
            SyncerEvent::Status(s) if synced && s != SyncStatus::InSync => {
                synced = false;
                in_sync.fetch_sub(1, Ordering::SeqCst);
            }
            SyncerEvent::Updates(batch) => {
                let arrived = now(base);
                for (j, u) in batch.into_iter().enumerate() {
                    if j == 0 && synced && measuring.load(Ordering::Relaxed) {
                        let t: Option<u64> = u
                            .kvp
                            .value
                            .as_value()
                            .ok()
                            .and_then(|v| v["labels"]["t"].as_str()?.parse().ok());
                        if let Some(t) = t {
                            lat.lock().expect("lock").push(arrived.saturating_sub(t));
                        }
                    }
                    if keep {
                        map.insert(u.kvp.key.clone(), u.kvp);
                    }
                }
            }
            _ => {}
        }
    }
}

async fn writer(store: Arc<dyn Client>, keys: usize, rate: usize, secs: usize, base: Instant) {
    let total = rate * secs;
    let start = tokio::time::Instant::now();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let i = (n * 7919) % keys;
        let _ = store.apply(node(i, now(base))).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = env("KVSYNC_BENCH_KEYS", 100_000);
    let clients = env("KVSYNC_BENCH_CLIENTS", 1_000);
    let full = env("KVSYNC_BENCH_FULL", 4);
    if std::env::var("KVSYNC_BENCH_ROLE").as_deref() == Ok("clients") {
        let addr = bench_addr();
        clients_process(addr, clients, full).await;
        return;
    }
    if std::env::var("KVSYNC_BENCH_ROLE").as_deref() == Ok("raw-clients") {
        let addr = bench_addr();
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let (p50, p99, n) =
            if std::env::var("KVSYNC_BENCH_RAW_CLIENT_RUNTIME").as_deref() == Ok("current") {
                // Every client on one thread: no wake-ups across threads.
                tokio::task::block_in_place(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime")
                        .block_on(raw_clients(addr, clients))
                })
            } else {
                raw_clients(addr, clients).await
            };
        let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
        println!("RAW {p50} {p99} {n} {cpu}");
        return;
    }
    let rate = env("KVSYNC_BENCH_RATE", 1_000);
    let secs = env("KVSYNC_BENCH_SECONDS", 10);
    let naive = env("KVSYNC_BENCH_NAIVE", 1_000);
    let base = Instant::now();
    let store: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    for i in 0..keys {
        store.create(node(i, 0)).await.expect("seed");
    }
    let value_bytes = node(0, 0).value.to_string().len();
    let rss_before_server = kvsync_tests::process::rss_mib(None);
    println!(
        "{keys} Nodes (~{value_bytes} bytes of value each), {clients} clients ({full} decoding fully), {rate} updates/s for {secs} s; 2 cores, loopback"
    );
    // Saved on shutdown and taken up on start: the outage of step 3 is a restart.
    let state_dir = tempfile::tempdir().expect("a temp dir");
    let mut config = ServerConfig::new()
        .with_plaintext()
        .with_state_dir(state_dir.path());
    if let Ok(us) = std::env::var("KVSYNC_BENCH_LINGER_US") {
        config.batch_linger = Duration::from_micros(us.parse().unwrap_or(1000));
    }
    println!("batch linger {:?}", config.batch_linger);
    let types = || vec![ResourceType::new(ListOptions::new("Node"))];
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        store.clone(),
        types(),
        config.clone(),
    )
    .await
    .expect("bind");
    let addr = server.local_addr();
    while server.status() != SyncStatus::InSync {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if env("KVSYNC_BENCH_ONLY_NAIVE", 0) == 1 {
        server.shutdown().await;
        naive_step(store, naive.max(1), full, keys, rate, secs, base).await;
        return;
    }
    if env("KVSYNC_BENCH_CLIENT_PROCESS", 0) == 1 {
        apart(
            &server,
            store.clone(),
            clients,
            full,
            keys,
            rate,
            secs,
            rss_before_server,
        )
        .await;
        server.shutdown().await;
        return;
    }

    // 1. Cold start.
    let t0 = Instant::now();
    let Clients {
        tasks,
        in_sync,
        latencies,
        full_latencies,
        measuring,
    } = spawn_clients(addr, clients, full, base);
    while in_sync.load(Ordering::SeqCst) < clients {
        if t0.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = server.stats();
    println!(
        "1. cold start: {}/{clients} clients in sync after {:.2} s; {} snapshots sent, {} built",
        in_sync.load(Ordering::SeqCst),
        t0.elapsed().as_secs_f64(),
        stats.snapshots,
        stats.snapshot_builds
    );

    // 2. Steady state.
    measuring.store(true, Ordering::SeqCst);
    let cpu0 = cpu_seconds();
    let w0 = Instant::now();
    writer(store.clone(), keys, rate, secs, base).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(false, Ordering::SeqCst);
    let cpu = (cpu_seconds() - cpu0) / w0.elapsed().as_secs_f64();
    let (p50, p99, n, fp50, fp99) = take_percentiles(&latencies, &full_latencies);
    println!(
        "2. {rate} updates/s: framing clients p50 {p50:.2} ms, p99 {p99:.2} ms ({n} samples); full-decode clients p50 {fp50:.2} ms, p99 {fp99:.2} ms; CPU {cpu:.2} cores (server and clients); peak RSS {:.0} MiB; log {} KiB",
        kvsync_tests::process::peak_rss_mib(None),
        server.log_bytes() / 1024
    );
    if env("KVSYNC_BENCH_RAW", 1) == 1 {
        raw_step(clients, rate, secs, keys, false).await;
    }

    // 2b. Clients that stopped reading: rounds without them and with them, interleaved so
    //     that the machine's drift over the run falls on both sides alike; the others'
    //     latency pooled per side, and the process's memory.
    let stalled_n = env("KVSYNC_BENCH_STALLED", 10);
    let rounds = env("KVSYNC_BENCH_STALLED_ROUNDS", 3);
    let half = secs.div_ceil(2);
    let rss0 = kvsync_tests::process::rss_mib(None);
    let mut rss_with = rss0;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let measure = async |into: &mut Vec<u64>| {
        measuring.store(true, Ordering::SeqCst);
        writer(store.clone(), keys, rate, half, base).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        measuring.store(false, Ordering::SeqCst);
        into.append(&mut latencies.lock().expect("lock"));
        full_latencies.lock().expect("lock").clear();
    };
    for _ in 0..rounds {
        measure(&mut without).await;
        let mut stalled = Vec::new();
        for _ in 0..stalled_n {
            stalled.push(stalled_client(addr).await);
        }
        measure(&mut with).await;
        rss_with = rss_with.max(kvsync_tests::process::rss_mib(None));
        drop(stalled);
    }
    let (wn, sn) = (without.len(), with.len());
    let (wp50, wp99) = (
        percentile(&mut without, 0.5),
        percentile(&mut without, 0.99),
    );
    let (sp50, sp99) = (percentile(&mut with, 0.5), percentile(&mut with, 0.99));
    println!(
        "2b. {rounds} rounds of {half} s without and {half} s with {stalled_n} clients that stopped reading: the others p50 {sp50:.2} ms, p99 {sp99:.2} ms with them ({sn} samples) against {wp50:.2} / {wp99:.2} ms without ({wn} samples): {:+.1}% / {:+.1}%; RSS {rss0:.0} -> at most {rss_with:.0} MiB; log {} KiB; {} clients let go for falling behind",
        100.0 * (sp50 / wp50 - 1.0),
        100.0 * (sp99 / wp99 - 1.0),
        server.log_bytes() / 1024,
        server.stats().fell_behind,
    );

    // 3. An outage: the server stops (saving its state), 5,000 updates are written while it
    //    is down for 10 s, and it starts again on the same address.
    server.shutdown().await;
    let t0 = Instant::now();
    while in_sync.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outage_rate = env("KVSYNC_BENCH_OUTAGE_UPDATES", 5_000) / 10;
    writer(store.clone(), keys, outage_rate, 10, base).await;
    let t0 = Instant::now();
    let server = Server::bind(addr, store.clone(), types(), config.clone())
        .await
        .expect("bind again");
    while in_sync.load(Ordering::SeqCst) < clients && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = server.stats();
    println!(
        "3. outage: down 10 s with {} updates written meanwhile; after the restart {}/{clients} clients in sync after {:.2} s: {} resumed from the log ({:.1}%), {} resynced, {} snapshots",
        outage_rate * 10,
        in_sync.load(Ordering::SeqCst),
        t0.elapsed().as_secs_f64(),
        stats.resumes,
        100.0 * stats.resumes as f64 / clients as f64,
        stats.resyncs,
        stats.snapshots,
    );
    for t in tasks {
        t.abort();
    }

    // 4. Resync bytes: one client, through a byte-counting proxy, cut off while 1% of the keys
    //    change: (a) beyond the log window of the same server (a small log, so that the
    //    changes push it out), (b) across a restart without saved state (a new epoch).
    server.shutdown().await;
    let _ = std::fs::remove_file(state_dir.path().join("kvsync-server.state"));
    let server = Server::bind(
        addr,
        store.clone(),
        types(),
        config.clone().with_log(8 << 10, Duration::from_secs(300)),
    )
    .await
    .expect("bind again");
    let proxy = kvsync_tests::proxy::Proxy::start(addr).await;
    let mut events = RemoteSyncer::new(proxy.addr().to_string())
        .with_retry_policy(kvsync_syncer::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
        .stream();
    let wait_in_sync = async |events: &mut futures::stream::BoxStream<'static, SyncerEvent>| {
        let mut n = 0usize;
        let mut left_sync = false;
        while let Some(ev) = events.next().await {
            match ev {
                SyncerEvent::Updates(b) => n += b.len(),
                SyncerEvent::Status(SyncStatus::InSync) if left_sync || n > 0 => return n,
                SyncerEvent::Status(SyncStatus::InSync) => {}
                SyncerEvent::Status(_) => left_sync = true,
                _ => {}
            }
        }
        n
    };
    let updates = wait_in_sync(&mut events).await;
    let (snap_up, snap_down) = proxy.take_bytes();
    let changed = keys / 100;
    let report = |case: &str, re_up: u64, re_down: u64, resent: usize, stats: HubStats| {
        println!(
            "4{case} after {changed} of {keys} keys changed: the server sent {re_down} bytes, {:.2}% of the snapshot's {snap_down}; the client sent {re_up} bytes; both ways {:.2}% of the snapshot's ({}); {resent} updates handed on for {updates} in the snapshot; {} resume(s), {} resync(s) ({} by sketch, {} sketch(es) too small), {} snapshot(s)",
            100.0 * re_down as f64 / snap_down as f64,
            100.0 * (re_up + re_down) as f64 / (snap_up + snap_down) as f64,
            snap_up + snap_down,
            stats.resumes,
            stats.resyncs,
            stats.reconciled,
            stats.sketches_too_small,
            stats.snapshots,
        );
    };
    // (a) Beyond the log window.
    proxy.refuse(true);
    proxy.cut();
    for i in 0..changed {
        let _ = store.apply(node(i * 97 % keys, 1)).await;
    }
    // The server takes the writes in (and its log moves past the client) within milliseconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = server.stats();
    proxy.take_bytes();
    proxy.refuse(false);
    let resent = wait_in_sync(&mut events).await;
    let (re_up, re_down) = proxy.take_bytes();
    let mut stats = server.stats();
    stats.resumes -= before.resumes;
    stats.resyncs -= before.resyncs;
    stats.reconciled -= before.reconciled;
    stats.sketches_too_small -= before.sketches_too_small;
    stats.snapshots -= before.snapshots;
    report("a. beyond the log window", re_up, re_down, resent, stats);
    // (b) Across a restart without saved state.
    server.shutdown().await;
    let _ = std::fs::remove_file(state_dir.path().join("kvsync-server.state"));
    for i in 0..changed {
        let _ = store.apply(node(i * 89 % keys + 1, 2)).await;
    }
    proxy.take_bytes();
    let server = Server::bind(addr, store.clone(), types(), config.clone())
        .await
        .expect("bind again");
    let resent = wait_in_sync(&mut events).await;
    let (re_up, re_down) = proxy.take_bytes();
    report(
        "b. across a restart (a new epoch)",
        re_up,
        re_down,
        resent,
        server.stats(),
    );
    drop(events);
    server.shutdown().await;

    if naive > 0 {
        naive_step(store, naive, full, keys, rate, secs, base).await;
    }
}

/// Step 5, the naive alternative: a Syncer per client on the datastore, `full` of their
/// consumers keeping the whole map.
async fn naive_step(
    store: Arc<dyn Client>,
    naive: usize,
    full: usize,
    keys: usize,
    rate: usize,
    secs: usize,
    base: Instant,
) {
    let in_sync = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..naive {
        let (store, in_sync, lat, measuring) = (
            store.clone(),
            in_sync.clone(),
            lat.clone(),
            measuring.clone(),
        );
        let events = Syncer::new(store)
            .with_resource(ResourceType::new(ListOptions::new("Node")))
            .stream();
        // As on the server's side: a few consumers keep the whole map, the rest only
        // measure (the Syncer itself still tracks every key it has sent).
        tasks.push(tokio::spawn(consume(
            events,
            n < full,
            base,
            in_sync,
            lat,
            measuring,
        )));
    }
    while in_sync.load(Ordering::SeqCst) < naive && t0.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let synced_after = t0.elapsed();
    measuring.store(true, Ordering::SeqCst);
    writer(store.clone(), keys, rate, secs.min(5), base).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut l = std::mem::take(&mut *lat.lock().expect("lock"));
    println!(
        "5. naive: {naive} Syncers on the datastore, in sync after {:.2} s; at {rate} updates/s p50 {:.2} ms, p99 {:.2} ms; peak RSS {:.0} MiB",
        synced_after.as_secs_f64(),
        percentile(&mut l, 0.5),
        percentile(&mut l, 0.99),
        kvsync_tests::process::peak_rss_mib(None)
    );
    for t in tasks {
        t.abort();
    }
}
