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
pub mod responses;
pub mod serve;
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod sse;
pub mod stream;
pub mod table;
pub mod usage;
pub mod usage_chunk;
pub mod validate;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

pub use admin::admin_app;
pub use api::app;
use attest::{Record, Records, Signer, Unsigned};
use config::{ConfigError, GatewayConfig};
use metrics::{Metrics, ReasonLabels, VersionLabels};
use peers::{Owner, Owners};
use stream::{End, EndCause};
use table::{Backend, KeyEntry, Table};

pub struct AppState {
    /// Read with one atomic load per request; replaced whole on a swap.
    pub table: ArcSwap<Table>,
    pub metrics: Metrics,
    pub signer: Signer,
    pub records: Records,
    pub tee: Option<TeeSource>,
    /// Owners learnt from peers (answers seen here are in `records`).
    pub owners: Owners,
    /// This sidecar's public URL as other sidecars reach it; backends whose
    /// `sidecar` is this URL are local.
    pub self_url: Option<String>,
    /// Every URL that names this sidecar (`self_url` and its listener's):
    /// a backend behind one of them is served here, never forwarded.
    own_urls: ArcSwap<Vec<String>>,
    /// For talking to peer sidecars (signature and owner look-ups).
    pub peer_client: reqwest::Client,
    /// Signs the hops this sidecar makes, checks the ones it receives.
    pub hops: peers::HopAuth,
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
    /// How many answer records to keep, and for how long.
    pub records_capacity: Option<u64>,
    pub records_ttl: Option<Duration>,
    /// See `AppState::self_url`.
    pub self_url: Option<String>,
    /// Shared by every sidecar of a deployment; authenticates hops between
    /// them. Without it this sidecar neither makes nor accepts hops.
    pub peer_secret: Option<Vec<u8>>,
    /// Usage records (JSON lines); needs a running tokio runtime.
    pub usage: Option<usage::Sink>,
    /// Changes the log filter at run time (`PUT /admin/v1/log-level`).
    pub log_level: Option<LogLevelSetter>,
}

/// Applies a tracing filter directive such as `debug` or `infergate_sidecar=trace`.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A TEE quote for `/v1/attestation/report`: a file's contents, or the
/// output of a command that receives the nonce in `INFERGATE_NONCE`.
#[derive(Debug, Clone)]
pub enum TeeSource {
    File(std::path::PathBuf),
    Command(String),
}

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
        let state = AppState {
            table: ArcSwap::from_pointee(Table::empty()),
            metrics: Metrics::default(),
            signer,
            records: Records::new(
                options.records_capacity.unwrap_or(100_000),
                options.records_ttl.unwrap_or(Duration::from_secs(3600)),
            ),
            tee: options.tee,
            owners: Owners::new(
                options.records_capacity.unwrap_or(100_000),
                options.records_ttl.unwrap_or(Duration::from_secs(3600)),
            ),
            own_urls: ArcSwap::from_pointee(
                options
                    .self_url
                    .iter()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            self_url: options.self_url.map(|u| u.trim_end_matches('/').to_owned()),
            peer_client: table::upstream_client(2_000)
                .map_err(|e| ConfigError::Invalid(format!("HTTP client: {e}")))?,
            hops: peers::HopAuth::new(options.peer_secret),
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
        let _guard = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        match Table::build(config, Some(&current)) {
            Ok(table) => {
                let version = table.version.clone();
                self.warn_if_peers_without_secret(&table);
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

    /// The public listener is bound: the URLs that name it are this
    /// sidecar's own (so a config that names it is not forwarded to itself).
    pub fn listening_on(&self, addr: std::net::SocketAddr) {
        let mut own: Vec<String> = self.self_url.iter().cloned().collect();
        own.extend(peers::own_urls(addr));
        self.own_urls.store(Arc::new(own));
        self.warn_if_peers_without_secret(&self.table.load());
    }

    /// URLs naming this sidecar.
    pub fn own_urls(&self) -> arc_swap::Guard<Arc<Vec<String>>> {
        self.own_urls.load()
    }

    fn warn_if_peers_without_secret(&self, table: &Table) {
        if !self.hops.enabled() && !peers::peers(table, &self.own_urls.load()).is_empty() {
            tracing::warn!(
                "the config names other sidecars but no peer secret is set \
                 (--peer-secret-file): their backends are unavailable from here"
            );
        }
    }

    pub fn current_version(&self) -> String {
        self.table.load().version.clone()
    }

    /// Called once per answered request when its body ended, before the
    /// client sees the terminal event: keep what a signature needs.
    fn record_answer(
        &self,
        key: &KeyEntry,
        backend: &Backend,
        via: Option<&str>,
        status: StatusCode,
        request_sha256: [u8; 32],
        end: &End,
    ) {
        let Some(id) = &end.scan.id else { return };
        let owner = Owner {
            backend: backend.id.clone(),
            via: via.map(str::to_owned),
            key_id: key.id.clone(),
        };
        if via.is_some() {
            // The sidecar next to the model keeps the hashes and signs.
            self.records.insert(id.clone(), Record::forwarded(owner));
            return;
        }
        let unsigned = if !status.is_success() {
            Some(Unsigned::ErrorStatus)
        } else if end.cause != EndCause::Completed {
            Some(Unsigned::Incomplete)
        } else if !backend.attestation {
            Some(Unsigned::NotAttested)
        } else {
            None
        };
        self.records.insert(
            id.clone(),
            Record::new(owner, &request_sha256, &end.response_sha256, unsigned),
        );
    }
}

impl AppState {
    /// Who produced response `id`: remembered here, or learnt from a peer
    /// (never when this request is itself a hop, so look-ups do not bounce).
    pub async fn find_owner(
        &self,
        id: &str,
        headers: &axum::http::HeaderMap,
        hop: bool,
    ) -> Option<Owner> {
        if let Some(r) = self.records.get(id) {
            return Some(r.owner.clone());
        }
        if let Some(o) = self.owners.get(id) {
            return Some(o);
        }
        if hop || !self.hops.enabled() {
            return None;
        }
        let table = self.table.load_full();
        let own = self.own_urls();
        let peer_list = peers::peers(&table, &own);
        let path = format!("/v1/internal/owner/{id}");
        let empty: [u8; 32] = Sha256::digest(b"").into();
        let hdrs = self
            .hops
            .headers(headers, &axum::http::Method::GET, &path, &empty, None);
        let (_, _, body) = peers::ask(&self.peer_client, &peer_list, &path, &hdrs).await?;
        #[derive(serde::Deserialize)]
        struct Found {
            backend: String,
            key_id: String,
        }
        let found: Found = serde_json::from_slice(&body).ok()?;
        let owner = Owner {
            backend: found.backend,
            via: None,
            key_id: found.key_id,
        };
        self.owners.remember(id.to_owned(), owner.clone());
        Some(owner)
    }
}
