//! Typed CRUD from a service: a small HTTP API (axum) over one of your own kinds, stored in
//! SQLite through the typed `Api`, with the revision as the `ETag` and `If-Match` as the
//! precondition.
//!
//! | request | answers |
//! |---|---|
//! | `POST /tenants` `{"name": .., "spec": {..}}` | 201 + `ETag`; 409 if it exists; 422 naming the field that failed validation |
//! | `GET /tenants` | 200, `{"revision": .., "items": [..]}` |
//! | `GET /tenants/{name}` | 200 + `ETag`; 404 |
//! | `PUT /tenants/{name}` `{..spec..}` | 200 + new `ETag`; with `If-Match`, 412 when it is stale; 404; 422 |
//! | `DELETE /tenants/{name}` | 204; with `If-Match`, 412 when it is stale; 404 |
//!
//! `cargo run -p kvsync-tests --example service` serves on 127.0.0.1:8080 with the database
//! `kvsync-service.db` until Ctrl-C; `--check` serves on a free loopback port with a temporary
//! database, sends a few requests, checks every answer, and exits (`scripts/test` runs this).

use std::sync::Arc;

use axum::Json as Body;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kvsync_backend::sqlite::{SqliteBackend, SqliteConfig};
use kvsync_backend::{Api, Client, Error};
use kvsync_model::{DeleteOptions, KVPair, Registry, Resource, Revision, Validate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A tenant of the platform: the kind this service offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema, Resource)]
#[resource(group = "platform.example.com", kind = "Tenant", plural = "tenants")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Tenant {
    /// Who to call: an e-mail address.
    owner: String,
    /// How many projects the tenant may have (at most 100).
    #[serde(default)]
    max_projects: u32,
}

impl Validate for Tenant {
    fn validate(&self) -> kvsync_model::Result<()> {
        if !self.owner.contains('@') {
            return Err(kvsync_model::Error::invalid(
                "spec.owner",
                format!("{:?} is not an e-mail address", self.owner),
            ));
        }
        if self.max_projects > 100 {
            return Err(kvsync_model::Error::invalid(
                "spec.maxProjects",
                "must be at most 100",
            ));
        }
        Ok(())
    }
}

/// What `POST /tenants` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    spec: Tenant,
}

/// An error answer: the status and a JSON body naming what was wrong.
struct Problem(StatusCode, Value);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.0, Body(self.1)).into_response()
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound { .. } => Problem(StatusCode::NOT_FOUND, json!({"error": message})),
            Error::AlreadyExists { .. } => Problem(StatusCode::CONFLICT, json!({"error": message})),
            Error::Conflict { actual, .. } => Problem(
                StatusCode::PRECONDITION_FAILED,
                json!({"error": message, "currentRevision": actual.map(|r| r.to_string())}),
            ),
            Error::Invalid { field, reason } => Problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": message, "field": field, "reason": reason}),
            ),
            other if other.is_retryable() => {
                Problem(StatusCode::SERVICE_UNAVAILABLE, json!({"error": message}))
            }
            _ => Problem(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": message})),
        }
    }
}

/// The revision as a strong ETag: `"<revision>"`.
fn etag(kvp: &KVPair<Tenant>) -> HeaderValue {
    let rev = kvp
        .revision
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    HeaderValue::from_str(&format!("\"{rev}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// The revision an `If-Match` header asks for (`*` asks for none).
fn if_match(headers: &HeaderMap) -> Result<Option<Revision>, Problem> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(rev) if !rev.is_empty() => Ok(Some(Revision::from(rev))),
        _ => Err(Problem(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("If-Match must be a quoted revision, got {text:?}")}),
        )),
    }
}

/// One tenant, with its revision as the ETag.
fn one(status: StatusCode, kvp: KVPair<Tenant>) -> Response {
    let tag = etag(&kvp);
    let body = json!({
        "name": kvp.key.name,
        "revision": kvp.revision.map(|r| r.to_string()),
        "uid": kvp.uid,
        "spec": kvp.value,
    });
    let mut resp = (status, Body(body)).into_response();
    resp.headers_mut().insert(header::ETAG, tag);
    resp
}

async fn create(
    State(api): State<Api<Tenant>>,
    body: Result<Body<NewTenant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let Body(new) = body.map_err(|e| {
        Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": e.body_text()}),
        )
    })?;
    Ok(one(
        StatusCode::CREATED,
        api.create(&new.name, new.spec).await?,
    ))
}

async fn list(State(api): State<Api<Tenant>>) -> Result<Response, Problem> {
    let list = api.list().await?;
    let items: Vec<Value> = list
        .items
        .into_iter()
        .map(|kvp| json!({"name": kvp.key.name, "revision": kvp.revision.map(|r| r.to_string()), "spec": kvp.value}))
        .collect();
    Ok(Body(json!({"revision": list.revision.to_string(), "items": items})).into_response())
}

async fn read(
    State(api): State<Api<Tenant>>,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    Ok(one(StatusCode::OK, api.get(&name).await?))
}

async fn replace(
    State(api): State<Api<Tenant>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Body<Tenant>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let Body(spec) = body.map_err(|e| {
        Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": e.body_text()}),
        )
    })?;
    let mut kvp = KVPair::of(api.key(&name)?, spec);
    // With If-Match the update applies only at that revision; without, to whatever is there.
    kvp.revision = if_match(&headers)?;
    Ok(one(StatusCode::OK, api.update(kvp).await?))
}

