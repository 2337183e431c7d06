//! The API server double itself, at the HTTP level: status bodies, pagination, watches.

use kvsync_model::Registry;
use kvsync_tests::kube_double::ApiServerDouble;
use serde_json::{Value, json};

/// One HTTP/1.1 request; returns the status code and the body text (chunks left in place).
fn http(url: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let answer = kvsync_tests::http::request(
        addr,
        method,
        path,
        &[("Authorization", "Bearer test-token")],
        body,
    );
    (answer.code, answer.body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn pool(name: &str) -> Value {
    json!({"apiVersion": "kvsync.dev/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": "10.0.0.0/16"}})
}

const POOLS: &str = "/apis/kvsync.dev/v1/ippools";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_bodies_follow_the_api_conventions() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let (code, body) = http(&url, "POST", POOLS, Some(&pool("a")));
        assert_eq!(code, 201, "{body}");
        let created = json_of(&body);
        assert!(created["metadata"]["uid"].is_string());
        let rv = created["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_owned();

        let (code, body) = http(&url, "POST", POOLS, Some(&pool("a")));
        let status = json_of(&body);
        assert_eq!(
            (code, status["kind"].as_str(), status["reason"].as_str()),
            (409, Some("Status"), Some("AlreadyExists"))
        );
        assert_eq!(status["code"], 409);

        let (code, body) = http(&url, "POST", POOLS, Some(&pool("Bad_Name")));
        assert_eq!(
            (code, json_of(&body)["reason"].as_str()),
            (422, Some("Invalid"))
        );

        let (code, body) = http(&url, "GET", &format!("{POOLS}/missing"), None);
        assert_eq!(
            (code, json_of(&body)["reason"].as_str()),
            (404, Some("NotFound"))
        );

        let mut stale = pool("a");
        stale["metadata"]["resourceVersion"] = json!("1");
        let (code, body) = http(&url, "PUT", &format!("{POOLS}/a"), Some(&stale));
        assert_eq!(
            (code, json_of(&body)["reason"].as_str()),
            (409, Some("Conflict"))
        );
        let mut fresh = pool("a");
        fresh["metadata"]["resourceVersion"] = json!(rv);
        let (code, body) = http(&url, "PUT", &format!("{POOLS}/a"), Some(&fresh));
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            json_of(&body)["metadata"]["uid"],
            created["metadata"]["uid"],
            "uid kept"
        );

        let pre = json!({"preconditions": {"resourceVersion": rv}});
        let (code, _) = http(&url, "DELETE", &format!("{POOLS}/a"), Some(&pre));
        assert_eq!(code, 409, "stale precondition");
        let wrong_uid = json!({"preconditions": {"uid": "not-the-uid"}});
        let (code, body) = http(&url, "DELETE", &format!("{POOLS}/a"), Some(&wrong_uid));
        assert_eq!(code, 409, "uid precondition: {body}");
        assert!(body.contains("UID in precondition"), "{body}");
        let (code, body) = http(&url, "DELETE", &format!("{POOLS}/a"), None);
        assert_eq!(code, 200);
        // A real API server answers a completed delete of a custom resource with a Status
        // naming the object (details.kind is the resource), not with the object.
        let status = json_of(&body);
        assert_eq!(status["kind"], "Status", "{body}");
        assert_eq!(status["status"], "Success");
        assert_eq!(status["details"]["name"], "a");
        assert_eq!(status["details"]["group"], "kvsync.dev");
        assert_eq!(status["details"]["kind"], "ippools");
        assert_eq!(status["details"]["uid"], created["metadata"]["uid"]);
        assert!(status.get("spec").is_none(), "no object in the answer");

        // While finalizers hold an object, the delete answers 202 with the object, marked.
        let mut held = pool("held");
        held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
        let (code, _) = http(&url, "POST", POOLS, Some(&held));
        assert_eq!(code, 201);
        let (code, body) = http(&url, "DELETE", &format!("{POOLS}/held"), None);
        assert_eq!(code, 202, "{body}");
        assert!(json_of(&body)["metadata"]["deletionTimestamp"].is_string());
        let (code, _) = http(&url, "GET", &format!("{POOLS}/held"), None);
        assert_eq!(code, 200, "still there while finalizers hold it");
    })
    .await
    .expect("requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_over_one_snapshot_and_old_watches_get_410() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 3).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        for i in 0..5 {
            assert_eq!(
                http(&url, "POST", POOLS, Some(&pool(&format!("p{i}")))).0,
                201
            );
        }
        let (_, body) = http(&url, "GET", &format!("{POOLS}?limit=2"), None);
        let page = json_of(&body);
        let token = page["metadata"]["continue"]
            .as_str()
            .expect("continue")
            .to_owned();
        let rv = page["metadata"]["resourceVersion"].clone();
        assert_eq!(page["metadata"]["remainingItemCount"], 3);
        // A write between pages does not change the snapshot.
        assert_eq!(http(&url, "POST", POOLS, Some(&pool("late"))).0, 201);
        let mut names: Vec<String> = page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        let mut token = Some(token);
        while let Some(t) = token {
            let (_, body) = http(&url, "GET", &format!("{POOLS}?limit=2&continue={t}"), None);
            let page = json_of(&body);
            assert_eq!(
                page["metadata"]["resourceVersion"], rv,
                "every page is of one snapshot"
            );
            names.extend(page["items"].as_array().expect("items").iter().map(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            }));
            token = page["metadata"]["continue"].as_str().map(str::to_owned);
        }
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);

        // Only the last 3 events are kept: a watch from the first revision is too old.
        let (code, body) = http(
            &url,
            "GET",
            &format!("{POOLS}?watch=1&resourceVersion=1001"),
            None,
        );
        assert_eq!(code, 200);
        assert!(
            body.contains("\"type\":\"ERROR\"")
                && body.contains("\"code\":410")
                && body.contains("Expired"),
            "{body}"
        );
    })
    .await
    .expect("requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stream_added_modified_deleted_and_bookmarks() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let (_, body) = http(&url, "POST", POOLS, Some(&pool("a")));
        let rv = json_of(&body)["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_owned();
        let (_, _) = http(&url, "PUT", &format!("{POOLS}/a"), Some(&pool("a")));
        let (_, _) = http(&url, "DELETE", &format!("{POOLS}/a"), None);
        let before: u64 = rv.parse::<u64>().expect("numeric") - 1;
        let (code, body) = http(
            &url,
            "GET",
            &format!(
                "{POOLS}?watch=1&resourceVersion={before}&allowWatchBookmarks=true&timeoutSeconds=1"
            ),
            None,
        );
        assert_eq!(code, 200);
        let types: Vec<&str> = ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
            .into_iter()
            .filter(|t| body.contains(&format!("\"type\":\"{t}\"")))
            .collect();
        assert_eq!(
            types,
            ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"],
            "{body}"
        );
    })
    .await
    .expect("requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lists_send_the_state_then_an_initial_events_end_bookmark() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        for name in ["a", "b"] {
            assert_eq!(http(&url, "POST", POOLS, Some(&pool(name))).0, 201);
        }
        let (code, body) = http(&url, "GET", &format!("{POOLS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"), None);
        assert_eq!((code, json_of(&body)["reason"].as_str()), (422, Some("Invalid")), "needs resourceVersionMatch");
        let (code, body) = http(
            &url,
            "GET",
            &format!("{POOLS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&resourceVersion=0&timeoutSeconds=1"),
            None,
        );
        assert_eq!(code, 200);
        assert_eq!(body.matches("\"type\":\"ADDED\"").count(), 2, "{body}");
        assert!(body.contains("k8s.io/initial-events-end"), "{body}");
    })
    .await
    .expect("requests");
}

