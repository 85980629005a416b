//! The gateway configuration: the one schema the sidecar accepts, from a YAML
//! file or from the operator's `PUT /admin/v1/config`. The operator renders
//! it and the sidecar runs it; both depend on this crate and on nothing of
//! each other, so a change here is an API change for both.
//!
//! Keys are stored as SHA-256 hashes only; the config never holds a secret
//! that lets anyone call the gateway.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiKey {
    /// Identifier safe to log and to put in metrics (never the key itself).
    pub id: String,
    /// Hex SHA-256 of the full key string as the client sends it.
    pub sha256: String,
    /// Public model names (or aliases) this key may use; `*` means all.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// May read every signature and every record, not only its own.
    #[serde(default)]
    pub admin: bool,
    /// Per-key quotas; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<KeyLimits>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    /// Stable name, used in metrics, logs and sticky hashing.
    pub id: String,
    /// Base URL of the OpenAI-compatible server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// Public URL of the sidecar that sits next to this backend, when it is
    /// not this one: requests for it are forwarded there (one hop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
    /// External providers are not ours to attest: no signatures for them.
    #[serde(default = "yes")]
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

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelRoute {
    /// Public model name clients ask for.
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub sticky: Sticky,
    /// Tuning of `prefixAffinity` (ignored by the other strategies).
    #[serde(default, skip_serializing_if = "PrefixAffinity::is_default")]
    pub prefix: PrefixAffinity,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Target {
    /// A `Backend::id`.
    pub backend: String,
    /// Model name the upstream knows; defaults to the public name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    #[default]
    RoundRobin,
    /// Fewest requests in flight, fleet-wide where peers share their load.
    LeastInFlight,
    /// Rendezvous hashing on the prompt's prefix, so every replica sends a
    /// prefix to the pod whose KV cache holds it, with bounded load.
    PrefixAffinity,
}

/// How `prefixAffinity` derives its key and bounds the load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixAffinity {
    /// Bytes of the prompt's head that make the key: the leading system
    /// messages and the first turn after them, cut at this length. Long
    /// enough to get past a shared system prompt, short enough that a long
    /// shared document keys on the document, not on each question.
    #[serde(default = "PrefixAffinity::default_bytes")]
    pub key_bytes: u32,
    /// Bounded load: a backend above `loadFactor x` the mean load is
    /// skipped for the next one in rendezvous order (at least 1.0).
    #[serde(default = "PrefixAffinity::default_load_factor")]
    pub load_factor: f64,
}

impl PrefixAffinity {
    fn default_bytes() -> u32 {
        16 * 1024
    }
    fn default_load_factor() -> f64 {
        1.25
    }
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for PrefixAffinity {
    fn default() -> Self {
        PrefixAffinity {
            key_bytes: Self::default_bytes(),
            load_factor: Self::default_load_factor(),
        }
    }
}

/// Where a session key comes from, tried in this order; the first present wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sticky {
    /// Request header carrying an explicit session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Use `previous_response_id` (Responses API) as the session key.
    #[serde(default = "yes")]
    pub previous_response_id: bool,
    /// Use the request's `user` field as the session key.
    #[serde(default)]
    pub user: bool,
}

impl Default for Sticky {
    fn default() -> Self {
        Sticky {
            header: Some("x-session-id".to_owned()),
            previous_response_id: true,
            user: false,
        }
    }
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

