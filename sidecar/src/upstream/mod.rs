//! The request to one backend (or to the peer sidecar in front of it):
//! which client headers go on, the deadline until the answer's headers, and
//! how a failure is classed for the retry policy.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};

use crate::error::ApiError;
use crate::table::RouteTarget;
use crate::validate::Endpoint;

pub mod body;
pub mod client;

pub use body::Chunks;
pub use client::{Answer, HttpClient, Uris};

/// How a request to a backend failed, by what it means for a retry.
pub(crate) enum Failure {
    /// No connection was made: the upstream never saw the request.
    NotStarted(&'static str, ApiError),
    /// The request was sent, then the connection failed.
    MayHaveStarted(&'static str, ApiError),
    /// The deadline passed while the upstream may still be working on it.
    Slow(&'static str, ApiError),
}

/// How long to wait for the response headers: streams send them at once,
/// non-streamed answers only when the whole generation is done.
#[derive(Clone, Copy)]
pub(crate) enum Deadline {
    FirstByte(u64),
    Total(u64),
}

pub(crate) async fn send(
    target: &RouteTarget,
    endpoint: Endpoint,
    client_headers: &HeaderMap,
    // The peer sidecar to go through, and the signed hop headers for it.
    hop: Option<(&str, HeaderMap)>,
    body: Chunks,
    deadline: Deadline,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<Answer, Failure> {
    let backend = &target.backend;
    let mut headers = HeaderMap::with_capacity(client_headers.len() + 3);
    for (name, value) in client_headers {
        if forwardable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    // JSON, or the client's own multipart type (its boundary is in it).
    let content_type = match client_headers.get(header::CONTENT_TYPE) {
        Some(form) if endpoint.form() => form.clone(),
        _ => HeaderValue::from_static("application/json"),
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    let uri = match hop {
        Some((peer, hop_headers)) => {
            headers.extend(hop_headers);
            client::join(peer, endpoint.path())
        }
        None => {
            if let Some(key) = &backend.api_key {
                headers.insert(header::AUTHORIZATION, key.clone());
            }
            backend.uris.get(endpoint)
        }
    };
    let Some(uri) = uri else {
        return Err(Failure::NotStarted(
            "connect",
            ApiError::Upstream(format!("backend {} has no valid URL", backend.id)),
        ));
    };
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let request = backend.http.request(request);
    let (ms, kind, what) = match deadline {
        Deadline::FirstByte(ms) => (ms, "first_byte_timeout", "waiting for the first byte"),
        Deadline::Total(ms) => (ms, "total_timeout", "waiting for the answer"),
    };
    let answer = if ms == 0 {
        Ok(request.await)
    } else {
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(ms));
        tokio::select! {
            biased;
            answer = request => Ok(answer),
            () = timer.as_mut() => Err(()),
        }
    };
    match answer {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) if e.is_connect() => Err(Failure::NotStarted(
            if client::is_connect_timeout(&e) {
                "connect_timeout"
            } else {
                "connect"
            },
            ApiError::Upstream(format!("backend {} unreachable (connect)", backend.id)),
        )),
        Ok(Err(_)) => Err(Failure::MayHaveStarted(
            "transport",
            ApiError::Upstream(format!(
                "backend {} failed before answering (transport)",
                backend.id
            )),
        )),
        Err(_) => Err(Failure::Slow(kind, ApiError::UpstreamTimeout(what))),
    }
}

/// Client headers worth passing on: not hop-by-hop, not the client's key,
/// not framing that the new request recomputes.
fn forwardable(name: &HeaderName) -> bool {
    !name.as_str().starts_with("x-infergate-")
        && !matches!(
            name.as_str(),
            // vLLM names answers after x-request-id (the gateway keeps state
            // and signatures by that name) and routes by the rank.
            "x-request-id" | "x-data-parallel-rank"
        )
        && !matches!(
            name.as_str(),
            "authorization"
                | "host"
                | "content-length"
                | "content-type"
                | "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "expect"
                | "proxy-authorization"
                | "proxy-connection"
                | "accept-encoding"
        )
}
