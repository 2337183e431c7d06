//! A real etcd for tests: Debian's `etcd-server` started on free 127.0.0.1 ports with a fresh
//! data directory, killed by pid when dropped. Also a 3-member cluster, TLS material made with
//! rcgen, and the etcd backend under test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvsync_backend::etcd::{EtcdBackend, EtcdConfig, EtcdTls};
use kvsync_model::Revision;

use crate::harness::{Guarded, RawAccess, TestBackend, TestClient, unique_prefix};

/// Where the etcd binary is: `$KVSYNC_ETCD_BIN`, then `etcd` on the PATH, then `/usr/bin/etcd`.
///
/// # Panics
/// With instructions, when etcd is not installed.
pub fn etcd_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KVSYNC_ETCD_BIN") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return p;
    }
    let fallback = PathBuf::from("/usr/bin/etcd");
    assert!(
        fallback.is_file(),
        "etcd is not installed: run scripts/test (which installs it), or \
         `apt-get install -y etcd-server`, or set KVSYNC_ETCD_BIN to an etcd binary"
    );
    fallback
}

/// A free TCP port on 127.0.0.1.
///
/// # Panics
/// If no port can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port on 127.0.0.1")
}

/// TLS material for a test: a CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes a fresh CA and certificates.
    ///
    /// # Panics
    /// If rcgen or the file system fails.
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
            .expect("self-signed CA");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        };
        write("ca.pem", ca.pem());
        for (name, sans) in [
            ("server", vec!["localhost".to_owned()]),
            ("client", vec!["kvsync-client".to_owned()]),
        ] {
            let mut params = CertificateParams::new(sans).expect("params");
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        TestPki { dir }
    }

    /// The path of `name` (`ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The client's TLS settings (CA, certificate and key).
    ///
    /// # Panics
    /// If the files cannot be read.
    pub fn client_tls(&self) -> EtcdTls {
        EtcdTls::from_files(
            Some(&self.path("ca.pem")),
            Some(&self.path("client.pem")),
            Some(&self.path("client-key.pem")),
        )
        .expect("read client pki")
    }
}

/// How one etcd member is started.
#[derive(Clone)]
struct MemberSpec {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    initial_cluster: String,
    cluster_token: String,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl MemberSpec {
    fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&self, state: &str) -> (Child, Child) {
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.client_url())
            .arg("--advertise-client-urls")
            .arg(self.client_url())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg("--logger=zap")
            .arg("--log-level=error")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--quota-backend-bytes=4294967296")
            .arg("--max-request-bytes=3145728")
            // Frequent per-watch progress notifications, so that watches resumed by a Syncer
            // confirm catching up quickly on etcd versions whose requested progress cannot be
            // trusted.
            .arg("--experimental-watch-progress-notify-interval=1s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key, ca)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().expect("start etcd");
        // A watchdog ends etcd and removes its data if this test process ends without
        // dropping the fixture (a shared fixture lives in a static, which is never dropped).
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {test} 2>/dev/null; do sleep 1; done; kill -9 {etcd} 2>/dev/null; \
                 sleep 1; rm -rf '{dir}'",
                test = std::process::id(),
                etcd = child.id(),
                dir = self.data_dir.parent().unwrap_or(&self.data_dir).display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start watchdog");
        (child, watchdog)
    }
}

/// One running etcd member.
pub struct EtcdMember {
    spec: MemberSpec,
    process: Option<(Child, Child)>,
}

impl EtcdMember {
    /// The member's client URL.
    pub fn endpoint(&self) -> String {
        self.spec.client_url()
    }

    /// The etcd process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|(c, _)| c.id())
    }

    /// Kills the member (SIGKILL, by pid) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some((mut child, mut watchdog)) = self.process.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the member is running.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the member again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.process = Some(self.spec.spawn("existing"));
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single etcd server or a cluster of members, with their data directories.
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<EtcdMember>,
    _data: tempfile::TempDir,
    tls: Option<EtcdTls>,
}

impl EtcdCluster {
    /// Starts one etcd on free ports and waits until it answers.
    ///
    /// # Panics
    /// If etcd is missing or does not answer within 30 s.
    pub fn start() -> Self {
        Self::start_n(1, None)
    }

    /// Starts one etcd serving TLS with `pki`'s server certificate, requiring client
    /// certificates signed by its CA.
    ///
    /// # Panics
    /// As [`EtcdCluster::start`].
    pub fn start_tls(pki: &TestPki) -> Self {
        Self::start_n(1, Some(pki))
    }

