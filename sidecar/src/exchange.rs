//! What happens once per answered request when its body ends: metrics,
//! usage record, attestation record, one log line. Also the in-flight slot
//! that a request holds on its backend until then.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::attest::{Answer, Record, Unsigned};
use crate::backlog::Waiting;
use crate::metrics::{BackendLabels, ErrorLabels, Metrics, ReasonLabels, TokenLabels};
use crate::peers::Owner;
use crate::quota::{KeySlot, TokenReservation};
use crate::sse::Usage;
use crate::stream::{End, EndCause, OnEnd};
use crate::table::{now_ns, Backend, KeyEntry, Route};
use crate::usage::{now_unix_ms, UsageRecord};
use crate::AppState;

/// Everything known about a request once an upstream answered.
pub struct Exchange {
    pub state: Arc<AppState>,
    pub request_id: String,
    pub key: Arc<KeyEntry>,
    pub route: Arc<Route>,
    /// Index of the target in `route.targets`.
    pub target: usize,
    pub backend: Arc<Backend>,
    /// The peer sidecar this went through, when not served here (shared
    /// with the table's backend, and then with the answer's record).
    pub via: Option<Arc<str>>,
    pub status: StatusCode,
    /// The client's body hash, when this sidecar attests the answer
    /// (`attests`); nothing is hashed for an answer nobody will sign.
    pub request_sha256: Option<[u8; 32]>,
    /// When the gateway received the request.
    pub received: Instant,
    pub slot: Slot,
    /// The key's concurrency slot, if it has a limit.
    pub key_slot: Option<KeySlot>,
    /// Tokens reserved at admission, settled when the answer ends (given
    /// back if it is dropped unsettled).
    pub reservation: Option<TokenReservation>,
    /// Size of the client's request body (for a usage estimate).
    pub request_bytes: u64,
    /// A text generation: tokens the upstream did not count are estimated
    /// (not for embeddings or audio, where bytes say nothing of tokens).
    pub estimate_usage: bool,
    /// Charge the key's token quota here: false on a hop, where the sidecar
    /// the client reached admits and charges the request.
    pub charge: bool,
}

/// Tokens of an answer the upstream did not count (a stream cut before its
/// usage event, or an upstream that ignored the request for usage): about
/// four bytes of prompt per token, one token per streamed event (vLLM sends
/// an event per token, per choice), four bytes per token of a JSON answer. Marked as an estimate in the usage record.
fn estimate(end: &End, request_bytes: u64) -> Usage {
    let completion_tokens = if end.first_chunk.is_some() {
        end.events
    } else {
        end.bytes.div_ceil(4)
    };
    Usage {
        prompt_tokens: request_bytes.div_ceil(4),
        completion_tokens,
    }
}

impl Exchange {
    /// Whether this sidecar hashes the answer and signs it: served here
    /// (a sidecar that forwarded leaves that to the peer) by a backend
    /// with attestation on.
    pub fn attests(&self) -> bool {
        self.via.is_none() && self.backend.attestation
    }

    /// Keep what a signature needs, before the client sees the terminal
    /// event. The sidecar next to the model keeps the hashes and signs; one
    /// that forwarded keeps only where the answer came from. Every record
    /// keeps its owner, for follow-ups and look-ups by the same key.
    fn record_answer(&self, end: &End) {
        let Some(id) = &end.scan.id else { return };
        let answer = if let Some(via) = &self.via {
            Answer::Forwarded(via.clone())
        } else if !self.status.is_success() {
            Answer::Unsigned(Unsigned::ErrorStatus)
        } else if end.cause != EndCause::Completed {
            Answer::Unsigned(Unsigned::Incomplete)
        } else {
            match (self.attests(), self.request_sha256, end.response_sha256) {
                (true, Some(request), Some(response)) => Answer::Hashed { request, response },
                // Attestation off: nothing was hashed, nothing is signed.
                _ => Answer::Unsigned(Unsigned::NotAttested),
            }
        };
        let owner = Owner {
            backend: self.backend.id.clone(),
            key_id: self.key.id.clone(),
        };
        self.state
            .records
            .insert(id.as_str(), Record { owner, answer });
    }

    pub fn count_upstream_error(&self, kind: &'static str) {
        self.state
            .metrics
            .upstream_errors
            .get_or_create(&ErrorLabels {
                backend: self.backend.id.to_string(),
                kind,
            })
            .inc();
    }
}

impl OnEnd for Exchange {
    fn on_first_chunk(&mut self) {
        self.slot.release(self.status.is_success());
    }

