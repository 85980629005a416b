//! infergate sidecar: an OpenAI-compatible gateway that sits next to vLLM.
//!
//! `app(state)` is the public router and `admin_app(state)` the admin one;
//! both are plain axum routers so tests drive them with `oneshot` or serve
//! them on real sockets.
//!
//! Nothing here may panic on a request: no `unwrap`, `expect` or `panic!`
//! outside tests (enforced below).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod api;
pub mod attest;
pub mod auth;
pub mod backlog;
pub mod balance;
pub use infergate_config as config;
pub mod error;
pub mod exchange;
pub mod load;
pub mod load_peer;
pub mod logging;
pub mod metrics;
pub mod peers;
pub mod prefix;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod report;
mod respond;
pub mod responses;
pub mod serve;
pub mod spill;
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod sse;
pub mod store;
pub mod stream;
pub mod table;
pub mod tee;
mod upstream;
pub mod usage;
pub mod usage_chunk;
pub mod validate;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

pub use admin::admin_app;
pub use api::app;
use attest::{Records, Signer};
use config::{ConfigError, GatewayConfig};
use metrics::{Metrics, ReasonLabels, VersionLabels};
use peers::{Owners, Peers};
use table::Table;
pub use tee::TeeSource;

pub struct AppState {
    /// Read with one atomic load per request; replaced whole on a swap.
    pub table: ArcSwap<Table>,
    pub metrics: Metrics,
    pub signer: Signer,
    pub records: Records,
    /// TEE quotes and GPU evidence for the attestation report.
    pub attestor: tee::Attestor,
    /// The other sidecars: forwarding to them, asking them.
    pub peers: Peers,
    /// The quota store sidecars share, when keys' limits are cluster-wide.
    pub cluster: Option<Arc<quota::Cluster>>,
    /// Where usage records go, if anywhere.
    pub usage: Option<usage::UsageLog>,
    /// Signalled when a backend slot frees up, for requests queued on a
    /// route whose backends are all at capacity.
    pub slot_freed: Arc<tokio::sync::Notify>,
    /// Requests waiting for a backend slot right now.
    pub queued: std::sync::atomic::AtomicUsize,
    log_level: Option<LogLevelSetter>,
    admin_token_sha256: Option<[u8; 32]>,
    /// Serialises swaps (never taken on the request path).
    swap_lock: Mutex<()>,
}

#[derive(Default)]
pub struct Options {
    /// Bearer token for the admin config endpoints; none disables them.
    pub admin_token: Option<String>,
    /// Signing keys; generated at start when none are given.
    pub signer: Option<Signer>,
    /// Where a TEE quote comes from, if this machine has one.
    pub tee: Option<TeeSource>,
    /// A command printing GPU evidence for `INFERGATE_NONCE_HEX`.
    pub gpu_evidence_command: Option<String>,
    /// Serve `/v1/attestation/report` without an API key, at most this
    /// many a minute (shared by all such callers); None: a key is needed.
    pub public_attestation_per_minute: Option<u64>,
    /// How many answer records to keep, and for how long after the answer
    /// (default 100 000 for an hour). Learnt owners get the same bounds.
    pub records_capacity: Option<u64>,
    pub records_ttl: Option<Duration>,
    /// This sidecar's public URL as other sidecars reach it; backends whose
    /// `sidecar` is this URL are local.
    pub self_url: Option<String>,
    /// Shared by every sidecar of a deployment; authenticates hops between
    /// them. Without it this sidecar neither makes nor accepts hops.
    pub peer_secret: Option<Vec<u8>>,
    /// A Redis (`host:port` or `unix:/path`) that holds keys' limits for
    /// every sidecar (`ApiKey::cluster_limits`).
    pub quota_redis: Option<String>,
    /// Usage records (JSON lines); needs a running tokio runtime.
    pub usage: Option<usage::Sink>,
    /// Changes the log filter at run time (`PUT /admin/v1/log-level`).
    pub log_level: Option<LogLevelSetter>,
}

