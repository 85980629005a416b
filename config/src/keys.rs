//! API keys as the config holds them: an id, the key's SHA-256, the models
//! it may use and its quotas. Never the key itself.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::KeyId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiKey {
    /// Identifier safe to log and to put in metrics (never the key itself).
    pub id: KeyId,
    /// Hex SHA-256 of the full key string as the client sends it.
    pub sha256: String,
    /// Public model names (or aliases) this key may use; `*` means all.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// May read every signature and every record, not only its own.
    #[serde(default)]
    pub admin: bool,
    /// Per-key quotas (this sidecar's share); absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<KeyLimits>,
    /// The key's whole limits, for sidecars that share a quota store
    /// (`--quota-redis`): they enforce these together and fall back to
    /// `limits` when the store does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_limits: Option<KeyLimits>,
}

/// Quotas for one key. Zero means no limit for that dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyLimits {
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Requests (streams included) in flight at once.
    #[serde(default)]
    pub concurrent_requests: u32,
    /// Prompt + completion tokens, as the upstream reports them.
    #[serde(default)]
    pub tokens_per_minute: u64,
}

fn all_models() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Hex SHA-256 of an API key, as stored in `ApiKey::sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
