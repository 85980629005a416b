//! What makes routing matter, simulated: a scheduler with at most
//! `max_running` sequences (the rest wait in FIFO order), a prefix cache
//! ([`KvCache`]), prefill that costs time per *uncached* prompt token, and
//! decode per output token (the simulator's `delay`). Prefill is serialised
//! per simulator (one GPU's compute is shared, so two prefills take twice
//! as long); decode runs in parallel (batched). `/metrics` exports the load
//! under vLLM's own metric names.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::kv::{self, KvCache};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block (vLLM's default is 16).
    pub block_size: usize,
    /// Prefix cache capacity in blocks; 0 turns prefix caching off.
    pub cache_blocks: usize,
    /// Prefill time per uncached prompt token, in microseconds.
    pub prefill_us_per_token: u64,
    /// Sequences running at once; the rest wait. 0 = no limit.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            cache_blocks: 0,
            prefill_us_per_token: 0,
            max_running: 0,
        }
    }
}

impl EngineConfig {
    /// Whether prompts need to be read into tokens at all.
    pub fn models_prompts(&self) -> bool {
        self.cache_blocks > 0 || self.prefill_us_per_token > 0
    }
}

pub struct Engine {
    config: EngineConfig,
    kv: Mutex<KvCache>,
    slots: Option<Arc<Semaphore>>,
    prefill: tokio::sync::Mutex<()>,
    running: Arc<AtomicU64>,
    waiting: AtomicU64,
    /// Blocks held by running sequences, for `kv_cache_usage_perc`.
    held_blocks: Arc<AtomicU64>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

/// A running sequence: frees its slot and blocks when dropped.
pub struct Running {
    _permit: Option<OwnedSemaphorePermit>,
    running: Arc<AtomicU64>,
    held_blocks: Arc<AtomicU64>,
    blocks: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.held_blocks.fetch_sub(self.blocks, Ordering::Relaxed);
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            config,
            kv: Mutex::new(KvCache::new(config.block_size, config.cache_blocks)),
            slots: (config.max_running > 0).then(|| Arc::new(Semaphore::new(config.max_running))),
            prefill: tokio::sync::Mutex::new(()),
            running: Arc::new(AtomicU64::new(0)),
            waiting: AtomicU64::new(0),
            held_blocks: Arc::new(AtomicU64::new(0)),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Waits for a slot, looks the prompt up in the cache and prefills what
    /// is not cached. Returns when the first token may be produced.
    pub async fn run(&self, prompt: &[u64], output_tokens: usize) -> Running {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = match &self.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
        let bs = self.config.block_size.max(1);
        let blocks = (prompt.len() + output_tokens).div_ceil(bs) as u64;
        self.held_blocks.fetch_add(blocks, Ordering::Relaxed);
        let running = Running {
            _permit: permit,
            running: self.running.clone(),
            held_blocks: self.held_blocks.clone(),
            blocks,
        };
        let cached = match self.kv.lock() {
            Ok(mut kv) => kv.admit(prompt),
            Err(_) => 0,
        };
        self.prompt_tokens
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(output_tokens as u64, Ordering::Relaxed);
        let uncached = (prompt.len() - cached) as u64;
        if self.config.prefill_us_per_token > 0 && uncached > 0 {
            let _gpu = self.prefill.lock().await;
            let cost = uncached * self.config.prefill_us_per_token;
            tokio::time::sleep(Duration::from_micros(cost)).await;
        }
        running
    }

    /// Prefix cache counters: (queried tokens, hit tokens).
    pub fn prefix_cache(&self) -> (u64, u64) {
        self.kv.lock().map_or((0, 0), |kv| (kv.queries, kv.hits))
    }

    /// Prometheus text with vLLM's metric names (v1 engine, 0.10 and later).
    pub fn metrics(&self, model: &str) -> String {
        let labels = format!("{{engine=\"0\",model_name={}}}", quoted(model));
        let (queries, hits) = self.prefix_cache();
        let usage = if self.config.cache_blocks == 0 {
            0.0
        } else {
            (self.held_blocks.load(Ordering::Relaxed) as f64 / self.config.cache_blocks as f64)
                .min(1.0)
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{}{labels} {value:?}\n",
                if kind == "counter" { "_total" } else { "" }
            );
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            n(&self.running),
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            n(&self.waiting),
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        );
        metric(
            "vllm:prefix_cache_queries",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            queries as f64,
        );
        metric(
            "vllm:prefix_cache_hits",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            hits as f64,
        );
        metric(
            "vllm:prompt_tokens",
            "counter",
            "Number of prefill tokens processed.",
            n(&self.prompt_tokens),
        );
        metric(
            "vllm:generation_tokens",
            "counter",
            "Number of generation tokens processed.",
            n(&self.generation_tokens),
        );
        out
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A prompt as tokens, in the order a chat template lays it out: one token
/// per message role, then whitespace words of every string (the `type` tags
/// of content parts are not text).
pub fn tokens(parts: &[&Option<Value>]) -> Vec<u64> {
    fn walk(v: &Value, out: &mut Vec<u64>) {
        match v {
            Value::String(s) => out.extend(s.split_whitespace().map(kv::token)),
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => {
                if let Some(Value::String(role)) = map.get("role") {
                    out.push(kv::token(&format!("<|{role}|>")));
                }
                map.iter()
                    .filter(|(k, _)| *k != "role" && *k != "type")
                    .for_each(|(_, v)| walk(v, out));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    parts
        .iter()
        .copied()
        .flatten()
        .for_each(|v| walk(v, &mut out));
    out
}
