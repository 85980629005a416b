//! Responses API follow-ups by id (`GET`, `DELETE`, `POST .../cancel`): the
//! state lives on the backend that produced the response, so they go there,
//! through its sidecar when that is another one.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Response};
use axum::response::IntoResponse;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::peers::{PeerHop, Reach, EMPTY_SHA256};
use crate::validate::valid_id;
use crate::AppState;

pub async fn get_response(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(s, caller, Method::GET, "", id, headers, hop.is_some()).await
}

pub async fn delete_response(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(s, caller, Method::DELETE, "", id, headers, hop.is_some()).await
}

pub async fn cancel_response(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(
        s,
        caller,
        Method::POST,
        "/cancel",
        id,
        headers,
        hop.is_some(),
    )
    .await
}

async fn by_id(
    s: Arc<AppState>,
    Caller { key, table }: Caller,
    method: Method,
    suffix: &str,
    id: String,
    headers: HeaderMap,
    hop: bool,
) -> Result<Response<Body>, ApiError> {
    // Look-ups count against the key's limits like any request (a hop was
    // counted by the sidecar the client reached).
    let _key_slot = match key.quota.as_ref().filter(|_| !hop) {
        Some(q) => q
            .admit(crate::table::now_ns(), s.cluster.as_deref())
            .await
            .map_err(ApiError::RateLimited)?,
        None => None,
    };
    if !valid_id(&id) {
        return Err(ApiError::invalid("Malformed response id.", Some("id")));
    }
    let not_found = || ApiError::NotFound(format!("No response with id `{id}`."));
    let owner = s
        .peers
        .owner(&s.records, &table, &id, &headers, hop)
        .await
        .ok_or_else(not_found)?;
    if owner.key_id != key.id && !key.admin {
        return Err(not_found());
    }
    let backend = table.backends.get(&owner.backend).ok_or_else(not_found)?;
    let path = format!("/v1/responses/{id}{suffix}");
    let mut out = HeaderMap::new();
    let url = match s.peers.reach(backend, hop) {
        Reach::Peer(peer) => {
            out = s
                .peers
                .hop_headers(&headers, &method, &path, &EMPTY_SHA256, None);
            format!("{peer}{path}")
        }
        Reach::Here => {
            if let Some(k) = &backend.api_key {
                out.insert(header::AUTHORIZATION, k.clone());
            }
            format!("{}{path}", backend.url)
        }
        Reach::Unreachable => return Err(not_found()),
    };
    let resp = backend
        .client()
        .request(method, url)
        .headers(out)
        .timeout(std::time::Duration::from_millis(
            backend.timeouts.first_byte_ms,
        ))
        .send()
        .await
        .map_err(|e| {
            ApiError::Upstream(format!(
                "backend {} unreachable ({})",
                backend.id,
                if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "transport"
                }
            ))
        })?;
    Ok(passthrough(resp, table.limits.max_response_bytes).await)
}

/// Status, content type and body of an upstream answer, as they are.
/// (at most `max_bytes` of it held, as for any answer).
async fn passthrough(resp: reqwest::Response, max_bytes: u64) -> Response<Body> {
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    if resp.content_length().is_some_and(|n| n > max_bytes) {
        return ApiError::Upstream("backend answer exceeds the size bound".into()).into_response();
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let Ok(chunk) = chunk else {
            return ApiError::Upstream("backend connection failed mid-body".into()).into_response();
        };
        if (body.len() + chunk.len()) as u64 > max_bytes {
            return ApiError::Upstream("backend answer exceeds the size bound".into())
                .into_response();
        }
        body.extend_from_slice(&chunk);
    }
    let mut out = (status, body).into_response();
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out
}
