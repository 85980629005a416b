//! The routing table compiled from a `GatewayConfig`: what the request path
//! reads through one atomic pointer load. Built off the hot path at swap time.
//!
//! Backend counters (in flight, ejection) outlive a swap when the backend's
//! id and URL stay the same, so a request that started on the old table
//! still releases its slot on the counter the new table reads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;

use crate::config::{
    BackendId, ConfigDelta, ConfigError, GatewayConfig, KeyId, Limits, PrefixAffinity, Sticky,
    Strategy, Timeouts,
};
use crate::quota::KeyQuota;

pub struct Table {
    pub config: Arc<GatewayConfig>,
    pub version: String,
    keys: HashMap<[u8; 32], Arc<KeyEntry>>,
    models: HashMap<String, Arc<Route>>,
    pub backends: HashMap<BackendId, Arc<Backend>>,
    pub limits: Limits,
    /// Backends left out of routing, with why (e.g. an upstream key file
    /// that cannot be read): one bad backend must not block the whole config,
    /// or a leaked key could not be revoked while it lasts.
    pub unavailable: Vec<(BackendId, String)>,
}

pub struct KeyEntry {
    pub id: KeyId,
    pub hash: [u8; 32],
    pub admin: bool,
    all_models: bool,
    /// Canonical (public) route names this key may use.
    models: HashSet<String>,
    /// Kept across swaps while the key id and its limits stay the same.
    pub quota: Option<Arc<KeyQuota>>,
}

impl KeyEntry {
    pub fn may_use(&self, route: &Route) -> bool {
        (self.all_models || self.models.contains(&route.name))
            && (route.keys.is_empty() || route.keys.contains(&self.id))
    }
}

pub struct Route {
    pub name: String,
    pub strategy: Strategy,
    pub sticky: Sticky,
    pub prefix: PrefixAffinity,
    pub targets: Vec<RouteTarget>,
    pub total_weight: u64,
    /// Only these keys may use the route, when not empty.
    pub keys: HashSet<KeyId>,
    /// Round-robin cursor; relaxed ordering is enough, it only spreads load.
    pub cursor: AtomicUsize,
    /// Metric handles, bound on first use.
    pub metrics: std::sync::OnceLock<crate::metrics::RouteMetrics>,
}

pub struct RouteTarget {
    pub backend: Arc<Backend>,
    /// Model name to send upstream.
    pub upstream_model: String,
    pub weight: u32,
}

pub struct Backend {
    pub id: BackendId,
    /// Base URL without trailing slash.
    pub url: String,
    /// The sidecar next to it (shared with the records of answers that
    /// went through it).
    pub sidecar: Option<Arc<str>>,
    pub attestation: bool,
    pub max_in_flight: u32,
    pub timeouts: Timeouts,
    pub api_key: Option<HeaderValue>,
    /// Fixed per id so rendezvous hashing agrees across replicas.
    pub id_hash: u64,
    pub counters: Arc<BackendCounters>,
    /// The in-flight gauge handle, bound on first use.
    pub in_flight_gauge: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
    /// Per backend so each gets its own connect deadline; kept across swaps
    /// (with their connection pools) while URL and deadline stay the same.
    /// `http` carries the proxied requests; `client` the side traffic
    /// (metrics polls, stored-response look-ups).
    pub http: crate::upstream::HttpClient,
    client: reqwest::Client,
    /// The proxied requests' URIs, parsed once.
    pub uris: crate::upstream::Uris,
}

#[derive(Default)]
pub struct BackendCounters {
    pub in_flight: AtomicU32,
    /// Cold prefill waiting there, and the keys it holds (see `backlog`).
    pub backlog: crate::backlog::Backlog,
    /// Milliseconds since `clock_origin()` before which the backend rests.
    pub ejected_until_ms: AtomicU64,
    pub consecutive_failures: AtomicU32,
    /// Fleet-wide load from the pod's metrics (here or via its sidecar).
    pub signal: crate::load::Signal,
}

impl Backend {
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.counters.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn is_full(&self) -> bool {
        self.max_in_flight != 0
            && self.counters.in_flight.load(Ordering::Relaxed) >= self.max_in_flight
    }

    pub fn in_flight(&self) -> u32 {
        self.counters.in_flight.load(Ordering::Relaxed)
    }

