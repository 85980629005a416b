//! Scale: what a config costs as routes, pods and keys grow, and how long
//! a key revocation takes to reach every sidecar.
//!
//! Part 1 links the operator's `render` and the sidecar's `Table::build` and
//! times them (median of a few runs) over a grid of routes x pods x keys,
//! with the bytes of the whole config and of the delta a one-key revocation
//! sends. Part 2 runs `SIDECARS` sidecar admin listeners in this process on
//! loopback, pushes the config to all of them, then revokes one key and
//! measures from the render to the moment the last sidecar refuses it.
//!
//! `benches/run-scale` runs it in release mode and writes
//! `benches/results/scale.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use infergate_operator::push::{push_all, Payload, PodRef, Pushed, Sidecar};
use infergate_operator::render::{render, Inputs};
use infergate_sidecar::config::hash_key;
use infergate_sidecar::serve::{serve, ServeOptions};
use infergate_sidecar::table::Table;
use infergate_sidecar::{admin_app, AppState, Options};

const TOKEN: &str = "scale-bench-admin-token";
/// Providers the pods are spread over; route i targets provider i % 10.
const PROVIDERS: usize = 10;

fn inputs(routes: usize, pods: usize, keys: usize) -> Inputs {
    let mut i = Inputs::default();
    let per = pods.div_ceil(PROVIDERS);
    for p in 0..PROVIDERS {
        let spec = serde_json::json!({
            "endpoints": {"service": format!("vllm-{p}"), "port": 8000, "sidecarPort": 8080},
        });
        i.providers.insert(
            ("ai".into(), format!("p{p}")),
            serde_json::from_value(spec).expect("provider spec"),
        );
        let ips = (0..per)
            .map(|n| format!("10.{p}.{}.{}", n / 250, n % 250 + 1))
            .collect();
        i.endpoints.insert(("ai".into(), format!("vllm-{p}")), ips);
    }
    for r in 0..routes {
        let spec = serde_json::json!({
            "model": format!("model-{r:04}"),
            "backends": [{"provider": format!("p{}", r % PROVIDERS)}],
        });
        i.routes.insert(
            ("ai".into(), format!("r{r:04}")),
            serde_json::from_value(spec).expect("route spec"),
        );
    }
    for k in 0..keys {
        i.keys.insert(
            format!("team-{k:05}"),
            format!("ig-scale-key-{k:05}-0123456789"),
        );
    }
    i.sidecars = 1;
    i
}

fn gzipped_len(bytes: &[u8]) -> usize {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("to a Vec");
    enc.finish().expect("to a Vec").len()
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn time<T>(n: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut runs = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let start = Instant::now();
        last = Some(f());
        runs.push(start.elapsed());
    }
    (median(runs), last.expect("n > 0"))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn kb(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MB", n as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KB", n as f64 / 1024.0)
    }
}

/// One grid point, for the plot.
struct Point {
    label: String,
    config_bytes: usize,
    delta_bytes: usize,
    apply_whole: Duration,
    apply_delta: Duration,
}

