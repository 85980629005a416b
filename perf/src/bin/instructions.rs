//! Instructions per request, counted by callgrind: the sidecar and the
//! minimal passthrough each run under `valgrind --tool=callgrind` with one
//! tokio worker, in front of the same `vllm-sim`, and get the same requests.
//! Counters are zeroed after a warm-up and dumped after the measured
//! requests, so start-up and connection set-up are not counted.
//!
//! valgrind has no SHA extensions, so the sidecar's SHA-256 runs in software
//! there (several times its native cost); figures are given with it and
//! without it (the self cost of `sha2::` functions taken out).
//!
//! Modes:
//! - no flag: measure and print;
//! - `--write`: also store `benches/results/instructions.{json,md}`;
//! - `--keep`: leave the callgrind dumps (for `callgrind_annotate`);
//! - `--check`: fail if a ratio (without SHA) grew more than 5% over the
//!   stored one, so a change that makes the hot path heavier is seen the
//!   day it lands. Ratios against a passthrough built by the same compiler
//!   in the same run do not drift with the toolchain the way raw counts do.
//!
//! Binaries: `INFERGATE_SIDECAR_BIN`, `INFERGATE_PASSTHROUGH_BIN` and
//! `VLLM_SIM_BIN`, else siblings of this executable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use infergate_perf::{binary, sidecar_config, start, start_sim, Proc};
use serde_json::{json, Value};

const KEY: &str = "ig-instructions-benchmark-key";
/// A ratio may grow this much before `--check` fails.
const TOLERANCE: f64 = 1.05;
const RESULTS: &str = "benches/results";

fn under_callgrind(bin: &Path, args: &[&str], out: &Path) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--dump-line=no")
        .arg("--compress-strings=no")
        .arg(bin)
        .args(args)
        // One worker: the figures are per request, not per scheduling luck.
        .env("TOKIO_WORKER_THREADS", "1")
        .env_remove("RUST_LOG");
    cmd
}

fn callgrind_control(flag: &str, pid: u32) {
    let status = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("callgrind_control");
    assert!(status.success(), "callgrind_control {flag} {pid} failed");
}

/// Total and SHA-256 instructions of a callgrind dump.
fn read_dump(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).expect("dump");
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))
        .and_then(|v| v.trim().parse().ok())
        .expect("a summary line");
    // Self cost per function: cost lines under `fn=`, except the line
    // after `calls=` (that one is the callee's inclusive cost).
    let mut sha = 0u64;
    let mut in_sha = false;
    let mut skip_next = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("fn=") {
            in_sha = name.contains("sha2::");
        } else if line.starts_with("calls=") {
            skip_next = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-') {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            if in_sha {
                sha += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    (total, sha)
}

struct Target {
    name: &'static str,
    proc: Proc,
    out: PathBuf,
    dumps: usize,
}

impl Target {
    /// Instructions (total, SHA) for `n` requests after `warm` unmeasured ones.
    async fn count(
        &mut self,
        client: &reqwest::Client,
        req: &Request,
        warm: usize,
        n: usize,
    ) -> (u64, u64) {
        for _ in 0..warm {
            req.send(client, &self.proc.url).await;
        }
        let pid = self.proc.child.id();
        callgrind_control("-z", pid);
        for _ in 0..n {
            req.send(client, &self.proc.url).await;
        }
        callgrind_control("-d", pid);
        self.dumps += 1;
        let dump = PathBuf::from(format!("{}.{}", self.out.display(), self.dumps));
        read_dump(&dump)
    }
}

struct Request {
    body: String,
    stream: bool,
    tokens: usize,
}

impl Request {
    async fn send(&self, client: &reqwest::Client, url: &str) {
        let resp = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .header("x-sim-tokens", self.tokens.to_string())
            .body(self.body.clone())
            .send()
            .await
            .expect("request");
        assert!(resp.status().is_success(), "status {}", resp.status());
        let body = resp.bytes().await.expect("body");
        if self.stream {
            assert!(body.ends_with(b"data: [DONE]\n\n"), "stream cut short");
        }
    }
}

fn chat(prompt: &str, stream: bool, tokens: usize) -> Request {
    let body = json!({
        "model": "m",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly and cite sources."},
            {"role": "user", "content": prompt},
        ],
    });
    Request {
        body: body.to_string(),
        stream,
        tokens,
    }
}