    /// Fleet-wide load estimate; `None` when the pod's metrics vanished.
    pub fn load(&self, now_ms: u64) -> Option<f64> {
        self.counters.signal.estimate(self.in_flight(), now_ms)
    }

    /// What this sidecar knows of the backend's prefill backlog and cache,
    /// for a request keyed `key`: its own sends, and what the pod's
    /// sidecar last said.
    pub fn view(&self, key: u64, now_ms: u64) -> crate::backlog::View {
        let (own, signal) = (&self.counters.backlog, &self.counters.signal);
        crate::backlog::View {
            backlog: signal.backlog(own.bytes(), now_ms),
            holds: own.holds(key) || signal.holds(key),
            prefilling: own.prefilling(key) || signal.prefilling(key, now_ms),
        }
    }

    /// Records a load sample for the backend, against this sidecar's own
    /// counts now.
    pub fn record(&self, sample: crate::load::Sample, now_ms: u64) {
        self.counters.signal.record(
            sample,
            self.in_flight(),
            self.counters.backlog.bytes(),
            now_ms,
        );
    }

    /// Passive health: rest for `base` doubled per consecutive failure (max 8x).
    pub fn record_failure(&self, base: Duration) {
        let n = self
            .counters
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(3);
        let rest = base.as_millis() as u64 * (1u64 << n);
        self.counters
            .ejected_until_ms
            .store(now_ms() + rest, Ordering::Relaxed);
    }

    pub fn record_success(&self) {
        if self.counters.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.counters
                .consecutive_failures
                .store(0, Ordering::Relaxed);
            self.counters.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

fn clock_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Monotonic milliseconds, cheap enough for every request.
pub fn now_ms() -> u64 {
    clock_origin().elapsed().as_millis() as u64
}

/// Monotonic nanoseconds on the same clock.
pub fn now_ns() -> u64 {
    clock_origin().elapsed().as_nanos() as u64
}

impl Table {
    /// Whether any route chooses by load (and so needs the pods' metrics
    /// and the peers' reports).
    pub fn routes_by_load(&self) -> bool {
        self.models.values().any(|r| {
            matches!(
                r.strategy,
                Strategy::LeastInFlight | Strategy::PrefixAffinity
            )
        })
    }

    #[allow(
        clippy::expect_used,
        reason = "the empty config is valid by construction"
    )]
    pub fn empty() -> Self {
        Table::build(GatewayConfig::default(), None).expect("empty config is valid")
    }

