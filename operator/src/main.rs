//! `infergate-operator`: watch InferenceProviders, ModelRoutes, API-key
//! Secrets, EndpointSlices and sidecar pods; while leading, render the
//! gateway config, store it in a ConfigMap, push it to the sidecars and
//! write status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use infergate_operator::cache;
use infergate_operator::leader::{self, Fence, LeaseLock};
use infergate_operator::metrics::{self, Metrics};
use infergate_operator::reconcile::{self, Context, Timing, FIELD_MANAGER};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(version, about = "infergate operator")]
struct Cli {
    /// The operator's own namespace: its ConfigMap and Lease live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Namespaces to watch (comma-separated); empty watches all.
    #[arg(long, env = "INFERGATE_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// ConfigMap that receives the rendered config (key `config.json`).
    #[arg(long, env = "INFERGATE_CONFIG_MAP", default_value = "infergate-config")]
    config_map: String,
    /// File holding the sidecars' admin bearer token.
    #[arg(long, env = "INFERGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: PathBuf,
    /// coordination.k8s.io/v1 Lease used for leader election.
    #[arg(
        long,
        env = "INFERGATE_LEASE_NAME",
        default_value = "infergate-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease holder may go without renewing before a standby takes over.
    #[arg(long, env = "INFERGATE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds between passes when nothing changes (re-pushes to restarted sidecars).
    #[arg(long, env = "INFERGATE_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(
        long,
        env = "INFERGATE_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "INFERGATE_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colour only on a terminal: log files and pipes get plain text.
        use std::io::IsTerminal as _;
        tracing_subscriber::fmt()
            .with_ansi(std::io::stdout().is_terminal())
            .with_env_filter(filter)
            .init();
    }
    let identity = cli
        .identity
        .clone()
        .unwrap_or_else(|| format!("infergate-operator-{}", std::process::id()));
    if cli.lease_seconds < 3 {
        anyhow::bail!("--lease-seconds must be at least 3");
    }
    // Fail at start, not at the first push, when the token is missing.
    std::fs::metadata(&cli.admin_token_file)
        .with_context(|| format!("admin token file {}", cli.admin_token_file.display()))?;

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let trigger = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    let stores = cache::start(&client, &cli.watch_namespaces, &trigger, &mut tasks);

    let (term, fence) = Fence::new();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let lock = LeaseLock::new(
        Api::namespaced(client.clone(), &cli.namespace),
        &cli.lease_name,
        &identity,
        Duration::from_secs(cli.lease_seconds),
    );
    let leader_task = tokio::spawn(leader::run(lock, term, shutdown_rx.clone()));

    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Context {
        client,
        http,
        namespace: cli.namespace.clone(),
        config_map: cli.config_map.clone(),
        admin_token_file: cli.admin_token_file.clone(),
        recorder,
        metrics: metrics.clone(),
        stores,
        fence,
    };
    {
        // Readiness and the first pass wait for every cache to list once.
        let (metrics, trigger) = (metrics.clone(), trigger.clone());
        let stores = ctx.stores.clone();
        tasks.spawn(async move {
            stores.wait_ready().await;
            metrics.synced.store(true, Ordering::Relaxed);
            trigger.notify_one();
        });
    }
    let timing = Timing {
        resync: Duration::from_secs(cli.resync_seconds.max(1)),
        ..Timing::default()
    };
    let reconciler = tokio::spawn(reconcile::run(ctx, trigger, timing, shutdown_rx.clone()));

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listen on {}", cli.listen))?;
    tracing::info!(addr = %listener.local_addr()?, %identity, "operator started");
    let mut server_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(metrics::serve(listener, metrics, async move {
        let _ = server_shutdown.wait_for(|stop| *stop).await;
    }));

    shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown_tx.send_replace(true);
    // Releasing the Lease lets the standby take over now rather than after
    // a lease duration.
    let _ = tokio::time::timeout(Duration::from_secs(5), leader_task).await;
    let _ = reconciler.await;
    let _ = server.await;
    tasks.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
