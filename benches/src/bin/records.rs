//! Answer records: bytes per answered request at steady state (the store
//! full, old records being evicted), counted by the allocator and by RSS.
//!
//! Each variant runs in a fresh child process (so one variant's freed
//! memory does not flatter the next one's RSS): it fills a store of
//! `--capacity` records, then inserts another capacity's worth, and reports
//! live heap bytes and RSS growth per record, and the time per insert and
//! per look-up. Records are realistic: ids `chatcmpl-` + 32 hex, operator
//! style backend ids (`namespace/provider/pod-ip`) and key ids, two hashes.
//!
//! - `moka-before`: the record and cache as they were before issue 20 (a
//!   moka cache of `String` -> `Arc<Record>`, the hex text built at
//!   creation, `String` ids cloned per record, two empty `OnceLock`s).
//! - `moka-compact`: today's compact record in a moka cache (what moka
//!   itself costs per entry).
//! - `store`: today's `attest::Records` (the sidecar's own store).
//!
//! `benches/run-records` builds it in release mode and writes
//! `benches/results/records.md`.

use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cap::Cap;
use infergate_sidecar::attest::{Answer, Record, Records, Unsigned};
use infergate_sidecar::config::{BackendId, KeyId};
use infergate_sidecar::peers::Owner;

#[global_allocator]
static ALLOC: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

const VARIANTS: [&str; 3] = ["moka-before", "moka-compact", "store"];
const TTL: Duration = Duration::from_secs(3600);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let capacity: usize = arg("--capacity").map_or(100_000, |c| c.parse().expect("--capacity N"));
    if let Some(variant) = arg("--variant") {
        println!("{}", run(&variant, capacity));
        return;
    }
    let mut rows = Vec::new();
    for variant in VARIANTS {
        let out = Command::new(std::env::current_exe().expect("own path"))
            .args(["--variant", variant, "--capacity", &capacity.to_string()])
            .output()
            .expect("run a variant");
        assert!(out.status.success(), "{variant}: {out:?}");
        let line = String::from_utf8(out.stdout).expect("utf-8");
        let row: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON line");
        eprintln!("{row}");
        rows.push(row);
    }
    let table = markdown(capacity, &rows);
    print!("{table}");
    if let Some(path) = arg("--write") {
        std::fs::write(&path, table).expect("write the results");
        eprintln!("wrote {path}");
    }
}

/// Heap bytes live now, and resident memory (from /proc).
fn measure() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .unwrap_or(0);
    (ALLOC.allocated(), rss_kib * 1024)
}

/// A realistic answer id: `chatcmpl-` and 32 hex characters.
fn id(i: u64) -> String {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("chatcmpl-{:016x}{:016x}", z ^ (z >> 31), i)
}

/// The ids of a small fleet: 8 pods, 16 keys, as the operator names them.
fn fleet() -> (Vec<BackendId>, Vec<KeyId>) {
    let backends = (0..8)
        .map(|p| BackendId::new(format!("inference/llama-3-1-8b/10.42.{p}.17")))
        .collect();
    let keys = (0..16)
        .map(|k| KeyId::new(format!("team-search-prod-{k:02}")))
        .collect();
    (backends, keys)
}

fn hashes(i: u64) -> ([u8; 32], [u8; 32]) {
    let mut q = [0u8; 32];
    let mut r = [0u8; 32];
    q[..8].copy_from_slice(&i.to_le_bytes());
    r[..8].copy_from_slice(&(!i).to_le_bytes());
    (q, r)
}

/// The pre-issue-20 record, field for field.
#[allow(dead_code, reason = "held for its size, as the sidecar held it")]
mod before {
    use super::*;

    pub struct Owner {
        pub backend: String,
        pub via: Option<String>,
        pub key_id: String,
    }

    pub struct Record {
        pub owner: Owner,
        pub text: String,
        pub unsigned: Option<Unsigned>,
        pub ecdsa: OnceLock<String>,
        pub ed25519: OnceLock<String>,
    }

    impl Record {
        pub fn new(owner: Owner, request: &[u8; 32], response: &[u8; 32]) -> Self {
            let mut text = String::with_capacity(129);
            text.push_str(&hex::encode(request));
            text.push(':');
            text.push_str(&hex::encode(response));
            Record {
                owner,
                text,
                unsigned: None,
                ecdsa: OnceLock::new(),
                ed25519: OnceLock::new(),
            }
        }
    }
}

enum Store {
    Before(moka::sync::Cache<String, Arc<before::Record>>),
    MokaCompact(moka::sync::Cache<Box<str>, Record>),
    Records(Records),
}

impl Store {
    fn new(variant: &str, capacity: usize) -> Store {
        fn moka<K, V>(capacity: usize) -> moka::sync::Cache<K, V>
        where
            K: std::hash::Hash + Eq + Send + Sync + 'static,
            V: Clone + Send + Sync + 'static,
        {
            moka::sync::Cache::builder()
                .max_capacity(capacity as u64)
                .time_to_live(TTL)
                .build()
        }
        match variant {
            "moka-before" => Store::Before(moka(capacity)),
            "moka-compact" => Store::MokaCompact(moka(capacity)),
            "store" => Store::Records(Records::new(capacity as u64, TTL)),
            other => panic!("no variant {other}"),
        }
    }

