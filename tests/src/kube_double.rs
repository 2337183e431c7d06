//! A test double of the Kubernetes API server: the REST semantics the kvsync backend relies
//! on, served over real HTTP on 127.0.0.1 (following the Kubernetes "API Concepts" document),
//! for tests only.
//!
//! It serves custom resources under `/apis/<group>/<version>/[namespaces/<ns>/]<plural>[/<name>]`:
//! create (POST, 201; 409 AlreadyExists), get (404 NotFound), replace (PUT; 409 Conflict on a
//! stale `metadata.resourceVersion`), delete (with `preconditions.resourceVersion` and
//! `preconditions.uid`; answers a `Status` with `status: Success` and details naming the
//! object once it is gone, and `202 Accepted` with the object while finalizers hold it), list (with `limit`/`continue` over one snapshot, `fieldSelector=metadata.name=`),
//! and watch (`?watch=1&resourceVersion=R&allowWatchBookmarks=true`) streaming ADDED,
//! MODIFIED, DELETED, BOOKMARK and ERROR events as JSON lines; PATCH with JSON patches and
//! JSON merge patches (a changed `metadata.resourceVersion` is a precondition: 409). The
//! built-in coordination.k8s.io/v1 `leases` are served the same way. Every write bumps one global
//! resourceVersion; objects get a uid on create. Only the last `window` events are kept: a
//! watch from an older resourceVersion gets an ERROR event with a `410 Gone` (Expired) Status,
//! as the real server does. A bearer token can be required (401 without it).
//!
//! Checked against the API concepts document and the apiserver sources
//! (`staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go`):
//! - a completed DELETE answers `200` with `Status{status: Success, details: {name, group,
//!   kind: <resource>, uid}}`, not the object (the bug a real server showed); with finalizers
//!   the object stays, marked with a `deletionTimestamp`, and comes back with `202 Accepted`;
//! - preconditions on DELETE (resourceVersion, uid) fail with `409 Conflict`, reason
//!   `Conflict`, "Precondition failed: ..." messages as the server words them;
//! - lists carry `metadata.resourceVersion` and `metadata.continue` (empty on the last page);
//!   an expired continue token (used once already, or of a snapshot the history moved past:
//!   [`ApiServerDouble::expire_history`]) and a watch from before the window answer `410`,
//!   reason `Expired`, the latter as an `ERROR` watch event carrying the Status;
//! - numbers come back as the server's Go JSON round trip gives them: a whole float loses
//!   its fraction (`1.0` -> `1`, `1e3` -> `1000`);
//! - with the kind's CRD installed (POSTed to the double), every write is pruned of the
//!   fields its structural schema does not know (unless `x-kubernetes-preserve-unknown-fields`)
//!   and given the `default`s it declares (`registry/customresource`'s pruning and
//!   `structuraldefaulting`);
//! - a list or watch at a resourceVersion the server has not reached answers `504`, reason
//!   `Timeout`, cause `ResourceVersionTooLarge`, `retryAfterSeconds: 1`
//!   (`storage.NewTooLargeResourceVersionError`);
//! - per-verb `403 Forbidden` ([`ApiServerDouble::forbid`]) worded as the RBAC authorizer
//!   words it, with details naming the object;
//! - a deleted namespace stays `Terminating` (deletionTimestamp, `status.phase`) for a while
//!   ([`ApiServerDouble::set_namespace_finalize_after`]); creates in it meanwhile get `403`
//!   with a `NamespaceTerminating` cause (the NamespaceLifecycle admission plugin), then its
//!   objects are deleted (DELETED events) and it is gone;
//! - bookmarks: at the start of a watch without events to send, at the end of a watch-list's
//!   initial events, after [`ApiServerDouble::set_bookmark_interval`] without events (60 s
//!   by default, as the watch cache's one-minute frequency) and as the watch times out;
//! - managedFields: one `Update` entry a field manager (`fieldManager`, else `unknown`) with
//!   the spec's fields, `generation` bumped when the spec changes.
//!
//! What it does **not** model (a test that depends on one of these needs a real cluster,
//! `KVSYNC_TEST_KUBECONFIG`):
//! - `details` (name, group, kind) in most failure Statuses (404, 409, 422): only `code`,
//!   `reason` and `message` are sent;
//! - schema validation (types, patterns, required fields, `422 Invalid` with field
//!   `causes`): the backend validates before it sends; defaulting of `null` values, and
//!   pruning of `metadata` beyond what the backend sends;
//! - graceful deletion, managedFields beyond one Update entry a manager (no ownership moves),
//!   strategic merge patches and server-side apply (`415`), label selectors and field
//!   selectors other than `metadata.name`; the `copy` and `move` ops of JSON patches;
//! - `resourceVersionMatch=Exact`, reads of the past at a resourceVersion, the time a
//!   continue token lives (about five minutes on a real server, by compaction);
//! - the watch cache's own timing: no jitter on bookmarks; a watch ends after its
//!   `timeoutSeconds` (or [`ApiServerDouble::close_watches_after`]), not after a randomized
//!   request timeout; a too-large resourceVersion is refused at once, not after waiting
//!   three seconds for the cache to catch up;
//! - authorization beyond one bearer token and [`ApiServerDouble::forbid`] (no RBAC
//!   objects), admission other than namespace lifecycle; rate limits only as asked for
//!   ([`ApiServerDouble::throttle`]: 429 with Retry-After); API priority and fairness.

// Handlers return the error response itself; boxing it would only add noise to a test server.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kvsync_model::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;

/// `(plural, namespace, name)`.
type ObjKey = (String, Option<String>, String);

struct Event {
    rv: u64,
    plural: String,
    namespace: Option<String>,
    kind: &'static str,
    object: Value,
}

