//! A prefix-affinity choice corrected by the sidecar next to the pod.
//!
//! The sidecar a request enters chooses a backend on what it knows of each
//! pod's backlog and cache: its own sends, and what each pod's sidecar said
//! up to `PEER_PERIOD_MS` ago. The sidecar next to the pod knows them
//! exactly (every request to the pod passes through it). So a choice sent
//! to a peer carries what the sender's next-best backend would cost
//! (`x-infergate-spill`, in bytes of prefill, see `backlog::cost`); if the
//! pod's exact cost for the request is higher, its sidecar turns the hop
//! away at once, before any upstream work: 503 with `x-infergate-spilled`
//! and a load report of the pod as the body. The sender records the report
//! and makes its next choice, on fresher numbers. A request carries at most
//! `MAX_OFFERS` offers (one fewer than the route's backends), the choice
//! after the last one is taken wherever it lands, and it runs exactly once. Both headers are honoured only between peers: a client's
//! `x-infergate-*` headers are never forwarded, the offer is read only on
//! an authenticated hop, and the refusal only from the peer that was asked.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::backlog;
use crate::balance::Prefix;
use crate::config::Strategy;
use crate::load_peer::{entry, Report};
use crate::metrics::BackendLabels;
use crate::table::{now_ms, Backend, Route, Table};
use crate::AppState;

/// On a hop: "turn this away if it costs more than this here".
pub const OFFER: HeaderName = HeaderName::from_static("x-infergate-spill");
/// On the answer: turned away; the body is the pod's load report.
pub const SPILLED: HeaderName = HeaderName::from_static("x-infergate-spilled");
/// Offers per request: each costs a round trip to a peer, and three fresh
/// looks are plenty to find a pod that is not busy, if there is one.
pub const MAX_OFFERS: usize = 3;
/// A refusal's report is one entry; anything larger is not one.
const MAX_REPORT_BYTES: u64 = 16 * 1024;

/// Adds the offer to a hop's headers.
pub fn offer(hop: &mut HeaderMap, next_best: f64) {
    let bar = next_best.clamp(0.0, u64::MAX as f64) as u64;
    if let Ok(v) = HeaderValue::from_str(&bar.to_string()) {
        hop.insert(OFFER, v);
    }
}

/// The offer on a request's headers (meaningful on a verified hop only).
pub fn offered(headers: &HeaderMap) -> Option<f64> {
    headers
        .get(OFFER)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()
        .map(|v| v as f64)
}

/// At the pod's sidecar, for a verified hop to `backend`: the answer that
/// turns the peer's offer down, if the request carries one and the pod's
/// exact cost for it is higher.
pub fn turn_away(
    state: &AppState,
    route: &Route,
    backend: &Backend,
    prefix: Option<Prefix>,
    headers: &HeaderMap,
) -> Option<Response<Body>> {
    let (prefix, offer) = (prefix?, offered(headers)?);
    let now = now_ms();
    if route.strategy != Strategy::PrefixAffinity || !should_refuse(backend, prefix, offer, now) {
        return None;
    }
    state
        .metrics
        .spills
        .get_or_create(&BackendLabels {
            backend: backend.id.to_string(),
        })
        .inc();
    Some(refusal(backend, now))
}

/// The pod's own cost for the request is above the offer.
pub fn should_refuse(backend: &Backend, prefix: Prefix, offer: f64, now_ms: u64) -> bool {
    let cost = backlog::cost(backend.view(prefix.key, now_ms), prefix.bytes as f64);
    cost > offer
}

/// The refusal: 503, marked, with the pod's numbers.
pub fn refusal(backend: &Backend, now_ms: u64) -> Response<Body> {
    let report = Report {
        backends: vec![entry(backend, now_ms)],
    };
    let body = serde_json::to_vec(&report).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut()
        .insert(SPILLED, HeaderValue::from_static("1"));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether a peer's answer is a refusal.
pub fn is_refusal(resp: &crate::upstream::Answer) -> bool {
    resp.status() == StatusCode::SERVICE_UNAVAILABLE && resp.headers().contains_key(SPILLED)
}

/// Records what a refusal from `peer` says of its pod.
pub async fn record_refusal(table: &Table, peer: &str, resp: crate::upstream::Answer) {
    use http_body::Body as _;
    use http_body_util::{BodyExt, Limited};
    if resp
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n > MAX_REPORT_BYTES)
    {
        return;
    }
    let body = Limited::new(resp.into_body(), MAX_REPORT_BYTES as usize).collect();
    if let Ok(Ok(body)) = tokio::time::timeout(std::time::Duration::from_secs(1), body)
        .await
        .map(|r| r.map(|c| c.to_bytes()))
    {
        if body.len() as u64 <= MAX_REPORT_BYTES {
            if let Ok(report) = serde_json::from_slice::<Report>(&body) {
                crate::load_peer::apply(table, peer, &report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn table() -> Table {
        let yaml = "backends:\n  - { id: a, url: \"http://a\", sidecar: \"http://side-a\" }\n  - { id: b, url: \"http://b\", sidecar: \"http://side-b\" }\nmodels:\n  - { name: m, strategy: prefixAffinity, targets: [{ backend: a }, { backend: b }] }\n";
        Table::build(GatewayConfig::from_yaml(yaml).unwrap(), None).unwrap()
    }

    #[test]
    fn an_offer_goes_on_the_hop_as_whole_bytes() {
        let mut h = HeaderMap::new();
        offer(&mut h, 1234.7);
        assert_eq!(h[OFFER], "1234");
        assert_eq!(offered(&h), Some(1234.0));
        h.insert(OFFER, HeaderValue::from_static("-5"));
        assert_eq!(offered(&h), None);
        assert_eq!(offered(&HeaderMap::new()), None);
    }

    #[test]
    fn turned_away_only_when_the_exact_cost_is_above_the_offer() {
        let t = table();
        let a = &t.backends["a"];
        let p = Prefix {
            key: 42,
            bytes: 1000,
        };
        // Idle, cold: 1000 here, as anywhere else.
        assert!(!should_refuse(a, p, 1000.0, 0));
        assert!(should_refuse(a, p, 999.0, 0));
        // Holding the key behind 1500 bytes of another cold prompt.
        let b = &a.counters.backlog;
        b.release(b.admit(Some(42), 1000, true), true);
        let _ahead = b.admit(Some(7), 1500, true);
        assert!(should_refuse(a, p, 1000.0, 0));
        assert!(!should_refuse(a, p, 1500.0, 0));
    }

    #[tokio::test]
    async fn the_refusal_carries_the_pods_numbers() {
        let t = table();
        let a = &t.backends["a"];
        let _ahead = a.counters.backlog.admit(Some(7), 1500, true);
        let resp = refusal(a, 0);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[SPILLED], "1");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let report: Report = serde_json::from_slice(&body).unwrap();
        // What a peer takes from it: the backlog and its key.
        let peer = table();
        crate::load_peer::apply(&peer, "http://side-a", &report);
        let v = peer.backends["a"].view(7, crate::table::now_ms());
        assert_eq!(v.backlog, 1500.0);
        assert!(v.prefilling);
    }
}