    /// Compile a config; `previous` lends its backend counters.
    pub fn build(config: GatewayConfig, previous: Option<&Table>) -> Result<Self, ConfigError> {
        config.validate()?;
        let version = config.effective_version();
        let mut backends = HashMap::new();
        let mut unavailable = Vec::new();
        for b in &config.backends {
            let timeouts = b.timeouts.unwrap_or_default().over(config.timeouts);
            let old = previous
                .and_then(|p| p.backends.get(&b.id))
                .filter(|old| old.url == b.url.trim_end_matches('/'));
            let counters = old.map(|o| o.counters.clone()).unwrap_or_default();
            let (http, client) = match old.filter(|o| o.timeouts.connect_ms == timeouts.connect_ms)
            {
                Some(o) => (o.http.clone(), o.client.clone()),
                None => (
                    crate::upstream::HttpClient::new(timeouts.connect_ms),
                    upstream_client(timeouts.connect_ms)
                        .map_err(|e| ConfigError::Invalid(format!("backends[{}]: {e}", b.id)))?,
                ),
            };
            let api_key = match b.api_key_file.as_deref().map(read_api_key) {
                None => None,
                Some(Ok(key)) => Some(key),
                Some(Err(e)) => {
                    tracing::warn!(backend = %b.id, reason = %e, "backend unavailable: apiKeyFile");
                    unavailable.push((b.id.clone(), format!("apiKeyFile: {e}")));
                    continue;
                }
            };
            backends.insert(
                b.id.clone(),
                Arc::new(Backend {
                    id: b.id.clone(),
                    url: b.url.trim_end_matches('/').to_owned(),
                    sidecar: b
                        .sidecar
                        .as_ref()
                        .map(|s| Arc::from(s.trim_end_matches('/'))),
                    attestation: b.attestation,
                    max_in_flight: b.max_in_flight,
                    timeouts,
                    api_key,
                    id_hash: xxhash_rust::xxh3::xxh3_64(b.id.as_str().as_bytes()),
                    counters,
                    in_flight_gauge: std::sync::OnceLock::new(),
                    http,
                    client,
                    uris: crate::upstream::Uris::new(b.url.trim_end_matches('/')),
                }),
            );
        }
        // Group members in config order (so every replica orders a route's
        // targets alike); a backend not built is unavailable.
        let mut groups: HashMap<&str, Vec<Arc<Backend>>> = HashMap::new();
        for b in &config.backends {
            if let (Some(g), Some(built)) = (b.group.as_deref(), backends.get(&b.id)) {
                groups.entry(g).or_default().push(built.clone());
            }
        }
        let mut models = HashMap::new();
        for m in &config.models {
            let mut targets: Vec<RouteTarget> = Vec::new();
            for t in &m.targets {
                let upstream_model = t.upstream_model.as_ref().unwrap_or(&m.name);
                let members = match (&t.backend, &t.group) {
                    (Some(id), _) => backends.get(id).into_iter().cloned().collect(),
                    (None, Some(g)) => groups.get(g.as_str()).cloned().unwrap_or_default(),
                    (None, None) => Vec::new(),
                };
                targets.extend(members.into_iter().map(|backend| RouteTarget {
                    backend,
                    upstream_model: upstream_model.clone(),
                    weight: t.weight,
                }));
            }
            let route = Arc::new(Route {
                name: m.name.clone(),
                strategy: m.strategy,
                sticky: m.sticky.clone(),
                prefix: m.prefix,
                total_weight: targets.iter().map(|t| t.weight as u64).sum(),
                keys: m.keys.iter().cloned().collect(),
                targets,
                cursor: AtomicUsize::new(0),
                metrics: std::sync::OnceLock::new(),
            });
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                models.insert(n.clone(), route.clone());
            }
        }
        let keys = build_keys(&config, &models, previous)?;
        Ok(Table {
            limits: config.limits,
            config: Arc::new(config),
            version,
            keys,
            models,
            backends,
            unavailable,
        })
    }

    /// The table after `delta` (which the caller checked is for this
    /// version), rebuilding only what it touches: a change to keys alone,
    /// such as a revocation, keeps every route and backend as it is.
    pub fn apply(&self, delta: &ConfigDelta) -> Result<Table, ConfigError> {
        let config = self.config.apply(delta)?;
        let keys_only = delta.backends.is_empty()
            && delta.models.is_empty()
            && delta.timeouts.is_none()
            && delta.limits.is_none();
        if !keys_only {
            return Table::build(config, Some(self));
        }
        Ok(Table {
            keys: build_keys(&config, &self.models, Some(self))?,
            limits: config.limits,
            version: config.effective_version(),
            config: Arc::new(config),
            models: self.models.clone(),
            backends: self.backends.clone(),
            unavailable: self.unavailable.clone(),
        })
    }
}

