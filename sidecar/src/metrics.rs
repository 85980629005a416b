//! Prometheus metrics for the admin port. Labels are low-cardinality: model
//! and backend names come from the config, never from client input.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub backend: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub backend: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    /// The key's id from the config (never the key).
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlgoLabels {
    pub algo: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// Per-route handles, looked up once per table (not per request).
pub struct RouteMetrics {
    pub duration: Histogram,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    /// Per target: requests by status class (2xx, 4xx, 5xx, other).
    pub requests: Vec<[Counter; 4]>,
}

pub struct Metrics {
    registry: Registry,
    // Families are cheap handles (Arc inside); clones are registered.
    pub requests: Family<RequestLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub in_flight: Family<BackendLabels, Gauge>,
    /// Fleet-wide load estimate routing uses; -1 when the pod's metrics vanished.
    pub backend_load: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub stream_ends: Family<ReasonLabels, Counter>,
    pub config_swaps: Family<ReasonLabels, Counter>,
    pub config_version: Family<VersionLabels, Gauge>,
    pub signatures: Family<AlgoLabels, Counter>,
    pub ttft: Family<ModelLabels, Histogram>,
    pub inter_token: Family<ModelLabels, Histogram>,
    pub duration: Family<ModelLabels, Histogram>,
    pub prompt_tokens: Family<TokenLabels, Counter>,
    pub completion_tokens: Family<TokenLabels, Counter>,
    pub usage_dropped: Counter,
    pub quota_fallbacks: Counter,
    /// Peers' prefix-affinity hops turned away here (see `spill`).
    pub spills: Family<BackendLabels, Counter>,
}

type HistogramFactory = fn() -> Histogram;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

fn gap_histogram() -> Histogram {
    // 0.1 ms .. ~3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 15,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("infergate");
        let m = Metrics {
            requests: Family::default(),
            rejected: Family::default(),
            upstream_errors: Family::default(),
            in_flight: Family::default(),
            backend_load: Family::default(),
            stream_ends: Family::default(),
            config_swaps: Family::default(),
            config_version: Family::default(),
            signatures: Family::default(),
            ttft: Family::new_with_constructor(latency_histogram as HistogramFactory),
            inter_token: Family::new_with_constructor(gap_histogram as HistogramFactory),
            duration: Family::new_with_constructor(latency_histogram as HistogramFactory),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            usage_dropped: Counter::default(),
            quota_fallbacks: Counter::default(),
            spills: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Proxied requests by public model, backend and status class",
            m.requests.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests refused before any upstream call, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by backend and kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests in flight by backend",
            m.in_flight.clone(),
        );
        registry.register(
            "backend_load",
            "Fleet-wide load estimate (requests) routing uses per backend, from \
             vLLM metrics and peers; -1 when the backend's metrics vanished",
            m.backend_load.clone(),
        );
        registry.register(
            "stream_ends",
            "Ends of proxied response bodies by cause",
            m.stream_ends.clone(),
        );
        registry.register(
            "config_swaps",
            "Config swap attempts by result",
            m.config_swaps.clone(),
        );
        registry.register(
            "config_version_info",
            "1 for the config version in use",
            m.config_version.clone(),
        );
        registry.register(
            "signatures",
            "Signatures made (lazily, on first look-up) by algorithm",
            m.signatures.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From request received to the first streamed chunk, by model",
            m.ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Mean gap between streamed chunks of one response, by model",
            m.inter_token.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From request received to the end of the answer, by model",
            m.duration.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens reported by the upstream, by model and key id",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens reported by the upstream, by model and key id",
            m.completion_tokens.clone(),
        );
        registry.register(
            "usage_records_dropped",
            "Usage records dropped because the sink fell behind",
            m.usage_dropped.clone(),
        );
        registry.register(
            "quota_fallbacks",
            "Quota decisions made on the local share because the cluster quota store did not answer",
            m.quota_fallbacks.clone(),
        );
        registry.register(
            "prefix_spills",
            "Peers' prefix-affinity choices of a backend turned away here because its \
             exact prefill backlog made another backend cheaper, by backend",
            m.spills.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    #[allow(clippy::expect_used, reason = "writing to a String cannot fail")]
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn for_route(&self, model: &str, backends: impl Iterator<Item = String>) -> RouteMetrics {
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        RouteMetrics {
            duration: self.duration.get_or_create(&labels).clone(),
            ttft: self.ttft.get_or_create(&labels).clone(),
            inter_token: self.inter_token.get_or_create(&labels).clone(),
            requests: backends
                .map(|backend| {
                    ["2xx", "4xx", "5xx", "other"].map(|status| {
                        self.requests
                            .get_or_create(&RequestLabels {
                                model: model.to_owned(),
                                backend: backend.clone(),
                                status,
                            })
                            .clone()
                    })
                })
                .collect(),
        }
    }

    pub fn status_index(status: u16) -> usize {
        match status {
            200..=299 => 0,
            400..=499 => 1,
            500..=599 => 2,
            _ => 3,
        }
    }

    pub fn status_class(status: u16) -> &'static str {
        match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        }
    }
}
