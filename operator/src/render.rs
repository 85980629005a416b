//! The pure heart of the operator: cluster objects in, one deterministic
//! `GatewayConfig` out (plus what each object's status should say). No IO,
//! so plain unit tests cover every rule.
//!
//! Names are namespaced in the rendered config (`ns/provider`, and
//! `ns/provider/podIP` per endpoint) so two namespaces never collide; public
//! model names are global, and the first route by (namespace, name) wins a
//! clash.

use std::collections::{BTreeMap, BTreeSet};

use infergate_config::{
    self as config, ApiKey, Backend, BackendId, ConfigError, GatewayConfig, KeyId, KeyLimits,
    ModelRoute as RouteConfig, Sticky, Target, TimeoutOverrides, Timeouts,
};
use infergate_crds::{InferenceProviderSpec, ModelRouteSpec, Strategy};

/// (namespace, name)
pub type ObjectKey = (String, String);

#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub providers: BTreeMap<ObjectKey, InferenceProviderSpec>,
    pub routes: BTreeMap<ObjectKey, ModelRouteSpec>,
    /// Key id -> the key itself (read from its Secret; only its hash leaves).
    pub keys: BTreeMap<String, String>,
    /// Key id -> its cluster-wide limits (from its Secret's annotations).
    pub limits: BTreeMap<String, KeyLimits>,
    /// Running sidecars: each enforces its share of a key's limits.
    pub sidecars: u32,
    /// (namespace, service) -> ready endpoint addresses, from EndpointSlices.
    pub endpoints: BTreeMap<ObjectKey, BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderOutcome {
    pub ready_backends: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteOutcome {
    /// Why the route is not accepted (a name clash), if it is not.
    pub rejected: Option<String>,
    /// Providers the route names that do not exist.
    pub missing: Vec<String>,
    /// `provider: model` pairs where the provider lists its `models` and
    /// the model the route asks it for is not among them.
    pub unserved: Vec<String>,
    pub resolved_backends: u32,
}

/// A config that passed validation, with what status needs to know.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub config: GatewayConfig,
    pub version: String,
    pub providers: BTreeMap<ObjectKey, ProviderOutcome>,
    pub routes: BTreeMap<ObjectKey, RouteOutcome>,
    /// Backend id -> the provider it was made from (sidecars report
    /// backends by id; status is per provider).
    pub backend_providers: BTreeMap<BackendId, ObjectKey>,
}

/// The group a provider's backends form; routes target it by this name.
fn provider_group((ns, name): &ObjectKey) -> String {
    format!("{ns}/{name}")
}

/// Where the chart mounts a provider's upstream key Secret in the sidecar.
pub fn upstream_key_path(secret: &str, key: &str) -> String {
    format!("/var/run/infergate/upstream/{secret}/{key}")
}

/// The one config for `inputs`, validated here, once: what the operator
/// stores and pushes is exactly what passed (the sidecar checks again at
/// its own boundary).
pub fn render(inputs: &Inputs) -> Result<Rendered, ConfigError> {
    let mut backends = Vec::new();
    let mut backend_providers = BTreeMap::new();
    let mut by_provider: BTreeMap<&ObjectKey, Vec<BackendId>> = BTreeMap::new();
    let mut providers = BTreeMap::new();
    for (key @ (ns, name), spec) in &inputs.providers {
        let made = provider_backends(ns, name, spec, inputs);
        providers.insert(
            key.clone(),
            ProviderOutcome {
                ready_backends: made.len() as u32,
            },
        );
        by_provider.insert(key, made.iter().map(|b| b.id.clone()).collect());
        backend_providers.extend(made.iter().map(|b| (b.id.clone(), key.clone())));
        backends.extend(made);
    }

    let mut routes = BTreeMap::new();
    let mut models = Vec::new();
    let mut taken = BTreeSet::new();
    for (key @ (ns, _), spec) in &inputs.routes {
        let names: Vec<&String> = std::iter::once(&spec.model).chain(&spec.aliases).collect();
        if let Some(clash) = names.iter().find(|n| taken.contains(n.as_str())) {
            routes.insert(
                key.clone(),
                RouteOutcome {
                    rejected: Some(format!(
                        "model name or alias {clash:?} is already used by another ModelRoute"
                    )),
                    missing: Vec::new(),
                    unserved: Vec::new(),
                    resolved_backends: 0,
                },
            );
            continue;
        }
        let mut missing = Vec::new();
        let mut unserved = Vec::new();
        let mut targets = Vec::new();
        let mut resolved_backends = 0;
        for b in &spec.backends {
            let provider = (ns.clone(), b.provider.clone());
            let upstream = b.upstream_model.as_ref().unwrap_or(&spec.model);
            let serves =
                |p: &InferenceProviderSpec| p.models.is_empty() || p.models.contains(upstream);
            match by_provider.get(&provider) {
                None => missing.push(b.provider.clone()),
                Some(_) if !serves(&inputs.providers[&provider]) => {
                    unserved.push(format!("{}: {upstream}", b.provider));
                }
                // The provider's backends as one group target: the config
                // grows with routes + pods, not routes x pods.
                Some(ids) if !ids.is_empty() => {
                    resolved_backends += ids.len() as u32;
                    targets.push(Target {
                        backend: None,
                        group: Some(provider_group(&provider)),
                        upstream_model: b.upstream_model.clone(),
                        weight: b.weight.max(1),
                    });
                }
                Some(_) => {}
            }
        }
        routes.insert(
            key.clone(),
            RouteOutcome {
                rejected: None,
                missing,
                unserved,
                resolved_backends,
            },
        );
        if targets.is_empty() {
            // Nothing to send it to: the sidecars answer 404 for it, and the
            // route's status says why.
            continue;
        }
        taken.extend(names.iter().map(|n| n.to_string()));
        models.push(RouteConfig {
            name: spec.model.clone(),
            aliases: spec.aliases.clone(),
            strategy: match spec.strategy {
                Strategy::RoundRobin => config::Strategy::RoundRobin,
                Strategy::LeastInFlight => config::Strategy::LeastInFlight,
                Strategy::PrefixAffinity => config::Strategy::PrefixAffinity,
            },
            prefix: prefix_affinity(spec.prefix_affinity),
            sticky: spec
                .sticky
                .as_ref()
                .map_or_else(Sticky::default, |s| Sticky {
                    header: s.header.clone(),
                    user: s.user,
                    previous_response_id: s.previous_response_id,
                }),
            targets,
            keys: spec
                .api_keys
                .iter()
                .map(|k| KeyId::new(k.as_str()))
                .collect(),
        });
    }

    // Two ids holding the same key would make the config ambiguous (the
    // sidecar refuses it): the first id in order keeps it. Every key may use
    // every route that does not name its keys (`ModelRoute::keys`), so a key
    // costs one line however many routes there are.
    let mut hashes = BTreeSet::new();
    let keys = inputs
        .keys
        .iter()
        .map(|(id, key)| (id, config::hash_key(key)))
        .filter(|(_, hash)| hashes.insert(hash.clone()))
        .map(|(id, sha256)| ApiKey {
            id: KeyId::new(id.as_str()),
            sha256,
            models: vec!["*".to_owned()],
            admin: false,
            limits: inputs
                .limits
                .get(id)
                .map(|l| sidecar_share(*l, inputs.sidecars)),
            // Sidecars with a shared quota store enforce the whole limit
            // together; the share above is what each falls back to.
            cluster_limits: inputs.limits.get(id).copied(),
        })
        .collect();

    let mut config = GatewayConfig {
        version: None,
        keys,
        backends,
        models,
        timeouts: Timeouts::default(),
        limits: Default::default(),
    };
    config.validate()?;
    let version = config.computed_version();
    config.version = Some(version.clone());
    Ok(Rendered {
        config,
        version,
        providers,
        routes,
        backend_providers,
    })
}

