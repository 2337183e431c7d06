//! The KV client, retrying calls whose connection could not be made.

use std::future::Future;
use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, KvClient, Txn};

/// The KV client, retrying a call whose connection could not be made (so the request never
/// left): with several endpoints, a dead member must not fail requests the others can serve.
pub(super) struct RetryingKv {
    pub(super) kv: KvClient,
    pub(super) attempts: usize,
}

pub(super) fn is_connect_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

impl RetryingKv {
    pub(super) async fn run<T, F, Fut>(&self, f: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        loop {
            match f(self.kv.clone()).await {
                Err(e) if attempt < self.attempts && is_connect_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    pub(super) async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        self.run(|mut kv| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    pub(super) async fn txn(
        &self,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.run(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    pub(super) async fn delete(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<DeleteOptions>,
    ) -> Result<etcd_client::DeleteResponse, etcd_client::Error> {
        let key = key.into();
        self.run(|mut kv| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.delete(key, opts).await }
        })
        .await
    }

    pub(super) async fn compact(
        &self,
        revision: i64,
        opts: Option<etcd_client::CompactionOptions>,
    ) -> Result<etcd_client::CompactionResponse, etcd_client::Error> {
        self.run(|mut kv| {
            let opts = opts.clone();
            async move { kv.compact(revision, opts).await }
        })
        .await
    }
}
