//! TLS between server and clients: the client verifies the server; with mutual TLS the
//! server checks each client certificate against its CA and an allow-list of names (common
//! name or URI SAN); refusals are logged and counted, and the allowed clients are served.

use std::sync::Arc;
use std::time::Duration;

use kvsync_backend::{Client, MemoryBackend};
use kvsync_model::{KVPair, ListOptions, ResourceKey};
use kvsync_server::{ClientTls, RemoteSyncer, Server, ServerConfig, ServerMetrics, ServerTls};
use kvsync_syncer::{Backoff, ResourceType, SyncStatus};
use kvsync_tests::checker::{CheckingConsumer, datastore_state};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    SanType,
};
use serde_json::json;

/// A CA, a server certificate for 127.0.0.1 and localhost, and client certificates.
struct Pki {
    ca: String,
    server: (String, String),
    other_ca: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let ca = |_: ()| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca")
        };
        let issuer = ca(());
        let other = ca(());
        let mut sp = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        sp.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let key = KeyPair::generate().expect("key");
        let cert = sp.signed_by(&key, &issuer).expect("sign");
        Pki {
            ca: issuer.pem(),
            server: (cert.pem(), key.serialize_pem()),
            other_ca: other.pem(),
            issuer,
        }
    }

    /// A client certificate with this common name and URI SAN.
    fn client(&self, cn: &str, uri: Option<&str>) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        if let Some(u) = uri {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().expect("a URI")));
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

async fn store() -> Arc<dyn Client> {
    let s: Arc<dyn Client> = Arc::new(MemoryBackend::new(kvsync_model::demo::registry()));
    s.create(KVPair::new(
        ResourceKey::cluster("IPPool", "a"),
        json!({"cidr": "10.0.0.0/16"}),
    ))
    .await
    .expect("seed");
    s
}

fn remote(addr: std::net::SocketAddr, tls: ClientTls) -> RemoteSyncer {
    RemoteSyncer::new(addr.to_string())
        .with_tls(tls)
        .with_retry_policy(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
}

async fn syncs(consumer: &CheckingConsumer, store: &dyn Client, within: Duration) -> bool {
    let expected = datastore_state(store, &[ListOptions::new("IPPool")]).await;
    consumer
        .wait_for(within, |s| {
            s.status() == Some(SyncStatus::InSync) && s.cache == expected
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_needs_tls_or_plain_tcp_asked_for() {
    let err = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        store().await,
        vec![ResourceType::new(ListOptions::new("IPPool"))],
        ServerConfig::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("plain TCP"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_allowed_clients_and_refuses_the_others() {
    let pki = Pki::new();
    let store = store().await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ServerMetrics::new(&mut registry);
    let tls = ServerTls::new(pki.server.0.clone(), pki.server.1.clone()).with_client_auth(
        pki.ca.clone(),
        vec!["node-1".into(), "spiffe://kvsync/node-2".into()],
    );
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        store.clone(),
        vec![ResourceType::new(ListOptions::new("IPPool"))],
        ServerConfig::new().with_tls(tls).with_metrics(metrics),
    )
    .await
    .expect("bind");
    let addr = server.local_addr();
    // Allowed by common name, and by URI SAN.
    for (cn, uri) in [
        ("node-1", None),
        ("whatever", Some("spiffe://kvsync/node-2")),
    ] {
        let (cert, key) = pki.client(cn, uri);
        let c = CheckingConsumer::start_stream(
            remote(
                addr,
                ClientTls::new(pki.ca.clone(), "127.0.0.1").with_identity(cert, key),
            )
            .stream(),
        );
        assert!(
            syncs(&c, &*store, Duration::from_secs(20)).await,
            "{cn} is served"
        );
        let seen = c.stop().await;
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    }
    let refused = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix("kvsync_server_refused_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(refused(&registry), 0);
    // Not in the allow-list; no certificate; a certificate of another CA; a server verified
    // against the wrong CA: none is ever in sync.
    let (stranger, stranger_key) = pki.client("intruder", Some("spiffe://evil/x"));
    let cases = [
        ClientTls::new(pki.ca.clone(), "127.0.0.1").with_identity(stranger, stranger_key),
        ClientTls::new(pki.ca.clone(), "127.0.0.1"),
        ClientTls::new(pki.other_ca.clone(), "127.0.0.1"),
    ];
    for tls in cases {
        let c = CheckingConsumer::start_stream(remote(addr, tls).stream());
        assert!(
            !syncs(&c, &*store, Duration::from_millis(800)).await,
            "a client that must be refused got in"
        );
        let seen = c.stop().await;
        assert!(
            !seen.statuses.contains(&SyncStatus::InSync),
            "{:?}",
            seen.statuses
        );
    }
    assert!(refused(&registry) >= 2, "refusals are counted");
    // A plain TCP client is refused too, and the allowed ones are still served.
    let plain = CheckingConsumer::start_stream(RemoteSyncer::new(addr.to_string()).stream());
    assert!(!syncs(&plain, &*store, Duration::from_millis(500)).await);
    plain.stop().await;
    let (cert, key) = pki.client("node-1", None);
    let again = CheckingConsumer::start_stream(
        remote(
            addr,
            ClientTls::new(pki.ca.clone(), "localhost").with_identity(cert, key),
        )
        .stream(),
    );
    assert!(syncs(&again, &*store, Duration::from_secs(20)).await);
    again.stop().await;
    server.shutdown().await;
}
