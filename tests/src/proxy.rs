//! A TCP proxy on loopback whose connections a test can cut: faults between a client and a
//! server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A running proxy, stopped when dropped.
pub struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
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
        let c = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let handle = tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
                let mut list = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                list.retain(|h| !h.is_finished());
                list.push(handle);
            }
        });
        Proxy { addr, conns, task }
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
