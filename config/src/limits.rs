//! Gateway-wide limits: body sizes, queueing, ejection, records.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    #[serde(default = "Limits::default_body")]
    pub max_body_bytes: usize,
    #[serde(default = "Limits::default_messages")]
    pub max_messages: usize,
    /// How long an ejected backend rests before it is tried again.
    #[serde(default = "Limits::default_eject")]
    pub eject_ms: u64,
    /// How long a client may take to send its body.
    #[serde(default = "Limits::default_body_read")]
    pub body_read_ms: u64,
    /// When every backend of a route is at its `maxInFlight`, how long a
    /// request waits for a slot before 503 ...
    #[serde(default = "Limits::default_queue")]
    pub queue_ms: u64,
    /// ... and how many requests may wait at once (the rest get 503 now).
    #[serde(default = "Limits::default_queued")]
    pub max_queued: usize,
    /// Bytes one answer may have; a larger one is cut with an error.
    #[serde(default = "Limits::default_response")]
    pub max_response_bytes: u64,
}

impl Limits {
    fn default_body() -> usize {
        4 * 1024 * 1024
    }
    fn default_messages() -> usize {
        1024
    }
    fn default_eject() -> u64 {
        5_000
    }
    fn default_body_read() -> u64 {
        30_000
    }
    fn default_queue() -> u64 {
        1_000
    }
    fn default_queued() -> usize {
        256
    }
    fn default_response() -> u64 {
        256 * 1024 * 1024
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: Self::default_body(),
            max_messages: Self::default_messages(),
            eject_ms: Self::default_eject(),
            body_read_ms: Self::default_body_read(),
            queue_ms: Self::default_queue(),
            max_queued: Self::default_queued(),
            max_response_bytes: Self::default_response(),
        }
    }
}
