//! A vLLM simulator: OpenAI-compatible chat, completions, Responses and
//! models endpoints, streaming exactly as vLLM frames them, with a
//! configurable token count, inter-token delay and fault modes. Used by the
//! tests, the demo and the benchmarks.
//!
//! Per-request overrides come in headers so one simulator serves many test
//! cases: `x-sim-tokens`, `x-sim-delay-ms`, `x-sim-fault`. Every answer
//! carries `x-sim-backend: <id>`.

mod frames;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use frames::{Framer, Kind, ResponseDoc};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub id: String,
    pub models: Vec<String>,
    pub tokens: usize,
    pub delay: Duration,
    pub fault: Option<Fault>,
    pub api_key: Option<String>,
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `500`: answer HTTP 500.
    Status500,
    /// `stall-after:N`: N tokens, then silence with the connection open.
    StallAfter(usize),
    /// `drop-after:N`: N tokens, then the connection is cut mid-body.
    DropAfter(usize),
    /// `malformed-after:N`: after N tokens one `data: {not json` event.
    MalformedAfter(usize),
    /// `slow-headers:MS`: wait before sending the response headers.
    SlowHeaders(u64),
    /// `refuse`: (server level) accept connections and close them at once.
    Refuse,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let n = || {
            arg.parse::<u64>()
                .map_err(|_| format!("fault {name:?} needs a number"))
        };
        Ok(match name {
            "500" => Fault::Status500,
            "refuse" => Fault::Refuse,
            "stall-after" => Fault::StallAfter(n()? as usize),
            "drop-after" => Fault::DropAfter(n()? as usize),
            "malformed-after" => Fault::MalformedAfter(n()? as usize),
            "slow-headers" => Fault::SlowHeaders(n()?),
            _ => return Err(format!("unknown fault {s:?}")),
        })
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SimStats {
    pub requests: u64,
    pub active: u64,
    pub completed: u64,
    pub cancelled: u64,
}

pub struct Sim {
    config: SimConfig,
    requests: AtomicU64,
    active: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    next_id: AtomicU64,
    /// Responses produced here, bounded: vLLM keeps conversation state on the
    /// server that produced it, and so does the simulator.
    responses: Mutex<(HashMap<String, Value>, VecDeque<String>)>,
}

const MAX_STORED: usize = 10_000;

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        Arc::new(Sim {
            config,
            requests: AtomicU64::new(0),
            active: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            responses: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    pub fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", self.config.id)
    }

    fn store(&self, id: &str, doc: Value) {
        let mut guard = self.responses.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        if map.insert(id.to_owned(), doc).is_none() {
            order.push_back(id.to_owned());
        }
        while order.len() > MAX_STORED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    fn stored(&self, id: &str) -> Option<Value> {
        self.responses
            .lock()
            .expect("not poisoned")
            .0
            .get(id)
            .cloned()
    }

    fn remove(&self, id: &str) -> bool {
        self.responses
            .lock()
            .expect("not poisoned")
            .0
            .remove(id)
            .is_some()
    }
}

/// Counts a request as active until dropped: completed if `done` was set,
/// cancelled otherwise (the client went away, or a fault cut it short).
struct Active {
    sim: Arc<Sim>,
    done: bool,
}

impl Active {
    fn start(sim: &Arc<Sim>) -> Active {
        sim.requests.fetch_add(1, Ordering::Relaxed);
        sim.active.fetch_add(1, Ordering::Relaxed);
        Active {
            sim: sim.clone(),
            done: false,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.sim.active.fetch_sub(1, Ordering::Relaxed);
        let counter = if self.done {
            &self.sim.completed
        } else {
            &self.sim.cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(get_response).delete(delete_response),
        )
        .route("/v1/responses/{id}/cancel", post(get_response))
        .route("/v1/models", get(models))
        .route(
            "/sim/stats",
            get(|State(s): State<Arc<Sim>>| async move { Json(s.stats()) }),
        )
        .with_state(sim.clone())
        .layer(axum::middleware::map_response(move |mut resp: Response| {
            let id = sim.config.id.clone();
            async move {
                if let Ok(v) = HeaderValue::from_str(&id) {
                    resp.headers_mut().insert("x-sim-backend", v);
                }
                resp
            }
        }))
}

pub async fn serve(listener: TcpListener, config: SimConfig) -> std::io::Result<()> {
    if config.fault == Some(Fault::Refuse) {
        loop {
            drop(listener.accept().await?);
        }
    }
    let app = router(Sim::new(config));
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

pub struct SimHandle {
    pub addr: SocketAddr,
    pub url: String,
    pub sim: Arc<Sim>,
}

/// Bind 127.0.0.1:0 and serve on the current runtime.
pub async fn spawn(config: SimConfig) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(config);
    let app = router(sim.clone());
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(SimHandle {
        addr,
        url: format!("http://{addr}"),
        sim,
    })
}

fn error(status: StatusCode, message: String, kind: &str, param: Option<&str>) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

/// What every generation endpoint decides first.
struct Plan {
    model: String,
    tokens: usize,
    finish: &'static str,
    delay: Duration,
    fault: Option<Fault>,
    stream: bool,
    include_usage: bool,
    prompt_tokens: usize,
    body: Value,
}

async fn plan(sim: &Sim, headers: &HeaderMap, body: &[u8]) -> Result<Plan, Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(key) = &sim.config.api_key {
        let sent = header("authorization").and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_str()) {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized".into(),
                "Unauthorized",
                None,
            ));
        }
    }
    let fault = match header("x-sim-fault") {
        Some(f) => Some(
            f.parse::<Fault>()
                .map_err(|e| error(StatusCode::BAD_REQUEST, e, "BadRequestError", None))?,
        ),
        None => sim.config.fault,
    };
    if let Some(Fault::SlowHeaders(ms)) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if fault == Some(Fault::Status500) {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated failure".into(),
            "InternalServerError",
            None,
        ));
    }
    let body: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("Invalid JSON: {e}"),
            "BadRequestError",
            None,
        )
    })?;
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if !sim.config.models.contains(&model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
            "NotFoundError",
            Some("model"),
        ));
    }
    let configured = header("x-sim-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(sim.config.tokens);
    let cap = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body[*k].as_u64())
        .map(|n| n as usize);
    let tokens = cap.map_or(configured, |c| c.min(configured));
    let delay = header("x-sim-delay-ms")
        .and_then(|v| v.parse().ok())
        .map_or(sim.config.delay, Duration::from_millis);
    Ok(Plan {
        finish: if cap.is_some_and(|c| c < configured) {
            "length"
        } else {
            "stop"
        },
        stream: body["stream"].as_bool().unwrap_or(false),
        include_usage: body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
        prompt_tokens: words(&body["messages"]) + words(&body["prompt"]) + words(&body["input"]),
        model,
        tokens,
        delay,
        fault,
        body,
    })
}

