//! A change between two configs, sent instead of the whole config when a
//! sidecar already runs the older one: revoking one key among ten thousand
//! sends that key's id, not the ten thousand.
//!
//! Each list (keys, backends, models) changes by id: entries removed,
//! entries replaced in place, new entries appended. `diff` makes a delta
//! only when applying it reproduces the new config exactly (same order, so
//! the same version); otherwise the caller sends the whole config.

use serde::{Deserialize, Serialize};

use crate::Timeouts;
use crate::{ApiKey, Backend, BackendId, ConfigError, GatewayConfig, KeyId, Limits, ModelRoute};

/// Changes to one list of entries keyed by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Changes<T, Id> {
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Id>,
    /// Replaced where an entry with the same id is, else appended.
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<T>,
}

impl<T, Id> Default for Changes<T, Id> {
    fn default() -> Self {
        Changes {
            remove: Vec::new(),
            upsert: Vec::new(),
        }
    }
}

impl<T, Id> Changes<T, Id> {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.upsert.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigDelta {
    /// The version the receiver must run for this delta to apply.
    pub from: String,
    /// The version the receiver runs after it.
    pub to: String,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub keys: Changes<ApiKey, KeyId>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub backends: Changes<Backend, BackendId>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub models: Changes<ModelRoute, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

trait Keyed {
    type Id: PartialEq + Clone;
    fn id(&self) -> &Self::Id;
}

impl Keyed for ApiKey {
    type Id = KeyId;
    fn id(&self) -> &KeyId {
        &self.id
    }
}

impl Keyed for Backend {
    type Id = BackendId;
    fn id(&self) -> &BackendId {
        &self.id
    }
}

impl Keyed for ModelRoute {
    type Id = String;
    fn id(&self) -> &String {
        &self.name
    }
}

fn apply_list<T: Keyed + Clone>(list: &mut Vec<T>, changes: &Changes<T, T::Id>) {
    list.retain(|e| !changes.remove.contains(e.id()));
    for entry in &changes.upsert {
        match list.iter_mut().find(|e| e.id() == entry.id()) {
            Some(slot) => *slot = entry.clone(),
            None => list.push(entry.clone()),
        }
    }
}

impl GatewayConfig {
    /// The delta from `self` (version `from`) to `new` (version `to`), or
    /// `None` when applying one would not give `new` exactly (entries added
    /// anywhere but at the end): then the whole config must go.
    ///
    /// `diff` checks its delta by applying it, so `apply` and `diff` cannot
    /// disagree about order.
    pub fn diff(&self, new: &GatewayConfig, from: &str, to: &str) -> Option<ConfigDelta> {
        let delta = ConfigDelta {
            from: from.to_owned(),
            to: to.to_owned(),
            keys: diff_keyed(&self.keys, &new.keys),
            backends: diff_keyed(&self.backends, &new.backends),
            models: diff_keyed(&self.models, &new.models),
            timeouts: (self.timeouts != new.timeouts).then_some(new.timeouts),
            limits: (self.limits != new.limits).then_some(new.limits),
        };
        let mut applied = self.apply_changes(&delta);
        applied.version.clone_from(&new.version);
        (applied == *new).then_some(delta)
    }

    /// `self` changed by `delta`, validated, with version `delta.to`. The
    /// caller checks that it runs `delta.from`.
    pub fn apply(&self, delta: &ConfigDelta) -> Result<GatewayConfig, ConfigError> {
        let mut next = self.apply_changes(delta);
        next.version = Some(delta.to.clone());
        next.validate()?;
        Ok(next)
    }