/// A prompt of about `bytes` bytes of prose with some non-ASCII text, as a
/// pasted document would be.
fn document(bytes: usize) -> String {
    let para = "The quarterly report shows revenue grew 12% — driven by the Zürich office — while costs stayed flat. ";
    para.repeat(bytes / para.len() + 1)[..bytes].to_owned()
}

/// Per-request counts for one workload on one target.
#[derive(Clone, Copy, Default)]
struct Counts {
    total: f64,
    sha: f64,
}

async fn measure(targets: &mut [Target], quick: bool) -> BTreeMap<&'static str, [Counts; 2]> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let scale = if quick { 1 } else { 4 };
    let question = "What does the attached contract say about termination for convenience, and which notice period applies?";
    let workloads: Vec<(&'static str, Request, usize)> = vec![
        // ~1.1 KB answer (100 tokens of the simulator).
        ("chat", chat(question, false, 100), 25 * scale),
        ("stream-20", chat(question, true, 20), 10 * scale),
        ("stream-200", chat(question, true, 200), 10 * scale),
        (
            "prompt-150k",
            chat(&document(150 * 1024), false, 16),
            5 * scale,
        ),
    ];
    let mut out = BTreeMap::new();
    for (name, req, n) in &workloads {
        let mut row = [Counts::default(); 2];
        for (i, t) in targets.iter_mut().enumerate() {
            let (total, sha) = t.count(&client, req, 3, *n).await;
            row[i] = Counts {
                total: total as f64 / *n as f64,
                sha: sha as f64 / *n as f64,
            };
            eprintln!(
                "{:<12} {:<12} {:>10.0} instructions/request ({:.0} in SHA-256)",
                name, t.name, row[i].total, row[i].sha
            );
        }
        out.insert(*name, row);
    }
    out
}

/// The figures the gate compares: sidecar / passthrough, without SHA.
fn ratios(m: &BTreeMap<&'static str, [Counts; 2]>) -> Value {
    let row = |name: &str| m[name];
    let [sc, pt] = row("chat");
    let (s20, s200) = (row("stream-20"), row("stream-200"));
    // Per frame: the difference between a 200-token and a 20-token stream.
    let frame = |i: usize, sha: bool| {
        let cost = |c: Counts| c.total - if sha { 0.0 } else { c.sha };
        (cost(s200[i]) - cost(s20[i])) / 180.0
    };
    let [bc, bp] = row("prompt-150k");
    let per_req = |c: Counts| c.total - c.sha;
    json!({
        "chat": {
            "sidecar": per_req(sc).round(), "sidecar_sha": sc.sha.round(),
            "passthrough": pt.total.round(), "ratio": per_req(sc) / pt.total,
            "ratio_with_sha": sc.total / pt.total,
        },
        "stream_frame": {
            "sidecar": frame(0, false).round(), "sidecar_sha": (frame(0, true) - frame(0, false)).round(),
            "passthrough": frame(1, true).round(), "ratio": frame(0, false) / frame(1, true),
            "ratio_with_sha": frame(0, true) / frame(1, true),
        },
        "prompt_150k": {
            "sidecar": per_req(bc).round(), "sidecar_sha": bc.sha.round(),
            "passthrough": bp.total.round(), "ratio": per_req(bc) / bp.total,
            "ratio_with_sha": bc.total / bp.total,
        },
    })
}

fn markdown(r: &Value) -> String {
    let mut s = String::from(
        "Instructions per request under callgrind (one tokio worker, warm \
         connections, `RUST_LOG` unset), sidecar / minimal passthrough, same \
         requests in the same run. SHA-256 runs in software under valgrind, so \
         it is shown apart. Written by `perf/src/bin/instructions.rs --write`.\n\n\
         | workload | sidecar (without SHA) | SHA-256 | passthrough | ratio | ratio with SHA |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (name, what) in [
        ("chat", "non-streaming chat, 1.1 KB answer"),
        ("stream_frame", "stream, per frame (200 vs 20 tokens)"),
        ("prompt_150k", "150 KB prompt, non-streaming"),
    ] {
        let w = &r[name];
        let n = |k: &str| w[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {what} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x |",
            n("sidecar"),
            n("sidecar_sha"),
            n("passthrough"),
            n("ratio"),
            n("ratio_with_sha")
        );
    }
    s
}