/// Whitespace-separated words in every string inside `v`: a deterministic
/// stand-in for a tokenizer.
fn words(v: &Value) -> usize {
    match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(items) => items.iter().map(words).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "type")
            .map(|(_, v)| words(v))
            .sum(),
        _ => 0,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, Kind::Chat, headers, body).await
}

async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(sim, Kind::Completion, headers, body).await
}

async fn generate(sim: Arc<Sim>, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    let mut active = Active::start(&sim);
    let plan = match plan(&sim, &headers, &body).await {
        Ok(p) => p,
        Err(resp) => {
            active.done = true;
            return resp;
        }
    };
    let (id, created) = match kind {
        Kind::Chat => (sim.new_id("chatcmpl"), now_secs()),
        Kind::Completion => (sim.new_id("cmpl"), now_secs()),
    };
    if !plan.stream {
        tokio::time::sleep(plan.delay * plan.tokens as u32).await;
        let doc = match kind {
            Kind::Chat => frames::chat_completion(
                &id,
                created,
                &plan.model,
                plan.tokens,
                plan.finish,
                plan.prompt_tokens,
            ),
            Kind::Completion => frames::text_completion(
                &id,
                created,
                &plan.model,
                plan.tokens,
                plan.finish,
                plan.prompt_tokens,
            ),
        };
        active.done = true;
        return Json(doc).into_response();
    }
    let framer = Framer::new(kind, &id, created, &plan.model);
    let mut events: Vec<Bytes> = Vec::with_capacity(plan.tokens + 3);
    events.extend(framer.first());
    for i in 0..plan.tokens {
        let last = i + 1 == plan.tokens;
        events.push(framer.token(i, last.then_some(plan.finish)));
    }
    if plan.include_usage {
        events.push(framer.usage(plan.prompt_tokens, plan.tokens));
    }
    events.push(Bytes::from_static(frames::DONE));
    sse(
        events,
        usize::from(kind == Kind::Chat),
        plan.delay,
        plan.fault,
        active,
    )
}

/// Stream `events` with `delay` before each token event (the first `lead`
/// events go at once), applying a mid-stream fault if any.
fn sse(
    events: Vec<Bytes>,
    lead: usize,
    delay: Duration,
    fault: Option<Fault>,
    active: Active,
) -> Response {
    let body = paced(events, lead, delay, fault, active);
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}

struct Pace {
    events: Vec<Bytes>,
    next: usize,
    lead: usize,
    delay: Duration,
    fault: Option<Fault>,
    /// Index of the event before which the fault strikes.
    cut: Option<usize>,
    active: Active,
}

