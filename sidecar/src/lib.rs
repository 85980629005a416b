//! infergate sidecar: an OpenAI-compatible gateway that sits next to vLLM.
//!
//! `app(state)` is the public router and `admin_app(state)` the admin one;
//! both are plain axum routers so tests drive them with `oneshot` or serve
//! them on real sockets.

pub mod admin;
pub mod api;
pub mod auth;
pub mod balance;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod sim;
pub mod sse;
pub mod stream;
pub mod table;
pub mod validate;

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

pub use admin::admin_app;
pub use api::app;
use config::{ConfigError, GatewayConfig};
use metrics::{Metrics, ReasonLabels, VersionLabels};
use stream::End;
use table::{Backend, KeyEntry, Table};

pub struct AppState {
    /// Read with one atomic load per request; replaced whole on a swap.
    pub table: ArcSwap<Table>,
    pub metrics: Metrics,
    admin_token_sha256: Option<[u8; 32]>,
    /// Serialises swaps (never taken on the request path).
    swap_lock: Mutex<()>,
}

pub struct Options {
    /// Bearer token for the admin config endpoints; none disables them.
    pub admin_token: Option<String>,
}

impl AppState {
    pub fn new(config: Option<GatewayConfig>, options: Options) -> Result<Arc<Self>, ConfigError> {
        let table = match config {
            Some(c) => Table::build(c, None)?,
            None => Table::empty(),
        };
        let state = AppState {
            table: ArcSwap::from_pointee(Table::empty()),
            metrics: Metrics::default(),
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

    pub fn current_version(&self) -> String {
        self.table.load().version.clone()
    }

    /// Called once per answered request when its body ended.
    fn record_answer(
        &self,
        _key: &KeyEntry,
        _backend: &Backend,
        _status: StatusCode,
        _request_sha256: [u8; 32],
        _end: &End,
    ) {
    }
}
