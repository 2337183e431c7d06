//! Lean decoding of what the API server sends for lists and watches.
//!
//! kvsync keeps of an object only its name, namespace, resourceVersion, uid and `spec`; the
//! spec stays the JSON text the server sent (a [`Json`] decoded only when a consumer looks at
//! it), as on etcd and SQLite. So list pages and watch events are decoded into the slim types
//! here, never into `DynamicObject` and its `serde_json::Value` tree: everything else
//! (managedFields, labels, annotations, status, ...) is skipped by the parser without being
//! built. Watch events are read line by line from the response body; each line's `type` and
//! `object` are found first (in whatever order they come), then the object is decoded by its
//! type.

use std::borrow::Cow;

use futures::stream::BoxStream;
use futures::{AsyncBufReadExt, StreamExt};
use kube::api::DynamicObject;
use kube::core::Status;
use kvsync_model::{Json, ResourceKey, Revision};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::convert::map_err;
use crate::error::{Error, Result};
use crate::kernel::Decoded;

/// The metadata kvsync reads of an object (every other field is skipped unbuilt).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SlimMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    /// Only the annotation a watch-list bookmark carries is read.
    #[serde(default)]
    pub annotations: Option<SlimAnnotations>,
}

/// The one annotation kvsync reads: `k8s.io/initial-events-end` on a watch-list's bookmark.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SlimAnnotations {
    #[serde(rename = "k8s.io/initial-events-end", default)]
    pub initial_events_end: Option<String>,
}

/// An object as kvsync reads it: metadata and the spec's JSON text.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SlimObject {
    #[serde(default)]
    pub metadata: SlimMeta,
    #[serde(default)]
    pub spec: Option<Box<RawValue>>,
}

impl SlimObject {
    /// The object of a single-object request (get, create, patch), which kube decodes whole.
    pub fn from_dynamic(obj: DynamicObject) -> Self {
        let mut data = obj.data;
        let spec = data
            .get_mut("spec")
            .map(serde_json::Value::take)
            .filter(|s| !s.is_null())
            .and_then(|s| serde_json::value::to_raw_value(&s).ok());
        SlimObject {
            metadata: SlimMeta {
                name: obj.metadata.name,
                namespace: obj.metadata.namespace,
                resource_version: obj.metadata.resource_version,
                uid: obj.metadata.uid,
                annotations: None,
            },
            spec,
        }
    }

    /// Whether this is the bookmark that ends a watch-list's initial events.
    pub fn ends_initial_events(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.initial_events_end.as_deref())
            == Some("true")
    }

    /// The KVPair of this object of `kind`, or why it has none (an object without `spec`).
    pub fn decode(self, kind: &str, codec: &kvsync_model::PathCodec) -> Decoded {
        let meta = self.metadata;
        let name = meta.name.unwrap_or_default();
        let key = match meta.namespace {
            Some(ns) => ResourceKey::namespaced(kind, ns, name),
            None => ResourceKey::cluster(kind, name),
        };
        let revision = meta.resource_version.map(Revision::from);
        let Some(spec) = self.spec else {
            let raw_value = serde_json::json!({
                "metadata": {
                    "name": key.name,
                    "namespace": key.namespace,
                    "resourceVersion": revision.as_ref().map(ToString::to_string),
                    "uid": meta.uid,
                },
            })
            .to_string()
            .into_bytes();
            return Err(Box::new(kvsync_model::ParseFailure {
                raw_key: codec.to_path(&key).unwrap_or_else(|_| key.to_string()),
                raw_value,
                key: Some(key),
                revision,
                reason: "the object has no spec".into(),
            }));
        };
        Ok(kvsync_model::KVPair {
            key,
            value: Json::from_raw(spec),
            revision,
            create_revision: None,
            uid: meta.uid,
            ttl: None,
        })
    }
}

/// A list page: its metadata and items.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SlimList {
    #[serde(default)]
    pub metadata: SlimListMeta,
    #[serde(default)]
    pub items: Vec<SlimObject>,
}

/// A list's metadata: the snapshot's resourceVersion and the next page's token.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SlimListMeta {
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default, rename = "continue")]
    pub continue_: Option<String>,
}

/// One event of a watch stream.
#[derive(Debug)]
pub(super) enum SlimEvent {
    Added(SlimObject),
    Modified(SlimObject),
    Deleted(SlimObject),
    Bookmark(SlimObject),
    Error(Box<Status>),
}

/// A watch line before its object is decoded: `type` and `object` in either order.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    object: &'a RawValue,
}

fn parse_error(line: &str, e: serde_json::Error) -> Error {
    Error::Parse {
        raw_key: "watch event".into(),
        raw_value: line.as_bytes().to_vec(),
        source: Box::new(e),
    }
}

/// Decodes one line of a watch stream.
///
/// # Errors
/// [`Error::Parse`] for a line that is not a watch event (nor a bare Status, which is the
/// event's error).
pub(super) fn parse_event(line: &str) -> Result<SlimEvent> {
    let parsed: Line<'_> = match serde_json::from_str(line) {
        Ok(l) => l,
        Err(e) => {
            // A bare Status instead of an event: the server's error.
            return match serde_json::from_str::<Status>(line) {
                Ok(s) if s.code != 0 => Ok(SlimEvent::Error(Box::new(s))),
                _ => Err(parse_error(line, e)),
            };
        }
    };
    let object = parsed.object.get();
    let obj = || serde_json::from_str::<SlimObject>(object).map_err(|e| parse_error(line, e));
    Ok(match parsed.kind.as_ref() {
        "ADDED" => SlimEvent::Added(obj()?),
        "MODIFIED" => SlimEvent::Modified(obj()?),
        "DELETED" => SlimEvent::Deleted(obj()?),
        "BOOKMARK" => SlimEvent::Bookmark(obj()?),
        "ERROR" => SlimEvent::Error(Box::new(
            serde_json::from_str::<Status>(object).map_err(|e| parse_error(line, e))?,
        )),
        other => {
            return Err(Error::Parse {
                raw_key: "watch event".into(),
                raw_value: line.as_bytes().to_vec(),
                source: format!("unknown watch event type {other:?}").into(),
            });
        }
    })
}

