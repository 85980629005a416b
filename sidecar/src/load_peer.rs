//! The IO side of load signals: reading this sidecar's own vLLM `/metrics`
//! and its peers' `GET /v1/internal/load`, on a short period.
//!
//! Pull, not push: each sidecar asks each peer for one small JSON document
//! (its own pods' loads) every `PEER_PERIOD_MS`, signed with the peer hop HMAC
//! like any hop, so only sidecars holding the peer secret may read it and
//! a public client gets 404. A peer reports only the pods next to it, and
//! only those are taken from it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::backlog::Bloom;
use crate::config::BackendId;
use crate::error::ApiError;
use crate::load::{parse_vllm, Sample, METRICS_PERIOD_MS, PEER_PERIOD_MS};
use crate::metrics::BackendLabels;
use crate::peers::{PeerHop, Peers, Reach, EMPTY_SHA256};
use crate::table::{now_ms, Backend, Table};
use crate::AppState;

pub const PATH: &str = "/v1/internal/load";

/// On the answer to a hop: the serving sidecar's load for the pod (requests
/// in flight, this one included). Never reaches a client: answers pass only
/// allow-listed headers.
pub const LOAD_HEADER: HeaderName = HeaderName::from_static("x-infergate-load");

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub backends: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    pub id: BackendId,
    /// `None` when the pod's metrics vanished.
    pub load: Option<Sample>,
    /// Keys of the cold prefills waiting at the pod (see `backlog`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cold: Vec<u64>,
    /// The keys the pod was sent lately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<Bloom>,
}

/// Backends served here (not through another sidecar), that are ours to
/// measure: attested ones, i.e. pods, not external providers.
fn local<'a>(table: &'a Table, peers: &'a Peers) -> impl Iterator<Item = &'a Arc<Backend>> {
    table
        .backends
        .values()
        .filter(move |b| b.attestation && peers.reach(b, false) == Reach::Here)
}

/// What this sidecar knows about its own pods, for peers only.
pub async fn serve(
    State(s): State<Arc<AppState>>,
    PeerHop(hop): PeerHop,
) -> Result<Json<Report>, ApiError> {
    if hop.is_none() {
        return Err(ApiError::NotFound("Not Found".into()));
    }
    let table = s.table.load();
    let now = now_ms();
    let backends = local(&table, &s.peers).map(|b| entry(b, now)).collect();
    Ok(Json(Report { backends }))
}

/// What this sidecar knows of one of its own pods.
pub fn entry(b: &Backend, now: u64) -> Entry {
    Entry {
        id: b.id.clone(),
        // Its own counts already include the hops peers sent here.
        load: b.load(now).map(|l| Sample {
            queue: l.round().clamp(0.0, u32::MAX as f64) as u32,
            kv_permille: b
                .counters
                .signal
                .sample()
                .map_or(0, |(s, _, _)| s.kv_permille),
            backlog: b.counters.backlog.bytes(),
        }),
        cold: b.counters.backlog.cold_keys(),
        holds: Some(b.counters.backlog.bloom()),
    }
}

/// Piggy-backs load on hop answers, at response-header time: a sidecar
/// serving a hop (`served_for_peer`) adds its load for `backend` to `out`;
/// one that forwarded to a peer (`via_peer`) takes it from `upstream`.
pub fn on_answer(
    backend: &Backend,
    served_for_peer: bool,
    via_peer: bool,
    upstream: &HeaderMap,
    out: &mut HeaderMap,
) {
    let now = now_ms();
    if served_for_peer {
        let load = backend
            .load(now)
            .map_or(-1, |l| l.round().clamp(0.0, u32::MAX as f64) as i64);
        if let Ok(v) = HeaderValue::from_str(&load.to_string()) {
            out.insert(LOAD_HEADER, v);
        }
    } else if via_peer {
        let value = upstream
            .get(LOAD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        match value {
            Some(-1) => backend.counters.signal.lost(),
            Some(n) if n >= 0 => {
                let last = backend.counters.signal.sample().map(|(s, _, _)| s);
                backend.record(
                    Sample {
                        queue: n.min(u32::MAX as i64) as u32,
                        kv_permille: last.map_or(0, |s| s.kv_permille),
                        backlog: last.map_or(0, |s| s.backlog),
                    },
                    now,
                )
            }
            _ => {}
        }
    }
}

/// Polls until the process ends; started by `serve::run`.
pub fn spawn(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(PEER_PERIOD_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every = (METRICS_PERIOD_MS / PEER_PERIOD_MS).max(1);
        for n in 0u64.. {
            tick.tick().await;
            poll(&state, n % every == 0).await;
        }
    })
}