struct Inner {
    /// Requests served, by method.
    requests: HashMap<String, u64>,
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    events: VecDeque<Event>,
    /// The oldest resourceVersion a watch may start from.
    oldest: u64,
    window: usize,
    continues: HashMap<String, Vec<Value>>,
    next_continue: u64,
    /// plural -> (group, version, kind, namespaced)
    kinds: HashMap<String, (String, String, String, bool)>,
    token: Option<String>,
    /// Bumped to end every open watch with a 410.
    expire_epoch: u64,
    /// Namespaces and CRDs: `(resource, name)` -> object.
    cluster_objects: BTreeMap<(String, String), Value>,
    /// Whether objects may only be created in namespaces created first.
    strict_namespaces: bool,
    /// The longest a watch stays open, whatever its `timeoutSeconds` (the real server also
    /// ends watches after a time of its own choosing).
    watch_cap: Option<Duration>,
    /// Bumped to make every open watch go silent (no events, no bookmarks, never closed).
    stall_epoch: u64,
    /// How watch-list requests (`sendInitialEvents`) are refused, if they are.
    refuse_watch_list: Option<(u16, String)>,
    /// How many watch-list requests came.
    watch_list_requests: u64,
    /// The next this many requests are throttled (429) with this retryAfterSeconds.
    throttle: (u64, u32),
    /// `(verb, plural)` pairs answered with `403 Forbidden`.
    forbidden: HashSet<(String, String)>,
    /// How long a watch goes without events before a bookmark (the API server: about a
    /// minute).
    bookmark_interval: Duration,
    /// How long a deleted namespace stays `Terminating` before its objects are deleted and
    /// it is gone.
    namespace_finalize_after: Duration,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running double, stopped when dropped.
pub struct ApiServerDouble {
    addr: SocketAddr,
    shared: Shared,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServerDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    })
}

