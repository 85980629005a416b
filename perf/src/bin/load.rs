//! End-to-end load on loopback: the same load sent (a) straight to the vLLM
//! simulator, (b) through a minimal axum+reqwest passthrough, (c) through
//! the infergate sidecar with auth, routing and attestation hashing on.
//! Reports throughput, latency and time-to-first-byte percentiles, and the
//! proxy process's CPU time per request and per streamed frame, with the
//! ratio (c)/(b) that matters. Writes a Markdown table and an SVG plot.
//!
//! Run: `benches/run-load` (builds release binaries, then this).

use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use infergate_perf::{sibling, sidecar_config, start, start_sim, Proc};

const KEY: &str = "ig-load-benchmark-key-000";

/// A binary next to this one, with `RUST_LOG=warn`.
fn spawn(bin: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(sibling(bin));
    cmd.args(args).env("RUST_LOG", "warn");
    start(cmd, bin)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    stream: bool,
    tokens: usize,
    delay_ms: u64,
    /// A pasted document of this many KiB as the prompt (0: a short one).
    prompt_kib: usize,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "non-streaming",
        stream: false,
        tokens: 16,
        delay_ms: 0,
        prompt_kib: 0,
    },
    Mode {
        name: "stream 200 instant",
        stream: true,
        tokens: 200,
        delay_ms: 0,
        prompt_kib: 0,
    },
    Mode {
        name: "stream 200 paced 1ms",
        stream: true,
        tokens: 200,
        delay_ms: 1,
        prompt_kib: 0,
    },
    Mode {
        name: "150 KB prompt",
        stream: false,
        tokens: 16,
        delay_ms: 0,
        prompt_kib: 150,
    },
];
const CONCURRENCY: [usize; 3] = [1, 32, 256];

struct Row {
    case: &'static str,
    mode: &'static str,
    concurrency: usize,
    requests: usize,
    errors: usize,
    per_sec: f64,
    p50: f64,
    p99: f64,
    ttfb50: f64,
    ttfb99: f64,
    cpu_per_req_us: Option<f64>,
    cpu_per_frame_us: Option<f64>,
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    body: &'static str,
    mode: Mode,
) -> Option<(f64, f64)> {
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("x-sim-tokens", mode.tokens.to_string())
        .header("x-sim-delay-ms", mode.delay_ms.to_string())
        .body(body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut stream = resp.bytes_stream();
    let mut ttfb = None;
    while let Some(chunk) = stream.next().await {
        chunk.ok()?;
        ttfb.get_or_insert_with(|| start.elapsed().as_secs_f64());
    }
    Some((start.elapsed().as_secs_f64(), ttfb.unwrap_or(0.0)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(
    case: &'static str,
    url: &str,
    pid: Option<u32>,
    mode: Mode,
    concurrency: usize,
    secs: f64,
) -> Row {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap();
    let body: &'static str = if mode.prompt_kib > 0 {
        // Prose with some non-ASCII text, as a pasted document would be;
        // made once per run (leaked: the process ends with the benchmark).
        let para = "The quarterly report shows revenue grew 12% — driven by the Zürich office — while costs stayed flat. ";
        let text = para.repeat(mode.prompt_kib * 1024 / para.len() + 1);
        let cut = (0..=mode.prompt_kib * 1024)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            &text[..cut]
        );
        Box::leak(body.into_boxed_str())
    } else if mode.stream {
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"benchmark prompt of a few words"}]}"#
    } else {
        r#"{"model":"m","messages":[{"role":"user","content":"benchmark prompt of a few words"}]}"#
    };
    // Warm the connection pool.
    for _ in 0..concurrency.min(8) {
        one(&client, url, body, mode).await;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let cpu_before = pid.map(cpu_seconds);
    let started = Instant::now();
    let url = Arc::new(url.to_owned());
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut errors = 0;
                while Instant::now() < deadline {
                    match one(&client, &url, body, mode).await {
                        Some(s) => out.push(s),
                        None => errors += 1,
                    }
                }
                (out, errors)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await.unwrap();
        samples.extend(s);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = pid.map(|p| cpu_seconds(p) - cpu_before.unwrap());
    let mut lat: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut ttfb: Vec<f64> = samples.iter().map(|s| s.1).collect();
    lat.sort_by(f64::total_cmp);
    ttfb.sort_by(f64::total_cmp);
    let n = samples.len();
    let frames_per = if mode.stream { mode.tokens + 2 } else { 1 };
    Row {
        case,
        mode: mode.name,
        concurrency,
        requests: n,
        errors,
        per_sec: n as f64 / elapsed,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        ttfb50: percentile(&ttfb, 0.5),
        ttfb99: percentile(&ttfb, 0.99),
        cpu_per_req_us: cpu.map(|c| c * 1e6 / n.max(1) as f64),
        cpu_per_frame_us: cpu
            .filter(|_| mode.stream)
            .map(|c| c * 1e6 / (n * frames_per).max(1) as f64),
    }
}