fn ippool_crd() -> Value {
    let registry = Registry::with_demo_kinds();
    let info = registry.kind("IPPool").expect("IPPool");
    kvsync_model::crd::crd(info)
}

/// With the kind's CRD installed, a write is pruned of fields its schema does not know and
/// given the defaults it declares; without it nothing is pruned. Whole floats lose their
/// fraction either way, as the server's Go JSON round trip gives them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_pruned_defaulted_and_their_numbers_normalised() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let obj = |name: &str| {
            json!({"apiVersion": "kvsync.dev/v1", "kind": "IPPool", "metadata": {"name": name},
                "spec": {"cidr": "10.0.0.0/16", "blockSize": 26.0, "extra": {"n": 1e3, "f": 1.5}},
                "unknownTop": 1})
        };
        let (code, body) = http(&url, "POST", POOLS, Some(&obj("raw")));
        assert_eq!(code, 201, "{body}");
        let raw = json_of(&body);
        assert_eq!(
            raw["spec"],
            json!({"cidr": "10.0.0.0/16", "blockSize": 26, "extra": {"n": 1000, "f": 1.5}}),
            "no CRD: nothing pruned, numbers normalised"
        );
        assert!(body.contains("\"blockSize\":26,"), "{body}");

        let (code, body) = http(
            &url,
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            Some(&ippool_crd()),
        );
        assert_eq!(code, 201, "{body}");
        let (code, body) = http(&url, "POST", POOLS, Some(&obj("pruned")));
        assert_eq!(code, 201, "{body}");
        let pruned = json_of(&body);
        assert_eq!(
            pruned["spec"],
            json!({"cidr": "10.0.0.0/16", "blockSize": 26, "disabled": false, "natOutgoing": false}),
            "unknown fields pruned, defaults set"
        );
        assert!(pruned.get("unknownTop").is_none(), "{pruned}");
        // A replace goes through the same.
        let mut changed = obj("pruned");
        changed["spec"] = json!({"cidr": "10.0.0.0/16", "disabled": true, "bogus": 1});
        let (code, body) = http(&url, "PUT", &format!("{POOLS}/pruned"), Some(&changed));
        assert_eq!(code, 200, "{body}");
        let patched = json_of(&body);
        assert_eq!(patched["spec"]["disabled"], true);
        assert!(patched["spec"].get("bogus").is_none(), "{patched}");
        assert_eq!(patched["spec"]["natOutgoing"], false, "defaulted again");
        assert_eq!(patched["metadata"]["generation"], 2, "the spec changed");
    })
    .await
    .expect("requests");
}