/// Ratios that grew more than the tolerance over the stored ones.
fn regressions(stored: &Value, now: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["chat", "stream_frame", "prompt_150k"] {
        let (Some(was), Some(is)) = (stored[name]["ratio"].as_f64(), now[name]["ratio"].as_f64())
        else {
            out.push(format!("{name}: no stored ratio to compare with"));
            continue;
        };
        if is > was * TOLERANCE {
            out.push(format!(
                "{name}: ratio {is:.3} is {:.1}% over the stored {was:.3} (allowed {:.0}%)",
                (is / was - 1.0) * 100.0,
                (TOLERANCE - 1.0) * 100.0
            ));
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let write = args.iter().any(|a| a == "--write");
    let check = args.iter().any(|a| a == "--check");
    let quick = args.iter().any(|a| a == "--quick");
    let dir = std::env::temp_dir().join(format!("infergate-instructions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");

    let sim = start_sim();
    let config = dir.join("config.yaml");
    std::fs::write(&config, sidecar_config(KEY, &sim.url, "")).expect("config");
    let sidecar_out = dir.join("sidecar.out");
    let passthrough_out = dir.join("passthrough.out");
    let config = config.to_string_lossy().into_owned();
    let sidecar = start(
        under_callgrind(
            &binary("INFERGATE_SIDECAR_BIN", "infergate-sidecar"),
            &[
                "--config",
                &config,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &sidecar_out,
        ),
        "infergate-sidecar under callgrind",
    );
    let passthrough = start(
        under_callgrind(
            &binary("INFERGATE_PASSTHROUGH_BIN", "passthrough"),
            &["127.0.0.1:0", &sim.url],
            &passthrough_out,
        ),
        "passthrough under callgrind",
    );
    let mut targets = [
        Target {
            name: "sidecar",
            proc: sidecar,
            out: sidecar_out,
            dumps: 0,
        },
        Target {
            name: "passthrough",
            proc: passthrough,
            out: passthrough_out,
            dumps: 0,
        },
    ];
    let counts = measure(&mut targets, quick).await;
    drop(targets);
    drop(sim);
    if args.iter().any(|a| a == "--keep") {
        eprintln!("callgrind dumps kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }

    let now = ratios(&counts);
    let table = markdown(&now);
    println!("{table}");
    let stored_path = Path::new(RESULTS).join("instructions.json");
    if write {
        std::fs::create_dir_all(RESULTS).expect("results dir");
        let pretty = serde_json::to_string_pretty(&now).expect("json");
        std::fs::write(&stored_path, pretty + "\n").expect("write json");
        std::fs::write(Path::new(RESULTS).join("instructions.md"), &table).expect("write md");
        println!("stored in {RESULTS}/instructions.{{json,md}}");
    }
    if check {
        let stored: Value = std::fs::read_to_string(&stored_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_else(|| panic!("no stored ratios at {}", stored_path.display()));
        let worse = regressions(&stored, &now);
        if !worse.is_empty() {
            eprintln!("instruction-count gate FAILED:");
            for w in &worse {
                eprintln!("  {w}");
            }
            std::process::exit(1);
        }
        println!(
            "instruction-count gate passed (every ratio within {:.0}% of {})",
            (TOLERANCE - 1.0) * 100.0,
            stored_path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(chat: f64, frame: f64, prompt: f64) -> Value {
        json!({"chat": {"ratio": chat}, "stream_frame": {"ratio": frame}, "prompt_150k": {"ratio": prompt}})
    }

    #[test]
    fn the_gate_fails_a_ratio_more_than_five_percent_heavier() {
        let stored = figures(1.00, 1.20, 6.00);
        assert!(regressions(&stored, &figures(1.04, 1.20, 6.00)).is_empty());
        assert!(regressions(&stored, &figures(0.80, 1.10, 5.00)).is_empty());
        let worse = regressions(&stored, &figures(1.06, 1.20, 6.40));
        assert_eq!(worse.len(), 2, "{worse:?}");
        assert!(worse[0].starts_with("chat:") && worse[1].starts_with("prompt_150k:"));
    }

    #[test]
    fn the_gate_fails_when_nothing_is_stored_to_compare_with() {
        let worse = regressions(&json!({}), &figures(1.0, 1.0, 1.0));
        assert_eq!(worse.len(), 3);
    }

    #[test]
    fn sha_self_cost_is_read_from_a_dump_and_calls_are_not_counted_twice() {
        let dir = std::env::temp_dir().join(format!("ig-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("callgrind.out");
        std::fs::write(
            &path,
            "events: Ir\nfn=main\n0 100\ncfn=sha2::sha256::compress\ncalls=1 0\n0 50\n\
             fn=sha2::sha256::compress\n0 50\nfn=other\n0 7\nsummary: 157\n",
        )
        .unwrap();
        assert_eq!(read_dump(&path), (157, 50));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
