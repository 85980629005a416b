//! The operator's own observability: Prometheus metrics and the probes, on
//! one small HTTP listener (`/metrics`, `/healthz`, `/readyz`). Three fixed
//! GET routes are served with plain hyper (already in the tree through kube):
//! the operator carries no web framework.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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

/// Serve the probes and metrics until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let m = metrics.clone();
        let service = service_fn(move |req| {
            let answer = answer(&m, &req);
            async move { Ok::<_, Infallible>(answer) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// The answer to one request (pure, so unit tests call it directly).
pub fn answer<B>(m: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        resp
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok".into()),
        // Ready once the caches are warm: a standby is ready too, so a
        // rollout never waits for leadership.
        "/readyz" if m.synced.load(Ordering::Relaxed) => {
            reply(StatusCode::OK, TEXT, "ready".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "caches not synced".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
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

    #[test]
    fn probes_answer_by_path_and_readiness_follows_the_caches() {
        let m = Metrics::default();
        let get = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(answer(&m, &get("/healthz")).status(), StatusCode::OK);
        assert_eq!(
            answer(&m, &get("/readyz")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.synced.store(true, Ordering::Relaxed);
        assert_eq!(answer(&m, &get("/readyz")).status(), StatusCode::OK);
        let scrape = answer(&m, &get("/metrics"));
        assert!(scrape.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert_eq!(answer(&m, &get("/nope")).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(answer(&m, &post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
