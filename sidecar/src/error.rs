//! One error type for every handler, rendered as the OpenAI error body
//! `{"error":{"message","type","param","code"}}` with the matching status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Missing API key: send it as `Authorization: Bearer <key>`.")]
    MissingKey,
    #[error("Incorrect API key provided.")]
    InvalidKey,
    #[error("This API key may not use model `{0}`.")]
    ModelNotAllowed(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("Request body is larger than the limit of {0} bytes.")]
    BodyTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error("Admin token missing or wrong.")]
    AdminUnauthorized,
    #[error("No backend is available for model `{0}`.")]
    NoBackend(String),
    #[error("Upstream error: {0}")]
    Upstream(String),
    #[error("Upstream timed out: {0}")]
    UpstreamTimeout(&'static str),
    #[error("Method not allowed.")]
    MethodNotAllowed,
    #[error("{0}")]
    NotSigned(&'static str),
    #[error("Rate limit reached for {}; retry after {} s.", .0.what, retry_secs(.0.retry_after))]
    RateLimited(crate::quota::Exceeded),
    #[error("The request body did not arrive in time.")]
    BodyTimeout,
    #[error("All backends for model `{0}` are at capacity; retry shortly.")]
    AtCapacity(String),
    /// Internal headers (`x-infergate-*`) that no peer signed.
    #[error("Headers x-infergate-hop and x-infergate-backend-pin are internal to infergate and not accepted from clients.")]
    ForgedHop,
    #[error("Content-Type must be application/json.")]
    UnsupportedMediaType,
    /// A config delta for another version than the one running here.
    #[error("This sidecar runs config version {0}; send the whole config.")]
    VersionConflict(String),
}

fn retry_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingKey | InvalidKey | AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            ModelNotFound(_) | NotFound(_) | NotSigned(_) => StatusCode::NOT_FOUND,
            InvalidRequest { .. } | ForgedHop => StatusCode::BAD_REQUEST,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            VersionConflict(_) => StatusCode::CONFLICT,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            NoBackend(_) | AtCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Upstream(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Low-cardinality label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingKey => "missing_api_key",
            InvalidKey => "invalid_api_key",
            ModelNotAllowed(_) => "model_not_allowed",
            ModelNotFound(_) => "model_not_found",
            InvalidRequest { .. } => "invalid_request",
            BodyTooLarge(_) => "request_too_large",
            NotFound(_) => "not_found",
            AdminUnauthorized => "admin_unauthorized",
            NoBackend(_) => "no_backend",
            Upstream(_) => "upstream_error",
            UpstreamTimeout(_) => "upstream_timeout",
            MethodNotAllowed => "method_not_allowed",
            NotSigned(_) => "signature_unavailable",
            RateLimited(_) => "rate_limit_exceeded",
            BodyTimeout => "request_timeout",
            AtCapacity(_) => "at_capacity",
            ForgedHop => "forged_internal_header",
            UnsupportedMediaType => "unsupported_media_type",
            VersionConflict(_) => "version_conflict",
        }
    }

    fn kind(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingKey | InvalidKey | AdminUnauthorized => "authentication_error",
            ModelNotAllowed(_) => "permission_error",
            NoBackend(_) | Upstream(_) | UpstreamTimeout(_) | AtCapacity(_) => "server_error",
            RateLimited(e) if e.what == "tokens" => "tokens",
            RateLimited(_) => "requests",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidRequest { param, .. } => *param,
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) => Some("model"),
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// The OpenAI error body as bytes; also used inside SSE error frames.
pub fn error_json(message: String, kind: &str, code: &str) -> Vec<u8> {
    serde_json::to_vec(&Body {
        error: Inner {
            message,
            kind,
            param: None,
            code,
        },
    })
    // Strings only: serialising cannot fail; the fallback is never used.
    .unwrap_or_else(|_| b"{\"error\":{}}".to_vec())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body {
            error: Inner {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.metric_label(),
            },
        })
        .unwrap_or_else(|_| b"{\"error\":{}}".to_vec());
        let mut resp = (self.status(), body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match &self {
            ApiError::RateLimited(e) => Some(retry_secs(e.retry_after)),
            ApiError::AtCapacity(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::MissingKey | ApiError::InvalidKey) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
