//! A vLLM simulator for the tests, the demo and the benchmarks.
//!
//! It answers `/v1/chat/completions`, `/v1/completions`, `/v1/responses` and
//! `/v1/models` with the bytes vLLM's OpenAI server sends (same fields, same
//! order, same SSE framing), with deterministic text (`tok0 tok1 ...`), a
//! configurable length and inter-token delay, and fault modes.
//!
//! One simulator serves many test cases: `x-sim-tokens`, `x-sim-delay-ms` and
//! `x-sim-fault` override the settings per request, and every answer carries
//! `x-sim-backend: <id>` so a test sees which backend served it.
//!
//! It must never be the bottleneck of a load benchmark: streamed events are
//! formatted once per answer, a token costs one small allocation, and no
//! JSON is parsed or built per token.

mod ask;
mod completions;
pub mod engine;
pub mod kv;
mod responses;
mod stream;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Sent as `x-sim-backend` (left out if it is not a valid header value).
    pub id: String,
    /// Model names served; a request for another gets vLLM's 404.
    pub models: Vec<String>,
    /// Completion tokens per answer (a request's `max_tokens` may cut it).
    pub tokens: usize,
    /// Before each token; a non-streamed answer waits `tokens * delay`.
    pub delay: Duration,
    pub fault: Option<Fault>,
    /// If set, `/v1/*` requires `Authorization: Bearer <key>`, as `vllm --api-key`.
    pub api_key: Option<String>,
    /// Scheduler, prefix cache and prefill cost (all off by default).
    pub engine: engine::EngineConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            id: "sim".into(),
            models: vec!["sim-model".into()],
            tokens: 16,
            delay: Duration::ZERO,
            fault: None,
            api_key: None,
            engine: engine::EngineConfig::default(),
        }
    }
}

/// What can go wrong, as the `--fault` flag and the `x-sim-fault` header spell
/// it. `N` counts content chunks (tokens); an `N` past the last token strikes
/// just before the end (`[DONE]`, or the usage chunk when asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `500`: HTTP 500 with an OpenAI error body.
    Status500,
    /// `stall-after:N`: N tokens, then silence with the connection open.
    StallAfter(usize),
    /// `drop-after:N`: N tokens, then the connection is cut mid-body (no
    /// terminating chunk, no `[DONE]`): the client's body read fails.
    DropAfter(usize),
    /// `malformed-after:N`: after N tokens one `data: {not json\n\n` event,
    /// then the rest of the stream as usual.
    MalformedAfter(usize),
    /// `slow-headers:MS`: wait before sending the response headers.
    SlowHeaders(u64),
    /// `refuse`: accept each connection and close it at once (`serve` and
    /// `spawn` only; as a request header it is a 400).
    Refuse,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let n = || {
            arg.parse::<u64>()
                .map_err(|_| format!("fault {name:?} needs a number, as in {name}:3"))
        };
        Ok(match name {
            "500" => Fault::Status500,
            "refuse" => Fault::Refuse,
            "stall-after" => Fault::StallAfter(n()? as usize),
            "drop-after" => Fault::DropAfter(n()? as usize),
            "malformed-after" => Fault::MalformedAfter(n()? as usize),
            "slow-headers" => Fault::SlowHeaders(n()?),
            _ => {
                return Err(format!(
                    "unknown fault {s:?} (500, refuse, stall-after:N, drop-after:N, \
                     malformed-after:N, slow-headers:MS)"
                ))
            }
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status500 => f.write_str("500"),
            Fault::Refuse => f.write_str("refuse"),
            Fault::StallAfter(n) => write!(f, "stall-after:{n}"),
            Fault::DropAfter(n) => write!(f, "drop-after:{n}"),
            Fault::MalformedAfter(n) => write!(f, "malformed-after:{n}"),
            Fault::SlowHeaders(ms) => write!(f, "slow-headers:{ms}"),
        }
    }
}

/// Generation requests (chat, completions, responses) seen so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SimStats {
    pub requests: u64,
    /// In progress now, streams included until their body is dropped.
    pub active: u64,
    /// Answered in full (error answers included).
    pub completed: u64,
    /// Ended before their end: the client went away, or a fault cut them.
    pub cancelled: u64,
}