    /// The version every replica and the operator agree on: SHA-256 of the
    /// canonical JSON (sorted keys, no whitespace) of the config without its
    /// `version` field.
    #[allow(
        clippy::expect_used,
        reason = "a config is plain data: it always serialises"
    )]
    pub fn computed_version(&self) -> String {
        let mut copy = self.clone();
        copy.version = None;
        let value = serde_json::to_value(&copy).expect("config is always serialisable");
        hex::encode(Sha256::digest(canonical_json(&value).as_bytes()))
    }

    /// The stated version, or the computed one.
    pub fn effective_version(&self) -> String {
        self.version
            .clone()
            .unwrap_or_else(|| self.computed_version())
    }

    /// Everything a reference can get wrong, checked before the config is used.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut key_ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for k in &self.keys {
            if !key_ids.insert(k.id.as_str()) {
                return invalid(format!("keys: duplicate id {:?}", k.id));
            }
            if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
                return invalid(format!("keys[{}]: sha256 must be 64 hex characters", k.id));
            }
            if !key_hashes.insert(k.sha256.to_ascii_lowercase()) {
                return invalid(format!("keys[{}]: the same key hash appears twice", k.id));
            }
        }
        let mut backend_ids = HashSet::new();
        for b in &self.backends {
            if !backend_ids.insert(b.id.as_str()) {
                return invalid(format!("backends: duplicate id {:?}", b.id));
            }
            for (what, url) in [("url", Some(&b.url)), ("sidecar", b.sidecar.as_ref())] {
                if let Some(url) = url {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return invalid(format!(
                            "backends[{}]: {what} must start with http:// or https://",
                            b.id
                        ));
                    }
                }
            }
        }
        let mut names = HashSet::new();
        for m in &self.models {
            if m.name.is_empty() {
                return invalid("models: a route has an empty name".into());
            }
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if !names.insert(n.as_str()) {
                    return invalid(format!("models: name or alias {n:?} is used twice"));
                }
            }
            if m.targets.is_empty() {
                return invalid(format!("models[{}]: no targets", m.name));
            }
            if m.prefix.key_bytes < 64 || m.prefix.key_bytes > 1 << 20 {
                return invalid(format!(
                    "models[{}]: prefix.keyBytes must be 64 to 1048576",
                    m.name
                ));
            }
            // NaN fails this too.
            if !(1.0..=100.0).contains(&m.prefix.load_factor) {
                return invalid(format!(
                    "models[{}]: prefix.loadFactor must be 1.0 to 100.0",
                    m.name
                ));
            }
            for t in &m.targets {
                if !backend_ids.contains(t.backend.as_str()) {
                    return invalid(format!(
                        "models[{}]: target backend {:?} is not defined",
                        m.name, t.backend
                    ));
                }
                if t.weight == 0 {
                    return invalid(format!(
                        "models[{}]: target {:?} has weight 0",
                        m.name, t.backend
                    ));
                }
            }
        }
        for k in &self.keys {
            for m in &k.models {
                if m != "*" && !names.contains(m.as_str()) {
                    return invalid(format!("keys[{}]: unknown model {m:?}", k.id));
                }
            }
        }
        if self.limits.max_body_bytes == 0 || self.limits.max_messages == 0 {
            return invalid("limits: maxBodyBytes and maxMessages must be positive".into());
        }
        Ok(())
    }
}

/// JSON with object keys sorted and no insignificant whitespace.
#[allow(clippy::expect_used, reason = "a Value always serialises")]
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let ordered: BTreeMap<_, _> = map.iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(
                    ordered.into_iter().map(|(k, v)| (k.clone(), v)).collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    // serde_json's Map is a BTreeMap without `preserve_order`, but sort
    // explicitly so canonical form never depends on a feature flag elsewhere.
    serde_json::to_string(&sorted(value)).expect("value is serialisable")
}

/// Hex SHA-256 of an API key, as stored in `ApiKey::sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
keys:
  - id: team-a
    sha256: "0000000000000000000000000000000000000000000000000000000000000001"
    models: [llama]
backends:
  - id: sim-0
    url: http://127.0.0.1:8000
models:
  - name: llama-3
    aliases: [llama]
    targets:
      - backend: sim-0
        upstreamModel: meta-llama/Llama-3
"#;

    #[test]
    fn parses_yaml_with_defaults() {
        let cfg = GatewayConfig::from_yaml(EXAMPLE).unwrap();
        assert_eq!(cfg.models[0].targets[0].weight, 1);
        assert_eq!(cfg.models[0].strategy, Strategy::RoundRobin);
        assert!(cfg.backends[0].attestation);
        assert_eq!(cfg.timeouts.idle_ms, 30_000);
    }

    #[test]
    fn version_is_stable_and_ignores_stated_version() {
        let a = GatewayConfig::from_yaml(EXAMPLE).unwrap();
        let mut b = a.clone();
        b.version = Some("whatever".into());
        assert_eq!(a.computed_version(), b.computed_version());
        assert_eq!(a.computed_version().len(), 64);
        let mut c = a.clone();
        c.models[0].aliases.push("other".into());
        assert_ne!(a.computed_version(), c.computed_version());
    }

    #[test]
    fn rejects_dangling_and_duplicate_references() {
        let dangling = EXAMPLE.replace("backend: sim-0", "backend: nope");
        let err = GatewayConfig::from_yaml(&dangling).unwrap_err();
        assert!(err.to_string().contains("\"nope\" is not defined"), "{err}");

        let unknown_model = EXAMPLE.replace("models: [llama]", "models: [gpt]");
        assert!(GatewayConfig::from_yaml(&unknown_model).is_err());

        let dup_alias = EXAMPLE.replace("aliases: [llama]", "aliases: [llama-3]");
        assert!(GatewayConfig::from_yaml(&dup_alias).is_err());

        let unknown_field = EXAMPLE.replace("aliases:", "alias:");
        assert!(matches!(
            GatewayConfig::from_yaml(&unknown_field),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"d":2,"c":[3]}}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":{"c":[3],"d":2},"b":1}"#);
    }
}