/// One full round: every own pod's metrics and every peer's report.
pub async fn poll_once(state: &AppState) {
    poll(state, true).await
}

/// Every peer's report and, if `metrics`, every own pod's metrics, at once.
async fn poll(state: &AppState, metrics: bool) {
    let table = state.table.load_full();
    // Only load-aware routes read these signals; without one, a sidecar
    // does no background work at all.
    if !table.routes_by_load() {
        return;
    }
    let peers = &state.peers;
    let deadline = Duration::from_millis(4 * PEER_PERIOD_MS);
    let pods = local(&table, peers)
        .filter(|_| metrics)
        .map(|b| async move {
            let text = async {
                let resp = b
                    .client()
                    .get(format!("{}/metrics", b.url))
                    .timeout(deadline)
                    .send()
                    .await
                    .ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                resp.text().await.ok()
            };
            match text.await.as_deref().and_then(parse_vllm) {
                Some(m) => b.record(m.sample(), now_ms()),
                None => b.counters.signal.lost(),
            }
        });
    let peer_list: Vec<String> = if peers.enabled() {
        peers.list(&table).into_iter().map(str::to_owned).collect()
    } else {
        Vec::new()
    };
    let table_ref = &table;
    let asks = peer_list.iter().map(|peer| async move {
        let headers = peers.hop_headers(&HeaderMap::new(), &Method::GET, PATH, &EMPTY_SHA256, None);
        let report = async {
            let resp = peers
                .client()
                .get(format!("{peer}{PATH}"))
                .headers(headers)
                .timeout(deadline)
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.bytes().await.ok()?;
            serde_json::from_slice::<Report>(&body).ok()
        };
        // A silent peer: its samples age and fade to the local view.
        if let Some(report) = report.await {
            apply(table_ref, peer, &report);
        }
    });
    futures_util::future::join(
        futures_util::future::join_all(pods),
        futures_util::future::join_all(asks),
    )
    .await;
    let now = now_ms();
    for b in table.backends.values() {
        state
            .metrics
            .backend_load
            .get_or_create(&BackendLabels {
                backend: b.id.to_string(),
            })
            .set(b.load(now).unwrap_or(-1.0));
    }
}

/// Takes from `peer`'s report only the backends that sit behind `peer`.
pub fn apply(table: &Table, peer: &str, report: &Report) {
    for e in &report.backends {
        let Some(b) = table.backends.get(&e.id) else {
            continue;
        };
        if b.sidecar.as_deref() != Some(peer) {
            continue;
        }
        match e.load {
            Some(sample) => {
                b.record(sample, now_ms());
                b.counters.signal.record_keys(&e.cold, e.holds.as_ref());
            }
            None => b.counters.signal.lost(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    #[test]
    fn a_peer_speaks_only_for_its_own_pods() {
        let cfg = GatewayConfig::from_yaml(
            r#"
backends:
  - { id: a, url: "http://a", sidecar: "http://side-a" }
  - { id: b, url: "http://b", sidecar: "http://side-b" }
models:
  - { name: m, targets: [{ backend: a }, { backend: b }] }
"#,
        )
        .unwrap();
        let t = Table::build(cfg, None).unwrap();
        let s = |queue| {
            Some(Sample {
                queue,
                kv_permille: 0,
                backlog: 0,
            })
        };
        let entry = |id: &str, load| Entry {
            id: id.into(),
            load,
            cold: Vec::new(),
            holds: None,
        };
        let report = Report {
            backends: vec![entry("a", s(7)), entry("b", s(9)), entry("nope", s(1))],
        };
        apply(&t, "http://side-a", &report);
        assert_eq!(t.backends["a"].load(now_ms()), Some(7.0));
        assert_eq!(t.backends["b"].load(now_ms()), Some(0.0));
        let gone = Report {
            backends: vec![entry("a", None)],
        };
        apply(&t, "http://side-a", &gone);
        assert_eq!(t.backends["a"].load(now_ms()), None);
    }
}