pub struct Sim {
    config: SimConfig,
    backend: Option<HeaderValue>,
    requests: AtomicU64,
    active: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    ids: Ids,
    responses: responses::Store,
    engine: engine::Engine,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        let engine = config.engine;
        Arc::new(Sim {
            backend: HeaderValue::from_str(&config.id).ok(),
            config,
            requests: AtomicU64::new(0),
            active: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ids: Ids::new(),
            responses: responses::Store::default(),
            engine: engine::Engine::new(engine),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn engine(&self) -> &engine::Engine {
        &self.engine
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// Counts one generation request as active from arrival until dropped: as
/// completed if `finish`ed, as cancelled otherwise. Streams carry it inside
/// their body, so a client that hangs up mid-stream is seen here.
struct Active {
    sim: Arc<Sim>,
    done: bool,
    /// Holds the engine's slot and blocks while the answer is produced.
    running: Option<engine::Running>,
}

impl Active {
    fn start(sim: &Arc<Sim>) -> Active {
        sim.requests.fetch_add(1, Ordering::Relaxed);
        sim.active.fetch_add(1, Ordering::Relaxed);
        Active {
            sim: sim.clone(),
            done: false,
            running: None,
        }
    }

    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let end = if self.done {
            &self.sim.completed
        } else {
            &self.sim.cancelled
        };
        end.fetch_add(1, Ordering::Relaxed);
        self.sim.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Unique ids in vLLM's shape (`chatcmpl-` + 32 hex digits): a random
/// per-simulator half, so simulators never collide, and a counter.
struct Ids {
    seed: u64,
    next: AtomicU64,
}

impl Ids {
    fn new() -> Ids {
        Ids {
            seed: RandomState::new().hash_one(std::process::id()),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self, prefix: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{:016x}{n:016x}", self.seed)
    }
}

pub fn router(sim: Arc<Sim>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::text))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::fetch).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::fetch))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(sim.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async {}))
        .route("/metrics", get(metrics))
        .route(
            "/sim/stats",
            get(|State(s): State<Arc<Sim>>| async move { Json(s.stats()) }),
        )
        // FastAPI's answer to an unknown path.
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        // vLLM sets no small body limit; long prompts must reach the handler.
        .layer(DefaultBodyLimit::max(64 << 20))
        .layer(middleware::map_response_with_state(sim.clone(), tag))
        .with_state(sim)
}

/// vLLM's Prometheus metrics (the load and prefix-cache ones).
async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    let model = sim.config.models.first().map_or("", String::as_str);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        sim.engine.metrics(model),
    )
        .into_response()
}

async fn tag(State(sim): State<Arc<Sim>>, mut resp: Response) -> Response {
    if let Some(id) = &sim.backend {
        resp.headers_mut().insert("x-sim-backend", id.clone());
    }
    resp
}

async fn authorize(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    if let Some(key) = &sim.config.api_key {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationError",
                "Unauthorized",
            );
        }
    }
    next.run(req).await
}

/// Serve until the listener fails.
pub async fn serve(listener: TcpListener, config: SimConfig) -> std::io::Result<()> {
    run(listener, Sim::new(config)).await
}

pub struct SimHandle {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub sim: Arc<Sim>,
}

/// Bind 127.0.0.1:0 and serve on the current tokio runtime.
pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(config);
    tokio::spawn(run(listener, sim.clone()));
    Ok(SimHandle {
        addr,
        url: format!("http://{addr}"),
        sim,
    })
}

async fn run(listener: TcpListener, sim: Arc<Sim>) -> std::io::Result<()> {
    if sim.config.fault == Some(Fault::Refuse) {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => drop(tcp),
                // Out of descriptors and the like: back off, as axum::serve does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    // Without NODELAY, Nagle holds back each small token frame until the
    // previous one is acknowledged: paced streams would arrive bunched.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(sim)).await
}

async fn models(State(sim): State<Arc<Sim>>) -> Json<ModelList> {
    let created = now_secs();
    let data = sim
        .config
        .models
        .iter()
        .map(|id| ModelCard {
            id: id.clone(),
            object: "model",
            created,
            owned_by: "vllm",
            root: id.clone(),
            parent: (),
            max_model_len: 8192,
            permission: [],
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelCard>,
}

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: String,
    parent: (),
    max_model_len: u32,
    permission: [(); 0],
}

/// vLLM's error body: `{"error":{"message","type","param","code"}}`.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    error_with_param(status, kind, message, None)
}

fn error_with_param(
    status: StatusCode,
    kind: &str,
    message: &str,
    param: Option<&str>,
) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Info<'a>,
    }
    #[derive(Serialize)]
    struct Info<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: u16,
    }
    let body = Body {
        error: Info {
            message,
            kind,
            param,
            code: status.as_u16(),
        },
    };
    (status, Json(body)).into_response()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