fn ms(s: f64) -> String {
    format!("{:.2}", s * 1e3)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let out_dir =
        std::path::PathBuf::from(std::env::var("LOAD_OUT").unwrap_or("benches/results".into()));
    std::fs::create_dir_all(&out_dir).unwrap();

    let sim = start_sim();
    let passthrough = spawn("passthrough", &["127.0.0.1:0", &sim.url]);
    let dir = std::env::temp_dir().join(format!("infergate-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        sidecar_config(KEY, &sim.url, "limits: { maxQueued: 4096 }\n"),
    )
    .unwrap();
    let sidecar = spawn(
        "infergate-sidecar",
        &[
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let cases: [(&'static str, &str, Option<u32>); 3] = [
        ("a direct", &sim.url, None),
        (
            "b passthrough",
            &passthrough.url,
            Some(passthrough.child.id()),
        ),
        ("c infergate", &sidecar.url, Some(sidecar.child.id())),
    ];
    let mut rows = Vec::new();
    for mode in MODES {
        for c in CONCURRENCY {
            for (name, url, pid) in cases {
                let row = run(name, url, pid, mode, c, secs).await;
                eprintln!(
                    "{:<14} {:<22} c={:<3} {:>8.0} req/s p50 {} ms p99 {} ms",
                    row.case,
                    row.mode,
                    c,
                    row.per_sec,
                    ms(row.p50),
                    ms(row.p99)
                );
                rows.push(row);
            }
        }
    }
    let report = markdown(&rows, secs);
    println!("{report}");
    std::fs::write(out_dir.join("load.md"), &report).unwrap();
    std::fs::write(out_dir.join("latency.svg"), svg(&rows)).unwrap();
}

fn markdown(rows: &[Row], secs: f64) -> String {
    let mut s = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(s, "Load run: {secs} s per cell, {cpus} CPUs, loopback; client, simulator and proxy share the machine.\n").unwrap();
    writeln!(s, "| case | mode | conc | requests | req/s | errors | p50 ms | p99 ms | TTFB p50 ms | TTFB p99 ms | proxy CPU µs/req | proxy CPU µs/frame |").unwrap();
    writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            r.case,
            r.mode,
            r.concurrency,
            r.requests,
            r.per_sec,
            r.errors,
            ms(r.p50),
            ms(r.p99),
            ms(r.ttfb50),
            ms(r.ttfb99),
            opt(r.cpu_per_req_us),
            r.cpu_per_frame_us.map_or("-".into(), |v| format!("{v:.2}")),
        )
        .unwrap();
    }
    writeln!(s, "\nRatios (c) infergate / (b) passthrough, proxy CPU:\n").unwrap();
    writeln!(s, "| mode | conc | per request | per frame |").unwrap();
    writeln!(s, "|---|---:|---:|---:|").unwrap();
    for r in rows.iter().filter(|r| r.case.starts_with('c')) {
        let b = rows
            .iter()
            .find(|b| b.case.starts_with('b') && b.mode == r.mode && b.concurrency == r.concurrency)
            .unwrap();
        let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "-".into(),
        };
        writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.mode,
            r.concurrency,
            ratio(r.cpu_per_req_us, b.cpu_per_req_us),
            ratio(r.cpu_per_frame_us, b.cpu_per_frame_us)
        )
        .unwrap();
    }
    s
}

/// p50 latency against concurrency, one panel per mode, one line per case.
fn svg(rows: &[Row]) -> String {
    let (w, h, pad) = (300.0, 220.0, 40.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='10'>",
        w * 3.0,
        h + 30.0
    );
    let colors = [("a", "#888"), ("b", "#1f77b4"), ("c", "#d62728")];
    for (p, mode) in MODES.iter().enumerate() {
        let x0 = p as f64 * w;
        let cell: Vec<&Row> = rows.iter().filter(|r| r.mode == mode.name).collect();
        let max = cell.iter().map(|r| r.p50).fold(0.0, f64::max).max(1e-6) * 1.1;
        write!(
            s,
            "<text x='{}' y='14'>{} — p50 latency (ms) vs concurrency</text>",
            x0 + pad,
            mode.name
        )
        .unwrap();
        write!(
            s,
            "<line x1='{0}' y1='{1}' x2='{2}' y2='{1}' stroke='black'/>",
            x0 + pad,
            h - 10.0,
            x0 + w - 10.0
        )
        .unwrap();
        write!(
            s,
            "<line x1='{0}' y1='20' x2='{0}' y2='{1}' stroke='black'/>",
            x0 + pad,
            h - 10.0
        )
        .unwrap();
        write!(s, "<text x='{}' y='30'>{:.1}</text>", x0 + 2.0, max * 1e3).unwrap();
        let px = |i: usize| x0 + pad + 10.0 + i as f64 * (w - pad - 30.0) / 2.0;
        let py = |v: f64| h - 10.0 - v / max * (h - 40.0);
        for (i, c) in CONCURRENCY.iter().enumerate() {
            write!(s, "<text x='{}' y='{}'>{c}</text>", px(i) - 5.0, h + 2.0).unwrap();
        }
        for (prefix, color) in colors {
            let pts: Vec<String> = CONCURRENCY
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    cell.iter()
                        .find(|r| r.case.starts_with(prefix) && r.concurrency == *c)
                        .map(|r| format!("{:.1},{:.1}", px(i), py(r.p50)))
                })
                .collect();
            write!(
                s,
                "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>",
                pts.join(" ")
            )
            .unwrap();
        }
    }
    for (i, (prefix, color)) in colors.iter().enumerate() {
        let label = match *prefix {
            "a" => "(a) direct",
            "b" => "(b) axum+reqwest passthrough",
            _ => "(c) infergate sidecar",
        };
        write!(
            s,
            "<text x='{}' y='{}' fill='{color}'>{label}</text>",
            10.0 + i as f64 * 220.0,
            h + 25.0
        )
        .unwrap();
    }
    s.push_str("</svg>");
    s
}
