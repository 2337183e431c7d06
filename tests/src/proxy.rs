//! A TCP proxy on loopback whose connections a test can cut: faults between a client and a
//! server. It counts the bytes it forwards each way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running proxy, stopped when dropped.
pub struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
    /// Bytes forwarded client -> server, and server -> client.
    counts: Arc<[AtomicU64; 2]>,
    /// While set, connections are closed as soon as they are accepted (a partition).
    refusing: Arc<AtomicBool>,
}

/// Copies `r` to `w`, counting, until either end closes; then closes `w`.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    count: Arc<[AtomicU64; 2]>,
    way: usize,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                count[way].fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = w.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    ///
    /// # Panics
    /// If it cannot bind a loopback port.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let refusing = Arc::new(AtomicBool::new(false));
        let c = conns.clone();
        let n = counts.clone();
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if refuse.load(Ordering::Relaxed) {
                    drop(down);
                    continue;
                }
                let counts = n.clone();
                let handle = tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pipe(dr, uw, counts.clone(), 0), pipe(ur, dw, counts, 1));
                });
                let mut list = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                list.retain(|h| !h.is_finished());
                list.push(handle);
            }
        });
        Proxy {
            addr,
            conns,
            task,
            counts,
            refusing,
        }
    }

    /// While `on`, connections are closed as soon as they are made: with [`Proxy::cut`], a
    /// client cut off from the server for as long as a test wants.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::Relaxed);
    }

    /// The bytes forwarded so far (client -> server, server -> client), and counting afresh.
    pub fn take_bytes(&self) -> (u64, u64) {
        (
            self.counts[0].swap(0, Ordering::Relaxed),
            self.counts[1].swap(0, Ordering::Relaxed),
        )
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection open now (both ends see it closed).
    pub fn cut(&self) {
        for h in self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            h.abort();
        }
    }
}
