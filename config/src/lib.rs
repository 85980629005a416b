//! The gateway configuration: the one schema the sidecar accepts, from a YAML
//! file or from the operator's `PUT /admin/v1/config`. The operator renders
//! it and the sidecar runs it; both depend on this crate and on nothing of
//! each other, so a change here is an API change for both.
//!
//! Keys are stored as SHA-256 hashes only; the config never holds a secret
//! that lets anyone call the gateway.

use serde::{Deserialize, Serialize};

mod backends;
mod delta;
mod ids;
mod keys;
mod limits;
mod routes;
mod validate;
mod version;

pub use backends::{Backend, TimeoutOverrides, Timeouts};
pub use delta::{Changes, ConfigDelta};
pub use ids::{BackendId, KeyId};
pub use keys::{hash_key, ApiKey, KeyLimits};
pub use limits::Limits;
pub use routes::{ModelRoute, PrefixAffinity, Sticky, Strategy, Target};
pub use version::canonical_json;

/// The header of an admin `PUT /admin/v1/config` answer naming the backends
/// the sidecar took but cannot use (comma-separated ids), e.g. an unreadable
/// key file; the operator reports them in status.
pub const UNAVAILABLE_HEADER: &str = "x-infergate-unavailable-backends";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Set by the renderer to the SHA-256 of the canonical JSON of the rest;
    /// when absent the sidecar computes it the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub keys: Vec<ApiKey>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub models: Vec<ModelRoute>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
}

/// serde's default for a flag that is on unless the config says otherwise.
fn yes() -> bool {
    true
}

/// Why a config was refused. The message names the offending object.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("config is not valid YAML/JSON: {0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(String),
}

impl GatewayConfig {
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: GatewayConfig =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: GatewayConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests;
