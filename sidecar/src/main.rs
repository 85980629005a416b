//! `infergate-sidecar`: serve the gateway from a YAML file (hot-reloaded) or
//! from configs pushed by the operator. (`infergate-demo` runs it with
//! simulators; this binary carries none.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use infergate_sidecar::attest::Signer;
use infergate_sidecar::reload::{self, FileConfig};
use infergate_sidecar::serve;
use infergate_sidecar::{logging, AppState, LogLevelSetter, Options, TeeSource};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(version, about = "infergate gateway sidecar")]
struct ServeArgs {
    /// YAML config file; re-read when it changes.
    #[arg(long, env = "INFERGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Public listener (OpenAI API).
    #[arg(long, env = "INFERGATE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Admin listener (config push, metrics, health); keep it off public networks.
    #[arg(long, env = "INFERGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// File holding the admin bearer token; without it config push is refused.
    #[arg(long, env = "INFERGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Signing key for ECDSA secp256k1 (64 hex chars); generated if absent.
    #[arg(long, env = "INFERGATE_ECDSA_KEY_FILE", requires = "ed25519_key_file")]
    ecdsa_key_file: Option<PathBuf>,
    /// Signing key (seed) for Ed25519 (64 hex chars); generated if absent.
    #[arg(long, env = "INFERGATE_ED25519_KEY_FILE", requires = "ecdsa_key_file")]
    ed25519_key_file: Option<PathBuf>,
    /// File holding this machine's TEE quote, for the attestation report.
    #[arg(
        long,
        env = "INFERGATE_TEE_QUOTE_FILE",
        conflicts_with = "tee_quote_command"
    )]
    tee_quote_file: Option<PathBuf>,
    /// Shell command printing a TEE quote (hex, or JSON with `quote` and
    /// `event_log`); it gets the 64 bytes of report data (signing address,
    /// then nonce) in INFERGATE_REPORT_DATA, and the nonce in
    /// INFERGATE_NONCE and INFERGATE_NONCE_HEX.
    #[arg(
        long,
        env = "INFERGATE_TEE_QUOTE_COMMAND",
        conflicts_with = "tee_configfs_tsm"
    )]
    tee_quote_command: Option<String>,
    /// Quotes from Linux configfs-tsm under this directory (TDX or SEV-SNP
    /// guests: normally /sys/kernel/config/tsm/report).
    #[arg(
        long,
        env = "INFERGATE_TEE_CONFIGFS_TSM",
        conflicts_with = "tee_quote_file"
    )]
    tee_configfs_tsm: Option<PathBuf>,
    /// Shell command printing NVIDIA GPU evidence for the nonce in
    /// INFERGATE_NONCE_HEX (the payload `{"nonce","evidence_list","arch"}`
    /// or just the evidence list); reported as `nvidia_payload`.
    #[arg(long, env = "INFERGATE_GPU_EVIDENCE_COMMAND")]
    gpu_evidence_command: Option<String>,
    /// Serve /v1/attestation/report to callers without an API key (it holds
    /// only public keys and quotes), at most --public-attestation-per-minute.
    #[arg(long, env = "INFERGATE_PUBLIC_ATTESTATION")]
    public_attestation: bool,
    /// The shared budget of reports for callers without a key.
    #[arg(
        long,
        env = "INFERGATE_PUBLIC_ATTESTATION_PER_MINUTE",
        default_value_t = 60
    )]
    public_attestation_per_minute: u64,
    /// This sidecar's public URL as peers reach it (e.g. http://$POD_IP:8080):
    /// backends whose `sidecar` is this URL are served here, others are
    /// forwarded to their own sidecar.
    #[arg(long, env = "INFERGATE_SELF_URL")]
    self_url: Option<String>,
    /// File holding the secret every sidecar of a deployment shares: it
    /// authenticates requests one sidecar forwards to another. Without it
    /// this sidecar neither forwards to peers nor accepts their requests.
    #[arg(long, env = "INFERGATE_PEER_SECRET_FILE")]
    peer_secret_file: Option<PathBuf>,
    /// Redis (`host:port` or `unix:/path`) shared by every sidecar: keys'
    /// request and token limits hold across replicas (each falls back to
    /// its share while the store does not answer).
    #[arg(long, env = "INFERGATE_QUOTA_REDIS")]
    quota_redis: Option<String>,
    /// How many answer records to keep (each ~200 bytes: the owner, for
    /// follow-ups and signature look-ups by the same key, and the hashes a
    /// signature is made from); the oldest makes room for the newest.
    #[arg(
        long,
        env = "INFERGATE_RECORDS_CAPACITY",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    records_capacity: u64,
    /// How long an answer's record is kept after the answer, in seconds:
    /// its signature can be fetched, and its conversation continued by id
    /// through this sidecar, for that long.
    #[arg(
        long,
        env = "INFERGATE_RECORDS_TTL_SECONDS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    records_ttl_seconds: u64,
    /// Usage records as JSON lines: `stdout` or a file path.
    #[arg(long, env = "INFERGATE_USAGE_LOG")]
    usage_log: Option<infergate_sidecar::usage::Sink>,
    /// Log as JSON lines.
    #[arg(long, env = "INFERGATE_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = ServeArgs::parse();
    let log_level = logging::init(args.log_json);
    // A panic is a bug: one log line saying where, never a backtrace (it
    // costs memory and may hold request data), whatever RUST_BACKTRACE says.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(location = %at, "internal error (panic); the request was dropped");
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(start(args, log_level))
}