fn grid(out: &mut String) -> Vec<Point> {
    let mut points = Vec::new();
    out.push_str(
        "| routes x pods x keys | render | config JSON | gzipped (sent) | serialise | sidecar apply (whole) | revocation delta | sidecar apply (delta) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let sizes = [10, 100, 1000];
    let cells = sizes
        .iter()
        .flat_map(|r| sizes.iter().map(move |p| (*r, *p)))
        .flat_map(|(r, p)| [100, 10_000].map(|k| (r, p, k)));
    for (routes, pods, keys) in cells {
        let mut i = inputs(routes, pods, keys);
        let (t_render, before) = time(5, || render(&i).expect("valid"));
        let (t_ser, full) = time(5, || serde_json::to_vec(&before.config).expect("json"));
        let (t_apply, _) = time(3, || {
            Table::build(before.config.clone(), None).expect("valid")
        });
        i.keys.remove("team-00042");
        let after = render(&i).expect("valid");
        let delta = before
            .config
            .diff(&after.config, &before.version, &after.version)
            .expect("a revocation is a delta");
        let delta_bytes = serde_json::to_vec(&delta).expect("json").len();
        let base = Table::build(before.config.clone(), None).expect("valid");
        let (t_delta, _) = time(5, || base.apply(&delta).expect("applies"));
        out.push_str(&format!(
            "| {routes} x {pods} x {keys} | {} | {} | {} | {} | {} | {} B | {} |\n",
            ms(t_render),
            kb(full.len()),
            kb(gzipped_len(&full)),
            ms(t_ser),
            ms(t_apply),
            delta_bytes,
            ms(t_delta)
        ));
        points.push(Point {
            label: format!("{routes} x {pods} x {keys}"),
            config_bytes: full.len(),
            delta_bytes,
            apply_whole: t_apply,
            apply_delta: t_delta,
        });
        eprintln!("grid {routes}x{pods}x{keys} done");
    }
    points
}

/// Bars on a log scale: the whole config against the revocation delta
/// (bytes), and a sidecar's apply of each (ms), per grid point.
fn svg(points: &[Point]) -> String {
    let (row, left, width) = (16.0, 150.0, 300.0);
    let height = 40.0 + row * 2.0 * points.len() as f64;
    let log_x = |v: f64, max: f64| (v.max(1.0).ln() / max.ln()) * width;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{height}' font-family='sans-serif' font-size='10'>",
        left * 2.0 + width * 2.0 + 20.0
    );
    s.push_str(&format!(
        "<text x='{left}' y='12'>bytes per change (log): whole config (blue) vs one-key revocation delta (orange)</text>\
         <text x='{}' y='12'>sidecar apply, us (log): whole (blue) vs delta (orange)</text>",
        left * 2.0 + width
    ));
    for (i, p) in points.iter().enumerate() {
        let y = 24.0 + row * 2.0 * i as f64;
        s.push_str(&format!("<text x='4' y='{}'>{}</text>", y + 12.0, p.label));
        for (j, (v, max, x0, color)) in [
            (p.config_bytes as f64, 1e8, left, "#4e79a7"),
            (p.delta_bytes as f64, 1e8, left, "#f28e2b"),
            (
                p.apply_whole.as_secs_f64() * 1e6,
                1e6,
                left * 2.0 + width,
                "#4e79a7",
            ),
            (
                p.apply_delta.as_secs_f64() * 1e6,
                1e6,
                left * 2.0 + width,
                "#f28e2b",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let yy = y + if j % 2 == 0 { 0.0 } else { row * 0.8 };
            s.push_str(&format!(
                "<rect x='{x0}' y='{yy}' width='{:.1}' height='{:.1}' fill='{color}'/>",
                log_x(v, max),
                row * 0.7
            ));
        }
    }
    s.push_str("</svg>");
    s
}

async fn start_sidecar() -> (Arc<AppState>, String) {
    let options = Options {
        admin_token: Some(TOKEN.into()),
        records_capacity: Some(16),
        ..Options::default()
    };
    let state = AppState::new(None, options).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(serve(
        listener,
        admin_app(state.clone()),
        ServeOptions::default(),
        std::future::pending(),
    ));
    (state, url)
}

async fn revocation(out: &mut String, sidecars: usize, routes: usize, pods: usize, keys: usize) {
    let mut states = Vec::with_capacity(sidecars);
    let mut targets = Vec::with_capacity(sidecars);
    for n in 0..sidecars {
        let (state, url) = start_sidecar().await;
        states.push(state);
        targets.push(Sidecar {
            pod: PodRef {
                namespace: "ai".into(),
                name: format!("sidecar-{n}"),
            },
            admin_url: url,
        });
    }
    let client = reqwest::Client::new();
    let mut i = inputs(routes, pods, keys);
    let before = render(&i).expect("valid");
    let start = Instant::now();
    let first = push_all(
        &client,
        &targets,
        &Payload::new(&before.config, &before.version, None),
        TOKEN,
    )
    .await;
    let t_full = start.elapsed();
    assert!(first.iter().all(|p| matches!(p, Pushed::Applied(_))));

    let revoked: [u8; 32] = {
        let mut h = [0u8; 32];
        hex::decode_to_slice(hash_key("ig-scale-key-00042-0123456789"), &mut h).expect("hex");
        h
    };
    assert!(states
        .iter()
        .all(|s| s.table.load().key(&revoked).is_some()));
    // The clock starts when the operator sees the Secret gone.
    let start = Instant::now();
    i.keys.remove("team-00042");
    let after = render(&i).expect("valid");
    let payload = Payload::new(
        &after.config,
        &after.version,
        Some((&before.config, &before.version)),
    );
    let results = push_all(&client, &targets, &payload, TOKEN).await;
    let t_revoke = start.elapsed();
    let patched = results
        .iter()
        .filter(|p| matches!(p, Pushed::Patched(_)))
        .count();
    let refusing = states
        .iter()
        .filter(|s| s.table.load().key(&revoked).is_none())
        .count();
    assert_eq!(refusing, sidecars, "every sidecar refuses the revoked key");
    let (full, delta) = payload.sizes();
    out.push_str(&format!(
        "| {sidecars} | {routes} x {pods} x {keys} | {} ({} gzipped each) | {} | {} B by PATCH to {patched} | {refusing}/{sidecars} |\n",
        ms(t_full),
        kb(full),
        ms(t_revoke),
        delta.unwrap_or(0),
    ));
}

#[tokio::main]
async fn main() {
    let sidecars: usize = std::env::var("SCALE_SIDECARS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut out = String::from("## Config size and apply cost\n\n");
    let points = grid(&mut out);
    out.push_str(
        "\n## Key revocation\n\n\
         | sidecars | routes x pods x keys | first push (whole config) | revoke one key: render to last sidecar refusing | sent | refusing |\n\
         |---:|---|---:|---:|---:|---:|\n",
    );
    revocation(&mut out, sidecars, 100, 100, 1000).await;
    println!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("scale.md"), &out);
    let _ = std::fs::write(dir.join("scale.svg"), svg(&points));
}
