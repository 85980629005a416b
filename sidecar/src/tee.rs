//! Where TEE quotes and GPU evidence come from, and what keeps the report
//! from being a denial-of-service lever: a cache (a quote for the same
//! report data, or GPU evidence for the same nonce, is made once) and the
//! rate limit for callers without an API key.
//!
//! Quote sources: Linux configfs-tsm (TDX and SEV-SNP guests on current
//! kernels: make an entry directory, write the 64 bytes of report data to
//! `inblob`, read the quote from `outblob`), a command hook, or a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::OnceCell;

use crate::error::ApiError;
use crate::quota::{Exceeded, Gcra};
use crate::report::{self, GpuEvidence, TeeEvidence};

/// A TEE quote for `/v1/attestation/report`.
#[derive(Debug, Clone)]
pub enum TeeSource {
    /// A file's contents (a fixed quote: not bound to any nonce).
    File(PathBuf),
    /// A shell command's output; it gets `INFERGATE_REPORT_DATA` (128 hex
    /// characters), `INFERGATE_NONCE` (as the caller sent it) and
    /// `INFERGATE_NONCE_HEX` (the 32 nonce bytes in the report data).
    Command(String),
    /// The root of configfs-tsm reports, normally
    /// `/sys/kernel/config/tsm/report`.
    ConfigfsTsm(PathBuf),
}

/// How long a quote or GPU evidence is kept, and how many.
const CACHE_TTL: Duration = Duration::from_secs(600);
const CACHE_ENTRIES: u64 = 4096;
/// Hooks that print more than this are broken, not attesting.
const MAX_OUTPUT: usize = 4 << 20;

type Cell<T> = Arc<OnceCell<Arc<T>>>;

fn cache<K, V>() -> moka::sync::Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(CACHE_ENTRIES)
        .time_to_live(CACHE_TTL)
        .build()
}

pub struct Attestor {
    source: Option<TeeSource>,
    gpu_command: Option<String>,
    quotes: moka::sync::Cache<[u8; 64], Cell<TeeEvidence>>,
    gpu: moka::sync::Cache<[u8; 32], Cell<GpuEvidence>>,
    /// Reports for callers without an API key: allowed at this rate, or
    /// not at all.
    public: Option<Gcra>,
}

impl Attestor {
    pub fn new(
        source: Option<TeeSource>,
        gpu_command: Option<String>,
        public_per_minute: Option<u64>,
    ) -> Self {
        Attestor {
            source,
            gpu_command,
            quotes: cache(),
            gpu: cache(),
            public: public_per_minute.map(Gcra::per_minute),
        }
    }

    /// A caller without an API key: allowed when public reports are on and
    /// their shared budget has room.
    pub fn admit_public(&self, now_ns: u64) -> Result<(), ApiError> {
        let gcra = self.public.as_ref().ok_or(ApiError::MissingKey)?;
        gcra.take(now_ns, 1).map_err(|retry_after| {
            ApiError::RateLimited(Exceeded {
                what: "attestation reports without an API key",
                retry_after,
            })
        })
    }

    /// The quote for `report_data`, made at most once while cached
    /// (concurrent asks for the same data wait for the one being made).
    pub async fn tee(&self, report_data: &[u8; 64], nonce: &str) -> Arc<TeeEvidence> {
        let Some(source) = &self.source else {
            return Arc::new(TeeEvidence::Absent);
        };
        let cell = self.quotes.get_with(*report_data, Default::default);
        cell.get_or_init(|| async {
            Arc::new(match quote(source, report_data, nonce).await {
                Ok(evidence) => evidence,
                Err(message) => TeeEvidence::Failed(message),
            })
        })
        .await
        .clone()
    }

    /// GPU evidence for a nonce, made at most once while cached.
    pub async fn gpu(&self, nonce: &[u8; 32]) -> Arc<GpuEvidence> {
        let Some(cmd) = &self.gpu_command else {
            return Arc::new(GpuEvidence::Absent);
        };
        let cell = self.gpu.get_with(*nonce, Default::default);
        cell.get_or_init(|| async {
            let nonce_hex = hex::encode(nonce);
            let env = [("INFERGATE_NONCE_HEX", nonce_hex.as_str())];
            Arc::new(
                match run(cmd, &env, Duration::from_secs(60), "GPU evidence").await {
                    Ok(out) => match report::nvidia_payload(&out, &nonce_hex) {
                        Ok(p) => GpuEvidence::Payload(p),
                        Err(m) => GpuEvidence::Failed(m),
                    },
                    Err(m) => GpuEvidence::Failed(m),
                },
            )
        })
        .await
        .clone()
    }
}