fn reply(code: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    // As the API server's response writer does for a Status that says when to come back.
    if let Some(secs) = body
        .pointer("/details/retryAfterSeconds")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        && let Ok(v) = secs.to_string().parse()
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn fail(code: u16, reason: &str, message: impl Into<String>) -> Response {
    reply(code, &status(code, reason, message))
}

fn dns_subdomain(s: &str) -> bool {
    kvsync_model::validation::validate_name(s).is_ok()
}

impl ApiServerDouble {
    /// Starts a double serving the CRDs of `registry`, keeping the last `window` events.
    ///
    /// # Panics
    /// If it cannot bind a loopback port.
    pub async fn start(registry: &Registry, window: usize) -> Self {
        let kinds = registry
            .kinds()
            .into_iter()
            .map(|k| {
                (
                    k.plural.clone(),
                    (
                        k.group.clone(),
                        k.version.clone(),
                        k.kind.clone(),
                        k.namespaced,
                    ),
                )
            })
            .collect::<HashMap<_, _>>();
        // Built in, as on every API server: the Leases of locks and elections.
        let mut kinds = kinds;
        kinds.insert(
            "leases".to_owned(),
            (
                "coordination.k8s.io".to_owned(),
                "v1".to_owned(),
                "Lease".to_owned(),
                true,
            ),
        );
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                requests: HashMap::new(),
                rv: 1000,
                objects: BTreeMap::new(),
                events: VecDeque::new(),
                oldest: 1000,
                window: window.max(1),
                continues: HashMap::new(),
                next_continue: 0,
                kinds,
                token: None,
                expire_epoch: 0,
                cluster_objects: BTreeMap::new(),
                strict_namespaces: false,
                watch_cap: None,
                stall_epoch: 0,
                refuse_watch_list: None,
                watch_list_requests: 0,
                throttle: (0, 0),
                forbidden: HashSet::new(),
                bookmark_interval: Duration::from_secs(60),
                namespace_finalize_after: Duration::from_millis(200),
            })),
            changed: watch::Sender::new(0),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let double = ApiServerDouble {
            addr,
            shared,
            dir,
            task,
        };
        double.write_kubeconfig("kubeconfig", "test-token");
        double
    }

    /// How many requests of `method` (`GET`, `POST`, ...) the double has served.
    pub fn requests(&self, method: &str) -> u64 {
        self.shared
            .lock()
            .requests
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn write_kubeconfig(&self, file: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {url}\n\
             users:\n- name: tester\n  user:\n    token: {token}\ncontexts:\n- name: double\n  context:\n    \
             cluster: double\n    user: tester\n    namespace: default\ncurrent-context: double\n",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A kubeconfig pointing at the double, with the token `test-token`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubeconfig with another token.
    pub fn kubeconfig_with_token(&self, token: &str) -> PathBuf {
        self.write_kubeconfig(&format!("kubeconfig-{token}"), token)
    }

    /// Requires `Authorization: Bearer <token>` from now on.
    pub fn require_token(&self, token: &str) {
        self.shared.lock().token = Some(token.to_owned());
    }

    /// From now on, objects may only be created in namespaces created first (`POST
    /// /api/v1/namespaces`), as on a real server (404 otherwise); deleting a namespace deletes
    /// its objects.
    pub fn require_namespaces(&self) {
        self.shared.lock().strict_namespaces = true;
    }

    /// Waits (up to `limit`) until no namespace is left terminating: the deleted ones are
    /// gone, with their objects. Whether none is left.
    pub async fn namespaces_finalized(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let terminating = self
                .shared
                .lock()
                .cluster_objects
                .iter()
                .any(|((r, _), o)| {
                    r == "namespaces" && o.pointer("/metadata/deletionTimestamp").is_some()
                });
            if !terminating {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The names of the namespaces created through the API and not deleted.
    pub fn namespaces(&self) -> Vec<String> {
        self.cluster_objects("namespaces")
    }

    /// The names of the CRDs created through the API.
    pub fn crds(&self) -> Vec<String> {
        self.cluster_objects("customresourcedefinitions")
    }

    fn cluster_objects(&self, resource: &str) -> Vec<String> {
        self.shared
            .lock()
            .cluster_objects
            .keys()
            .filter(|(r, _)| r == resource)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// How many custom resources are stored.
    pub fn object_count(&self) -> usize {
        self.shared.lock().objects.len()
    }

    /// Ends every watch (with a normal end of its stream) at most `cap` after it opened, as
    /// the real server ends a watch after its `timeoutSeconds` or its own request timeout.
    pub fn close_watches_after(&self, cap: Duration) {
        self.shared.lock().watch_cap = Some(cap);
    }

    /// Refuses watch-list requests as a server that cannot serve them does: `500` with
    /// "RequestWatchProgress is disabled" (etcd 3.4 under the API server, as a real server
    /// answered), or `422` with the validation message of a server without the WatchList
    /// feature ("sendInitialEvents is forbidden for watch unless the WatchList feature gate is
    /// enabled").
    pub fn refuse_watch_list(&self, code: u16) {
        let message = match code {
            500 => "etcdserver: RequestWatchProgress is disabled".to_owned(),
            _ => "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled".to_owned(),
        };
        self.shared.lock().refuse_watch_list = Some((code, message));
    }

    /// Answers the next `n` requests with `429 Too Many Requests`, as API priority and
    /// fairness does: a `Retry-After` header and `details.retryAfterSeconds`.
    pub fn throttle(&self, n: u64, retry_after_seconds: u32) {
        self.shared.lock().throttle = (n, retry_after_seconds);
    }

    /// Answers requests of `verb` (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`) on `plural` with `403 Forbidden`, worded as the RBAC authorizer words it.
    pub fn forbid(&self, verb: &str, plural: &str) {
        self.shared
            .lock()
            .forbidden
            .insert((verb.to_owned(), plural.to_owned()));
    }

    /// Sends a bookmark to a watch after `interval` without events (60 s by default, as the
    /// API server's watch cache does about every minute).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// Keeps a deleted namespace `Terminating` for `d` (200 ms by default) before its
    /// objects are deleted and it is gone; creates in it meanwhile are refused as the
    /// NamespaceLifecycle admission plugin refuses them.
    pub fn set_namespace_finalize_after(&self, d: Duration) {
        self.shared.lock().namespace_finalize_after = d;
    }

    /// How many watch-list requests (`sendInitialEvents=true`) were made.
    pub fn watch_list_requests(&self) -> u64 {
        self.shared.lock().watch_list_requests
    }

    /// Makes every watch open now go silent for good: no events, no bookmarks, no end (a
    /// connection that died without a reset). Watches opened later are served normally.
    pub fn stall_watches(&self) {
        let rv = {
            let mut inner = self.shared.lock();
            inner.stall_epoch += 1;
            inner.rv
        };
        self.shared.changed.send_replace(rv);
    }

    /// Ends every open watch with `410 Gone` and forgets the history, as an API server whose
    /// watch cache moved on does.
    pub fn expire_history(&self) {
        let rv = {
            let mut inner = self.shared.lock();
            inner.events.clear();
            inner.oldest = inner.rv;
            inner.expire_epoch += 1;
            // Continue tokens name a compacted snapshot now: 410 on their next use.
            inner.continues.clear();
            inner.rv
        };
        self.shared.changed.send_replace(rv);
    }

    /// Stores many cluster-scoped objects of `plural` at once, each with its spec, as if
    /// created one by one (for benchmarks that need a large starting state fast).
    pub fn put_objects(&self, plural: &str, objects: impl IntoIterator<Item = (String, Value)>) {
        let mut inner = self.shared.lock();
        let Some((group, version, kind, _)) = inner.kinds.get(plural).cloned() else {
            return;
        };
        for (name, spec) in objects {
            inner.rv += 1;
            let rv = inner.rv;
            let mut obj = json!({
                "apiVersion": format!("{group}/{version}"), "kind": kind,
                "metadata": {"name": name, "uid": uuid(), "resourceVersion": rv.to_string(),
                    "creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1},
                "spec": spec,
            });
            set_managed_fields(&mut obj, "kvsync");
            inner
                .objects
                .insert((plural.to_owned(), None, name), obj.clone());
            record(&mut inner, rv, plural, None, "ADDED", obj);
        }
        let rv = inner.rv;
        drop(inner);
        self.shared.changed.send_replace(rv);
    }

    /// Stores `n` IPPools `pool-000000`... with an ~80-byte spec each: the benchmarks' data
    /// set (see [`ApiServerDouble::put_objects`]).
    pub fn put_ippools(&self, n: usize) {
        self.put_objects(
            "ippools",
            (0..n).map(|i| {
                (
                    format!("pool-{i:06}"),
                    json!({
                        "cidr": format!("10.{}.{}.0/24", i / 256 % 256, i % 256),
                        "blockSize": 26, "natOutgoing": true, "disabled": false
                    }),
                )
            }),
        );
    }

    /// Stores an object whose `spec` is missing, as a foreign writer could.
    pub fn put_without_spec(&self, plural: &str, namespace: Option<&str>, name: &str) -> u64 {
        let mut inner = self.shared.lock();
        let Some((group, version, kind, _)) = inner.kinds.get(plural).cloned() else {
            return 0;
        };
        inner.rv += 1;
        let rv = inner.rv;
        let mut meta = json!({"name": name, "uid": uuid(), "resourceVersion": rv.to_string()});
        if let Some(ns) = namespace {
            meta["namespace"] = json!(ns);
        }
        let obj =
            json!({"apiVersion": format!("{group}/{version}"), "kind": kind, "metadata": meta});
        let key = (
            plural.to_owned(),
            namespace.map(str::to_owned),
            name.to_owned(),
        );
        let existed = inner.objects.insert(key, obj.clone()).is_some();
        record(
            &mut inner,
            rv,
            plural,
            namespace,
            if existed { "MODIFIED" } else { "ADDED" },
            obj,
        );
        drop(inner);
        self.shared.changed.send_replace(rv);
        rv
    }
}

fn uuid() -> String {
    let mut rng = rand::rng();
    let n: u128 = rand::Rng::random(&mut rng);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn record(
    inner: &mut Inner,
    rv: u64,
    plural: &str,
    namespace: Option<&str>,
    kind: &'static str,
    object: Value,
) {
    inner.events.push_back(Event {
        rv,
        plural: plural.to_owned(),
        namespace: namespace.map(str::to_owned),
        kind,
        object,
    });
    while inner.events.len() > inner.window {
        if let Some(e) = inner.events.pop_front() {
            inner.oldest = e.rv;
        }
    }
}

struct Target {
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    group: String,
    version: String,
    kind: String,
    /// The request's `fieldManager` (managedFields name it).
    manager: String,
}

fn parse_target(inner: &Inner, path: &str) -> Result<Target, Response> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(fail(
                404,
                "NotFound",
                format!("the server could not find {path}"),
            ));
        }
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => {
            return Err(fail(
                404,
                "NotFound",
                format!("the server could not find {path}"),
            ));
        }
    };
    let Some((g, v, kind, namespaced)) = inner.kinds.get(plural).cloned() else {
        return Err(fail(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({plural})"),
        ));
    };
    if g != group || v != version {
        return Err(fail(
            404,
            "NotFound",
            format!("no {plural} in {group}/{version}"),
        ));
    }
    if !namespaced && namespace.is_some() {
        return Err(fail(404, "NotFound", format!("{plural} is cluster-scoped")));
    }
    if namespaced && namespace.is_none() && name.is_some() {
        return Err(fail(404, "NotFound", format!("{plural} is namespaced")));
    }
    Ok(Target {
        plural: plural.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        group: g,
        version: v,
        kind,
        manager: "unknown".to_owned(),
    })
}

fn query(req: &Request) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (k.to_owned(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(shared): State<Shared>, req: Request) -> Response {
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = req.uri().path().to_owned();
    {
        let mut inner = shared.lock();
        *inner.requests.entry(method.to_string()).or_default() += 1;
        if inner.throttle.0 > 0 {
            inner.throttle.0 -= 1;
            let secs = inner.throttle.1;
            let mut body = status(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
            );
            body["details"] = json!({"retryAfterSeconds": secs});
            return reply(429, &body);
        }
        if let Some(token) = &inner.token {
            let auth = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            if auth != format!("Bearer {token}") {
                return fail(401, "Unauthorized", "Unauthorized");
            }
        }
    }
    let body = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => return fail(400, "BadRequest", e.to_string()),
    };
    if let Some(resp) = cluster_object(&shared, &method, &path, &body) {
        return resp;
    }
    let mut target = match parse_target(&shared.lock(), &path) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    if let Some(m) = q.get("fieldManager") {
        target.manager.clone_from(m);
    }
    let watching = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    let verb = match (&method, target.name.is_some()) {
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "",
    };
    if shared
        .lock()
        .forbidden
        .contains(&(verb.to_owned(), target.plural.clone()))
    {
        return forbidden(&target, verb);
    }
    let json_body = || -> Result<Value, Response> {
        serde_json::from_slice(&body)
            .map_err(|e| fail(400, "BadRequest", format!("invalid JSON: {e}")))
    };
    match (method, target.name.is_some()) {
        (Method::GET, false) if q.get("watch").is_some_and(|w| w == "1" || w == "true") => {
            watch_stream(shared, target, &q)
        }
        (Method::GET, false) => list(&shared, &target, &q),
        (Method::POST, false) => match json_body() {
            Ok(b) => create(&shared, &target, b),
            Err(r) => r,
        },
        (Method::GET, true) => get(&shared, &target),
        (Method::PUT, true) => match json_body() {
            Ok(b) => replace(&shared, &target, b),
            Err(r) => r,
        },
        (Method::PATCH, true) => match json_body() {
            Ok(b) => patch(&shared, &target, &content_type, &b),
            Err(r) => r,
        },
        (Method::DELETE, true) => {
            let opts = if body.is_empty() {
                json!({})
            } else {
                json_body().unwrap_or(json!({}))
            };
            delete(&shared, &target, &opts)
        }
        (m, _) => fail(405, "MethodNotAllowed", format!("{m} is not allowed here")),
    }
}

/// Namespaces (`/api/v1/namespaces[/name]`) and CRDs
/// (`/apis/apiextensions.k8s.io/v1/customresourcedefinitions[/name]`): create, get, replace
/// and delete, enough to prepare a cluster. `None` for any other path.
fn cluster_object(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Option<Response> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (resource, name) = match segs.as_slice() {
        ["api", "v1", "namespaces"] => ("namespaces", None),
        ["api", "v1", "namespaces", name] => ("namespaces", Some(*name)),
        [
            "apis",
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
        ] => ("customresourcedefinitions", None),
        [
            "apis",
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            name,
        ] => ("customresourcedefinitions", Some(*name)),
        _ => return None,
    };
    let parse = || -> Result<Value, Response> {
        serde_json::from_slice(body)
            .map_err(|e| fail(400, "BadRequest", format!("invalid JSON: {e}")))
    };
    let mut inner = shared.lock();
    let not_found = |name: &str| fail(404, "NotFound", format!("{resource} \"{name}\" not found"));
    let resp = match (method, name) {
        (&Method::POST, None) => match parse() {
            Err(r) => r,
            Ok(mut obj) => {
                let name = obj
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let key = (resource.to_owned(), name.clone());
                if !dns_subdomain(&name) {
                    fail(422, "Invalid", format!("{resource} \"{name}\" is invalid"))
                } else if inner.cluster_objects.contains_key(&key) {
                    fail(
                        409,
                        "AlreadyExists",
                        format!("{resource} \"{name}\" already exists"),
                    )
                } else {
                    obj["metadata"]["uid"] = json!(uuid());
                    reply(201, &store_cluster_object(&mut inner, key, obj))
                }
            }
        },
        (&Method::GET, Some(name)) => {
            match inner
                .cluster_objects
                .get(&(resource.to_owned(), name.to_owned()))
            {
                Some(obj) => reply(200, obj),
                None => not_found(name),
            }
        }
        (&Method::PUT, Some(name)) => match parse() {
            Err(r) => r,
            Ok(mut obj) => {
                let key = (resource.to_owned(), name.to_owned());
                match inner.cluster_objects.get(&key) {
                    None => not_found(name),
                    Some(current)
                        if obj.pointer("/metadata/resourceVersion")
                            != current.pointer("/metadata/resourceVersion") =>
                    {
                        fail(
                            409,
                            "Conflict",
                            format!("{resource} \"{name}\" has been modified"),
                        )
                    }
                    Some(current) => {
                        obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                        reply(200, &store_cluster_object(&mut inner, key, obj))
                    }
                }
            }
        },
        (&Method::DELETE, Some(_)) if resource == "namespaces" => {
            let name = name.unwrap_or_default().to_owned();
            let key = (resource.to_owned(), name.clone());
            let after = inner.namespace_finalize_after;
            match inner.cluster_objects.get_mut(&key) {
                None => not_found(&name),
                Some(obj) => {
                    // Terminating first: the namespace controller deletes its objects,
                    // then the namespace goes.
                    if obj.pointer("/metadata/deletionTimestamp").is_none() {
                        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                        obj["status"] = json!({"phase": "Terminating"});
                        let shared = shared.clone();
                        let (key, name) = (key.clone(), name.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(after).await;
                            let mut inner = shared.lock();
                            delete_namespace_objects(&mut inner, &name);
                            inner.cluster_objects.remove(&key);
                            let rv = inner.rv;
                            drop(inner);
                            shared.changed.send_replace(rv);
                        });
                    }
                    reply(200, obj)
                }
            }
        }
        (&Method::DELETE, Some(name)) => {
            match inner
                .cluster_objects
                .remove(&(resource.to_owned(), name.to_owned()))
            {
                None => not_found(name),
                Some(obj) => reply(200, &obj),
            }
        }
        (m, _) => fail(405, "MethodNotAllowed", format!("{m} is not allowed here")),
    };
    Some(resp)
}

/// Stores a written namespace or CRD under a new resourceVersion and returns it.
fn store_cluster_object(inner: &mut Inner, key: (String, String), mut obj: Value) -> Value {
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.cluster_objects.insert(key, obj.clone());
    obj
}

/// Deletes every custom resource in a deleted namespace, each with its DELETED event.
fn delete_namespace_objects(inner: &mut Inner, namespace: &str) {
    let keys: Vec<ObjKey> = inner
        .objects
        .keys()
        .filter(|(_, ns, _)| ns.as_deref() == Some(namespace))
        .cloned()
        .collect();
    for key in keys {
        let Some(mut gone) = inner.objects.remove(&key) else {
            continue;
        };
        inner.rv += 1;
        let rv = inner.rv;
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        record(inner, rv, &key.0, Some(namespace), "DELETED", gone);
    }
}

fn key_of(t: &Target, name: &str) -> ObjKey {
    (t.plural.clone(), t.namespace.clone(), name.to_owned())
}

fn check_object(t: &Target, obj: &Value, name: &str) -> Result<(), Response> {
    if obj.get("kind").and_then(Value::as_str) != Some(t.kind.as_str()) {
        return Err(fail(400, "BadRequest", format!("kind must be {}", t.kind)));
    }
    if obj.get("apiVersion").and_then(Value::as_str)
        != Some(format!("{}/{}", t.group, t.version).as_str())
    {
        return Err(fail(400, "BadRequest", "apiVersion does not match the URL"));
    }
    if !dns_subdomain(name) {
        return Err(fail(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of ...",
                t.kind
            ),
        ));
    }
    if let Some(ns) = obj.pointer("/metadata/namespace").and_then(Value::as_str)
        && Some(ns) != t.namespace.as_deref()
    {
        return Err(fail(
            400,
            "BadRequest",
            "the namespace of the object does not match the URL",
        ));
    }
    Ok(())
}

fn create(shared: &Shared, t: &Target, mut obj: Value) -> Response {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if let Err(r) = check_object(t, &obj, &name) {
        return r;
    }
    let mut inner = shared.lock();
    if let Some(ns) = &t.namespace
        && inner.strict_namespaces
        && !inner
            .cluster_objects
            .contains_key(&("namespaces".to_owned(), ns.clone()))
    {
        // As the API server words it, with details naming the namespace.
        let mut body = status(404, "NotFound", format!("namespaces \"{ns}\" not found"));
        body["details"] = json!({"name": ns, "kind": "namespaces"});
        return reply(404, &body);
    }
    if let Some(ns) = &t.namespace
        && inner
            .cluster_objects
            .get(&("namespaces".to_owned(), ns.clone()))
            .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some())
    {
        // The NamespaceLifecycle admission plugin's answer.
        let mut body = status(
            403,
            "Forbidden",
            format!(
                "{}.{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                t.plural, t.group
            ),
        );
        body["details"] = json!({
            "name": name, "group": t.group, "kind": t.plural,
            "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}],
        });
        return reply(403, &body);
    }
    let key = key_of(t, &name);
    if inner.objects.contains_key(&key) {
        return fail(
            409,
            "AlreadyExists",
            format!("{}.{} \"{name}\" already exists", t.plural, t.group),
        );
    }
    admit(&inner, t, &mut obj);
    inner.rv += 1;
    let rv = inner.rv;
    obj["metadata"]["uid"] = json!(uuid());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    obj["metadata"]["generation"] = json!(1);
    if let Some(ns) = &t.namespace {
        obj["metadata"]["namespace"] = json!(ns);
    }
    set_managed_fields(&mut obj, &t.manager);
    store(shared, inner, t, key, "ADDED", obj.clone());
    reply(201, &obj)
}

