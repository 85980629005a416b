//! Prometheus metrics for the admin port. Labels are low-cardinality: model
//! and backend names come from the config, never from client input.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
pub struct AlgoLabels {
    pub algo: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub in_flight: Family<BackendLabels, Gauge>,
    pub stream_ends: Family<ReasonLabels, Counter>,
    pub config_swaps: Family<ReasonLabels, Counter>,
    pub config_version: Family<VersionLabels, Gauge>,
    pub signatures: Family<AlgoLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("infergate");
        let m = Metrics {
            requests: Family::default(),
            rejected: Family::default(),
            upstream_errors: Family::default(),
            in_flight: Family::default(),
            stream_ends: Family::default(),
            config_swaps: Family::default(),
            config_version: Family::default(),
            signatures: Family::default(),
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
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
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
