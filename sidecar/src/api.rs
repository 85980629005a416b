//! The public OpenAI-compatible surface.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use crate::attest::{Algo, Answer};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics::{AlgoLabels, ReasonLabels};
use crate::peers::PeerHop;
use crate::validate::{valid_id, Endpoint};
use crate::AppState;

mod attestation;

pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for endpoint in Endpoint::ALL {
        router = router.route(
            endpoint.path(),
            post(
                move |State(s): State<Arc<AppState>>,
                      caller: Result<Caller, ApiError>,
                      headers: HeaderMap,
                      body: Body| { forward(s, caller, endpoint, headers, body) },
            ),
        );
    }
    router
        .route("/v1/models", get(models))
        .route("/v1/signature/{id}", get(signature))
        .route("/v1/internal/owner/{id}", get(owner))
        .route(crate::load_peer::PATH, get(crate::load_peer::serve))
        .route(
            "/v1/responses/{id}",
            get(crate::responses::get_response).delete(crate::responses::delete_response),
        )
        .route(
            "/v1/responses/{id}/cancel",
            post(crate::responses::cancel_response),
        )
        .route("/v1/attestation/report", get(attestation::report))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// One span per request, named by its id (never by its content); every
/// refusal, authentication included, is counted by reason.
async fn forward(
    s: Arc<AppState>,
    caller: Result<Caller, ApiError>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = crate::proxy::request_id();
    // At debug level: with the default `info` filter a disabled span costs
    // nothing, where an enabled one cost ~9k instructions per request
    // (BENCHMARKS.md). Warnings inside a request name its id themselves.
    let span = tracing::debug_span!("request", id = %request_id, path = endpoint.path());
    let result = match caller {
        Ok(caller) => {
            crate::proxy::forward(s.clone(), caller, request_id, endpoint, headers, body)
                .instrument(span.clone())
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => resp,
        Err(e) => {
            span.in_scope(|| tracing::debug!(reason = e.metric_label(), "request refused"));
            s.metrics
                .rejected
                .get_or_create(&ReasonLabels {
                    reason: e.metric_label(),
                })
                .inc();
            e.into_response()
        }
    }
}

/// Only the models this key may use.
async fn models(Caller { key, table }: Caller) -> Result<Response, ApiError> {
    let data: Vec<_> = table
        .public_models()
        .filter(|name| table.route(name).is_some_and(|r| key.may_use(r)))
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "infergate"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Unknown path.".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[derive(Deserialize)]
struct SignatureQuery {
    signing_algo: Option<String>,
    /// NEAR AI's verifiers name the model; an id already says which
    /// answer, so it is accepted and not needed.
    #[allow(dead_code, reason = "accepted for NEAR AI's verifiers, not needed")]
    model: Option<String>,
}

async fn signature(
    State(s): State<Arc<AppState>>,
    Caller { key, table }: Caller,
    PeerHop(hop): PeerHop,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<SignatureQuery>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|_| attestation::malformed_query())?;
    let algo = match q.signing_algo.as_deref() {
        None => Algo::Ecdsa,
        Some(a) => Algo::parse(a).ok_or_else(|| {
            ApiError::invalid(
                "signing_algo must be `ecdsa` or `ed25519`.",
                Some("signing_algo"),
            )
        })?,
    };
    if !valid_id(&id) {
        return Err(ApiError::invalid("Malformed response id.", Some("id")));
    }
    // Someone else's record looks exactly like a missing one.
    let not_found = || ApiError::NotFound(format!("No signature for id `{id}`."));
    let record = s.records.get(&id);
    let local = record.as_ref().filter(|r| r.via().is_none());
    let Some(record) = local else {
        // Signed elsewhere: by the sidecar this one forwarded to, or one
        // that served the request directly.
        let via = record.as_ref().and_then(|r| r.via());
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or(uri.path());
        return s
            .peers
            .signature(&table, via.map(|v| &**v), path, &headers, hop.is_some())
            .await
            .ok_or_else(not_found);
    };
    if record.owner.key_id != key.id && !key.admin {
        return Err(not_found());
    }
    let (request, response) = match &record.answer {
        Answer::Hashed { request, response } => (request, response),
        Answer::Unsigned(reason) => return Err(ApiError::NotSigned(reason.message())),
        Answer::Forwarded(_) => return Err(not_found()),
    };
    let signed = s.records.sign(&id, request, response, &s.signer, algo);
    if signed.made {
        s.metrics
            .signatures
            .get_or_create(&AlgoLabels {
                algo: algo_label(algo),
            })
            .inc();
    }
    Ok(Json(json!({
        "text": signed.text,
        "signature": signed.signature,
        "signing_address": s.signer.identity(algo),
        "signing_algo": algo,
    }))
    .into_response())
}

fn algo_label(algo: Algo) -> &'static str {
    match algo {
        Algo::Ecdsa => "ecdsa",
        Algo::Ed25519 => "ed25519",
    }
}

/// For peers only (a hop): which backend here produced `id`, if this
/// sidecar served it and the caller's key made it.
async fn owner(
    State(s): State<Arc<AppState>>,
    Caller { key, .. }: Caller,
    PeerHop(hop): PeerHop,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("No response `{id}` here."));
    if hop.is_none() || !valid_id(&id) {
        return Err(not_found());
    }
    let owner = s
        .records
        .get(&id)
        .filter(|r| r.via().is_none())
        .map(|r| r.owner)
        .ok_or_else(not_found)?;
    if owner.key_id != key.id && !key.admin {
        return Err(not_found());
    }
    Ok(Json(json!({"backend": owner.backend, "key_id": owner.key_id})).into_response())
}