/// Applies a tracing filter directive such as `debug` or `infergate_sidecar=trace`.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

impl AppState {
    pub fn new(config: Option<GatewayConfig>, options: Options) -> Result<Arc<Self>, ConfigError> {
        let table = match config {
            Some(c) => Table::build(c, None)?,
            None => Table::empty(),
        };
        let signer = options.signer.unwrap_or_else(|| {
            let s = Signer::generate();
            tracing::warn!(
                signing_address = %s.address,
                ed25519_public_key = %s.ed25519_public,
                "no signing keys configured: generated fresh ones for this process"
            );
            s
        });
        let capacity = options.records_capacity.unwrap_or(100_000);
        let ttl = options.records_ttl.unwrap_or(Duration::from_secs(3600));
        let peers = Peers::new(
            options.self_url,
            options.peer_secret,
            Owners::new(capacity, ttl),
        )
        .map_err(|e| ConfigError::Invalid(format!("HTTP client: {e}")))?;
        let metrics = Metrics::default();
        let cluster = options
            .quota_redis
            .as_deref()
            .map(|addr| Arc::new(quota::Cluster::new(addr, metrics.quota_fallbacks.clone())));
        let state = AppState {
            table: ArcSwap::from_pointee(Table::empty()),
            metrics,
            cluster,
            signer,
            records: Records::new(capacity, ttl),
            attestor: tee::Attestor::new(
                options.tee,
                options.gpu_evidence_command,
                options.public_attestation_per_minute,
            ),
            peers,
            log_level: options.log_level,
            slot_freed: Arc::new(tokio::sync::Notify::new()),
            queued: std::sync::atomic::AtomicUsize::new(0),
            usage: match options.usage {
                Some(sink) => Some(usage::UsageLog::start(sink).map_err(|e| {
                    ConfigError::Invalid(format!("usage sink cannot be opened: {e}"))
                })?),
                None => None,
            },
            admin_token_sha256: options
                .admin_token
                .map(|t| Sha256::digest(t.trim().as_bytes()).into()),
            swap_lock: Mutex::new(()),
        };
        state.install(table);
        Ok(Arc::new(state))
    }

    /// Validate, compile and atomically install a config. On error the old
    /// table stays in place untouched. Returns the new version.
    pub fn swap(&self, config: GatewayConfig) -> Result<String, ConfigError> {
        self.swap_with(|current| Table::build(config, Some(current)))
    }

    /// Like `swap`, with the next table made from the running one, under
    /// the swap lock (a delta applies to exactly the table it was made for,
    /// whatever else is being pushed at the same time).
    pub fn swap_with<E>(&self, next: impl FnOnce(&Table) -> Result<Table, E>) -> Result<String, E> {
        let _guard = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        match next(&current) {
            Ok(table) => {
                let version = table.version.clone();
                self.peers.warn_if_unreachable(&table);
                self.install(table);
                self.count_swap("applied");
                tracing::info!(%version, "config installed");
                Ok(version)
            }
            Err(e) => {
                self.count_swap("rejected");
                Err(e)
            }
        }
    }

    fn install(&self, table: Table) {
        let old = self.table.swap(Arc::new(table));
        self.metrics
            .config_version
            .get_or_create(&VersionLabels {
                version: old.version.clone(),
            })
            .set(0);
        self.metrics
            .config_version
            .get_or_create(&VersionLabels {
                version: self.table.load().version.clone(),
            })
            .set(1);
    }

    fn count_swap(&self, result: &'static str) {
        self.metrics
            .config_swaps
            .get_or_create(&ReasonLabels { reason: result })
            .inc();
    }

    /// The public listener is bound (see `Peers::listening_on`).
    pub fn listening_on(&self, addr: std::net::SocketAddr) {
        self.peers.listening_on(addr);
        self.peers.warn_if_unreachable(&self.table.load());
    }

    pub fn current_version(&self) -> String {
        self.table.load().version.clone()
    }
}
