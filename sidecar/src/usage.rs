//! Usage records: one JSON line per answered request (who, what, how much,
//! how it ended), written by a background task so the stream never waits on
//! a disk. When the sink falls behind, records are dropped and counted
//! rather than queued without bound.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{BackendId, KeyId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Never the prompt, the completion or the key: ids and numbers only.
#[derive(Debug, Serialize)]
pub struct UsageRecord {
    pub ts_ms: u64,
    pub request_id: String,
    pub response_id: Option<String>,
    pub key_id: KeyId,
    pub model: String,
    pub backend: BackendId,
    pub status: u16,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The upstream sent no usage (a stream cut short): the token counts
    /// are the gateway's estimate from what was sent.
    pub usage_estimated: bool,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub finish_reason: Option<String>,
    /// completed, client_disconnect, idle_timeout, upstream_error
    pub stop_cause: &'static str,
    /// Set when the request went through another sidecar.
    pub via: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "-" | "stdout" => Sink::Stdout,
            path => Sink::File(path.into()),
        })
    }
}

pub struct UsageLog {
    tx: mpsc::Sender<UsageRecord>,
}

pub const QUEUE: usize = 8192;

impl UsageLog {
    /// Starts the writer task on the current runtime.
    #[allow(
        clippy::expect_used,
        reason = "a record is strings and numbers: it always serialises"
    )]
    pub fn start(sink: Sink) -> std::io::Result<UsageLog> {
        let (tx, mut rx) = mpsc::channel::<UsageRecord>(QUEUE);
        let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &sink {
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Box::new(tokio::fs::File::from_std(file))
            }
        };
        tokio::spawn(async move {
            let mut line = Vec::with_capacity(512);
            while let Some(record) = rx.recv().await {
                line.clear();
                serde_json::to_writer(&mut line, &record).expect("record serialises");
                line.push(b'\n');
                if out.write_all(&line).await.is_err() {
                    tracing::error!("usage sink write failed; records are being lost");
                }
                if rx.is_empty() {
                    let _ = out.flush().await;
                }
            }
        });
        Ok(UsageLog { tx })
    }

    /// False when the queue is full (the record is dropped).
    pub fn submit(&self, record: UsageRecord) -> bool {
        self.tx.try_send(record).is_ok()
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