    /// Starts a cluster of `n` members on 127.0.0.1.
    ///
    /// # Panics
    /// As [`EtcdCluster::start`].
    pub fn start_n(n: usize, pki: Option<&TestPki>) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let tls_files = pki.map(|p| {
            (
                p.path("server.pem"),
                p.path("server-key.pem"),
                p.path("ca.pem"),
            )
        });
        let members: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, (client_port, peer_port))| {
                let spec = MemberSpec {
                    name: format!("m{i}"),
                    client_port: *client_port,
                    peer_port: *peer_port,
                    data_dir: data.path().join(format!("m{i}")),
                    initial_cluster: initial_cluster.clone(),
                    cluster_token: format!("kvsync-test-{}", ports[0].1),
                    tls: tls_files.clone(),
                };
                let process = Some(spec.spawn("new"));
                EtcdMember { spec, process }
            })
            .collect();
        let cluster = EtcdCluster {
            members,
            _data: data,
            tls: pki.map(TestPki::client_tls),
        };
        cluster.wait_ready(Duration::from_secs(30));
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// Client settings for this cluster under `prefix` (with the client TLS material for a
    /// TLS cluster).
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.endpoints(), kvsync_model::demo::registry())
            .with_prefix(prefix)
            .with_request_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            c = c.with_tls(tls.clone());
        }
        c
    }

    /// Waits until every running member answers a read.
    ///
    /// # Panics
    /// After `timeout`.
    pub fn wait_ready(&self, timeout: Duration) {
        // A thread of its own, so this works from inside a test's runtime too.
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.wait_ready_blocking(timeout))
                .join()
                .expect("readiness check");
        });
    }

    fn wait_ready_blocking(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for m in self.members.iter().filter(|m| m.process.is_some()) {
            let mut config = self.config("/kvsync-ready");
            config.endpoints = vec![m.endpoint()];
            loop {
                let ok = rt.block_on(async {
                    match EtcdBackend::connect(config.clone()).await {
                        Ok(b) => b.current_revision().await.is_ok(),
                        Err(_) => false,
                    }
                });
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd at {} did not answer within {timeout:?}",
                    m.endpoint()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The etcd backend under test, over an [`EtcdCluster`].
pub struct EtcdTestBackend {
    cluster: Arc<EtcdCluster>,
}

impl EtcdTestBackend {
    /// Over the shared server of this test binary.
    pub fn shared() -> Self {
        static SERVER: OnceLock<Arc<EtcdCluster>> = OnceLock::new();
        EtcdTestBackend {
            cluster: SERVER
                .get_or_init(|| Arc::new(EtcdCluster::start()))
                .clone(),
        }
    }

    /// Over a server of its own, stopped when the last client of it is dropped.
    pub fn private() -> Self {
        EtcdTestBackend {
            cluster: Arc::new(EtcdCluster::start()),
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &Arc<EtcdCluster> {
        &self.cluster
    }
}

struct EtcdRaw(EtcdBackend);

#[async_trait]
impl RawAccess for EtcdRaw {
    async fn put_raw(&self, path: &str, bytes: &[u8]) -> Revision {
        let resp = self
            .0
            .etcd_client()
            .kv_client()
            .put(path, bytes, None)
            .await
            .expect("raw put");
        let rev = resp.header().map(|h| h.revision()).expect("header");
        Revision::from(u64::try_from(rev).expect("positive revision"))
    }
}

#[async_trait]
impl TestBackend for EtcdTestBackend {
    async fn client(&self) -> TestClient {
        let backend = EtcdBackend::connect(self.cluster.config(&unique_prefix()))
            .await
            .expect("connect to the test etcd");
        TestClient {
            client: Guarded::wrap(Arc::new(backend.clone()), self.cluster.clone()),
            raw: Arc::new(EtcdRaw(backend)),
        }
    }

    async fn isolated_client(&self) -> TestClient {
        let own = EtcdTestBackend {
            cluster: Arc::new(
                tokio::task::spawn_blocking(EtcdCluster::start)
                    .await
                    .expect("start a private etcd"),
            ),
        };
        own.client().await
    }
}

/// Runs `etcdctl`-free administration through the client: enables auth with a root user and
/// adds a user `reader` with read-only access to `readable_prefix`.
///
/// # Panics
/// If etcd refuses.
pub async fn enable_auth_with_reader(endpoint: &str, readable_prefix: &str) {
    use etcd_client::{Permission, PermissionType};
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("connect");
    c.user_add("root", "rootpw", None).await.expect("add root");
    c.role_add("root").await.ok();
    c.user_grant_role("root", "root").await.expect("grant root");
    c.role_add("reader").await.expect("add role");
    c.role_grant_permission(
        "reader",
        Permission::new(PermissionType::Read, readable_prefix).with_prefix(),
    )
    .await
    .expect("grant read");
    c.user_add("reader", "readerpw", None)
        .await
        .expect("add reader");
    c.user_grant_role("reader", "reader")
        .await
        .expect("grant reader");
    c.auth_enable().await.expect("enable auth");
}

/// The path of a member's data directory (for tests that inspect it).
pub fn data_dir(member: &EtcdMember) -> &Path {
    &member.spec.data_dir
}
