//! The admin listener: config push and read (bearer token), health, metrics.
//! Never exposed on the public Service.

use infergate_config::UNAVAILABLE_HEADER;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::config::{ConfigDelta, ConfigError, GatewayConfig};
use crate::error::ApiError;
use crate::AppState;

pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/admin/v1/config",
            get(get_config).put(put_config).patch(patch_config),
        )
        .route("/admin/v1/config/version", get(get_version))
        // A whole config for thousands of routes, pods and keys (gzip
        // usually makes it a tenth of this); the admin port is not public.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_CONFIG_BYTES))
        .route("/admin/v1/log-level", axum::routing::put(put_log_level))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("Unknown path.".into()) })
        .with_state(state)
}

/// The largest config the admin API takes, before and after gzip.
const MAX_CONFIG_BYTES: usize = 64 * 1024 * 1024;

/// The body as sent, or gunzipped when `Content-Encoding: gzip` (bounded,
/// so a small body cannot inflate without limit).
fn decoded(headers: &HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if !gzip {
        return Ok(body);
    }
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::invalid(format!("config rejected: bad gzip body: {e}"), None))?;
    if out.len() > MAX_CONFIG_BYTES {
        return Err(ApiError::BodyTooLarge(MAX_CONFIG_BYTES));
    }
    Ok(Bytes::from(out))
}

fn check_token(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &s.admin_token_sha256 {
        Some(expected) if crate::auth::admin_token_ok(expected, headers) => Ok(()),
        _ => Err(ApiError::AdminUnauthorized),
    }
}

async fn get_config(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_token(&s, &headers)?;
    let table = s.table.load();
    let mut config = (*table.config).clone();
    config.version = Some(table.version.clone());
    Ok((unavailable_header(&table), Json(config)).into_response())
}

fn unavailable_header(table: &crate::table::Table) -> [(&'static str, String); 1] {
    let ids: Vec<&str> = table
        .unavailable
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    [(UNAVAILABLE_HEADER, ids.join(","))]
}

/// The running version only (and the unavailable backends' header): what
/// the operator reads before each push, without the whole config.
async fn get_version(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_token(&s, &headers)?;
    let table = s.table.load();
    Ok((
        unavailable_header(&table),
        Json(json!({"version": table.version})),
    )
        .into_response())
}

/// A `ConfigDelta` against the version running here (nothing to do when it
/// already runs the delta's target); 409 for any other version (the
/// operator then sends the whole config).
async fn patch_config(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_token(&s, &headers)?;
    let body = decoded(&headers, body)?;
    let delta: ConfigDelta = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("config delta rejected: {e}"), None))?;
    if s.current_version() == delta.to {
        return applied(&s, delta.to);
    }
    let version = s.swap_with(|current| {
        if current.version != delta.from {
            return Err(ApiError::VersionConflict(current.version.clone()));
        }
        current
            .apply(&delta)
            .map_err(|e| ApiError::invalid(format!("config delta rejected: {e}"), None))
    })?;
    applied(&s, version)
}

async fn put_config(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_token(&s, &headers)?;
    let body = decoded(&headers, body)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let parsed = if is_json {
        GatewayConfig::from_json(&body)
    } else {
        std::str::from_utf8(&body)
            .map_err(|_| ConfigError::Parse("body is not UTF-8".into()))
            .and_then(GatewayConfig::from_yaml)
    };
    let version = parsed
        .and_then(|c| s.swap(c))
        .map_err(|e| ApiError::invalid(format!("config rejected: {e}"), None))?;
    applied(&s, version)
}

/// The answer to an applied push: the version and what could not be used.
fn applied(s: &AppState, version: String) -> Result<Response, ApiError> {
    let table = s.table.load();
    let unavailable: Vec<_> = table
        .unavailable
        .iter()
        .map(|(id, reason)| json!({"id": id, "reason": reason}))
        .collect();
    Ok((
        unavailable_header(&table),
        Json(json!({"version": version, "unavailableBackends": unavailable})),
    )
        .into_response())
}

async fn put_log_level(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    check_token(&s, &headers)?;
    let setter = s
        .log_level
        .as_ref()
        .ok_or_else(|| ApiError::invalid("log level is fixed in this process", None))?;
    let directive = body.trim();
    setter(directive).map_err(|e| ApiError::invalid(format!("bad filter: {e}"), None))?;
    tracing::info!(filter = directive, "log filter changed");
    Ok(Json(json!({"filter": directive})).into_response())
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.table.load().config.models.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no routes configured").into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