/// A read at a resourceVersion the server has not reached: `504` with the
/// ResourceVersionTooLarge cause and retryAfterSeconds, for lists and watches alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_ahead_of_the_server_answer_504_too_large_resource_version() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let (_, body) = http(&url, "GET", POOLS, None);
        let rv: u64 = json_of(&body)["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("rv");
        for path in [
            format!("{POOLS}?resourceVersion={}", rv + 50),
            format!("{POOLS}?watch=1&resourceVersion={}", rv + 50),
        ] {
            let (code, body) = http(&url, "GET", &path, None);
            let status = json_of(&body);
            assert_eq!(code, 504, "{path}: {body}");
            assert_eq!(status["reason"], "Timeout");
            assert_eq!(
                status["details"]["causes"][0]["reason"],
                "ResourceVersionTooLarge"
            );
            assert_eq!(status["details"]["retryAfterSeconds"], 1);
            assert!(
                status["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Too large resource version")),
                "{body}"
            );
        }
        let (code, _) = http(&url, "GET", &format!("{POOLS}?resourceVersion={rv}"), None);
        assert_eq!(code, 200, "a resourceVersion reached is served");
    })
    .await
    .expect("requests");
}

/// Per-verb 403s, worded as the RBAC authorizer words them; other verbs still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_verbs_answer_403_and_the_others_are_served() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    double.forbid("list", "ippools");
    double.forbid("delete", "ippools");
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let (code, _) = http(&url, "POST", POOLS, Some(&pool("a")));
        assert_eq!(code, 201);
        let (code, body) = http(&url, "GET", POOLS, None);
        let status = json_of(&body);
        assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
        assert!(
            status["message"].as_str().is_some_and(|m| m.contains(
                "cannot list resource \"ippools\" in API group \"kvsync.dev\" at the cluster scope"
            )),
            "{body}"
        );
        let (code, _) = http(&url, "DELETE", &format!("{POOLS}/a"), None);
        assert_eq!(code, 403);
        let (code, _) = http(&url, "GET", &format!("{POOLS}/a"), None);
        assert_eq!(
            code, 200,
            "get is still allowed, and the object is still there"
        );
        let (code, _) = http(
            &url,
            "GET",
            &format!("{POOLS}?watch=1&timeoutSeconds=1"),
            None,
        );
        assert_eq!(code, 200, "watch is still allowed");
    })
    .await
    .expect("requests");
}

