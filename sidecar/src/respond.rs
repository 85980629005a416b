//! The answer going back to the client: the headers it may see, and the
//! body passed through while it is observed (SSE) or collected whole, each
//! ending in the exchange's one `on_end`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::exchange::Exchange;
use crate::sse;
use crate::stream::{error_kind, End, EndCause, Observed, OnEnd};

/// Largest non-streamed upstream body the gateway will hold.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// Upstream answer headers a client sees: what describes the body and how
/// to retry, nothing that identifies the upstream (`server`, simulator or
/// backend-internal headers).
fn response_header_passes(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-type" | "cache-control" | "retry-after" | "x-accel-buffering"
    )
}

/// `strip`: the usage event the client did not ask for is left out of the
/// hash, and also of the bytes passed on when `Some(true)`.
pub(crate) async fn respond(
    resp: reqwest::Response,
    exchange: Exchange,
    strip: Option<bool>,
    max_bytes: u64,
) -> Result<Response<Body>, ApiError> {
    let mut headers = HeaderMap::with_capacity(4);
    for (name, value) in resp.headers() {
        if response_header_passes(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(exchange.backend.id.as_str()) {
        headers.insert(HeaderName::from_static("x-infergate-backend"), v);
    }
    // `charge` is false exactly on a hop served here for a peer.
    let (for_peer, via_peer) = (!exchange.charge, exchange.via.is_some());
    crate::load_peer::on_answer(
        &exchange.backend,
        for_peer,
        via_peer,
        resp.headers(),
        &mut headers,
    );
    if let Ok(v) = HeaderValue::from_str(&exchange.request_id) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    let status = resp.status();
    let timeouts = exchange.backend.timeouts;
    let idle = Duration::from_millis(timeouts.idle_ms);
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    // Only an answer this sidecar signs is hashed.
    let hash = exchange.attests();
    let body = if is_sse {
        let first_byte = Duration::from_millis(timeouts.first_byte_ms);
        let observed = Observed::new(Box::pin(resp.bytes_stream()), first_byte, idle, exchange)
            .with_max_bytes(max_bytes)
            .hashing(hash);
        Body::from_stream(match strip {
            Some(passed) => observed.with_usage_stripped(passed),
            None => observed,
        })
    } else {
        let bytes = collect(resp, idle, max_bytes, &exchange).await?;
        exchange.on_end(End {
            cause: EndCause::Completed,
            response_sha256: hash.then(|| Sha256::digest(&bytes).into()),
            bytes: bytes.len() as u64,
            frames: 1,
            events: 0,
            scan: sse::scan_json(&bytes),
            first_chunk: None,
            last_chunk: None,
        });
        Body::from(bytes)
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

/// A non-streamed body, each chunk within the idle deadline, size bounded.
async fn collect(
    resp: reqwest::Response,
    idle: Duration,
    max_bytes: u64,
    exchange: &Exchange,
) -> Result<Bytes, ApiError> {
    let max_bytes = max_bytes.min(MAX_UPSTREAM_BODY as u64) as usize;
    let capacity = resp.content_length().unwrap_or(0).min(max_bytes as u64) as usize;
    let mut out = Vec::with_capacity(capacity);
    let mut stream = resp.bytes_stream();
    loop {
        let count = |kind| exchange.count_upstream_error(kind);
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Ok(chunk))) => {
                if out.len() + chunk.len() > max_bytes {
                    count("too_large");
                    return Err(ApiError::Upstream(
                        "backend answer exceeds the size bound".into(),
                    ));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Some(Err(e))) => {
                count("body");
                return Err(ApiError::Upstream(format!(
                    "backend connection failed mid-body ({})",
                    error_kind(&e)
                )));
            }
            Err(_) => {
                count("idle_timeout");
                return Err(ApiError::UpstreamTimeout(
                    "waiting for the rest of the body",
                ));
            }
        }
    }
}
