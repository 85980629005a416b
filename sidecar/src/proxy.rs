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
use axum::http::{header, HeaderMap, Method, Response};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::balance::{self, Prefix, Tried};
use crate::config::Strategy;
use crate::error::ApiError;
use crate::exchange::{Exchange, Slot};
use crate::metrics::ErrorLabels;
use crate::peers::{self, Reach};
use crate::respond::respond;
use crate::spill;
use crate::table::{now_ms, now_ns, Backend, KeyEntry, Route, Table};
use crate::upstream::{send, Chunks, Deadline, Failure};
use crate::validate::{self, Endpoint, Parsed};
use crate::AppState;

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
        Some(q) => q
            .admit(now_ns(), state.cluster.as_deref())
            .await
            .map_err(ApiError::RateLimited)?,
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
    // The request's one timer: the body's deadline now, then each
    // upstream attempt's, then the answer's first-byte and idle deadlines.
    let read_deadline = Duration::from_millis(table.limits.body_read_ms);
    let mut timer = Box::pin(tokio::time::sleep(read_deadline));
    let body = tokio::select! {
        biased;
        body = axum::body::to_bytes(body, limit) => {
            body.map_err(|_| ApiError::BodyTooLarge(limit))?
        }
        () = timer.as_mut() => return Err(ApiError::BodyTimeout),
    };
    // The body is hashed only where that is needed, and once: to check a
    // hop's body, to sign a hop to a peer, or for an answer signed here.
    let sha256 = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
    let mut request_sha256 = None;
    if let Some(h) = &hop {
        if h.body_sha256 != *request_sha256.insert(sha256(&body)) {
            return Err(ApiError::ForgedHop);
        }
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
            q.reserve_tokens(
                now_ns(),
                prompt.saturating_add(answer),
                state.cluster.as_ref(),
            )
            .await
            .map_err(ApiError::RateLimited)?
        }
        _ => None,
    };
    let session = session_key(route, &headers, &parsed);
    // Also on a hop: the sidecar next to the pod keeps the pod's backlog
    // and the keys it was sent, for every request it gets.
    let prefix = crate::prefix::route_key(route, &body, &parsed.prefix).map(|key| Prefix {
        key,
        bytes: body.len() as u64,
    });
    // Streams always ask the upstream for usage (quotas need the count);
    // a client that did not ask does not get the usage event.
    let strip_usage = parsed.usage_edit.is_some();
    // A peer's prefix-affinity choice that this pod's exact backlog says
    // another backend would serve sooner goes back to the peer (`spill`).
    if let (Some(_), Some(i)) = (&hop, pinned) {
        let backend = &route.targets[i].backend;
        if let Some(answer) = spill::turn_away(&state, route, backend, prefix, &headers) {
            return Ok(answer);
        }
    }
    // Only a choice this sidecar made by prefix may be turned away.
    let spillable = pinned.is_none()
        && session.is_none()
        && route.strategy == Strategy::PrefixAffinity
        && prefix.is_some();

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
        // Offers a peer may turn away (not counted as attempts: nothing
        // ran); with none left, the choice is taken where it lands.
        let mut offers = if spillable {
            route.targets.len().saturating_sub(1).min(spill::MAX_OFFERS)
        } else {
            0
        };
        let mut attempt = 0;
        while attempt < attempts {
            attempt += 1;
            let Some(i) = pinned.or_else(|| balance::pick(route, session, prefix, tried, now_ms()))
            else {
                break;
            };
            tried.add(i);
            let target = &route.targets[i];
            let Some(mut slot) = Slot::acquire(&target.backend, &state) else {
                continue;
            };
            // Only a stream's first token is seen: a whole answer is not
            // counted as waiting (its prefill is unseen), only its key kept.
            let prefix_key = prefix.map(|p| p.key);
            let cold = prefix_key.is_none_or(|k| {
                let v = target.backend.view(k, now_ms());
                !(v.holds || v.prefilling)
            });
            slot.wait(prefix_key, body.len() as u64, cold && parsed.stream);
            let mut offered = false;
            let via = match state.peers.reach(&target.backend, hop.is_some()) {
                Reach::Here => None,
                Reach::Peer(peer) => Some(peer),
                Reach::Unreachable => {
                    last_error = Some(ApiError::NoBackend(route.name.clone()));
                    continue;
                }
            };
            let (upstream_body, onward) = match via {
                // The peer gets the client's bytes; it resolves the alias
                // and asks for usage itself.
                Some(peer) => {
                    let mut signed = state.peers.hop_headers(
                        &headers,
                        &Method::POST,
                        endpoint.path(),
                        request_sha256.get_or_insert_with(|| sha256(&body)),
                        Some(target.backend.id.as_str()),
                    );
                    if let (true, Some(p)) = (offers > 0, prefix) {
                        if let Some(cost) = balance::next_best(route, p, tried, now_ms()) {
                            spill::offer(&mut signed, cost);
                            offered = true;
                        }
                    }
                    (Chunks::one(body.clone()), Some((peer, signed)))
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
                endpoint,
                &headers,
                onward,
                upstream_body,
                deadline,
                &mut timer,
            )
            .await;
            match outcome {
                Ok(resp) if offered && spill::is_refusal(&resp) => {
                    // Nothing ran there. Its fresh numbers guide the next
                    // choice, which may still be this backend, if the others
                    // turn out no better. (Its slot goes first, so the
                    // numbers are taken against what is still in flight.)
                    drop(slot);
                    if let Some(peer) = via {
                        spill::record_refusal(&table, peer, resp).await;
                    }
                    tried.remove(i);
                    offers -= 1;
                    attempt -= 1;
                    last_error = Some(ApiError::NoBackend(route.name.clone()));
                }
                Ok(resp) if resp.status().is_server_error() && via.is_none() => {
                    // The upstream is done with this request: another
                    // backend may try, and nothing runs twice at once.
                    let status = resp.status();
                    fail(&state, &table, &target.backend, "status_5xx", &request_id);
                    last_error = Some(ApiError::Upstream(format!(
                        "backend {} answered HTTP {}",
                        target.backend.id,
                        status.as_u16()
                    )));
                }
                Ok(resp) => {
                    target.backend.record_success();
                    let mut exchange = Exchange {
                        state: state.clone(),
                        request_id,
                        key,
                        route: route.clone(),
                        target: i,
                        backend: target.backend.clone(),
                        via: via.and(target.backend.sidecar.clone()),
                        status: resp.status(),
                        request_sha256: None,
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
                    if exchange.attests() {
                        exchange.request_sha256 =
                            Some(*request_sha256.get_or_insert_with(|| sha256(&body)));
                    }
                    // On a hop the usage event goes on to the peer, which
                    // removes it from what its client gets.
                    let strip = strip_usage.then_some(hop.is_none());
                    let max_bytes = table.limits.max_response_bytes;
                    return respond(resp, timer, exchange, strip, max_bytes).await;
                }
                Err(Failure::NotStarted(kind, err)) => {
                    fail(&state, &table, &target.backend, kind, &request_id);
                    last_error = Some(err);
                }
                Err(Failure::MayHaveStarted(kind, err)) => {
                    fail(&state, &table, &target.backend, kind, &request_id);
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
            Some(_) => state.records.get(previous).map(|r| r.owner),
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
fn fail(state: &AppState, table: &Table, backend: &Backend, kind: &'static str, request_id: &str) {
    backend.record_failure(Duration::from_millis(table.limits.eject_ms));
    count(state, backend, kind);
    tracing::warn!(
        request_id,
        backend = %backend.id,
        kind,
        "upstream failed; backend ejected for a while"
    );
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