async fn start(args: ServeArgs, log_level: LogLevelSetter) -> anyhow::Result<()> {
    // Taken before the first read, so an edit made while starting up is
    // seen by the watcher rather than missed.
    let seen = args.config.as_deref().and_then(digest);
    let config = match &args.config {
        // A ConfigMap volume marked optional has no file until the operator
        // writes it: start empty (not ready) and pick it up when it appears.
        Some(path) if !path.exists() => {
            tracing::warn!(path = %path.display(), "config file absent; waiting for it");
            None
        }
        Some(path) => match load(path)? {
            FileConfig::Config { config, .. } => Some(config),
            FileConfig::Empty => {
                tracing::warn!(path = %path.display(), "config file is empty; waiting for a config in it");
                None
            }
        },
        None => None,
    };
    let admin_token = match &args.admin_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading admin token file {}", path.display()))?,
        ),
        None => None,
    };
    let peer_secret = match &args.peer_secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading peer secret file {}", path.display()))?
                .trim()
                .as_bytes()
                .to_vec(),
        ),
        None => None,
    };
    let signer = match (&args.ecdsa_key_file, &args.ed25519_key_file) {
        (Some(e), Some(d)) => Some(Signer::from_files(e, d)?),
        _ => None,
    };
    let tee = match (
        args.tee_quote_file,
        args.tee_quote_command,
        args.tee_configfs_tsm,
    ) {
        (Some(f), _, _) => Some(TeeSource::File(f)),
        (None, Some(c), _) => Some(TeeSource::Command(c)),
        (None, None, Some(root)) => Some(TeeSource::ConfigfsTsm(root)),
        (None, None, None) => None,
    };
    let options = Options {
        admin_token,
        signer,
        tee,
        gpu_evidence_command: args.gpu_evidence_command,
        public_attestation_per_minute: args
            .public_attestation
            .then_some(args.public_attestation_per_minute),
        self_url: args.self_url,
        peer_secret,
        records_capacity: Some(args.records_capacity),
        records_ttl: Some(Duration::from_secs(args.records_ttl_seconds)),
        usage: args.usage_log,
        quota_redis: args.quota_redis,
        log_level: Some(log_level),
    };
    let state = AppState::new(config, options)?;
    if let Some(path) = args.config.clone() {
        tokio::spawn(watch(state.clone(), path, seen));
    }
    run(state, args.listen, args.admin_listen).await
}

fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    reload::parse_file(&text).with_context(|| format!("config {}", path.display()))
}

type FileDigest = sha2::digest::Output<Sha256>;

fn digest(path: &Path) -> Option<FileDigest> {
    std::fs::read(path).ok().map(Sha256::digest)
}

/// Poll rather than inotify: ConfigMap volumes swap a symlink, which
/// file-event watchers miss; one read a second costs nothing.
async fn watch(state: Arc<AppState>, path: PathBuf, mut last: Option<FileDigest>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = digest(&path);
        if now.is_none() || now == last {
            continue;
        }
        last = now;
        if let Err(e) = reload_file(&state, &path) {
            tracing::error!(error = %format!("{e:#}"), "config file rejected; keeping the old one");
        }
    }
}

/// One reload: refuse bad edits (empty file, every key or route gone without
/// `allowEmpty: true`), apply the rest and log what changed by id.
fn reload_file(state: &AppState, path: &Path) -> anyhow::Result<()> {
    let (config, allow_empty) = match load(path)? {
        FileConfig::Config {
            config,
            allow_empty,
        } => (config, allow_empty),
        FileConfig::Empty => anyhow::bail!(
            "config {} is empty or only comments (an edit in progress?)",
            path.display()
        ),
    };
    let old = state.table.load().config.clone();
    reload::check_reload(&old, &config, allow_empty).map_err(anyhow::Error::msg)?;
    let changes = reload::diff(&old, &config);
    let version = state.swap(config)?;
    tracing::info!(%version, %changes, "config file reloaded");
    Ok(())
}

async fn run(
    state: Arc<AppState>,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Result<()> {
    let public = serve::bind(listen, "--listen").await?;
    let admin = serve::bind(admin_listen, "--admin-listen").await?;
    Ok(serve::run(state, public, admin).await?)
}
