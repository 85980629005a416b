//! Per-request costs: auth, backend choice, validation, config swap/read,
//! and signing (each signature on a fresh record: a true cache miss).

use std::hint::black_box;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use infergate_sidecar::attest::{Algo, Answer, Record, Records, Signer};
use infergate_sidecar::balance::{pick, Prefix, Tried};
use infergate_sidecar::config::{hash_key, GatewayConfig};
use infergate_sidecar::peers::Owner;
use infergate_sidecar::table::Table;
use infergate_sidecar::validate::{validate, Endpoint};
use infergate_sidecar::{AppState, Options};

const KEY: &str = "ig-bench-key-0123456789";

fn config(backends: usize, keys: usize) -> GatewayConfig {
    let mut yaml = String::from("keys:\n");
    for i in 0..keys {
        let k = if i == 0 {
            KEY.to_owned()
        } else {
            format!("ig-other-key-{i:08}")
        };
        yaml += &format!("  - {{ id: k{i}, sha256: \"{}\" }}\n", hash_key(&k));
    }
    yaml += "backends:\n";
    for i in 0..backends {
        yaml += &format!("  - {{ id: b{i}, url: http://10.0.0.{i}:8000 }}\n");
    }
    for strategy in ["roundRobin", "leastInFlight", "prefixAffinity"] {
        yaml += if strategy == "roundRobin" {
            "models:\n"
        } else {
            ""
        };
        let targets: String = (0..backends)
            .map(|i| format!("{{ backend: b{i} }},"))
            .collect();
        yaml +=
            &format!("  - {{ name: {strategy}, strategy: {strategy}, targets: [{targets}] }}\n");
    }
    GatewayConfig::from_yaml(&yaml).unwrap()
}

fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    h
}

fn auth(c: &mut Criterion) {
    let table = Table::build(config(3, 1000), None).unwrap();
    let mut g = c.benchmark_group("auth");
    for (name, key) in [
        ("valid", KEY),
        ("unknown_well_formed", "ig-unknown-key-000000000"),
        ("malformed", "short"),
    ] {
        let h = headers(key);
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(infergate_sidecar::auth::authenticate(&table, black_box(&h)).is_ok())
            })
        });
    }
    g.finish();
}

fn balance(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for n in [3, 10, 100] {
        let table = Table::build(config(n, 1), None).unwrap();
        let rr = table.route("roundRobin").unwrap();
        let lif = table.route("leastInFlight").unwrap();
        g.bench_function(format!("round_robin/{n}"), |b| {
            b.iter(|| black_box(pick(rr, None, None, Tried::default(), 0)))
        });
        g.bench_function(format!("least_in_flight/{n}"), |b| {
            b.iter(|| black_box(pick(lif, None, None, Tried::default(), 0)))
        });
        let pa = table.route("prefixAffinity").unwrap();
        g.bench_function(format!("prefix_bounded/{n}"), |b| {
            let prefix = Prefix {
                key: 1234,
                bytes: 16_000,
            };
            b.iter(|| black_box(pick(pa, None, Some(black_box(prefix)), Tried::default(), 0)))
        });
        g.bench_function(format!("rendezvous/{n}"), |b| {
            b.iter(|| {
                black_box(pick(
                    rr,
                    Some(black_box("session-1234")),
                    None,
                    Tried::default(),
                    0,
                ))
            })
        });
    }
    g.finish();
}

fn chat_body(messages: usize, multimodal: bool) -> Vec<u8> {
    let msgs: Vec<serde_json::Value> = (0..messages)
        .map(|i| {
            if multimodal && i % 2 == 0 {
                serde_json::json!({"role": "user", "content": [
                    {"type": "text", "text": "what is in this picture, in some detail please"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"}}]})
            } else {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                serde_json::json!({"role": role, "content": "a message of ordinary length, the kind people send to a chat model every day"})
            }
        })
        .collect();
    serde_json::to_vec(
        &serde_json::json!({"model": "m", "stream": true, "messages": msgs, "temperature": 0.7}),
    )
    .unwrap()
}

fn validation(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    for (name, body) in [
        ("chat_10", chat_body(10, false)),
        ("chat_50", chat_body(50, false)),
        ("chat_10_multimodal", chat_body(10, true)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(validate(Endpoint::Chat, black_box(&body), 1024).unwrap()))
        });
    }
    g.finish();
}

fn config_swap(c: &mut Criterion) {
    let state = AppState::new(Some(config(10, 100)), Options::default()).unwrap();
    let configs = [config(10, 100), config(11, 100)];
    let mut g = c.benchmark_group("config");
    let mut i = 0;
    g.bench_function("swap_10_backends_100_keys", |b| {
        b.iter(|| {
            i += 1;
            black_box(state.swap(configs[i % 2].clone()).unwrap())
        })
    });
    g.bench_function("read", |b| {
        b.iter(|| black_box(state.table.load().version.len()))
    });
    g.finish();
}

fn signing(c: &mut Criterion) {
    let signer = Signer::generate();
    let record = Record {
        owner: Owner {
            backend: "b".into(),
            key_id: "k".into(),
        },
        answer: Answer::Hashed {
            request: [1; 32],
            response: [2; 32],
        },
    };
    let mut g = c.benchmark_group("sign_fresh_record");
    for algo in [Algo::Ecdsa, Algo::Ed25519] {
        g.bench_function(format!("{algo:?}").to_lowercase(), |b| {
            b.iter_batched(
                || {
                    let records = Records::new(1, Duration::from_secs(60));
                    records.insert("id", record.clone());
                    records
                },
                |r| black_box(r.sign("id", &[1; 32], &[2; 32], &signer, algo).made),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, auth, balance, validation, config_swap, signing);
criterion_main!(benches);
