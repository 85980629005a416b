//! The answer going back to the client: the headers it may see, and the
//! body passed through while it is observed (SSE) or collected whole, each
//! ending in the exchange's one `on_end`.

use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Response};
use bytes::Bytes;
use http_body::Body as _;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::exchange::Exchange;
use crate::sse;
use crate::stream::{End, EndCause, Observed, OnEnd};
use crate::upstream::client::body_error_kind;
use crate::upstream::Answer;

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
/// `timer` is the request's one timer, re-armed for the body's deadlines.
pub(crate) async fn respond(
    resp: Answer,
    timer: Pin<Box<Sleep>>,
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
        let upstream = resp.into_body();
        let observed = Observed::new(upstream, timer, first_byte, idle, exchange)
            .with_max_bytes(max_bytes)
            .hashing(hash);
        Body::new(match strip {
            Some(passed) => observed.with_usage_stripped(passed),
            None => observed,
        })
    } else {
        let bytes = collect(resp, timer, idle, max_bytes, &exchange).await?;
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
    resp: Answer,
    mut timer: Pin<Box<Sleep>>,
    idle: Duration,
    max_bytes: u64,
    exchange: &Exchange,
) -> Result<Bytes, ApiError> {
    let max_bytes = max_bytes.min(MAX_UPSTREAM_BODY as u64) as usize;
    let count = |kind| exchange.count_upstream_error(kind);
    let too_large = || {
        count("too_large");
        ApiError::Upstream("backend answer exceeds the size bound".into())
    };
    let declared = resp.body().size_hint().exact();
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = resp.into_body();
    // A body of one frame (the usual answer) is passed on as it came.
    let mut first: Option<Bytes> = None;
    let mut out = Vec::new();
    timer.as_mut().reset(Instant::now() + idle);
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            () = timer.as_mut() => {
                count("idle_timeout");
                return Err(ApiError::UpstreamTimeout("waiting for the rest of the body"));
            }
        };
        let chunk = match frame {
            None => break,
            Some(Err(e)) => {
                count("body");
                return Err(ApiError::Upstream(format!(
                    "backend connection failed mid-body ({})",
                    body_error_kind(&e)
                )));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => chunk,
                Err(_trailers) => continue,
            },
        };
        let held = first.as_ref().map_or(0, Bytes::len) + out.len();
        if held + chunk.len() > max_bytes {
            return Err(too_large());
        }
        match first.take() {
            None if out.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    out.reserve(declared.unwrap_or(0) as usize);
                    out.extend_from_slice(&earlier);
                }
                out.extend_from_slice(&chunk);
            }
        }
        timer.as_mut().reset(Instant::now() + idle);
    }
    Ok(first.unwrap_or_else(|| Bytes::from(out)))
}