/// What an update keeps of the stored object (`current`) and changes, as the registry's
/// update does: uid and creationTimestamp stay, `generation` goes up when anything but
/// metadata changed, and the writer's managedFields entry is set.
fn carry_metadata(current: &Value, obj: &mut Value, manager: &str) {
    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
    obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    let generation = current["metadata"]["generation"].as_u64().unwrap_or(1);
    let changed = obj.get("spec") != current.get("spec");
    obj["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    if obj["metadata"].get("managedFields").is_none() {
        obj["metadata"]["managedFields"] = current["metadata"]["managedFields"].clone();
    }
    set_managed_fields(obj, manager);
}

/// The `fieldsV1` of a value: every field of an object, recursively (`f:<name>`), with `.`
/// for the object itself.
fn fields_v1(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            out.insert(".".into(), json!({}));
            for (k, v) in m {
                out.insert(format!("f:{k}"), fields_v1(v));
            }
            Value::Object(out)
        }
        _ => json!({}),
    }
}

/// Sets the `managedFields` entry of `manager` for an Update of the object's spec, as the
/// API server's field manager records it (one entry a manager and operation; the real server
/// also takes fields away from other managers, which is not modelled).
fn set_managed_fields(obj: &mut Value, manager: &str) {
    let entry = json!({
        "manager": manager,
        "operation": "Update",
        "apiVersion": obj["apiVersion"],
        "time": "2026-01-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": obj.get("spec").map(fields_v1).unwrap_or_else(|| json!({}))},
    });
    let mut entries: Vec<Value> = obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    entries.retain(|e| e["manager"] != manager || e["operation"] != "Update");
    entries.push(entry);
    obj["metadata"]["managedFields"] = Value::Array(entries);
}

