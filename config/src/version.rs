//! The config's version: SHA-256 of its canonical JSON, so the operator and
//! every replica agree on it without talking.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::GatewayConfig;

impl GatewayConfig {
    /// The version every replica and the operator agree on: SHA-256 of the
    /// canonical JSON (sorted keys, no whitespace) of the config without its
    /// `version` field.
    #[allow(
        clippy::expect_used,
        reason = "a config is plain data: it always serialises"
    )]
    pub fn computed_version(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config is always serialisable");
        if let Some(map) = value.as_object_mut() {
            map.remove("version");
        }
        hex::encode(Sha256::digest(canonical_json(&value).as_bytes()))
    }

    /// The stated version, or the computed one.
    pub fn effective_version(&self) -> String {
        self.version
            .clone()
            .unwrap_or_else(|| self.computed_version())
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