async fn quote(
    source: &TeeSource,
    report_data: &[u8; 64],
    nonce: &str,
) -> Result<TeeEvidence, String> {
    let (source, quote, event_log, provider, info) = match source {
        TeeSource::File(path) => {
            let q = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("reading the quote file failed: {e}"))?;
            let (quote, event_log, info) = report::parse_quote_output(&q)?;
            ("file", quote, event_log, None, info)
        }
        TeeSource::Command(cmd) => {
            let rd = hex::encode(report_data);
            let nonce_hex = hex::encode(&report_data[32..]);
            let env = [
                ("INFERGATE_NONCE", nonce),
                ("INFERGATE_NONCE_HEX", nonce_hex.as_str()),
                ("INFERGATE_REPORT_DATA", rd.as_str()),
            ];
            let out = run(cmd, &env, Duration::from_secs(30), "quote").await?;
            let (quote, event_log, info) = report::parse_quote_output(&out)?;
            ("command", quote, event_log, None, info)
        }
        TeeSource::ConfigfsTsm(root) => {
            let (quote, provider) = configfs_tsm(root, report_data).await?;
            let info = serde_json::Map::new();
            let log = serde_json::Value::Null;
            ("configfs-tsm", hex::encode(quote), log, provider, info)
        }
    };
    Ok(TeeEvidence::Quote {
        source,
        quote,
        event_log,
        provider,
        info,
    })
}

/// One configfs-tsm report: a fresh entry (so no other writer shares it),
/// `inblob` written, `outblob` read, the entry removed.
async fn configfs_tsm(
    root: &Path,
    report_data: &[u8; 64],
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut name = [0u8; 8];
    getrandom::getrandom(&mut name).map_err(|_| "no randomness for a report name".to_owned())?;
    let dir = root.join(format!("infergate-{}", hex::encode(name)));
    tokio::fs::create_dir(&dir).await.map_err(|e| {
        format!(
            "configfs-tsm: creating a report under {} failed: {e}",
            root.display()
        )
    })?;
    let result = async {
        // No truncate: configfs attributes exist already; a plain
        // directory (the test fake) gets the file created.
        let mut inblob = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("inblob"))
            .await
            .map_err(|e| format!("configfs-tsm: opening inblob failed: {e}"))?;
        inblob
            .write_all(report_data)
            .await
            .map_err(|e| format!("configfs-tsm: writing inblob failed: {e}"))?;
        inblob
            .flush()
            .await
            .map_err(|e| format!("configfs-tsm: writing inblob failed: {e}"))?;
        drop(inblob);
        let quote = read_outblob(&dir.join("outblob")).await?;
        let provider = tokio::fs::read_to_string(dir.join("provider"))
            .await
            .ok()
            .map(|p| p.trim().to_owned());
        Ok((quote, provider))
    }
    .await;
    // configfs removes an entry with rmdir; a plain directory needs its
    // files removed first.
    if tokio::fs::remove_dir(&dir).await.is_err() {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    result
}

/// The kernel makes the quote when `outblob` is read. A provider that
/// makes it asynchronously (and the tests' fake tree) shows `outblob` only
/// once it is ready: wait for it, up to a bound.
async fn read_outblob(path: &Path) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::fs::read(path).await {
            Ok(q) if q.is_empty() => return Err("configfs-tsm: outblob is empty".into()),
            Ok(q) => return Ok(q),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if tokio::time::Instant::now() >= deadline {
                    return Err("configfs-tsm: no outblob appeared".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(format!("configfs-tsm: reading outblob failed: {e}")),
        }
    }
}

/// Run an operator's hook with `sh -c`; its trimmed stdout, or why not.
async fn run(
    cmd: &str,
    env: &[(&str, &str)],
    limit: Duration,
    what: &str,
) -> Result<String, String> {
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(cmd).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    match tokio::time::timeout(limit, command.output()).await {
        Ok(Ok(out)) if out.status.success() && out.stdout.len() <= MAX_OUTPUT => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Ok(Ok(out)) if out.status.success() => Err(format!("the {what} command printed too much")),
        Ok(Ok(out)) => Err(format!("the {what} command exited with {}", out.status)),
        Ok(Err(e)) => Err(format!("the {what} command could not run: {e}")),
        Err(_) => Err(format!("the {what} command timed out")),
    }
}