/// `403 Forbidden` for `verb` on `t`, as the RBAC authorizer words it
/// (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`).
fn forbidden(t: &Target, verb: &str) -> Response {
    let user = "system:serviceaccount:kvsync:kvsync-test";
    let scope = match &t.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let name = t.name.clone().unwrap_or_default();
    let mut body = status(
        403,
        "Forbidden",
        format!(
            "{}.{} \"{name}\" is forbidden: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            t.plural, t.group, t.plural, t.group
        ),
    );
    body["details"] = json!({"name": name, "group": t.group, "kind": t.plural});
    reply(403, &body)
}

/// `504 Timeout` for a read at a resourceVersion the server has not reached, as the watch
/// cache answers after waiting for it (`storage.NewTooLargeResourceVersionError`).
fn too_large_resource_version(asked: u64, current: u64) -> Response {
    let mut body = status(
        504,
        "Timeout",
        format!("Timeout: Too large resource version: {asked}, current: {current}"),
    );
    body["details"] = json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    });
    reply(504, &body)
}

/// Numbers as the API server gives them back: it decodes a custom resource's JSON into Go
/// values (an integer when the text is one, else a float64) and encodes them again, so a
/// whole float comes back without its fraction (`1.0` -> `1`, `1e3` -> `1000`).
fn normalize_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 1e21
            {
                // Whole floats below 2^63 fit an integer exactly as Go prints them.
                #[allow(clippy::cast_possible_truncation)]
                if f.abs() < 9.2e18 {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

/// The structural schema of `t`'s kind at its version, when its CRD is installed.
fn schema_of(inner: &Inner, t: &Target) -> Option<Value> {
    let crd = inner.cluster_objects.get(&(
        "customresourcedefinitions".to_owned(),
        format!("{}.{}", t.plural, t.group),
    ))?;
    crd.pointer("/spec/versions")?
        .as_array()?
        .iter()
        .find(|v| v["name"] == t.version.as_str())?
        .pointer("/schema/openAPIV3Schema")
        .cloned()
}

/// Prunes the fields a structural schema does not know and sets the defaults it declares,
/// as the API server does to a custom resource on every write (and read): unknown fields go
/// unless `x-kubernetes-preserve-unknown-fields`; a missing property with a `default` gets
/// it; `additionalProperties` and `items` apply to every entry.
fn prune_and_default(v: &mut Value, schema: &Value) {
    match v {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                if !preserve {
                    map.retain(|k, _| props.contains_key(k));
                }
                for (k, sub) in props {
                    if !map.contains_key(k)
                        && let Some(d) = sub.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                    if let Some(field) = map.get_mut(k) {
                        prune_and_default(field, sub);
                    }
                }
            } else if let Some(sub) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for field in map.values_mut() {
                    prune_and_default(field, sub);
                }
            } else if !preserve && schema.get("type").and_then(Value::as_str) == Some("object") {
                // An object schema without properties keeps nothing, unless it preserves.
                if schema.get("additionalProperties").is_none() {
                    map.clear();
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for item in items {
                    prune_and_default(item, sub);
                }
            }
        }
        _ => {}
    }
}

