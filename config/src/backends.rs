//! Backends (upstream servers) and their deadlines.

use serde::{Deserialize, Serialize};

use crate::BackendId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    /// Stable name, used in metrics, logs and sticky hashing.
    pub id: BackendId,
    /// The group routes name to target every backend in it (the operator
    /// sets the provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Base URL of the OpenAI-compatible server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// Public URL of the sidecar that sits next to this backend, when it is
    /// not this one: requests for it are forwarded there (one hop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
    /// External providers are not ours to attest: no signatures for them.
    #[serde(default = "crate::yes")]
    pub attestation: bool,
    /// Concurrent requests this backend accepts from this sidecar (0 = unbounded).
    #[serde(default)]
    pub max_in_flight: u32,
    /// File holding the upstream's API key (a mounted Secret), sent as
    /// `Authorization: Bearer` instead of the client's key. Read at swap time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// Per-backend deadlines; unset fields fall back to the global ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutOverrides>,
}

/// Deadlines in milliseconds. Each phase has its own: a long generation that
/// keeps flowing is never cut by `idle_ms`, only a stall is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(default = "Timeouts::default_connect")]
    pub connect_ms: u64,
    /// Streams: until response headers and the first body bytes arrive.
    #[serde(default = "Timeouts::default_first_byte")]
    pub first_byte_ms: u64,
    /// Longest gap between two body chunks.
    #[serde(default = "Timeouts::default_idle")]
    pub idle_ms: u64,
    /// Non-streamed answers, whole (vLLM sends nothing until it is done);
    /// 0 = none. Streams are bounded by `first_byte_ms` and `idle_ms`.
    #[serde(default = "Timeouts::default_total")]
    pub total_ms: u64,
}

/// A backend's own deadlines: each field it leaves out is the global one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
}

impl TimeoutOverrides {
    pub fn over(self, global: Timeouts) -> Timeouts {
        Timeouts {
            connect_ms: self.connect_ms.unwrap_or(global.connect_ms),
            first_byte_ms: self.first_byte_ms.unwrap_or(global.first_byte_ms),
            idle_ms: self.idle_ms.unwrap_or(global.idle_ms),
            total_ms: self.total_ms.unwrap_or(global.total_ms),
        }
    }
}

impl Timeouts {
    fn default_connect() -> u64 {
        2_000
    }
    fn default_first_byte() -> u64 {
        60_000
    }
    fn default_idle() -> u64 {
        30_000
    }
    fn default_total() -> u64 {
        600_000
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: Self::default_connect(),
            first_byte_ms: Self::default_first_byte(),
            idle_ms: Self::default_idle(),
            total_ms: Self::default_total(),
        }
    }
}
