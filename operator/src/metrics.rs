//! The operator's own observability: Prometheus metrics and the probes, on
//! one small HTTP listener (`/metrics`, `/healthz`, `/readyz`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub pushes: Family<PushLabels, Counter>,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// Running sidecars known to run the latest rendered config.
    pub sidecars_programmed: Gauge,
    /// Set once every watch has listed its objects; `/readyz` waits for it.
    pub synced: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("infergate_operator");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "Render/store/push/status passes",
            reconciles.clone(),
        );
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed passes by error kind",
            failures.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one pass",
            duration.clone(),
        );
        let pushes = Family::<PushLabels, Counter>::default();
        registry.register(
            "pushes",
            "Config deliveries to sidecars by result (current, applied, failed)",
            pushes.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let sidecars_programmed = Gauge::default();
        registry.register(
            "sidecars_programmed",
            "Running sidecars that run the latest config",
            sidecars_programmed.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            pushes,
            leader,
            sidecars_programmed,
            synced: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn observe_pass(&self, took: Duration, error: Option<&'static str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(error) = error {
            self.failures.get_or_create(&ErrorLabels { error }).inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Ready once the caches are warm: a standby is ready too, so a rollout
/// never waits for leadership.
async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.synced.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_passes_and_failures_by_label() {
        let m = Metrics::default();
        m.observe_pass(Duration::from_millis(3), None);
        m.observe_pass(Duration::from_millis(5), Some("push"));
        m.pushes
            .get_or_create(&PushLabels { result: "applied" })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("infergate_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(text.contains("infergate_operator_reconcile_failures_total{error=\"push\"} 1"));
        assert!(text.contains("infergate_operator_pushes_total{result=\"applied\"} 1"));
        assert!(text.contains("infergate_operator_reconcile_duration_seconds_count 2"));
    }
}