/// What the API server does to a written custom resource before it stores it: numbers
/// normalised, then pruned and defaulted by its CRD's schema (when the CRD is installed).
/// `metadata` is left to the caller; the schema's `metadata: {type: object}` is not applied.
fn admit(inner: &Inner, t: &Target, obj: &mut Value) {
    normalize_numbers(obj);
    let Some(schema) = schema_of(inner, t) else {
        return;
    };
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    map.retain(|k, _| {
        matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
            || props.is_some_and(|p| p.contains_key(k))
    });
    for (k, field) in map.iter_mut() {
        if k == "metadata" {
            continue;
        }
        if let Some(sub) = props.and_then(|p| p.get(k)) {
            prune_and_default(field, sub);
        }
    }
}

/// Stores a written object, records its event and wakes the watches.
fn store(
    shared: &Shared,
    mut inner: std::sync::MutexGuard<'_, Inner>,
    t: &Target,
    key: ObjKey,
    kind: &'static str,
    obj: Value,
) {
    let rv = inner.rv;
    inner.objects.insert(key, obj.clone());
    record(&mut inner, rv, &t.plural, t.namespace.as_deref(), kind, obj);
    drop(inner);
    shared.changed.send_replace(rv);
}

/// `404 NotFound` for the object `name` of `t`, as the API server words it.
fn not_found(t: &Target, name: &str) -> Response {
    fail(
        404,
        "NotFound",
        format!("{}.{} \"{name}\" not found", t.plural, t.group),
    )
}

/// `409 Conflict` for a write with a stale resourceVersion, as the API server words it.
fn modified(t: &Target, name: &str) -> Response {
    fail(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            t.plural, t.group
        ),
    )
}

fn get(shared: &Shared, t: &Target) -> Response {
    let name = t.name.clone().unwrap_or_default();
    match shared.lock().objects.get(&key_of(t, &name)) {
        Some(o) => reply(200, o),
        None => not_found(t, &name),
    }
}

fn replace(shared: &Shared, t: &Target, mut obj: Value) -> Response {
    let name = t.name.clone().unwrap_or_default();
    if obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
        return fail(
            400,
            "BadRequest",
            "the name of the object does not match the URL",
        );
    }
    if let Err(r) = check_object(t, &obj, &name) {
        return r;
    }
    let mut inner = shared.lock();
    let key = key_of(t, &name);
    let Some(current) = inner.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    let given = obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let actual = current
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !given.is_empty() && given != actual {
        return modified(t, &name);
    }
    admit(&inner, t, &mut obj);
    inner.rv += 1;
    let rv = inner.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if let Some(ns) = &t.namespace {
        obj["metadata"]["namespace"] = json!(ns);
    }
    carry_metadata(&current, &mut obj, &t.manager);
    store(shared, inner, t, key, "MODIFIED", obj.clone());
    reply(200, &obj)
}

/// PATCH: a JSON patch (RFC 6902: add, replace, remove, test) or a JSON merge patch
/// (RFC 7386) applied to the stored object, as `staging/.../handlers/patch.go` applies them:
/// a patch that fails to apply answers `422`; the patched object's
/// `metadata.resourceVersion`, when the patch changed it, is a precondition (`409 Conflict`
/// when the object has moved on), as the registry's update checks it. Strategic merge
/// patches and server-side apply are not modelled (`415`).
fn patch(shared: &Shared, t: &Target, content_type: &str, body: &Value) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let mut inner = shared.lock();
    let key = key_of(t, &name);
    let Some(current) = inner.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    let patched = match mime {
        "application/json-patch+json" => json_patch(&current, body),
        "application/merge-patch+json" => {
            let mut obj = current.clone();
            merge_patch(&mut obj, body);
            Ok(obj)
        }
        other => {
            return fail(
                415,
                "UnsupportedMediaType",
                format!("the double does not model {other:?} patches"),
            );
        }
    };
    let mut obj = match patched {
        Ok(o) => o,
        Err(e) => return fail(422, "Invalid", e),
    };
    if obj.pointer("/metadata/resourceVersion") != current.pointer("/metadata/resourceVersion") {
        return modified(t, &name);
    }
    if obj.pointer("/metadata/name") != current.pointer("/metadata/name") {
        return fail(
            400,
            "BadRequest",
            "the name of the object cannot be patched",
        );
    }
    admit(&inner, t, &mut obj);
    inner.rv += 1;
    let rv = inner.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    carry_metadata(&current, &mut obj, &t.manager);
    store(shared, inner, t, key, "MODIFIED", obj.clone());
    reply(200, &obj)
}