async fn remove(
    State(api): State<Api<Tenant>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let mut opts = DeleteOptions::new();
    if let Some(rev) = if_match(&headers)? {
        opts = opts.with_revision(rev);
    }
    api.delete_with(&name, &opts).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The service's routes over `client`.
fn router(client: Arc<dyn Client>) -> Router {
    Router::new()
        .route("/tenants", get(list).post(create))
        .route("/tenants/{name}", get(read).put(replace).delete(remove))
        .with_state(Api::<Tenant>::all(client))
}

/// Sends a few requests and checks every answer: the contract in the table above.
fn check(addr: &str) {
    use kvsync_tests::http::request;
    let post = |body: Value| request(addr, "POST", "/tenants", &[], Some(&body));

    let created = post(json!({"name": "acme", "spec": {"owner": "ops@acme.example"}}));
    assert_eq!(created.code, 201, "{}", created.body);
    let tag = created.header("etag").expect("an ETag").to_owned();
    assert_eq!(
        tag,
        format!("\"{}\"", created.json()["revision"].as_str().unwrap())
    );

    let duplicate = post(json!({"name": "acme", "spec": {"owner": "ops@acme.example"}}));
    assert_eq!(duplicate.code, 409, "{}", duplicate.body);

    let invalid = post(json!({"name": "bad", "spec": {"owner": "nobody"}}));
    assert_eq!(invalid.code, 422, "{}", invalid.body);
    assert_eq!(invalid.json()["field"], "spec.owner");
    let bad_name = post(json!({"name": "Bad_Name", "spec": {"owner": "a@b.c"}}));
    assert_eq!(bad_name.code, 422, "{}", bad_name.body);
    assert_eq!(bad_name.json()["field"], "name");
    let unknown_field = post(json!({"name": "x", "spec": {"owner": "a@b.c", "colour": 1}}));
    assert_eq!(unknown_field.code, 422, "{}", unknown_field.body);

    let got = request(addr, "GET", "/tenants/acme", &[], None);
    assert_eq!(got.code, 200, "{}", got.body);
    assert_eq!(got.header("etag"), Some(tag.as_str()));
    assert_eq!(request(addr, "GET", "/tenants/nobody", &[], None).code, 404);

    let spec = json!({"owner": "sre@acme.example", "maxProjects": 5});
    let updated = request(
        addr,
        "PUT",
        "/tenants/acme",
        &[("If-Match", &tag)],
        Some(&spec),
    );
    assert_eq!(updated.code, 200, "{}", updated.body);
    let new_tag = updated.header("etag").expect("an ETag").to_owned();
    assert_ne!(new_tag, tag);
    assert_eq!(updated.json()["spec"]["maxProjects"], 5);

    // The old ETag is stale now: 412, and nothing changes.
    let stale = request(
        addr,
        "PUT",
        "/tenants/acme",
        &[("If-Match", &tag)],
        Some(&spec),
    );
    assert_eq!(stale.code, 412, "{}", stale.body);
    let too_many = json!({"owner": "sre@acme.example", "maxProjects": 1000});
    let invalid = request(
        addr,
        "PUT",
        "/tenants/acme",
        &[("If-Match", &new_tag)],
        Some(&too_many),
    );
    assert_eq!(invalid.code, 422, "{}", invalid.body);
    assert_eq!(invalid.json()["field"], "spec.maxProjects");
    assert_eq!(
        request(addr, "PUT", "/tenants/nobody", &[], Some(&spec)).code,
        404
    );

    let listed = request(addr, "GET", "/tenants", &[], None);
    assert_eq!(listed.code, 200);
    assert_eq!(listed.json()["items"].as_array().map(Vec::len), Some(1));

    let stale = request(addr, "DELETE", "/tenants/acme", &[("If-Match", &tag)], None);
    assert_eq!(stale.code, 412, "{}", stale.body);
    let deleted = request(
        addr,
        "DELETE",
        "/tenants/acme",
        &[("If-Match", &new_tag)],
        None,
    );
    assert_eq!(deleted.code, 204, "{}", deleted.body);
    assert_eq!(
        request(addr, "DELETE", "/tenants/acme", &[], None).code,
        404
    );
    println!("service check ok: 201, 409, 422, 200, 404, 412 and 204 as the table says");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let check_only = std::env::args().any(|a| a == "--check");
    let dir = tempfile::tempdir()?;
    let db = if check_only {
        dir.path().join("service.db")
    } else {
        "kvsync-service.db".into()
    };
    let registry = Registry::new().with::<Tenant>();
    let client: Arc<dyn Client> = Arc::new(SqliteBackend::open(SqliteConfig::new(db, registry))?);
    let bind = if check_only {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:8080"
    };
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?.to_string();
    let server = tokio::spawn(async move { axum::serve(listener, router(client)).await });
    if check_only {
        tokio::task::spawn_blocking(move || check(&addr)).await?;
        server.abort();
        return Ok(());
    }
    println!("serving tenants on http://{addr} (Ctrl-C to stop)");
    tokio::select! {
        r = server => r??,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