/// Keys by hash; a key whose id and limits stay keeps its quota state.
fn build_keys(
    config: &GatewayConfig,
    models: &HashMap<String, Arc<Route>>,
    previous: Option<&Table>,
) -> Result<HashMap<[u8; 32], Arc<KeyEntry>>, ConfigError> {
    let old_quotas: HashMap<&str, &Arc<KeyQuota>> = previous
        .map(|p| {
            p.keys
                .values()
                .filter_map(|k| Some((k.id.as_str(), k.quota.as_ref()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut keys = HashMap::new();
    for k in &config.keys {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&k.sha256, &mut hash)
            .map_err(|_| ConfigError::Invalid(format!("keys[{}]: bad sha256", k.id)))?;
        let all_models = k.models.iter().any(|m| m == "*");
        let allowed = k
            .models
            .iter()
            .filter_map(|m| models.get(m).map(|r: &Arc<Route>| r.name.clone()))
            .collect();
        keys.insert(
            hash,
            Arc::new(KeyEntry {
                id: k.id.clone(),
                hash,
                admin: k.admin,
                all_models,
                models: allowed,
                quota: k.limits.map(|limits| match old_quotas.get(k.id.as_str()) {
                    Some(q) if q.limits == limits && q.cluster_limits == k.cluster_limits => {
                        Arc::clone(q)
                    }
                    _ => Arc::new(KeyQuota::new(k.id.as_str(), limits, k.cluster_limits)),
                }),
            }),
        );
    }
    Ok(keys)
}

impl Table {
    pub fn key(&self, hash: &[u8; 32]) -> Option<&Arc<KeyEntry>> {
        self.keys.get(hash)
    }

    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.models.get(model)
    }

    /// Public names (not aliases) in config order, for `/v1/models`.
    pub fn public_models(&self) -> impl Iterator<Item = &str> {
        self.config.models.iter().map(|m| m.name.as_str())
    }
}

/// HTTP/1.1 with Nagle off: a streamed token must not wait 40 ms for an ACK.
pub fn upstream_client(connect_ms: u64) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(connect_ms))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .no_proxy()
        .http1_only()
        .build()
}

fn read_api_key(path: &str) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    HeaderValue::from_str(&format!("Bearer {}", text.trim()))
        .map(|mut v| {
            v.set_sensitive(true);
            v
        })
        .map_err(|_| "not a valid header value".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hash_key;

    #[test]
    fn a_group_target_stands_for_every_backend_of_the_group_in_config_order() {
        let config = GatewayConfig::from_yaml(
            r#"
backends:
  - { id: p/1, url: "http://a", group: p }
  - { id: other, url: "http://o" }
  - { id: p/2, url: "http://b", group: p }
models:
  - { name: m, targets: [{ group: p, weight: 3, upstreamModel: up }, { backend: other }] }
"#,
        )
        .unwrap();
        let t = Table::build(config, None).unwrap();
        let route = t.models.get("m").unwrap();
        let got: Vec<(&str, u32, &str)> = route
            .targets
            .iter()
            .map(|t| (t.backend.id.as_str(), t.weight, t.upstream_model.as_str()))
            .collect();
        assert_eq!(got, [("p/1", 3, "up"), ("p/2", 3, "up"), ("other", 1, "m")]);
        assert_eq!(route.total_weight, 7);
        let dangling = "backends: [{ id: a, url: \"http://a\" }]\nmodels: [{ name: m, targets: [{ group: none }] }]\n";
        let err = GatewayConfig::from_yaml(dangling).unwrap_err();
        assert!(
            err.to_string().contains("group \"none\" has no backends"),
            "{err}"
        );
        let both = "backends: [{ id: a, url: \"http://a\", group: g }]\nmodels: [{ name: m, targets: [{ group: g, backend: a }] }]\n";
        assert!(GatewayConfig::from_yaml(both).is_err());
    }

    #[test]
    fn a_key_revocation_delta_rebuilds_the_keys_only() {
        let (a, b) = ("ig-delta-key-a-00000000", "ig-delta-key-b-00000000");
        let yaml = |keys: &str| {
            format!(
                "keys: [{keys}]\nbackends: [{{ id: x, url: \"http://x\" }}]\n\
                 models: [{{ name: m, targets: [{{ backend: x }}] }}]\n"
            )
        };
        let both = format!(
            "{{ id: a, sha256: \"{}\" }}, {{ id: b, sha256: \"{}\" }}",
            hash_key(a),
            hash_key(b)
        );
        let only_a = format!("{{ id: a, sha256: \"{}\" }}", hash_key(a));
        let old = Table::build(GatewayConfig::from_yaml(&yaml(&both)).unwrap(), None).unwrap();
        let new = GatewayConfig::from_yaml(&yaml(&only_a)).unwrap();
        let delta = old.config.diff(&new, &old.version, "v2").unwrap();
        let next = old.apply(&delta).unwrap();
        assert_eq!(next.version, "v2");
        let hash =
            |k: &str| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(k.as_bytes()).into() };
        assert!(next.key(&hash(a)).is_some() && next.key(&hash(b)).is_none());
        // Routes and backends are the same objects: counters, cursors and
        // connection pools carry on.
        assert!(Arc::ptr_eq(
            old.route("m").unwrap(),
            next.route("m").unwrap()
        ));
        assert!(Arc::ptr_eq(&old.backends["x"], &next.backends["x"]));
    }

    #[test]
    fn a_route_that_names_its_keys_is_closed_to_every_other_key() {
        let (a, b) = ("ig-route-keys-key-a-0000", "ig-route-keys-key-b-0000");
        let config = GatewayConfig::from_yaml(&format!(
            r#"
keys:
  - {{ id: a, sha256: "{}" }}
  - {{ id: b, sha256: "{}" }}
backends: [{{ id: x, url: "http://x" }}]
models:
  - {{ name: open, targets: [{{ backend: x }}] }}
  - {{ name: closed, keys: [a], targets: [{{ backend: x }}] }}
"#,
            hash_key(a),
            hash_key(b)
        ))
        .unwrap();
        let t = Table::build(config, None).unwrap();
        let key = |k: &str| {
            let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(k.as_bytes()).into();
            t.key(&hash).unwrap().clone()
        };
        let (open, closed) = (t.route("open").unwrap(), t.route("closed").unwrap());
        assert!(key(a).may_use(open) && key(a).may_use(closed));
        assert!(key(b).may_use(open) && !key(b).may_use(closed));
    }

    #[test]
    fn an_unreadable_key_file_leaves_out_that_backend_only() {
        let good = std::env::temp_dir().join(format!("ig-upstream-key-{}", std::process::id()));
        std::fs::write(&good, "up-key\n").unwrap();
        let config = GatewayConfig::from_yaml(&format!(
            r#"
backends:
  - {{ id: ok, url: "http://a", apiKeyFile: "{}" }}
  - {{ id: bad, url: "http://b", apiKeyFile: "/nonexistent/infergate/key" }}
models:
  - {{ name: m, targets: [{{ backend: ok }}, {{ backend: bad }}] }}
"#,
            good.display()
        ))
        .unwrap();
        let t = Table::build(config, None).unwrap();
        assert_eq!(t.unavailable.len(), 1);
        assert_eq!(t.unavailable[0].0, "bad");
        assert!(t.unavailable[0].1.starts_with("apiKeyFile: cannot read"));
        let route = t.models.get("m").unwrap();
        let ids: Vec<&str> = route
            .targets
            .iter()
            .map(|t| t.backend.id.as_str())
            .collect();
        assert_eq!(ids, ["ok"]);
        assert!(t.backends["ok"].api_key.is_some());
        let _ = std::fs::remove_file(good);
    }

    fn config(url: &str) -> GatewayConfig {
        GatewayConfig::from_yaml(&format!(
            r#"
keys:
  - {{ id: a, sha256: "{}", models: [alias] }}
  - {{ id: b, sha256: "{}" }}
backends:
  - {{ id: b0, url: "{url}/" }}
models:
  - {{ name: m, aliases: [alias], targets: [{{ backend: b0, upstreamModel: up }}] }}
  - {{ name: other, targets: [{{ backend: b0 }}] }}
"#,
            hash_key("key-a"),
            hash_key("key-b")
        ))
        .unwrap()
    }

    #[test]
    fn aliases_resolve_to_the_route_and_key_permissions_use_public_names() {
        let t = Table::build(config("http://x"), None).unwrap();
        let route = t.route("alias").unwrap();
        assert_eq!(route.name, "m");
        assert_eq!(route.targets[0].upstream_model, "up");
        assert_eq!(t.route("other").unwrap().targets[0].upstream_model, "other");
        assert_eq!(route.targets[0].backend.url, "http://x");

        let mut h = [0u8; 32];
        hex::decode_to_slice(hash_key("key-a"), &mut h).unwrap();
        let a = t.key(&h).unwrap();
        assert!(a.may_use(route));
        assert!(!a.may_use(t.route("other").unwrap()));
    }

    #[test]
    fn counters_survive_a_swap_only_for_the_same_backend() {
        let old = Table::build(config("http://x"), None).unwrap();
        old.backends["b0"]
            .counters
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        let same = Table::build(config("http://x"), Some(&old)).unwrap();
        assert_eq!(same.backends["b0"].in_flight(), 1);
        let moved = Table::build(config("http://y"), Some(&old)).unwrap();
        assert_eq!(moved.backends["b0"].in_flight(), 0);
    }

    #[test]
    fn ejection_backs_off_and_success_clears_it() {
        let t = Table::build(config("http://x"), None).unwrap();
        let b = &t.backends["b0"];
        b.record_failure(Duration::from_secs(60));
        assert!(b.is_ejected(now_ms()));
        b.record_success();
        assert!(!b.is_ejected(now_ms()));
    }
}