/// The segments of a JSON pointer (RFC 6901).
fn pointer_segments(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {path:?}"));
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// Applies an RFC 6902 patch (add, replace, remove, test) to a copy of `doc`.
fn json_patch(doc: &Value, ops: &Value) -> Result<Value, String> {
    let mut doc = doc.clone();
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("an op without \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("an op without \"path\"")?;
        let mut segs = pointer_segments(path)?;
        let value = op.get("value").cloned();
        if kind == "test" {
            if doc.pointer(path) != value.as_ref() {
                return Err(format!("testing value {path} failed"));
            }
            continue;
        }
        let Some(last) = segs.pop() else {
            return Err("the whole document cannot be patched".into());
        };
        let parent_path: String = segs
            .iter()
            .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
            .collect();
        let parent = doc
            .pointer_mut(&parent_path)
            .ok_or_else(|| format!("doc is missing path: {path}"))?;
        match (kind, parent) {
            ("add", Value::Object(m)) => {
                m.insert(last, value.ok_or("add without a value")?);
            }
            ("replace", Value::Object(m)) if m.contains_key(&last) => {
                m.insert(last, value.ok_or("replace without a value")?);
            }
            ("remove", Value::Object(m)) if m.contains_key(&last) => {
                m.remove(&last);
            }
            ("add", Value::Array(a)) => {
                let v = value.ok_or("add without a value")?;
                if last == "-" {
                    a.push(v);
                } else {
                    let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                    if i > a.len() {
                        return Err(format!("index out of range in {path}"));
                    }
                    a.insert(i, v);
                }
            }
            ("replace" | "remove", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                if i >= a.len() {
                    return Err(format!("index out of range in {path}"));
                }
                if kind == "replace" {
                    a[i] = value.ok_or("replace without a value")?;
                } else {
                    a.remove(i);
                }
            }
            ("add" | "replace" | "remove", _) => {
                return Err(format!("doc is missing path: {path}"));
            }
            (other, _) => return Err(format!("the double does not model the {other:?} op")),
        }
    }
    Ok(doc)
}

