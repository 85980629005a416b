//! Model routes: a public name and its aliases, how a backend is chosen,
//! and the targets it is chosen from.

use serde::{Deserialize, Serialize};

use crate::{BackendId, KeyId};

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
    /// When set, only these keys may use the route (and only if their own
    /// `models` allow it); empty: every key whose `models` allow it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Target {
    /// One backend, by `Backend::id`; or else
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendId>,
    /// every backend whose `group` this is (e.g. all pods of a provider),
    /// each with this target's weight: a route names a fleet of any size in
    /// one line, so the config grows with routes + pods, not their product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
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
    #[serde(default = "crate::yes")]
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
