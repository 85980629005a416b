//! Load signals: how busy each backend is, fleet-wide, as cheaply as possible.
//!
//! Each sidecar knows its own in-flight count per backend at once. That is
//! only its own share: the pod next to another sidecar also serves that
//! sidecar's clients. So each sidecar reads its own vLLM's `/metrics` on a
//! short period (requests running + waiting, KV-cache usage, prefix-cache
//! queries and hits; see [`parse_vllm`]) and serves what it knows about its
//! own pods to peers on `GET /v1/internal/load` (hop-authenticated, see
//! `load_peer`), read every `PEER_PERIOD_MS`; a peer that serves a hop also
//! puts its pod's load on the answer's headers, so the busiest pairs of
//! sidecars see each other's numbers with every answer. A sample is used as
//! `queue + what this sidecar sent (less what it finished) since`
//! and fades linearly to this sidecar's own view between `FRESH_MS` and
//! `STALE_MS` of age, so a silent peer cannot pin an old number. A pod whose
//! metrics were there and vanished counts as over every bound: it is chosen
//! only when nothing else is left. A pod's sidecar also reports the pod's
//! prefill backlog and the keys it holds (see `backlog`); the backlog is
//! used and faded like the load.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::backlog::{AtomicBloom, Bloom, COLD_KEYS};

/// A sample younger than this is taken whole.
pub const FRESH_MS: u64 = 1_000;
/// A sample older than this is ignored (the local view alone).
pub const STALE_MS: u64 = 5_000;
/// How often a sidecar asks its peers for their pods' loads. A peer's
/// number is exact when sent (every request to a pod passes through the
/// sidecar next to it); what others sent since is unseen, so shorter is
/// better, and a report is one small JSON document.
pub const PEER_PERIOD_MS: u64 = 100;
/// How often a sidecar reads its own vLLM's `/metrics`: rendering them
/// costs the vLLM API server CPU, and its own in-flight count is fresh
/// anyway, so less often.
pub const METRICS_PERIOD_MS: u64 = 300;

/// The latest fleet-wide load of one backend, kept with its counters (so
/// it survives a config swap). Written by the poller, read per request.
#[derive(Default)]
pub struct Signal {
    /// Requests at the pod (vLLM's running + waiting) when sampled.
    queue: AtomicU32,
    /// This sidecar's in-flight count for the backend when sampled.
    local_at: AtomicU32,
    /// KV-cache usage in per-mille, when known.
    kv_permille: AtomicU32,
    /// When the sample arrived (`table::now_ms` clock); 0 = never.
    at_ms: AtomicU64,
    /// Metrics were seen and are gone now.
    vanished: AtomicBool,
    /// Bytes of cold prefill waiting at the pod when sampled (`backlog`),
    /// and this sidecar's own share then.
    backlog: AtomicU64,
    backlog_local_at: AtomicU64,
    /// From the pod's sidecar: the keys of the cold prefills waiting, and
    /// the keys the pod was sent lately (a Bloom filter; empty = unknown).
    cold: [AtomicU64; COLD_KEYS],
    bloom: AtomicBloom,
}

/// A sample as the poller or a peer delivers it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    pub queue: u32,
    pub kv_permille: u32,
    /// Bytes of cold prefill waiting (see `backlog`); vLLM's metrics do
    /// not have it, only the pod's sidecar (0 from an older one).
    #[serde(default)]
    pub backlog: u64,
}

impl Signal {
    /// `local_*`: this sidecar's own in-flight count and backlog for the
    /// backend now (its share of what the sample counts).
    pub fn record(&self, sample: Sample, local_in_flight: u32, local_backlog: u64, now_ms: u64) {
        self.queue.store(sample.queue, Ordering::Relaxed);
        self.kv_permille
            .store(sample.kv_permille, Ordering::Relaxed);
        self.local_at.store(local_in_flight, Ordering::Relaxed);
        self.backlog.store(sample.backlog, Ordering::Relaxed);
        self.backlog_local_at
            .store(local_backlog, Ordering::Relaxed);
        self.at_ms.store(now_ms.max(1), Ordering::Relaxed);
        self.vanished.store(false, Ordering::Relaxed);
    }

    /// The metrics could not be read: only a pod that had them is marked
    /// (one that never had any, an external provider, keeps its local view).
    pub fn lost(&self) {
        if self.at_ms.load(Ordering::Relaxed) != 0 {
            self.vanished.store(true, Ordering::Relaxed);
        }
    }

    pub fn vanished(&self) -> bool {
        self.vanished.load(Ordering::Relaxed)
    }