/// Applies an RFC 7386 merge patch to `doc`.
fn merge_patch(doc: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = json!({});
    }
    if let Value::Object(d) = doc {
        for (k, v) in p {
            if v.is_null() {
                d.remove(k);
            } else {
                merge_patch(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn delete(shared: &Shared, t: &Target, opts: &Value) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let mut inner = shared.lock();
    let key = key_of(t, &name);
    let Some(current) = inner.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    // Preconditions, worded as the API server words their failures.
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        let Some(want) = opts
            .pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        let actual = current
            .pointer(&format!("/metadata/{field}"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if want != actual {
            return fail(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": Precondition failed: {label} in precondition: {want}, {label} in object meta: {actual}",
                    t.plural, t.group
                ),
            );
        }
    }
    let finalizers = current
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    inner.rv += 1;
    let rv = inner.rv;
    if finalizers {
        // Finalizers hold the object: it is marked for deletion (MODIFIED) and answered with
        // 202 Accepted and the object, as the API concepts document describes.
        let mut held = current;
        held["metadata"]["resourceVersion"] = json!(rv.to_string());
        if held.pointer("/metadata/deletionTimestamp").is_none() {
            held["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        inner.objects.insert(key, held.clone());
        record(
            &mut inner,
            rv,
            &t.plural,
            t.namespace.as_deref(),
            "MODIFIED",
            held.clone(),
        );
        drop(inner);
        shared.changed.send_replace(rv);
        return reply(202, &held);
    }
    inner.objects.remove(&key);
    let uid = current
        .pointer("/metadata/uid")
        .cloned()
        .unwrap_or(Value::Null);
    let mut gone = current;
    gone["metadata"]["resourceVersion"] = json!(rv.to_string());
    record(
        &mut inner,
        rv,
        &t.plural,
        t.namespace.as_deref(),
        "DELETED",
        gone,
    );
    drop(inner);
    shared.changed.send_replace(rv);
    // A custom resource's store does not return the deleted object: it answers with a
    // Status whose details name it (apiserver registry/generic/registry/store.go,
    // finalizeDelete; its `kind` is the resource, not the kind).
    reply(200, &deleted_status(&name, &t.group, &t.plural, uid))
}

/// What a real API server answers to a completed DELETE of a custom resource.
fn deleted_status(name: &str, group: &str, plural: &str, uid: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": group, "kind": plural, "uid": uid},
    })
}

impl Inner {
    /// The objects of `t` (and of the object named `field_name`, if given), in key order.
    fn matching(&self, t: &Target, field_name: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((p, ns, _), o)| {
                *p == t.plural && matches_target(t, ns.as_deref(), o, field_name)
            })
            .map(|(_, o)| o.clone())
            .collect()
    }
}

fn matches_target(
    t: &Target,
    namespace: Option<&str>,
    obj: &Value,
    field_name: Option<&str>,
) -> bool {
    (t.namespace.is_none() || t.namespace.as_deref() == namespace)
        && field_name
            .is_none_or(|n| obj.pointer("/metadata/name").and_then(Value::as_str) == Some(n))
}

fn field_name(q: &HashMap<String, String>) -> Option<String> {
    q.get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

fn list(shared: &Shared, t: &Target, q: &HashMap<String, String>) -> Response {
    let mut inner = shared.lock();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let fname = field_name(q);
    let (mut items, rv) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match inner.continues.remove(token) {
            Some(rest) => {
                let rv = token.split(':').nth(1).unwrap_or_default().to_owned();
                (rest, rv)
            }
            None => return fail(410, "Expired", "the provided continue parameter is too old"),
        },
        None => {
            // A list at a resourceVersion (not older than it): 504 when the server has not
            // reached it.
            if let Some(asked) = q
                .get("resourceVersion")
                .and_then(|r| r.parse::<u64>().ok())
                .filter(|r| *r > inner.rv)
            {
                return too_large_resource_version(asked, inner.rv);
            }
            let items = inner.matching(t, fname.as_deref());
            (items, inner.rv.to_string())
        }
    };
    let mut meta = json!({"resourceVersion": rv});
    if limit > 0 && items.len() > limit {
        let rest = items.split_off(limit);
        inner.next_continue += 1;
        let token = format!("c{}:{rv}", inner.next_continue);
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(rest.len());
        inner.continues.insert(token, rest);
    }
    reply(
        200,
        &json!({
            "apiVersion": format!("{}/{}", t.group, t.version),
            "kind": format!("{}List", t.kind),
            "metadata": meta,
            "items": items,
        }),
    )
}

fn line(kind: &str, object: &Value) -> Result<Bytes, Infallible> {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Ok(Bytes::from(s))
}

fn watch_stream(shared: Shared, t: Target, q: &HashMap<String, String>) -> Response {
    let from: Option<u64> = q
        .get("resourceVersion")
        .filter(|r| !r.is_empty() && *r != "0")
        .and_then(|r| r.parse().ok());
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let fname = field_name(q);
    let api_version = format!("{}/{}", t.group, t.version);
    let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    if initial_events
        && (q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") || !bookmarks)
    {
        return fail(
            422,
            "Invalid",
            "sendInitialEvents needs resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true",
        );
    }
    if initial_events {
        let mut inner = shared.lock();
        inner.watch_list_requests += 1;
        if let Some((code, message)) = inner.refuse_watch_list.clone() {
            let reason = if code == 500 {
                "InternalError"
            } else {
                "Invalid"
            };
            return fail(code, reason, message);
        }
    }
    let mut rx = shared.changed.subscribe();
    let (timeout, stall_epoch) = {
        let inner = shared.lock();
        let timeout = match (timeout, inner.watch_cap) {
            (Some(t), Some(c)) => Some(t.min(c)),
            (t, c) => t.or(c),
        };
        (timeout, inner.stall_epoch)
    };
    let (start, epoch, initial) = {
        let inner = shared.lock();
        match from {
            // A watch-list: the current state (as of at least `r`), then what follows.
            _ if initial_events => {
                let added = inner.matching(&t, fname.as_deref());
                (inner.rv, inner.expire_epoch, added)
            }
            Some(r) if r < inner.oldest => {
                let err = status(
                    410,
                    "Expired",
                    format!("too old resource version: {r} ({})", inner.oldest),
                );
                let body = Body::from_stream(futures::stream::iter([line("ERROR", &err)]));
                return (StatusCode::OK, body).into_response();
            }
            Some(r) if r > inner.rv => return too_large_resource_version(r, inner.rv),
            Some(r) => (r, inner.expire_epoch, Vec::new()),
            None => {
                // No resourceVersion: the current state as ADDED events, then what follows.
                let added = inner.matching(&t, fname.as_deref());
                (inner.rv, inner.expire_epoch, added)
            }
        }
    };
    let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
    rx.borrow_and_update();
    let stream = event_stream(
        shared,
        t,
        fname,
        api_version,
        start,
        (epoch, stall_epoch),
        bookmarks,
        deadline,
        initial,
        initial_events,
        rx,
    );
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

#[allow(clippy::too_many_arguments)]
fn event_stream(
    shared: Shared,
    t: Target,
    fname: Option<String>,
    api_version: String,
    start: u64,
    (epoch, stall_epoch): (u64, u64),
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
    initial: Vec<Value>,
    initial_events_end: bool,
    rx: watch::Receiver<u64>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    struct S {
        shared: Shared,
        t: Target,
        fname: Option<String>,
        api_version: String,
        after: u64,
        epoch: u64,
        stall_epoch: u64,
        bookmarks: bool,
        deadline: Option<tokio::time::Instant>,
        pending: VecDeque<Result<Bytes, Infallible>>,
        rx: watch::Receiver<u64>,
        done: bool,
    }
    let mut pending: VecDeque<_> = initial.iter().map(|o| line("ADDED", o)).collect();
    if initial_events_end {
        pending.push_back(line(
            "BOOKMARK",
            &json!({
                "kind": t.kind, "apiVersion": api_version,
                "metadata": {
                    "resourceVersion": start.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                }
            }),
        ));
    } else if pending.is_empty() && bookmarks {
        pending.push_back(line("BOOKMARK", &json!({"kind": t.kind, "apiVersion": api_version, "metadata": {"resourceVersion": start.to_string()}})));
    }
    let s = S {
        shared,
        t,
        fname,
        api_version,
        after: start,
        epoch,
        stall_epoch,
        bookmarks,
        deadline,
        pending,
        rx,
        done: false,
    };
    futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(Ok(first)) = s.pending.pop_front() {
                // What is ready goes out in one chunk (up to 64 KiB), as the API server
                // flushes only once its queue is empty, not after every event.
                let mut chunk = first.to_vec();
                while chunk.len() < 64 << 10 {
                    match s.pending.pop_front() {
                        Some(Ok(more)) => chunk.extend_from_slice(&more),
                        _ => break,
                    }
                }
                return Some((Ok(Bytes::from(chunk)), s));
            }
            if s.done {
                return None;
            }
            s.rx.borrow_and_update();
            if s.shared.lock().stall_epoch != s.stall_epoch {
                // Silent for good.
                futures::future::pending::<()>().await;
            }
            {
                let inner = s.shared.lock();
                if inner.expire_epoch != s.epoch || s.after < inner.oldest {
                    let err = status(
                        410,
                        "Expired",
                        format!("too old resource version: {} ({})", s.after, inner.oldest),
                    );
                    s.pending.push_back(line("ERROR", &err));
                    s.done = true;
                    continue;
                }
                let after = s.after;
                for e in inner.events.iter().filter(|e| e.rv > after) {
                    s.after = e.rv;
                    if e.plural == s.t.plural
                        && matches_target(
                            &s.t,
                            e.namespace.as_deref(),
                            &e.object,
                            s.fname.as_deref(),
                        )
                    {
                        s.pending.push_back(line(e.kind, &e.object));
                    }
                }
                if s.pending.is_empty() && s.bookmarks && inner.rv > s.after {
                    s.after = inner.rv;
                }
            }
            if !s.pending.is_empty() {
                continue;
            }
            // A bookmark after `bookmark_interval` without events, and one as the watch
            // times out (the watch cache sends one ahead of the end, so that the client
            // resumes from there).
            let interval = s.shared.lock().bookmark_interval;
            let next = tokio::time::Instant::now() + interval;
            let wake = s.deadline.map_or(next, |d| d.min(next));
            tokio::select! {
                _ = s.rx.changed() => {}
                () = tokio::time::sleep_until(wake) => {
                    if s.bookmarks {
                        let rv = s.shared.lock().rv.max(s.after);
                        s.after = rv;
                        s.pending.push_back(line("BOOKMARK", &json!({
                            "kind": s.t.kind, "apiVersion": s.api_version,
                            "metadata": {"resourceVersion": rv.to_string()}
                        })));
                    }
                }
            }
            if s.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                s.done = true;
            }
        }
    })
    .boxed()
}
