//! The floor for the load benchmark: the smallest useful axum + reqwest
//! proxy (no auth, no routing, no hashing), forwarding every POST to one
//! upstream and streaming the answer back.

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::serve::ListenerExt;

#[derive(Clone)]
struct Upstream {
    url: String,
    client: reqwest::Client,
}

async fn forward(
    State(up): State<Upstream>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut req = up
        .client
        .post(format!("{}{}", up.url, uri.path()))
        .body(body);
    for (name, value) in &headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            if let Some(ct) = resp.headers().get("content-type") {
                out = out.header("content-type", ct);
            }
            out.body(Body::from_stream(resp.bytes_stream())).unwrap()
        }
        Err(_) => Response::builder().status(502).body(Body::empty()).unwrap(),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .expect("listen address")
        .parse()
        .expect("address");
    let upstream = args.next().expect("upstream url");
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client");
    let app = axum::Router::new()
        .fallback(axum::routing::post(forward))
        .with_state(Upstream {
            url: upstream,
            client,
        });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("passthrough listening on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|t| {
        let _ = t.set_nodelay(true);
    });
    axum::serve(listener, app).await
}