    /// What the pod's sidecar says of the keys there (see `Backlog`).
    pub fn record_keys(&self, cold: &[u64], bloom: Option<&Bloom>) {
        for (i, slot) in self.cold.iter().enumerate() {
            slot.store(cold.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        if let Some(b) = bloom {
            self.bloom.set(b);
        }
    }

    /// The sample's age, while it counts at all.
    fn live_age(&self, now_ms: u64) -> Option<u64> {
        let at = self.at_ms.load(Ordering::Relaxed);
        let age = now_ms.saturating_sub(at);
        (at != 0 && !self.vanished() && age < STALE_MS).then_some(age)
    }

    /// Backlog bytes at the pod: the sample moved by this sidecar's own
    /// since, faded to its own as the sample ages (as `estimate`).
    pub fn backlog(&self, local: u64, now_ms: u64) -> f64 {
        match self.live_age(now_ms) {
            Some(age) => fade(
                local as f64,
                self.backlog.load(Ordering::Relaxed) as f64,
                self.backlog_local_at.load(Ordering::Relaxed) as f64,
                age,
            ),
            None => local as f64,
        }
    }

    /// The pod's sidecar said a cold request of this key is waiting there.
    pub fn prefilling(&self, key: u64, now_ms: u64) -> bool {
        let k = key.max(1);
        self.live_age(now_ms).is_some() && self.cold.iter().any(|c| c.load(Ordering::Relaxed) == k)
    }

    /// The pod's sidecar said the pod was sent this key lately (a cache
    /// outlives a silent peer, so this does not fade).
    pub fn holds(&self, key: u64) -> bool {
        !self.vanished() && self.bloom.contains(key)
    }

    /// The sample, if one arrived and its metrics have not vanished since.
    pub fn sample(&self) -> Option<(Sample, u32, u64)> {
        let at = self.at_ms.load(Ordering::Relaxed);
        (at != 0 && !self.vanished()).then(|| {
            (
                Sample {
                    queue: self.queue.load(Ordering::Relaxed),
                    kv_permille: self.kv_permille.load(Ordering::Relaxed),
                    backlog: self.backlog.load(Ordering::Relaxed),
                },
                self.local_at.load(Ordering::Relaxed),
                at,
            )
        })
    }

    /// The load estimate; `None` when the pod's metrics vanished.
    pub fn estimate(&self, local_in_flight: u32, now_ms: u64) -> Option<f64> {
        if self.vanished() {
            return None;
        }
        Some(match self.sample() {
            Some((s, local_at, at)) => estimate(
                local_in_flight,
                s.queue,
                local_at,
                now_ms.saturating_sub(at),
            ),
            None => local_in_flight as f64,
        })
    }
}

/// `queue` (sampled `age_ms` ago, when this sidecar had `local_at` in
/// flight) moved by what this sidecar sent or finished since (its requests
/// were part of the queue), never below its own count, faded to the own
/// count as the sample ages.
pub fn estimate(local: u32, queue: u32, local_at: u32, age_ms: u64) -> f64 {
    fade(local as f64, queue as f64, local_at as f64, age_ms)
}

fn fade(local_f: f64, sampled: f64, local_at: f64, age_ms: u64) -> f64 {
    let fleet = (sampled + local_f - local_at).max(local_f);
    let weight = if age_ms <= FRESH_MS {
        1.0
    } else if age_ms >= STALE_MS {
        0.0
    } else {
        1.0 - (age_ms - FRESH_MS) as f64 / (STALE_MS - FRESH_MS) as f64
    };
    local_f + weight * (fleet - local_f)
}

/// What vLLM's `/metrics` says about load, summed over label sets (one per
/// engine and model).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct VllmMetrics {
    pub running: f64,
    pub waiting: f64,
    /// 0..1; vLLM >= 0.10 names it `kv_cache_usage_perc`, older
    /// `gpu_cache_usage_perc`.
    pub kv_usage: Option<f64>,
    /// Prompt tokens looked up in, and found in, the prefix cache (counters).
    pub prefix_queries: f64,
    pub prefix_hits: f64,
}

impl VllmMetrics {
    pub fn sample(&self) -> Sample {
        Sample {
            queue: (self.running + self.waiting).clamp(0.0, u32::MAX as f64) as u32,
            kv_permille: (self.kv_usage.unwrap_or(0.0) * 1000.0).clamp(0.0, 1000.0) as u32,
            backlog: 0,
        }
    }
}

/// Parses Prometheus text exposition for vLLM's load metrics; `None` when
/// there is no `vllm:num_requests_running` (not a vLLM, or not ready).
pub fn parse_vllm(text: &str) -> Option<VllmMetrics> {
    let mut m = VllmMetrics::default();
    let mut seen_running = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let rest = &line[name_end..];
        // Skip labels (values may hold spaces, never an unescaped `}` we
        // care about here: vLLM's labels are model names and engine ids).
        let rest = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(i) => &r[i + 1..],
                None => continue,
            },
            None => rest,
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        match name {
            "vllm:num_requests_running" => {
                seen_running = true;
                m.running += value;
            }
            "vllm:num_requests_waiting" => m.waiting += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                // Both names may be there (a deprecation period): keep one.
                m.kv_usage = Some(m.kv_usage.map_or(value, |v: f64| v.max(value)));
            }
            "vllm:prefix_cache_queries_total" | "vllm:prefix_cache_queries" => {
                m.prefix_queries += value
            }
            "vllm:prefix_cache_hits_total" | "vllm:prefix_cache_hits" => m.prefix_hits += value,
            _ => {}
        }
    }
    seen_running.then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1.7e9
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 750.0
vllm:generation_tokens_total{engine="0",model_name="x"} 9.0
"#;

    #[test]
    fn reads_vllm_metric_names_summed_over_engines() {
        let m = parse_vllm(VLLM).unwrap();
        assert_eq!(m.running, 5.0);
        assert_eq!(m.waiting, 4.0);
        assert_eq!(m.kv_usage, Some(0.25));
        assert_eq!(m.prefix_queries, 1000.0);
        assert_eq!(m.prefix_hits, 750.0);
        assert_eq!(
            m.sample(),
            Sample {
                queue: 9,
                kv_permille: 250,
                backlog: 0
            }
        );
    }

    #[test]
    fn older_names_and_garbage_are_handled() {
        let old = "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting NaN\nbroken{ 3\n";
        let m = parse_vllm(old).unwrap();
        assert_eq!((m.running, m.waiting, m.kv_usage), (1.0, 0.0, Some(0.5)));
        assert_eq!(parse_vllm("up 1\n"), None);
        assert_eq!(parse_vllm(""), None);
    }

    #[test]
    fn a_fresh_sample_adds_what_was_sent_since() {
        // The pod had 6; this sidecar had 1 in flight then and 3 now.
        assert_eq!(estimate(3, 6, 1, 0), 8.0);
        // Never below the own count.
        assert_eq!(estimate(5, 0, 5, 0), 5.0);
        // Two of its own finished since: the pod has two fewer.
        assert_eq!(estimate(0, 6, 2, 0), 4.0);
    }

    #[test]
    fn a_stale_sample_decays_to_the_local_view() {
        let fresh = estimate(1, 9, 1, FRESH_MS);
        let half = estimate(1, 9, 1, (FRESH_MS + STALE_MS) / 2);
        let stale = estimate(1, 9, 1, STALE_MS);
        assert_eq!(fresh, 9.0);
        assert_eq!(half, 5.0);
        assert_eq!(stale, 1.0);
    }

    #[test]
    fn vanished_metrics_give_no_estimate_until_they_return() {
        let s = Signal::default();
        s.lost(); // never had metrics: nothing vanished
        assert_eq!(s.estimate(2, 10), Some(2.0));
        s.record(
            Sample {
                queue: 4,
                kv_permille: 0,
                backlog: 0,
            },
            0,
            0,
            10,
        );
        assert_eq!(s.estimate(0, 10), Some(4.0));
        s.lost();
        assert_eq!(s.estimate(0, 10), None);
        s.record(
            Sample {
                queue: 1,
                kv_permille: 0,
                backlog: 0,
            },
            0,
            0,
            20,
        );
        assert_eq!(s.estimate(0, 20), Some(1.0));
    }

    #[test]
    fn a_pods_backlog_and_keys_from_its_sidecar_count_while_fresh() {
        let s = Signal::default();
        let sample = Sample {
            queue: 1,
            kv_permille: 0,
            backlog: 4000,
        };
        // This sidecar had 1000 of that backlog in flight when it came.
        s.record(sample, 1, 1000, 10);
        let mut held = Bloom::default();
        held.insert(7);
        s.record_keys(&[9], Some(&held));
        assert_eq!(s.backlog(1000, 10), 4000.0);
        // Its own 1000 started since: 3000 left.
        assert_eq!(s.backlog(0, 10), 3000.0);
        assert!(s.prefilling(9, 10) && !s.prefilling(7, 10));
        assert!(s.holds(7) && !s.holds(9));
        // Stale: only its own view; what the pod holds outlives that.
        assert_eq!(s.backlog(0, 10 + STALE_MS), 0.0);
        assert!(!s.prefilling(9, 10 + STALE_MS));
        assert!(s.holds(7));
        s.lost();
        assert!(!s.holds(7));
    }
}