/// A watch stream's events.
pub(super) type SlimStream = BoxStream<'static, Result<SlimEvent>>;

/// Sends a watch request and reads its events line by line. The stream ends when the server
/// ends the response (or the connection ends mid-way, which is the same to a watch that
/// resumes from the last resourceVersion).
///
/// # Errors
/// kube's error when the request itself fails (for the caller to classify).
pub(super) async fn watch_events(
    client: &kube::Client,
    mut request: http::Request<Vec<u8>>,
) -> kube::Result<SlimStream> {
    // Watches are not compressed: see kube's `request_events` (multi-member gzip).
    request.headers_mut().insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    let body = client.request_stream(request).await?;
    // One line buffer for the whole stream (not a String an event).
    let state = (Box::pin(body), String::new());
    Ok(
        futures::stream::unfold(state, |(mut body, mut line)| async move {
            loop {
                line.clear();
                match body.read_line(&mut line).await {
                    // The end, or a connection that ended mid-way: the watch resumes.
                    Ok(0) => return None,
                    Err(e) => {
                        tracing::debug!(error = %e, "a watch stream ended with an error");
                        return None;
                    }
                    Ok(_) if line.trim().is_empty() => {}
                    Ok(_) => {
                        let event = parse_event(line.trim_end());
                        return Some((event, (body, line)));
                    }
                }
            }
        })
        .boxed(),
    )
}

/// Reads a list page with one request, decoded into the slim types.
pub(super) async fn list_page(
    client: &kube::Client,
    request: http::Request<Vec<u8>>,
) -> Result<SlimList> {
    let text = client
        .request_text(request)
        .await
        .map_err(|e| map_err(e, None, None))?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        raw_key: "list page".into(),
        raw_value: text.get(..256).unwrap_or(&text).as_bytes().to_vec(),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_keeps_its_spec_text_and_skips_the_rest() {
        let text = r#"{"apiVersion":"kvsync.dev/v1","kind":"IPPool","metadata":{"name":"a","resourceVersion":"7","uid":"u1","managedFields":[{"manager":"kvsync","fieldsV1":{"f:spec":{}}}],"labels":{"x":"y"}},"spec":{"cidr": "10.0.0.0/16","n":1.0},"status":{"ok":true}}"#;
        let o: SlimObject = serde_json::from_str(text).unwrap();
        let codec = kvsync_model::PathCodec::with_registry(kvsync_model::demo::registry());
        let kvp = o.decode("IPPool", &codec).unwrap();
        assert_eq!(kvp.key, ResourceKey::cluster("IPPool", "a"));
        assert_eq!(kvp.revision, Some(Revision::from("7")));
        assert_eq!(kvp.uid.as_deref(), Some("u1"));
        assert_eq!(
            kvp.value.json_text(),
            Some(r#"{"cidr": "10.0.0.0/16","n":1.0}"#)
        );
    }

    #[test]
    fn an_object_without_spec_is_a_parse_failure_naming_its_key() {
        let o: SlimObject = serde_json::from_str(
            r#"{"metadata":{"name":"a","namespace":"ns","resourceVersion":"3"}}"#,
        )
        .unwrap();
        let f = o
            .decode(
                "NetworkPolicy",
                &kvsync_model::PathCodec::with_registry(kvsync_model::demo::registry()),
            )
            .unwrap_err();
        assert_eq!(
            f.key,
            Some(ResourceKey::namespaced("NetworkPolicy", "ns", "a"))
        );
        assert_eq!(f.revision, Some(Revision::from("3")));
        assert!(f.reason.contains("no spec"));
        assert!(String::from_utf8_lossy(&f.raw_value).contains("\"name\":\"a\""));
    }

    #[test]
    fn watch_lines_decode_whatever_the_field_order() {
        for line in [
            r#"{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"},"spec":{}}}"#,
            r#"{"object":{"metadata":{"name":"a","resourceVersion":"5"},"spec":{}},"type":"ADDED"}"#,
        ] {
            match parse_event(line).unwrap() {
                SlimEvent::Added(o) => {
                    assert_eq!(o.metadata.resource_version.as_deref(), Some("5"));
                    assert_eq!(o.spec.unwrap().get(), "{}");
                }
                other => panic!("{other:?}"),
            }
        }
        let end = r#"{"type":"BOOKMARK","object":{"kind":"IPPool","metadata":{"resourceVersion":"9","annotations":{"k8s.io/initial-events-end":"true","other":"x"}}}}"#;
        match parse_event(end).unwrap() {
            SlimEvent::Bookmark(b) => assert!(b.ends_initial_events()),
            other => panic!("{other:?}"),
        }
        let gone = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}}"#;
        match parse_event(gone).unwrap() {
            SlimEvent::Error(s) => assert_eq!(s.code, 410),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_watch_lines_are_errors_not_panics() {
        for line in [
            "garbage",
            r#"{"type":"ADDED"}"#,
            r#"{"type":"ADDED","object":[1]}"#,
            r#"{"type":"SOMETHING","object":{}}"#,
            r#"{"type":"ERROR","object":{"code":"x"}}"#,
        ] {
            assert!(
                matches!(parse_event(line), Err(Error::Parse { .. })),
                "{line}"
            );
        }
    }
}