    fn on_end(mut self, end: End) {
        // A whole (not streamed) answer: its first token came with the rest.
        self.slot
            .release(self.status.is_success() && end.cause == EndCause::Completed);
        let m = &self.state.metrics;
        let duration = self.received.elapsed();
        let route = &self.route;
        let rm = route.metrics.get_or_init(|| {
            m.for_route(
                &route.name,
                route.targets.iter().map(|t| t.backend.id.to_string()),
            )
        });
        rm.requests[self.target][Metrics::status_index(self.status.as_u16())].inc();
        m.stream_ends
            .get_or_create(&ReasonLabels {
                reason: end.cause.label(),
            })
            .inc();
        match end.cause {
            EndCause::IdleTimeout => self.count_upstream_error("idle_timeout"),
            EndCause::UpstreamError => self.count_upstream_error("dropped"),
            _ => {}
        }
        rm.duration.observe(duration.as_secs_f64());
        let ttft = end
            .first_chunk
            .map(|t| t.saturating_duration_since(self.received));
        if let Some(ttft) = ttft {
            rm.ttft.observe(ttft.as_secs_f64());
        }
        if let (Some(first), Some(last)) = (end.first_chunk, end.last_chunk) {
            if end.frames > 1 {
                let gap = last.saturating_duration_since(first) / (end.frames - 1) as u32;
                rm.inter_token.observe(gap.as_secs_f64());
            }
        }
        // Whatever produced tokens is charged: counted by the upstream, or
        // else estimated from what was sent.
        let estimated = self.estimate_usage
            && end.scan.usage.is_none()
            && self.status.is_success()
            && end.frames > 0;
        let usage = end
            .scan
            .usage
            .or_else(|| estimated.then(|| estimate(&end, self.request_bytes)));
        if let Some(u) = usage {
            let labels = TokenLabels {
                model: route.name.clone(),
                key: self.key.id.to_string(),
            };
            m.prompt_tokens
                .get_or_create(&labels)
                .inc_by(u.prompt_tokens);
            m.completion_tokens
                .get_or_create(&labels)
                .inc_by(u.completion_tokens);
        }
        let used = usage.map_or(0, |u| u.prompt_tokens + u.completion_tokens);
        match self.reservation.take() {
            Some(reserved) => reserved.settle(now_ns(), used),
            None => {
                if let Some(q) = self.key.quota.as_ref().filter(|_| self.charge && used > 0) {
                    q.charge_tokens(now_ns(), used);
                }
            }
        }
        self.record_answer(&end);
        tracing::debug!(
            request_id = %self.request_id,
            key = %self.key.id,
            model = %self.route.name,
            backend = %self.backend.id,
            response_id = end.scan.id.as_deref().unwrap_or("-"),
            cause = end.cause.label(),
            bytes = end.bytes,
            frames = end.frames,
            ms = duration.as_millis() as u64,
            "request ended"
        );
        if let Some(log) = &self.state.usage {
            let record = UsageRecord {
                ts_ms: now_unix_ms(),
                request_id: self.request_id,
                response_id: end.scan.id,
                key_id: self.key.id.clone(),
                model: self.route.name.clone(),
                backend: self.backend.id.clone(),
                status: self.status.as_u16(),
                prompt_tokens: usage.map(|u| u.prompt_tokens),
                completion_tokens: usage.map(|u| u.completion_tokens),
                usage_estimated: estimated,
                ttft_ms: ttft.map(|t| t.as_secs_f64() * 1e3),
                duration_ms: duration.as_secs_f64() * 1e3,
                finish_reason: end.scan.finish_reason,
                stop_cause: end.cause.label(),
                via: self.via.as_deref().map(str::to_owned),
            };
            if !log.submit(record) {
                m.usage_dropped.inc();
            }
        }
    }
}

/// One unit of a backend's in-flight count, released on drop whatever
/// happens to the request (error, retry, client gone).
pub struct Slot {
    backend: Arc<Backend>,
    gauge: Gauge,
    freed: Arc<Notify>,
    /// In the backend's backlog until the first chunk arrives.
    waiting: Option<Waiting>,
}

impl Slot {
    pub fn acquire(backend: &Arc<Backend>, state: &AppState) -> Option<Slot> {
        let metrics = &state.metrics;
        let max = backend.max_in_flight;
        backend
            .counters
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        let gauge = backend
            .in_flight_gauge
            .get_or_init(|| {
                metrics
                    .in_flight
                    .get_or_create(&BackendLabels {
                        backend: backend.id.to_string(),
                    })
                    .clone()
            })
            .clone();
        gauge.inc();
        Some(Slot {
            backend: backend.clone(),
            gauge,
            freed: state.slot_freed.clone(),
            waiting: None,
        })
    }

    /// In the backend's backlog (when `cold`) until the answer starts; its
    /// key is held there once it did (see `backlog`).
    pub fn wait(&mut self, key: Option<u64>, bytes: u64, cold: bool) {
        self.release(false);
        self.waiting = Some(self.backend.counters.backlog.admit(key, bytes, cold));
    }

    /// The answer started (`ran`: and it is not an error, so the prompt was
    /// read into the pod's cache), or will not.
    pub fn release(&mut self, ran: bool) {
        if let Some(w) = self.waiting.take() {
            self.backend.counters.backlog.release(w, ran);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release(false);
        self.backend
            .counters
            .in_flight
            .fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
        if self.backend.max_in_flight != 0 {
            self.freed.notify_one();
        }
    }
}
