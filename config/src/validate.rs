//! Everything a reference in a config can get wrong, checked before the
//! config is used: duplicate ids and hashes, dangling targets, bad URLs.

use std::collections::HashSet;

use crate::{ConfigError, GatewayConfig};

impl GatewayConfig {
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
        let groups: HashSet<&str> = self
            .backends
            .iter()
            .filter_map(|b| b.group.as_deref())
            .collect();
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
                let what = match (&t.backend, &t.group) {
                    (Some(b), None) if backend_ids.contains(b.as_str()) => format!("{b:?}"),
                    (Some(b), None) => {
                        return invalid(format!(
                            "models[{}]: target backend {b:?} is not defined",
                            m.name
                        ))
                    }
                    (None, Some(g)) if groups.contains(g.as_str()) => format!("group {g:?}"),
                    (None, Some(g)) => {
                        return invalid(format!(
                            "models[{}]: target group {g:?} has no backends",
                            m.name
                        ))
                    }
                    _ => {
                        return invalid(format!(
                            "models[{}]: a target names one backend or one group",
                            m.name
                        ))
                    }
                };
                if t.weight == 0 {
                    return invalid(format!("models[{}]: target {what} has weight 0", m.name));
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
