//! Responses API follow-ups by id (`GET`, `DELETE`, `POST .../cancel`): the
//! state lives on the backend that produced the response, so they go there,
//! through its sidecar when that is another one.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Response, StatusCode};
use axum::response::IntoResponse;

use crate::api::valid_id;
use crate::error::ApiError;
use sha2::{Digest, Sha256};

use crate::peers::{self, PeerHop};
use crate::AppState;

pub async fn get_response(
    State(s): State<Arc<AppState>>,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(s, Method::GET, id, "", headers, hop.is_some()).await
}

pub async fn delete_response(
    State(s): State<Arc<AppState>>,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(s, Method::DELETE, id, "", headers, hop.is_some()).await
}

pub async fn cancel_response(
    State(s): State<Arc<AppState>>,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response<Body>, ApiError> {
    by_id(s, Method::POST, id, "/cancel", headers, hop.is_some()).await
}

async fn by_id(
    s: Arc<AppState>,
    method: Method,
    id: String,
    suffix: &str,
    headers: HeaderMap,
    hop: bool,
) -> Result<Response<Body>, ApiError> {
    let table = s.table.load_full();
    let key = crate::auth::authenticate(&table, &headers)?;
    // Look-ups count against the key's limits like any request (a hop was
    // counted by the sidecar the client reached).
    let _key_slot = match key.quota.as_ref().filter(|_| !hop) {
        Some(q) => q
            .admit(crate::table::now_ns())
            .map_err(ApiError::RateLimited)?,
        None => None,
    };
    if !valid_id(&id) {
        return Err(ApiError::invalid("Malformed response id.", Some("id")));
    }
    let not_found = || ApiError::NotFound(format!("No response with id `{id}`."));
    let owner = s
        .find_owner(&id, &headers, hop)
        .await
        .ok_or_else(not_found)?;
    if owner.key_id != key.id && !key.admin {
        return Err(not_found());
    }
    let backend = table.backends.get(&owner.backend).ok_or_else(not_found)?;
    let path = format!("/v1/responses/{id}{suffix}");
    let via = if hop {
        None
    } else {
        peers::remote(backend.sidecar.as_deref(), &s.own_urls())
    };
    if via.is_some() && !s.hops.enabled() {
        return Err(not_found());
    }
    let mut out = HeaderMap::new();
    let url = match via {
        Some(peer) => {
            let empty: [u8; 32] = Sha256::digest(b"").into();
            out = s.hops.headers(&headers, &method, &path, &empty, None);
            format!("{peer}{path}")
        }
        None => {
            if let Some(k) = &backend.api_key {
                out.insert(header::AUTHORIZATION, k.clone());
            }
            format!("{}{path}", backend.url)
        }
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
                crate::stream::error_kind(&e)
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

/// A signature this sidecar does not hold: from the sidecar it forwarded
/// the request to, or else from whichever peer has it. Never on a hop, so
/// a look-up visits each sidecar at most once.
pub async fn from_peers(
    s: &AppState,
    via: Option<&str>,
    path_and_query: &str,
    headers: &HeaderMap,
    hop: bool,
) -> Option<Response<Body>> {
    // Without the peer secret peers would take this for a client's request
    // and ask on, back and forth.
    if hop || !s.hops.enabled() {
        return None;
    }
    let table = s.table.load_full();
    let own = s.own_urls();
    let ask: Vec<&str> = match via {
        Some(v) => vec![v],
        None => peers::peers(&table, &own),
    };
    let empty: [u8; 32] = Sha256::digest(b"").into();
    let hdrs = s
        .hops
        .headers(headers, &Method::GET, path_and_query, &empty, None);
    let (status, resp_headers, body) =
        peers::ask(&s.peer_client, &ask, path_and_query, &hdrs).await?;
    let mut out = (StatusCode::from_u16(status.as_u16()).ok()?, body).into_response();
    if let Some(ct) = resp_headers.get(header::CONTENT_TYPE) {
        out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    Some(out)
}