    /// What `exchange::record_answer` does for a completed, attested answer.
    fn insert(&self, id: &str, backend: &BackendId, key: &KeyId, (q, r): ([u8; 32], [u8; 32])) {
        match self {
            Store::Before(c) => {
                // Then: ids were Strings, cloned per record.
                let owner = before::Owner {
                    backend: backend.as_str().to_owned(),
                    via: None,
                    key_id: key.as_str().to_owned(),
                };
                c.entry(id.to_owned())
                    .or_insert_with(|| Arc::new(before::Record::new(owner, &q, &r)));
            }
            Store::MokaCompact(c) => {
                c.entry(id.into())
                    .or_insert_with(|| record(backend, key, q, r));
            }
            Store::Records(s) => s.insert(id, record(backend, key, q, r)),
        }
    }

    fn owner_of(&self, id: &str) -> Option<String> {
        match self {
            Store::Before(c) => c.get(id).map(|r| r.owner.key_id.clone()),
            Store::MokaCompact(c) => c.get(id).map(|r| r.owner.key_id.to_string()),
            Store::Records(s) => s.get(id).map(|r| r.owner.key_id.to_string()),
        }
    }

    /// Evictions moka still owes (it settles them in batches).
    fn settle(&self) -> u64 {
        match self {
            Store::Before(c) => {
                c.run_pending_tasks();
                c.entry_count()
            }
            Store::MokaCompact(c) => {
                c.run_pending_tasks();
                c.entry_count()
            }
            Store::Records(s) => s.len() as u64,
        }
    }
}

fn record(backend: &BackendId, key: &KeyId, request: [u8; 32], response: [u8; 32]) -> Record {
    Record {
        owner: Owner {
            backend: backend.clone(),
            key_id: key.clone(),
        },
        answer: Answer::Hashed { request, response },
    }
}

fn run(variant: &str, capacity: usize) -> serde_json::Value {
    let (backends, keys) = fleet();
    let n = capacity as u64;
    let (live0, rss0) = measure();
    let store = Store::new(variant, capacity);
    let insert = |i: u64| {
        let b = &backends[(i % 8) as usize];
        let k = &keys[(i % 16) as usize];
        store.insert(&id(i), b, k, hashes(i));
    };
    for i in 0..n {
        insert(i);
    }
    let entries_full = store.settle();
    let (live1, rss1) = measure();
    // Steady state: every insert evicts the oldest record.
    let t = Instant::now();
    for i in n..2 * n {
        insert(i);
    }
    let entries = store.settle();
    let insert_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let (live2, rss2) = measure();
    let t = Instant::now();
    let mut found = 0u64;
    for i in n..2 * n {
        found += u64::from(store.owner_of(&id(i)).is_some());
    }
    let get_ns = t.elapsed().as_nanos() as f64 / n as f64;
    // The store holds the newest capacity's worth and nothing older (moka
    // admits by frequency, so its set may differ slightly).
    let oldest_gone = store.owner_of(&id(0)).is_none();
    let per = |a: usize, b: usize| (a.saturating_sub(b)) as f64 / capacity as f64;
    serde_json::json!({
        "variant": variant,
        "capacity": capacity,
        "record_size": std::mem::size_of::<Record>(),
        "entries_full": entries_full,
        "entries": entries,
        "found": found,
        "oldest_gone": oldest_gone,
        "heap_per_record_full": per(live1, live0),
        "heap_per_record": per(live2, live0),
        "rss_per_record_full": per(rss1, rss0),
        "rss_per_record": per(rss2, rss0),
        "insert_ns": insert_ns,
        "get_ns": get_ns,
    })
}

fn markdown(capacity: usize, rows: &[serde_json::Value]) -> String {
    let mut out = format!(
        "# Answer records: bytes per answered request\n\n\
         `benches/run-records` (release build), capacity {capacity}: fill the store, then \
         insert another {capacity} records (each evicting the oldest) and measure. Heap: \
         bytes the allocator holds (requested sizes, counted by a wrapping global \
         allocator); RSS: resident memory growth of a fresh process (glibc malloc), both \
         per record held. Insert and look-up times are single-threaded, ids formatted \
         in the loop included. Newest kept: of the last {capacity} answers, how many \
         still have a record at the end (a signature asked for right after an answer \
         needs its record to be there).\n\n\
         | store | heap B/record (full) | heap B/record (steady) | RSS B/record (full) | RSS B/record (steady) | insert ns | look-up ns | records held | newest kept |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.1}% |\n",
            r["variant"].as_str().unwrap_or("?"),
            f("heap_per_record_full"),
            f("heap_per_record"),
            f("rss_per_record_full"),
            f("rss_per_record"),
            f("insert_ns"),
            f("get_ns"),
            r["entries"],
            100.0 * f("found") / capacity as f64,
        ));
    }
    out
}
