//! Routing benchmark: prefix-cache hit rate and time to first token on a
//! simulated vLLM fleet, per routing strategy, on the same traces.
//!
//! Four `vllm-sim` pods with a KV-cache model (prefix caching with LRU
//! eviction, prefill time per uncached token, decode time per output
//! token, a bounded running set) sit each behind its own `infergate-sidecar`
//! (peered with the hop secret, as in a cluster; `ROUTING_SIDECARS=2` puts
//! two pods behind each of two sidecars). Each request enters at a
//! random sidecar, as a Kubernetes Service would send it. Three workloads,
//! generated from one seed (words are tokens to the simulator):
//! - `multi-turn`: users sharing a 2000-token system prompt, each with a
//!   400-token opening context, 6 turns with think time in between;
//! - `documents`: questions over 12 long documents (3000 tokens each);
//! - `skewed`: one tenant sends half the requests, all over one 4000-token
//!   prompt; the rest are single-turn users sharing the system prompt.
//!
//! Per workload, each strategy runs on fresh pods (empty caches): round-
//! robin, least-in-flight, sticky by user, prefix affinity with bounded
//! load, and prefix affinity with every request entering one sidecar (the
//! single-global-router reference for hit rate). Hit rate is read from the
//! pods' own `vllm:prefix_cache_*` metrics; "hops turned away" sums the
//! sidecars' `infergate_prefix_spills_total` over the run.
//!
//! Run: `benches/run-routing` (release build, about two minutes).
//! `ROUTING_WORKLOADS=skewed` and `ROUTING_STRATEGIES="least-in-flight;prefix
//! affinity"` (names as in the table, `;`-separated) run a subset; with
//! `ROUTING_TRACE=1` every request's send time, user, entry sidecar,
//! TTFT and pod go to stderr (`TRACE` lines), to see where a tail comes from.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use infergate_benches::routing_report::{markdown, svg, Row};
use infergate_benches::workloads::{documents, multi_turn, skewed, Rng, Session};
use serde_json::Value;
use sha2::{Digest, Sha256};

const KEY: &str = "ig-routing-benchmark-key-0";
const ADMIN: &str = "routing-benchmark-admin-token";
const PODS: usize = 4;
const SEED: u64 = 17;
/// Requests sent before this (from the start of a run) meet cold caches.
const WARM_MS: u64 = 1_500;

struct Proc {
    child: Child,
    url: String,
    admin: Option<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, args: &[&str]) -> Proc {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let mut child = Command::new(dir.join(bin))
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (build it with benches/run-routing)"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |prefix: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix))
            .map(str::to_owned)
    };
    let url = field("public=")
        .or_else(|| {
            line.split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("{bin} printed {line:?}"));
    Proc {
        child,
        url,
        admin: field("admin="),
    }
}

struct Strategy {
    name: &'static str,
    yaml: &'static str,
    /// Every request enters sidecar 0 (one router for the whole fleet).
    single: bool,
}

const STRATEGIES: [Strategy; 5] = [
    Strategy {
        name: "round-robin",
        yaml: "strategy: roundRobin",
        single: false,
    },
    Strategy {
        name: "least-in-flight",
        yaml: "strategy: leastInFlight",
        single: false,
    },
    Strategy {
        name: "sticky by user",
        yaml: "strategy: roundRobin, sticky: { user: true }",
        single: false,
    },
    Strategy {
        name: "prefix affinity",
        yaml: "strategy: prefixAffinity",
        single: false,
    },
    Strategy {
        name: "prefix, 1 router",
        yaml: "strategy: prefixAffinity",
        single: true,
    },
];

const SIM_ARGS: [&str; 14] = [
    "--tokens",
    "100000",
    "--delay-ms",
    "2",
    "--block-size",
    "16",
    // 1500 blocks = 24k tokens: a pod holds a quarter of the working set
    // with room to spare, not all of it.
    "--cache-blocks",
    "1500",
    "--prefill-us-per-token",
    "40",
    "--max-running",
    "8",
    "--model",
    "sim-model",
];

#[derive(Default)]
struct Outcome {
    ttft_ms: Vec<f64>,
    /// TTFT of requests sent after the first `WARM_MS` (caches warm).
    warm_ms: Vec<f64>,
    errors: usize,
    per_pod: [usize; PODS],
    secs: f64,
    hits: f64,
    queries: f64,
    /// Hops turned away by the pod's sidecar (`infergate_prefix_spills`).
    spills: f64,
}

