//! Real sockets on 127.0.0.1:0: a gateway (public + admin listeners) in
//! front of in-process vLLM simulators.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::serve::ServeOptions;
use infergate_sidecar::{admin_app, app, AppState, Options};
use infergate_sim::{self as sim, SimConfig, SimHandle};
use tokio::net::TcpListener;

pub const KEY: &str = "ig-test-key-aaaaaaaaaaaa";
pub const OTHER_KEY: &str = "ig-test-key-bbbbbbbbbbbb";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const UPSTREAM_MODEL: &str = "org/model-7b";

pub struct Gateway {
    pub url: String,
    pub admin_url: String,
    pub state: Arc<AppState>,
}

impl Gateway {
    pub fn in_flight(&self, backend: &str) -> u32 {
        self.state.table.load().backends[backend].in_flight()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Wait (bounded) until no backend has a request in flight.
    pub async fn settle(&self) {
        for _ in 0..200 {
            let table = self.state.table.load();
            if table.backends.values().all(|b| b.in_flight() == 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("in-flight counters did not return to zero");
    }
}

/// The production listener loop, with a short header deadline for tests.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions {
        header_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    tokio::spawn(infergate_sidecar::serve::serve(
        listener,
        router,
        options,
        std::future::pending(),
    ));
    addr
}

pub async fn gateway(config: GatewayConfig) -> Gateway {
    gateway_with(config, Options::default()).await
}

/// A gateway with the test admin token and the given options otherwise.
pub async fn gateway_with(config: GatewayConfig, options: Options) -> Gateway {
    let options = Options {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..options
    };
    let state = AppState::new(Some(config), options).unwrap();
    let public = serve(app(state.clone())).await;
    state.listening_on(public);
    let admin = serve(admin_app(state.clone())).await;
    Gateway {
        url: format!("http://{public}"),
        admin_url: format!("http://{admin}"),
        state,
    }
}

pub async fn simulator(id: &str, tokens: usize, delay_ms: u64) -> SimHandle {
    sim::spawn(SimConfig {
        id: id.into(),
        models: vec![UPSTREAM_MODEL.into()],
        tokens,
        delay: Duration::from_millis(delay_ms),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// A config with one public model `m` (alias `alias`) over the given
/// backend URLs; `extra` is appended YAML at the route level.
pub fn config(urls: &[&str], route_extra: &str, top_extra: &str) -> GatewayConfig {
    let backends: String = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("  - {{ id: b{i}, url: \"{u}\" }}\n"))
        .collect();
    let targets: String = (0..urls.len())
        .map(|i| format!("{{ backend: b{i}, upstreamModel: {UPSTREAM_MODEL} }},"))
        .collect();
    GatewayConfig::from_yaml(&format!(
        r#"
keys:
  - {{ id: team-a, sha256: "{}" }}
  - {{ id: team-b, sha256: "{}", models: [other] }}
backends:
{backends}
models:
  - name: m
    aliases: [alias]
    targets: [{targets}]
{route_extra}
  - name: other
    targets: [{{ backend: b0 }}]
{top_extra}
"#,
        hash_key(KEY),
        hash_key(OTHER_KEY)
    ))
    .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn chat_body(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello there gateway"}],
    })
}

pub async fn post_chat(
    gw: &Gateway,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// A fresh directory under the system temp dir, unique per call.
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "infergate-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `GET path` on the gateway's public port, with `key` if any: status and
/// JSON body (answers and OpenAI errors alike).
pub async fn get_json(gw: &Gateway, key: Option<&str>, path: &str) -> (u16, serde_json::Value) {
    let mut req = client().get(format!("{}{path}", gw.url));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

/// Poll `cond` every 10 ms; panic after 3 s.
pub async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in time");
}
