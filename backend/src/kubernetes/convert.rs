//! Conversions between the API server's answers and kvsync's: errors and resources.

use kube::api::{ApiResource, GroupVersionKind};
use kube::core::Status;
use kvsync_model::{KindInfo, ResourceKey, Revision};

use crate::error::Error;

/// Maps an API status onto the crate's kinds; `at` is the resourceVersion the request asked
/// for, which a `410 Gone` names as compacted.
pub(super) fn status_err(s: &Status, key: Option<&ResourceKey>, at: Option<&Revision>) -> Error {
    let message = if s.message.is_empty() {
        s.reason.clone()
    } else {
        s.message.clone()
    };
    match (s.code, key) {
        (404, Some(k)) => Error::NotFound { key: k.clone() },
        (409, Some(k)) if s.reason == "AlreadyExists" => Error::AlreadyExists { key: k.clone() },
        (410, _) => match at {
            Some(at) => Error::Compacted {
                requested: at.clone(),
                compacted: None,
            },
            // A continue token of a list that expired: list again from the start.
            None => Error::Unavailable {
                message: format!("kubernetes: {message} (410 Gone): list again"),
                source: Some(Box::new(s.clone())),
            },
        },
        (401 | 403, _) => Error::Unauthorized { message },
        // Throttled (API priority and fairness, max-in-flight): wait as long as the server
        // asks (details.retryAfterSeconds, which it also sends as Retry-After; 1 s if absent).
        (429, _) => {
            let secs = s
                .details
                .as_ref()
                .map_or(0, |d| d.retry_after_seconds)
                .max(1);
            Error::Unavailable {
                message: format!("kubernetes: {message} (429)"),
                source: Some(Box::new(crate::error::RetryAfter::new(
                    std::time::Duration::from_secs(u64::from(secs)),
                    message,
                ))),
            }
        }
        (400 | 422, _) => Error::Invalid {
            field: "object".into(),
            reason: format!("the API server refused it: {message}"),
        },
        // A server error that says when to come back: a read at a resourceVersion the
        // server has not reached yet (504 "Too large resource version", after a switch to a
        // server whose cache lags behind), a server shutting down. Retried after that long,
        // from the same resourceVersion: not a relist.
        (code, _)
            if code >= 500
                && s.details
                    .as_ref()
                    .is_some_and(|d| d.retry_after_seconds > 0) =>
        {
            let secs = s.details.as_ref().map_or(1, |d| d.retry_after_seconds);
            Error::Unavailable {
                message: format!("kubernetes: {message} ({code})"),
                source: Some(Box::new(crate::error::RetryAfter::new(
                    std::time::Duration::from_secs(u64::from(secs)),
                    message,
                ))),
            }
        }
        (code, _) => Error::Unavailable {
            message: format!("kubernetes: {message} ({code})"),
            source: Some(Box::new(s.clone())),
        },
    }
}

/// What a refused write into a namespace says about the namespace itself, if anything: a
/// `404` naming the namespace (it does not exist: not the object's NotFound), or a `403`
/// because it is being deleted (not a question of permissions).
pub(super) fn namespace_err(e: &kube::Error, namespace: Option<&str>) -> Option<Error> {
    let (kube::Error::Api(s), Some(ns)) = (e, namespace) else {
        return None;
    };
    let names_namespace = s.details.as_ref().is_some_and(|d| d.kind == "namespaces")
        || s.message
            .contains(&format!("namespaces \"{ns}\" not found"));
    match s.code {
        404 if names_namespace => Some(Error::Invalid {
            field: "namespace".into(),
            reason: format!("the namespace {ns:?} does not exist"),
        }),
        403 if s.message.contains("being terminated")
            || s.details
                .as_ref()
                .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")) =>
        {
            Some(Error::Invalid {
                field: "namespace".into(),
                reason: format!("the namespace {ns:?} is being deleted"),
            })
        }
        _ => None,
    }
}

/// Maps a kube error onto the crate's kinds (see [`status_err`]).
pub(super) fn map_err(e: kube::Error, key: Option<&ResourceKey>, at: Option<&Revision>) -> Error {
    match e {
        kube::Error::Api(s) => status_err(&s, key, at),
        kube::Error::SerdeError(e) => Error::Parse {
            raw_key: key.map(ToString::to_string).unwrap_or_default(),
            raw_value: Vec::new(),
            source: Box::new(e),
        },
        other => Error::Unavailable {
            message: format!("kubernetes: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

pub(super) fn api_resource(info: &KindInfo) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&info.group, &info.version, &info.kind),
        &info.plural,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str, details: serde_json::Value) -> Status {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "code": code, "reason": reason, "message": "Too many requests, please try again later.",
            "details": details,
        }))
        .expect("a status")
    }

    #[test]
    fn a_429_is_retryable_and_carries_the_servers_retry_after() {
        let e = status_err(
            &status(
                429,
                "TooManyRequests",
                serde_json::json!({"retryAfterSeconds": 4}),
            ),
            None,
            None,
        );
        assert!(e.is_retryable(), "{e}");
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(4)));
        let e = status_err(
            &status(429, "TooManyRequests", serde_json::json!({})),
            None,
            None,
        );
        assert_eq!(
            e.retry_after(),
            Some(std::time::Duration::from_secs(1)),
            "a second when the server names no time"
        );
    }

    #[test]
    fn a_missing_or_terminating_namespace_is_named() {
        let missing = kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({
                "code": 404, "reason": "NotFound", "message": "namespaces \"x\" not found",
                "details": {"name": "x", "kind": "namespaces"},
            }))
            .expect("a status"),
        ));
        let e = namespace_err(&missing, Some("x")).expect("named");
        assert!(e.to_string().contains("does not exist"), "{e}");
        let terminating = kube::Error::Api(Box::new(
            serde_json::from_value(serde_json::json!({
                "code": 403, "reason": "Forbidden",
                "message": "ippools \"p\" is forbidden: unable to create new content in namespace x because it is being terminated",
                "details": {"name": "p", "kind": "ippools", "causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]},
            }))
            .expect("a status"),
        ));
        let e = namespace_err(&terminating, Some("x")).expect("named");
        assert!(e.to_string().contains("being deleted"), "{e}");
        assert!(namespace_err(&missing, None).is_none(), "cluster-scoped");
    }
}