/// Limits are local to each sidecar, so each enforces its share of the
/// key's total (rounded up; at least 1 where a limit is set, so a key is
/// never shut out by rounding; 0 stays "no limit").
pub fn sidecar_share(total: KeyLimits, sidecars: u32) -> KeyLimits {
    let n = sidecars.max(1);
    let share32 = |v: u32| if v == 0 { 0 } else { v.div_ceil(n) };
    KeyLimits {
        requests_per_minute: share32(total.requests_per_minute),
        concurrent_requests: share32(total.concurrent_requests),
        tokens_per_minute: if total.tokens_per_minute == 0 {
            0
        } else {
            total.tokens_per_minute.div_ceil(u64::from(n))
        },
    }
}

fn provider_backends(
    ns: &str,
    name: &str,
    spec: &InferenceProviderSpec,
    inputs: &Inputs,
) -> Vec<Backend> {
    // Unset fields stay unset: the sidecar falls back to the global ones.
    let timeouts = spec.timeouts.map(|t| TimeoutOverrides {
        connect_ms: t.connect_ms,
        first_byte_ms: t.first_byte_ms,
        idle_ms: t.idle_ms,
        total_ms: None,
    });
    let group = provider_group(&(ns.to_owned(), name.to_owned()));
    let base = |id: String, url: String, sidecar: Option<String>| Backend {
        id: BackendId::new(id),
        group: Some(group.clone()),
        url,
        sidecar,
        attestation: spec.attestation,
        max_in_flight: spec.max_concurrent_requests,
        api_key_file: spec
            .api_key_secret
            .as_ref()
            .map(|s| upstream_key_path(&s.name, &s.key)),
        timeouts,
    };
    let id = format!("{ns}/{name}");
    if let Some(url) = &spec.url {
        return vec![base(id, url.trim_end_matches('/').to_owned(), None)];
    }
    if let Some(svc) = &spec.service {
        let url = format!("http://{}.{ns}.svc:{}", svc.name, svc.port);
        return vec![base(id, url, None)];
    }
    let Some(ep) = &spec.endpoints else {
        return Vec::new();
    };
    inputs
        .endpoints
        .get(&(ns.to_owned(), ep.service.clone()))
        .into_iter()
        .flatten()
        .map(|ip| {
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            base(
                format!("{id}/{ip}"),
                format!("http://{host}:{}", ep.port),
                Some(format!("http://{host}:{}", ep.sidecar_port)),
            )
        })
        .collect()
}

/// The CRD's optional tuning over the sidecar's defaults.
fn prefix_affinity(p: Option<infergate_crds::PrefixAffinity>) -> config::PrefixAffinity {
    let d = config::PrefixAffinity::default();
    let p = p.unwrap_or_default();
    config::PrefixAffinity {
        key_bytes: p.key_bytes.unwrap_or(d.key_bytes),
        load_factor: p.load_factor.unwrap_or(d.load_factor),
    }
}

#[cfg(test)]
mod tests;