    fn apply_changes(&self, delta: &ConfigDelta) -> GatewayConfig {
        let mut next = self.clone();
        apply_list(&mut next.keys, &delta.keys);
        apply_list(&mut next.backends, &delta.backends);
        apply_list(&mut next.models, &delta.models);
        if let Some(t) = delta.timeouts {
            next.timeouts = t;
        }
        if let Some(l) = delta.limits {
            next.limits = l;
        }
        next
    }
}

/// Entries of `old` gone from `new`, and entries of `new` that are new or
/// differ; ids indexed once, so a list of n entries costs O(n).
fn diff_keyed<T>(old: &[T], new: &[T]) -> Changes<T, T::Id>
where
    T: Keyed + Clone + PartialEq,
    T::Id: std::hash::Hash + Eq,
{
    use std::collections::HashMap;
    let old_by_id: HashMap<&T::Id, &T> = old.iter().map(|o| (o.id(), o)).collect();
    let new_ids: std::collections::HashSet<&T::Id> = new.iter().map(Keyed::id).collect();
    Changes {
        remove: old
            .iter()
            .filter(|o| !new_ids.contains(o.id()))
            .map(|o| o.id().clone())
            .collect(),
        upsert: new
            .iter()
            .filter(|n| old_by_id.get(n.id()).is_none_or(|o| *o != *n))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    fn config(keys: &[&str], backends: &[&str]) -> GatewayConfig {
        GatewayConfig {
            keys: keys
                .iter()
                .enumerate()
                .map(|(i, id)| ApiKey {
                    id: KeyId::new(*id),
                    sha256: format!("{:064x}", i + 1),
                    models: vec!["*".into()],
                    admin: false,
                    limits: None,
                    cluster_limits: None,
                })
                .collect(),
            backends: backends
                .iter()
                .map(|id| Backend {
                    id: BackendId::new(*id),
                    group: Some("g".into()),
                    url: format!("http://{id}"),
                    sidecar: None,
                    attestation: true,
                    max_in_flight: 0,
                    api_key_file: None,
                    timeouts: None,
                })
                .collect(),
            models: vec![ModelRoute {
                name: "m".into(),
                aliases: vec![],
                strategy: Default::default(),
                sticky: Default::default(),
                prefix: Default::default(),
                targets: vec![Target {
                    backend: None,
                    group: Some("g".into()),
                    upstream_model: None,
                    weight: 1,
                }],
                keys: vec![],
            }],
            ..GatewayConfig::default()
        }
    }

    #[test]
    fn revoking_one_key_sends_only_its_id_and_applies_to_the_same_config() {
        let ids: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let old = config(&all, &["a", "b"]);
        let mut new = config(&all, &["a", "b"]);
        new.keys.remove(42);
        let delta = old.diff(&new, "v1", "v2").expect("a removal is a delta");
        assert_eq!(delta.keys.remove, ["k042"]);
        assert!(delta.keys.upsert.is_empty() && delta.backends.is_empty());
        let wire = serde_json::to_string(&delta).unwrap();
        assert!(wire.len() < 100, "{wire}");
        let mut applied = old.apply(&delta).unwrap();
        assert_eq!(applied.version.take().as_deref(), Some("v2"));
        assert_eq!(applied, new);
    }

    #[test]
    fn an_entry_changed_in_place_or_appended_is_a_delta_inserted_elsewhere_is_not() {
        let old = config(&["a", "c"], &["x"]);
        let mut changed = old.clone();
        changed.backends[0].max_in_flight = 8;
        changed
            .keys
            .push(config(&["a", "c", "d"], &[]).keys[2].clone());
        let delta = old.diff(&changed, "v1", "v2").unwrap();
        assert_eq!(delta.backends.upsert.len(), 1);
        assert_eq!(delta.keys.upsert.len(), 1);
        let mut applied = old.apply(&delta).unwrap();
        applied.version = None;
        assert_eq!(applied, changed);

        // "b" sorts between "a" and "c": appending would reorder the keys.
        let mut inserted = old.clone();
        inserted.keys.insert(1, config(&["b"], &[]).keys[0].clone());
        assert!(old.diff(&inserted, "v1", "v2").is_none());
    }

    #[test]
    fn a_delta_that_leaves_a_dangling_reference_is_refused() {
        let old = config(&["a"], &["x"]);
        let delta = ConfigDelta {
            from: "v1".into(),
            to: "v2".into(),
            keys: Changes::default(),
            backends: Changes {
                remove: vec![BackendId::new("x")],
                upsert: vec![],
            },
            models: Changes::default(),
            timeouts: None,
            limits: None,
        };
        let err = old.apply(&delta).unwrap_err();
        assert!(
            err.to_string().contains("group \"g\" has no backends"),
            "{err}"
        );
    }
}