fn paced(
    events: Vec<Bytes>,
    lead: usize,
    delay: Duration,
    fault: Option<Fault>,
    active: Active,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let cut = match fault {
        Some(Fault::StallAfter(n) | Fault::DropAfter(n) | Fault::MalformedAfter(n)) => {
            Some(lead + n)
        }
        _ => None,
    };
    let pace = Pace {
        events,
        next: 0,
        lead,
        delay,
        fault,
        cut,
        active,
    };
    stream::unfold(pace, |mut p| async move {
        if p.next >= p.events.len() {
            return None;
        }
        // Pace first, so what was sent before a fault is on the wire.
        if p.next >= p.lead && !p.delay.is_zero() {
            tokio::time::sleep(p.delay).await;
        }
        if p.cut == Some(p.next) {
            p.cut = None;
            match p.fault {
                Some(Fault::StallAfter(_)) => std::future::pending::<()>().await,
                Some(Fault::DropAfter(_)) => {
                    // An error ends the chunked body without its terminator:
                    // to the client it is a connection cut mid-stream.
                    p.next = p.events.len();
                    return Some((Err(std::io::Error::other("simulated drop")), p));
                }
                _ => return Some((Ok(Bytes::from_static(b"data: {not json\n\n")), p)),
            }
        }
        let event = p.events[p.next].clone();
        p.next += 1;
        p.active.done = p.next == p.events.len();
        Some((Ok(event), p))
    })
}

async fn responses(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut active = Active::start(&sim);
    let plan = match plan(&sim, &headers, &body).await {
        Ok(p) => p,
        Err(resp) => {
            active.done = true;
            return resp;
        }
    };
    let previous = plan.body["previous_response_id"]
        .as_str()
        .map(str::to_owned);
    if let Some(prev) = &previous {
        if sim.stored(prev).is_none() {
            active.done = true;
            return error(
                StatusCode::NOT_FOUND,
                format!("Response with id '{prev}' not found."),
                "invalid_request_error",
                Some("previous_response_id"),
            );
        }
    }
    let id = sim.new_id("resp");
    let message_id = sim.new_id("msg");
    let doc = ResponseDoc {
        id: &id,
        message_id: &message_id,
        created: now_secs(),
        model: &plan.model,
        previous: previous.as_deref(),
        prompt: plan.prompt_tokens,
    };
    let done = doc.object("completed", Some(plan.tokens));
    sim.store(&id, done.clone());
    if !plan.stream {
        tokio::time::sleep(plan.delay * plan.tokens as u32).await;
        active.done = true;
        return Json(done).into_response();
    }
    let mut seq = 0;
    let ev = frames::typed_event;
    let text = frames::text(plan.tokens);
    let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
    let at = |extra: Value| {
        let mut v = json!({"item_id": message_id, "output_index": 0, "content_index": 0});
        v.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        v
    };
    let mut events = vec![
        ev(
            &mut seq,
            "response.created",
            json!({"response": doc.object("in_progress", None)}),
        ),
        ev(
            &mut seq,
            "response.in_progress",
            json!({"response": doc.object("in_progress", None)}),
        ),
        ev(
            &mut seq,
            "response.output_item.added",
            json!({"output_index": 0, "item": doc.message("", "in_progress")}),
        ),
        ev(
            &mut seq,
            "response.content_part.added",
            at(json!({"part": part("")})),
        ),
    ];
    for i in 0..plan.tokens {
        events.push(ev(
            &mut seq,
            "response.output_text.delta",
            at(json!({"delta": frames::token(i), "logprobs": []})),
        ));
    }
    events.push(ev(
        &mut seq,
        "response.output_text.done",
        at(json!({"text": text, "logprobs": []})),
    ));
    events.push(ev(
        &mut seq,
        "response.content_part.done",
        at(json!({"part": part(&text)})),
    ));
    events.push(ev(
        &mut seq,
        "response.output_item.done",
        json!({"output_index": 0, "item": doc.message(&text, "completed")}),
    ));
    events.push(ev(
        &mut seq,
        "response.completed",
        json!({"response": done}),
    ));
    sse(events, 4, plan.delay, plan.fault, active)
}

async fn get_response(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.stored(&id) {
        Some(doc) => Json(doc).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("Response with id '{id}' not found."),
            "invalid_request_error",
            None,
        ),
    }
}

async fn delete_response(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    if sim.remove(&id) {
        Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("Response with id '{id}' not found."),
            "invalid_request_error",
            None,
        )
    }
}

async fn models(State(sim): State<Arc<Sim>>) -> Response {
    let data: Vec<Value> = sim
        .config
        .models
        .iter()
        .map(|m| {
            json!({"id": m, "object": "model", "created": now_secs(), "owned_by": "vllm",
                   "root": m, "parent": null, "max_model_len": 8192, "permission": []})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
