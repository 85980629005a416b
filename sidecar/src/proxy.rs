//! One proxied request, from the client's headers to the last byte:
//! authenticate (before reading the body), validate, resolve the model,
//! pick a backend, forward, and pass the answer through while it is hashed.
//!
//! A request is retried on another backend only where the first cannot be
//! generating it: the connection was refused or never made, or the upstream
//! answered 5xx (it has finished with the request). A deadline that passes
//! while the upstream may still be working is a 504, never a second run;
//! and slowness alone never ejects a backend, failures do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::balance::{self, Tried};
use crate::error::ApiError;
use crate::exchange::{Exchange, Slot};
use crate::metrics::ErrorLabels;
use crate::peers::{self, Reach};
use crate::sse;
use crate::stream::{error_kind, End, EndCause, Observed, OnEnd};
use crate::table::{now_ms, now_ns, Backend, KeyEntry, Route, RouteTarget, Table};
use crate::validate::{self, Endpoint, Parsed};
use crate::AppState;

/// Largest non-streamed upstream body the gateway will hold.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
const MAX_ATTEMPTS: usize = 3;
/// Tokens reserved for an answer whose request sets no `max_tokens`.
const DEFAULT_ANSWER_TOKENS: u64 = 256;

pub async fn forward(
    state: Arc<AppState>,
    Caller { key, table }: Caller,
    request_id: String,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Result<Response<Body>, ApiError> {
    let received = Instant::now();
    let form_boundary = body_type(endpoint, &headers)?;
    // Internal headers are checked before the body is read; a genuine hop
    // was admitted (and is charged) by the sidecar the client reached.
    let hop = state
        .peers
        .hops()
        .verify(&headers, &Method::POST, endpoint.path())?;
    // Quotas before the body is read: a refused request costs no more.
    let mut key_slot = match key.quota.as_ref().filter(|_| hop.is_none()) {
        Some(q) => q.admit(now_ns()).map_err(ApiError::RateLimited)?,
        None => None,
    };
    let limit = table.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    let read_deadline = Duration::from_millis(table.limits.body_read_ms);
    let body = match tokio::time::timeout(read_deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(ApiError::BodyTimeout),
        Ok(Err(_)) => return Err(ApiError::BodyTooLarge(limit)),
        Ok(Ok(body)) => body,
    };
    let request_sha256: [u8; 32] = Sha256::digest(&body).into();
    if hop
        .as_ref()
        .is_some_and(|h| h.body_sha256 != request_sha256)
    {
        return Err(ApiError::ForgedHop);
    }
    let parsed = match form_boundary {
        Some(boundary) => validate::form::validate_form(&body, boundary)?,
        None => validate::validate(endpoint, &body, table.limits.max_messages)?,
    };
    let route = table
        .route(&parsed.model)
        .ok_or_else(|| ApiError::ModelNotFound(parsed.model.clone()))?;
    if !key.may_use(route) {
        return Err(ApiError::ModelNotAllowed(parsed.model.clone()));
    }
    let pinned =
        pinned_target(&state, &table, &key, route, &headers, &parsed, hop.as_ref()).await?;
    // Generated tokens are reserved before the upstream is asked (about
    // four bytes of prompt per token, plus the answer's bound), so streams
    // opened together cannot spend more than the key's budget.
    let mut reservation = match key.quota.as_ref().filter(|_| hop.is_none()) {
        Some(q) if endpoint.generates() => {
            let answer = parsed.max_tokens.unwrap_or(DEFAULT_ANSWER_TOKENS);
            let prompt = (body.len() as u64).div_ceil(4);
            q.reserve_tokens(now_ns(), prompt.saturating_add(answer))
                .map_err(ApiError::RateLimited)?
        }
        _ => None,
    };
    let session = session_key(route, &headers, &parsed);
    let prefix = pinned
        .is_none()
        .then(|| crate::prefix::route_key(route, &body, &parsed.prefix))
        .flatten();
    // Streams always ask the upstream for usage (quotas need the count);
    // a client that did not ask does not get the usage event.
    let strip_usage = parsed.usage_edit.is_some();

    let queue_deadline = tokio::time::Instant::now() + Duration::from_millis(table.limits.queue_ms);
    loop {
        let mut tried = Tried::default();
        let mut last_error = None;
        // A pinned request (a hop, or a follow-up whose state lives on one
        // backend) has exactly one place to go.
        let attempts = if pinned.is_some() {
            1
        } else {
            route.targets.len().min(MAX_ATTEMPTS)
        };
        for _ in 0..attempts {
            let Some(i) = pinned.or_else(|| balance::pick(route, session, prefix, tried, now_ms()))
            else {
                break;
            };
            tried.add(i);
            let target = &route.targets[i];
            let Some(slot) = Slot::acquire(&target.backend, &state) else {
                continue;
            };
            let via = match state.peers.reach(&target.backend, hop.is_some()) {
                Reach::Here => None,
                Reach::Peer(peer) => Some(peer),
                Reach::Unreachable => {
                    last_error = Some(ApiError::NoBackend(route.name.clone()));
                    continue;
                }
            };
            let (upstream_body, hop_headers) = match via {
                // The peer gets the client's bytes; it resolves the alias
                // and asks for usage itself.
                Some(_) => {
                    let signed = state.peers.hop_headers(
                        &headers,
                        &Method::POST,
                        endpoint.path(),
                        &request_sha256,
                        Some(target.backend.id.as_str()),
                    );
                    (body.clone(), Some(signed))
                }
                None => (
                    validate::upstream_body(&body, &parsed, &target.upstream_model, strip_usage),
                    None,
                ),
            };
            let deadline = if parsed.stream {
                Deadline::FirstByte(target.backend.timeouts.first_byte_ms)
            } else {
                Deadline::Total(target.backend.timeouts.total_ms)
            };
            let outcome = send(
                target,
                via,
                endpoint,
                &headers,
                hop_headers,
                upstream_body,
                deadline,
            )
            .await;
            match outcome {
                Ok(resp) if resp.status().is_server_error() && via.is_none() => {
                    // The upstream is done with this request: another
                    // backend may try, and nothing runs twice at once.
                    let status = resp.status();
                    fail(&state, &table, &target.backend, "status_5xx");
                    last_error = Some(ApiError::Upstream(format!(
                        "backend {} answered HTTP {}",
                        target.backend.id,
                        status.as_u16()
                    )));
                }
                Ok(resp) => {
                    target.backend.record_success();
                    let exchange = Exchange {
                        state: state.clone(),
                        request_id,
                        key,
                        route: route.clone(),
                        target: i,
                        backend: target.backend.clone(),
                        via: via.map(str::to_owned),
                        status: resp.status(),
                        request_sha256,
                        received,
                        slot,
                        key_slot: key_slot.take(),
                        reservation: reservation.take(),
                        // An upload's bytes say nothing of its tokens.
                        request_bytes: if endpoint.form() {
                            0
                        } else {
                            body.len() as u64
                        },
                        estimate_usage: endpoint.generates() || parsed.stream,
                        charge: hop.is_none(),
                    };
                    // On a hop the usage event goes on to the peer, which
                    // removes it from what its client gets.
                    let strip = strip_usage.then_some(hop.is_none());
                    let max_bytes = table.limits.max_response_bytes;
                    return respond(resp, exchange, strip, max_bytes).await;
                }
                Err(Failure::NotStarted(kind, err)) => {
                    fail(&state, &table, &target.backend, kind);
                    last_error = Some(err);
                }
                Err(Failure::MayHaveStarted(kind, err)) => {
                    fail(&state, &table, &target.backend, kind);
                    return Err(err);
                }
                Err(Failure::Slow(kind, err)) => {
                    count(&state, &target.backend, kind);
                    return Err(err);
                }
            }
        }
        if let Some(err) = last_error {
            return Err(err);
        }
        // Every candidate was at its in-flight limit: wait briefly for a
        // slot, in a bounded queue, then give up with 503.
        let full = pinned.map_or_else(
            || route.targets.iter().all(|t| t.backend.is_full()),
            |i| route.targets[i].backend.is_full(),
        );
        if !full || !wait_for_slot(&state, queue_deadline, table.limits.max_queued).await {
            return Err(if full {
                ApiError::AtCapacity(route.name.clone())
            } else {
                ApiError::NoBackend(route.name.clone())
            });
        }
    }
}

/// JSON bodies: `application/json` (any parameters, any case) or a `+json`
/// type. Audio uploads: `multipart/form-data` with a boundary, returned.
/// Anything else is not what the endpoint takes: 415.
fn body_type(endpoint: Endpoint, headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if endpoint.form() {
        return validate::form::boundary(content_type)
            .map(Some)
            .ok_or(ApiError::UnsupportedMediaType);
    }
    let kind = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if kind == "application/json" || (kind.starts_with("application/") && kind.ends_with("+json")) {
        Ok(None)
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Wait until some backend slot frees up or the deadline passes; false if
/// the deadline passed or the queue is already full.
async fn wait_for_slot(
    state: &AppState,
    deadline: tokio::time::Instant,
    max_queued: usize,
) -> bool {
    let queued = state.queued.fetch_add(1, Ordering::AcqRel);
    let _leave = scopeguard(|| {
        state.queued.fetch_sub(1, Ordering::AcqRel);
    });
    if queued >= max_queued {
        return false;
    }
    tokio::time::timeout_at(deadline, state.slot_freed.notified())
        .await
        .is_ok()
}

/// Runs `f` when dropped (also when the waiting request is cancelled).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The one target this request must go to, if any: the backend a peer
/// chose (on a hop), or the owner of `previous_response_id`.
///
/// A request that names earlier state continues it only with the key that
/// made it (or an admin key); for any other key the id does not exist, the
/// same 404 an unknown id gets, here and when the owner is a peer's.
async fn pinned_target(
    state: &AppState,
    table: &Table,
    key: &KeyEntry,
    route: &Route,
    headers: &HeaderMap,
    parsed: &Parsed,
    hop: Option<&peers::Hop>,
) -> Result<Option<usize>, ApiError> {
    let position = |backend: &str| route.targets.iter().position(|t| t.backend.id == backend);
    if let Some(previous) = parsed.previous_response_id.as_deref() {
        if !validate::valid_id(previous) {
            return Err(ApiError::invalid(
                "Malformed previous_response_id.",
                Some("previous_response_id"),
            ));
        }
        let not_found = || ApiError::NotFound(format!("No response with id `{previous}`."));
        let owner = match hop {
            // The sidecar the client reached checked the owner; what this
            // one remembers must agree.
            Some(_) => state.records.get(previous).map(|r| r.owner.clone()),
            None => Some(
                state
                    .peers
                    .owner(&state.records, table, previous, headers, false)
                    .await
                    .ok_or_else(not_found)?,
            ),
        };
        if owner
            .as_ref()
            .is_some_and(|o| o.key_id != key.id && !key.admin)
        {
            return Err(not_found());
        }
        if let (None, Some(owner)) = (hop, owner) {
            if route.sticky.previous_response_id {
                return Ok(position(owner.backend.as_str()));
            }
        }
    }
    match hop.and_then(|h| h.pin.as_deref()) {
        Some(pin) => position(pin)
            .map(Some)
            .ok_or_else(|| ApiError::NoBackend(route.name.clone())),
        None => Ok(None),
    }
}

/// The first sticky source present in the request, in the route's order.
fn session_key<'a>(route: &Route, headers: &'a HeaderMap, parsed: &'a Parsed) -> Option<&'a str> {
    let sticky = &route.sticky;
    let from_header = sticky
        .header
        .as_deref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    from_header
        .or(if sticky.previous_response_id {
            parsed.previous_response_id.as_deref()
        } else {
            None
        })
        .or(if sticky.user {
            parsed.user.as_deref()
        } else {
            None
        })
}

/// A failure of the backend: counted, and the backend ejected for a while.
fn fail(state: &AppState, table: &Table, backend: &Backend, kind: &'static str) {
    backend.record_failure(Duration::from_millis(table.limits.eject_ms));
    count(state, backend, kind);
    tracing::warn!(backend = %backend.id, kind, "upstream failed; backend ejected for a while");
}

fn count(state: &AppState, backend: &Backend, kind: &'static str) {
    state
        .metrics
        .upstream_errors
        .get_or_create(&ErrorLabels {
            backend: backend.id.to_string(),
            kind,
        })
        .inc();
}

/// How a request to a backend failed, by what it means for a retry.
enum Failure {
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
enum Deadline {
    FirstByte(u64),
    Total(u64),
}

async fn send(
    target: &RouteTarget,
    via: Option<&str>,
    endpoint: Endpoint,
    client_headers: &HeaderMap,
    hop_headers: Option<HeaderMap>,
    body: Bytes,
    deadline: Deadline,
) -> Result<reqwest::Response, Failure> {
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
    let base = match (via, hop_headers) {
        (Some(peer), Some(hop)) => {
            headers.extend(hop);
            peer
        }
        _ => {
            if let Some(key) = &backend.api_key {
                headers.insert(header::AUTHORIZATION, key.clone());
            }
            &backend.url
        }
    };
    let request = backend
        .client()
        .post(format!("{base}{}", endpoint.path()))
        .headers(headers)
        .body(body)
        .send();
    let (ms, kind, what) = match deadline {
        Deadline::FirstByte(ms) => (ms, "first_byte_timeout", "waiting for the first byte"),
        Deadline::Total(ms) => (ms, "total_timeout", "waiting for the answer"),
    };
    let answer = if ms == 0 {
        Ok(request.await)
    } else {
        tokio::time::timeout(Duration::from_millis(ms), request).await
    };
    match answer {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) if e.is_connect() => Err(Failure::NotStarted(
            if e.is_timeout() {
                "connect_timeout"
            } else {
                "connect"
            },
            ApiError::Upstream(format!(
                "backend {} unreachable ({})",
                backend.id,
                error_kind(&e)
            )),
        )),
        Ok(Err(e)) => Err(Failure::MayHaveStarted(
            "transport",
            ApiError::Upstream(format!(
                "backend {} failed before answering ({})",
                backend.id,
                error_kind(&e)
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
async fn respond(
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
    let body = if is_sse {
        let first_byte = Duration::from_millis(timeouts.first_byte_ms);
        let observed = Observed::new(Box::pin(resp.bytes_stream()), first_byte, idle, exchange)
            .with_max_bytes(max_bytes);
        Body::from_stream(match strip {
            Some(passed) => observed.with_usage_stripped(passed),
            None => observed,
        })
    } else {
        let bytes = collect(resp, idle, max_bytes, &exchange).await?;
        exchange.on_end(End {
            cause: EndCause::Completed,
            response_sha256: Sha256::digest(&bytes).into(),
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

/// A short id for logs and the `x-request-id` header: a per-process random
/// prefix and a counter (unique without coordination, cheap to make).
pub fn request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        // Without OS randomness, the clock still tells processes apart.
        if getrandom::getrandom(&mut b).is_err() {
            b = (now_ns() as u32 ^ std::process::id()).to_le_bytes();
        }
        u32::from_le_bytes(b)
    });
    format!("{prefix:08x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}
