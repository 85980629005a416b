//! The public OpenAI-compatible surface.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::error::ApiError;
use crate::metrics::ReasonLabels;
use crate::validate::Endpoint;
use crate::AppState;

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    forward(s, Endpoint::Chat, headers, body).await
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    forward(s, Endpoint::Completions, headers, body).await
}

async fn responses(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    forward(s, Endpoint::Responses, headers, body).await
}

async fn forward(s: Arc<AppState>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    match crate::proxy::forward(s.clone(), endpoint, headers, body).await {
        Ok(resp) => resp,
        Err(e) => {
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
async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let table = s.table.load();
    let key = crate::auth::authenticate(&table, &headers)?;
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