/// A deleted namespace is Terminating for a while: creates in it are refused with the
/// NamespaceTerminating cause; then its objects are deleted (DELETED events) and it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_namespace_terminates_before_it_is_gone() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    double.set_namespace_finalize_after(std::time::Duration::from_millis(500));
    let url = double.url();
    tokio::task::spawn_blocking(move || {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}});
        assert_eq!(http(&url, "POST", "/api/v1/namespaces", Some(&ns)).0, 201);
        let policies = "/apis/kvsync.dev/v1/namespaces/team/networkpolicies";
        let policy = |name: &str| {
            json!({"apiVersion": "kvsync.dev/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": "team"}, "spec": {"selector": "all()"}})
        };
        let (code, body) = http(&url, "POST", policies, Some(&policy("p1")));
        assert_eq!(code, 201, "{body}");
        let rv = json_of(&body)["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_owned();

        let (code, body) = http(&url, "DELETE", "/api/v1/namespaces/team", None);
        assert_eq!(code, 200, "{body}");
        assert_eq!(json_of(&body)["status"]["phase"], "Terminating");
        let (code, body) = http(&url, "POST", policies, Some(&policy("p2")));
        let status = json_of(&body);
        assert_eq!(code, 403, "{body}");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "NamespaceTerminating"
        );
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains("because it is being terminated")),
            "{body}"
        );

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while http(&url, "GET", "/api/v1/namespaces/team", None).0 != 404 {
            assert!(
                std::time::Instant::now() < deadline,
                "the namespace never went"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(http(&url, "GET", &format!("{policies}/p1"), None).0, 404);
        let (_, body) = http(
            &url,
            "GET",
            &format!("{policies}?watch=1&resourceVersion={rv}&timeoutSeconds=1"),
            None,
        );
        assert!(body.contains("\"type\":\"DELETED\""), "{body}");
    })
    .await
    .expect("requests");
}

/// A continue token of a snapshot the history has moved past answers 410 Expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_tokens_expire_with_the_history() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    let token = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            for n in ["a", "b", "c"] {
                assert_eq!(http(&url, "POST", POOLS, Some(&pool(n))).0, 201);
            }
            let (_, body) = http(&url, "GET", &format!("{POOLS}?limit=1"), None);
            json_of(&body)["metadata"]["continue"]
                .as_str()
                .expect("a continue token")
                .to_owned()
        })
        .await
        .expect("requests")
    };
    double.expire_history();
    tokio::task::spawn_blocking(move || {
        let (code, body) = http(
            &url,
            "GET",
            &format!("{POOLS}?limit=1&continue={token}"),
            None,
        );
        assert_eq!(
            (code, json_of(&body)["reason"].as_str()),
            (410, Some("Expired"))
        );
    })
    .await
    .expect("requests");
}

/// Bookmarks come after the interval without events, and as a watch times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_come_at_the_interval_and_before_the_timeout() {
    let double = ApiServerDouble::start(&Registry::with_demo_kinds(), 100).await;
    let url = double.url();
    let rv_of = |body: &str| -> u64 {
        json_of(body)["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("rv")
    };
    let (code, body) = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let (_, body) = http(&url, "POST", POOLS, Some(&pool("a")));
            let rv = rv_of(&body);
            // The default interval is a minute: within a 2 s watch, only the bookmark at the
            // start (nothing else to send) and the one as it times out come.
            http(
                &url,
                "GET",
                &format!(
                    "{POOLS}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
                ),
                None,
            )
        })
        .await
        .expect("requests")
    };
    assert_eq!(code, 200);
    assert_eq!(body.matches("\"BOOKMARK\"").count(), 2, "{body}");
    double.set_bookmark_interval(std::time::Duration::from_millis(200));
    let body = tokio::task::spawn_blocking(move || {
        let (_, body) = http(&url, "GET", POOLS, None);
        let rv = rv_of(&body);
        http(
            &url,
            "GET",
            &format!(
                "{POOLS}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
            ),
            None,
        )
        .1
    })
    .await
    .expect("requests");
    assert!(body.matches("\"BOOKMARK\"").count() >= 4, "{body}");
}