/// `GET {base}/metrics`, with the admin token where the port needs it.
async fn metrics(client: &reqwest::Client, base: &str, token: Option<&str>) -> String {
    let mut req = client.get(format!("{base}/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap().text().await.unwrap()
}

/// Sum of every sidecar's `infergate_prefix_spills_total`.
async fn spills(client: &reqwest::Client, sidecars: &[Proc]) -> f64 {
    let mut n = 0.0;
    for s in sidecars {
        let text = metrics(client, s.admin.as_ref().unwrap(), Some(ADMIN)).await;
        n += text
            .lines()
            .filter(|l| l.starts_with("infergate_prefix_spills_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    n
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(f64, Option<usize>), ()> {
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .map_err(|_| ())?;
    if !resp.status().is_success() {
        return Err(());
    }
    let pod = resp
        .headers()
        .get("x-infergate-backend")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("pod"))
        .and_then(|v| v.parse().ok());
    let mut stream = resp.bytes_stream();
    let mut ttft = None;
    while let Some(chunk) = stream.next().await {
        chunk.map_err(|_| ())?;
        ttft.get_or_insert_with(|| start.elapsed().as_secs_f64() * 1e3);
    }
    Ok((ttft.ok_or(())?, pod))
}

async fn put_config(client: &reqwest::Client, sidecars: &[Proc], yaml: &str) {
    for s in sidecars {
        let resp = client
            .put(format!("{}/admin/v1/config", s.admin.as_ref().unwrap()))
            .bearer_auth(ADMIN)
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }
}

async fn run(sessions: &Arc<Vec<Session>>, sidecars: &[Proc], strategy: &Strategy) -> Outcome {
    let pods: Vec<Proc> = (0..PODS)
        .map(|i| {
            let id = format!("pod{i}");
            let mut args = vec!["--listen", "127.0.0.1:0", "--id", &id];
            args.extend(SIM_ARGS);
            spawn("vllm-sim", &args)
        })
        .collect();
    let key_hash = hex::encode(Sha256::digest(KEY.as_bytes()));
    let backends: String = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "  - {{ id: pod{i}, url: \"{}\", sidecar: \"{}\" }}\n",
                p.url,
                sidecars[i % sidecars.len()].url
            )
        })
        .collect();
    let targets: String = (0..PODS)
        .map(|i| format!("{{ backend: pod{i}, upstreamModel: sim-model }},"))
        .collect();
    let yaml = format!(
        "keys: [{{ id: bench, sha256: \"{key_hash}\" }}]\nbackends:\n{backends}models:\n  - {{ name: m, {}, targets: [{targets}] }}\nlimits: {{ maxQueued: 4096, maxBodyBytes: 16777216 }}\n",
        strategy.yaml
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    put_config(&client, sidecars, &yaml).await;
    // Let every sidecar read its pod and its peers once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let urls: Arc<Vec<String>> = Arc::new(sidecars.iter().map(|s| s.url.clone()).collect());
    let spills_before = spills(&client, sidecars).await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..sessions.len())
        .map(|i| {
            let (sessions, urls, client) = (sessions.clone(), urls.clone(), client.clone());
            let single = strategy.single;
            tokio::spawn(async move {
                let s = &sessions[i];
                tokio::time::sleep(Duration::from_millis(s.start_ms)).await;
                let mut out = Vec::new();
                for (t, (body, think)) in s.turns.iter().enumerate() {
                    tokio::time::sleep(Duration::from_millis(*think)).await;
                    let entry = if single { 0 } else { s.entry[t] };
                    let at = start.elapsed();
                    let warm = at >= Duration::from_millis(WARM_MS);
                    let r = send(&client, &urls[entry], body).await;
                    if std::env::var_os("ROUTING_TRACE").is_some() {
                        eprintln!(
                            "TRACE {} {} {} {:?}",
                            at.as_millis(),
                            body["user"].as_str().unwrap_or(""),
                            entry,
                            r
                        );
                    }
                    out.push((warm, r));
                }
                out
            })
        })
        .collect();
    let mut o = Outcome::default();
    for t in tasks {
        for (warm, r) in t.await.unwrap() {
            match r {
                Ok((ttft, pod)) => {
                    o.ttft_ms.push(ttft);
                    if warm {
                        o.warm_ms.push(ttft);
                    }
                    if let Some(p) = pod.filter(|p: &usize| *p < PODS) {
                        o.per_pod[p] += 1;
                    }
                }
                Err(()) => o.errors += 1,
            }
        }
    }
    o.secs = start.elapsed().as_secs_f64();
    o.spills = spills(&client, sidecars).await - spills_before;
    for p in &pods {
        let text = metrics(&client, &p.url, None).await;
        let m = infergate_sidecar::load::parse_vllm(&text).unwrap();
        o.hits += m.prefix_hits;
        o.queries += m.prefix_queries;
    }
    o.ttft_ms.sort_by(f64::total_cmp);
    o.warm_ms.sort_by(f64::total_cmp);
    o
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let out_dir =
        std::path::PathBuf::from(std::env::var("ROUTING_OUT").unwrap_or("benches/results".into()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let dir = std::env::temp_dir().join(format!("infergate-routing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin"), ADMIN).unwrap();
    std::fs::write(dir.join("peer"), "routing-benchmark-peer-secret").unwrap();
    let (admin_file, peer_file) = (dir.join("admin"), dir.join("peer"));
    // 2 to 4 sidecars (`ROUTING_SIDECARS`); pod i sits behind sidecar i mod n.
    let n_sidecars = std::env::var("ROUTING_SIDECARS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PODS)
        .clamp(2, PODS);
    let sidecars: Vec<Proc> = (0..n_sidecars)
        .map(|_| {
            spawn(
                "infergate-sidecar",
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--admin-token-file",
                    admin_file.to_str().unwrap(),
                    "--peer-secret-file",
                    peer_file.to_str().unwrap(),
                ],
            )
        })
        .collect();

    let mut rng = Rng::new(SEED);
    let system = rng.words(2_000);
    let workloads: Vec<(&'static str, Vec<Session>)> = vec![
        ("multi-turn", multi_turn(&mut rng, &system)),
        ("documents", documents(&mut rng)),
        ("skewed", skewed(&mut rng, &system)),
    ];
    let only = std::env::var("ROUTING_WORKLOADS").ok();
    let mut rows = Vec::new();
    for (name, mut sessions) in workloads {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|w| w == name))
        {
            continue;
        }
        for (i, s) in sessions.iter_mut().enumerate() {
            let mut r = Rng::new(SEED.wrapping_add(1_000 + i as u64));
            s.entry = (0..s.turns.len())
                .map(|_| r.below(sidecars.len() as u64) as usize)
                .collect();
        }
        let sessions = Arc::new(sessions);
        let n: usize = sessions.iter().map(|s| s.turns.len()).sum();
        let pick = std::env::var("ROUTING_STRATEGIES").ok();
        for strategy in &STRATEGIES {
            if pick
                .as_deref()
                .is_some_and(|p| !p.split(';').any(|s| s == strategy.name))
            {
                continue;
            }
            let o = run(&sessions, &sidecars, strategy).await;
            let served: usize = o.per_pod.iter().sum();
            let row = Row {
                workload: name,
                strategy: strategy.name,
                hit: o.hits / o.queries.max(1.0),
                p50: pct(&o.ttft_ms, 0.5),
                p99: pct(&o.ttft_ms, 0.99),
                warm_p99: pct(&o.warm_ms, 0.99),
                rps: o.ttft_ms.len() as f64 / o.secs,
                busiest: *o.per_pod.iter().max().unwrap() as f64 / served.max(1) as f64,
                errors: o.errors,
                turned_away: o.spills,
            };
            eprintln!(
                "{name:<11} {:<17} n={n} hit {:>5.1}%  ttft p50 {:>7.1} ms p99 {:>7.1} ms (warm {:>7.1})  {:>5.1} req/s  busiest {:>4.1}%  errors {}  spills {}  pods {:?}",
                row.strategy,
                row.hit * 100.0,
                row.p50,
                row.p99,
                row.warm_p99,
                row.rps,
                row.busiest * 100.0,
                row.errors,
                o.spills,
                o.per_pod
            );
            rows.push(row);
        }
    }
    let md = markdown(&rows);
    std::fs::write(out_dir.join("routing.md"), &md).unwrap();
    let names: Vec<&str> = STRATEGIES.iter().map(|s| s.name).collect();
    std::fs::write(out_dir.join("routing.svg"), svg(&rows, &names)).unwrap();
    println!("{md}");
    let _ = std::fs::remove_dir_all(&dir);
}
