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
