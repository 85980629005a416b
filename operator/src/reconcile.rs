//! One reconcile pass, top to bottom: read the caches, render, store the
//! config in its ConfigMap, push it to every ready sidecar, write status.
//! Every object feeds the one config, so there is one pass for everything,
//! run by `run` on any change (debounced), on a resync timer (which is how a
//! sidecar that restarted without its pod changing gets the config back) and
//! on a back-off after a failure. Only the leader runs passes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use infergate_crds::{InferenceProvider, InferenceProviderStatus, ModelRoute, ModelRouteStatus};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::cache::{all, Stores};
use crate::conditions;
use crate::leader::Fence;
use crate::metrics::{Metrics, PushLabels};
use crate::push::{push_all, Payload, Pushed, Sidecar};
use crate::render::{render, ObjectKey, Rendered};
use crate::writes::{route_events, store_config, warn_event, write_status};
use crate::{inputs, Error, Result};

pub const FIELD_MANAGER: &str = "infergate-operator";
/// The ConfigMap entry holding the rendered `GatewayConfig` as JSON.
pub const CONFIG_KEY: &str = "config.json";

/// Everything a pass needs; no logic of its own.
pub struct Context {
    pub client: Client,
    pub http: reqwest::Client,
    /// The operator's namespace: where its ConfigMap lives.
    pub namespace: String,
    pub config_map: String,
    /// Re-read every pass, so a rotated Secret is picked up.
    pub admin_token_file: PathBuf,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    /// Checked before every write: only a current leader writes.
    pub fence: Fence,
}

impl Context {
    /// `Err(NotLeader)` once this replica's term has run out.
    pub(crate) fn fenced(&self) -> Result<()> {
        if self.fence.leads() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }
}

/// What this leader wrote, so a pass whose cache has not yet seen its own
/// last write does not write the same thing again.
#[derive(Default)]
pub struct Memory {
    stored_version: Option<String>,
    /// The config pushed last and its version: deltas are made against it.
    pushed: Option<(infergate_config::GatewayConfig, String)>,
    /// object -> (resourceVersion it had when we wrote, status we wrote)
    pub(crate) statuses: HashMap<(String, String, String), (Option<String>, serde_json::Value)>,
}

/// One pass: render what the caches hold, store it, push it, report.
pub async fn pass(ctx: &Context, memory: &mut Memory) -> Result<()> {
    let objects = Objects::read(&ctx.stores);
    let sidecars = inputs::sidecars(&objects.pods);
    let rendered = render(&inputs::gather(
        &objects.providers,
        &objects.routes,
        &objects.secrets,
        &objects.slices,
        sidecars.len(),
    ))?;
    store_if_changed(ctx, memory, &rendered).await?;
    let results = push(ctx, memory, &sidecars, &rendered).await?;
    let pushes = report_pushes(ctx, &sidecars, &results, &rendered).await;
    provider_statuses(ctx, memory, &objects, &rendered, &pushes).await?;
    route_statuses(ctx, memory, &objects, &rendered, &pushes).await?;
    if pushes.failed > 0 {
        return Err(Error::Push {
            failed: pushes.failed,
            total: sidecars.len(),
        });
    }
    Ok(())
}

/// This pass's snapshot of the caches.
struct Objects {
    providers: Vec<Arc<InferenceProvider>>,
    routes: Vec<Arc<ModelRoute>>,
    secrets: Vec<Arc<Secret>>,
    slices: Vec<Arc<EndpointSlice>>,
    pods: Vec<Arc<Pod>>,
}

impl Objects {
    fn read(stores: &Stores) -> Self {
        Objects {
            providers: all(&stores.providers),
            routes: all(&stores.routes),
            secrets: all(&stores.secrets),
            slices: all(&stores.slices),
            pods: all(&stores.pods),
        }
    }
}

/// What the sidecars made of the push.
struct Pushes {
    total: usize,
    failed: usize,
    /// How many run the rendered version.
    programmed: usize,
    /// Provider -> (backend id, how many sidecars left it out of routing).
    unavailable: BTreeMap<ObjectKey, Vec<(String, usize)>>,
}

async fn store_if_changed(ctx: &Context, memory: &mut Memory, rendered: &Rendered) -> Result<()> {
    if memory.stored_version.as_deref() == Some(rendered.version.as_str()) {
        return Ok(());
    }
    ctx.fenced()?;
    store_config(ctx, rendered).await?;
    tracing::info!(version = %rendered.version, "stored config");
    memory.stored_version = Some(rendered.version.clone());
    Ok(())
}

/// The config to every sidecar: a delta to those on the version pushed
/// last, the whole config to the others.
async fn push(
    ctx: &Context,
    memory: &mut Memory,
    sidecars: &[Sidecar],
    rendered: &Rendered,
) -> Result<Vec<Pushed>> {
    let token = std::fs::read_to_string(&ctx.admin_token_file).map_err(Error::Token)?;
    let previous = memory.pushed.as_ref().map(|(c, v)| (c, v.as_str()));
    let payload = Payload::new(&rendered.config, &rendered.version, previous);
    ctx.fenced()?;
    let results = push_all(&ctx.http, sidecars, &payload, token.trim()).await;
    if memory.pushed.as_ref().map(|(_, v)| v) != Some(&rendered.version) {
        memory.pushed = Some((rendered.config.clone(), rendered.version.clone()));
    }
    Ok(results)
}

/// Count, log and (for failures) raise an event on the sidecar's pod.
async fn report_pushes(
    ctx: &Context,
    sidecars: &[Sidecar],
    results: &[Pushed],
    rendered: &Rendered,
) -> Pushes {
    let mut failed = 0;
    for (sidecar, result) in sidecars.iter().zip(results) {
        ctx.metrics
            .pushes
            .get_or_create(&PushLabels {
                result: result.metric_label(),
            })
            .inc();
        match result {
            Pushed::Applied(_) => {
                tracing::info!(sidecar = %sidecar.pod, version = %rendered.version, "pushed config")
            }
            Pushed::Patched(_) => {
                tracing::info!(sidecar = %sidecar.pod, version = %rendered.version, "pushed config change")
            }
            Pushed::Current(_) => {}
            Pushed::Failed(why) => {
                failed += 1;
                tracing::warn!(sidecar = %sidecar.pod, reason = %why, "config push failed");
                let pod = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(sidecar.pod.namespace.clone()),
                    name: Some(sidecar.pod.name.clone()),
                    ..Default::default()
                };
                warn_event(ctx, &pod, "ConfigPushFailed", why.clone()).await;
            }
        }
    }
    let programmed = results.iter().filter(|r| r.runs_version()).count();
    ctx.metrics.sidecars_programmed.set(programmed as i64);
    let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for id in results.iter().flat_map(Pushed::unavailable) {
        *by_backend.entry(id.as_str()).or_default() += 1;
    }
    let mut unavailable: BTreeMap<ObjectKey, Vec<(String, usize)>> = BTreeMap::new();
    for (id, n) in by_backend {
        if let Some(provider) = rendered.backend_providers.get(id) {
            unavailable
                .entry(provider.clone())
                .or_default()
                .push((id.to_owned(), n));
        }
    }
    Pushes {
        total: sidecars.len(),
        failed,
        programmed,
        unavailable,
    }
}

async fn provider_statuses(
    ctx: &Context,
    memory: &mut Memory,
    objects: &Objects,
    rendered: &Rendered,
    pushes: &Pushes,
) -> Result<()> {
    let now = Time(Timestamp::now());
    for p in &objects.providers {
        let key = object_key(&**p);
        let Some(outcome) = rendered.providers.get(&key) else {
            continue;
        };
        let current = p.status.clone().unwrap_or_default();
        let unusable: Vec<(&str, usize)> = pushes
            .unavailable
            .get(&key)
            .into_iter()
            .flatten()
            .map(|(id, n)| (id.as_str(), *n))
            .collect();
        let desired = conditions::for_provider(outcome, &unusable, pushes.total);
        let (conditions, changed) =
            conditions::merge(&current.conditions, &desired, p.metadata.generation, &now);
        let status = InferenceProviderStatus {
            ready_backends: outcome.ready_backends,
            observed_generation: p.metadata.generation,
            conditions,
        };
        if changed || status.ready_backends != current.ready_backends {
            write_status(ctx, memory, &**p, &status).await?;
        }
    }
    Ok(())
}

async fn route_statuses(
    ctx: &Context,
    memory: &mut Memory,
    objects: &Objects,
    rendered: &Rendered,
    pushes: &Pushes,
) -> Result<()> {
    let now = Time(Timestamp::now());
    for r in &objects.routes {
        let Some(outcome) = rendered.routes.get(&object_key(&**r)) else {
            continue;
        };
        let current = r.status.clone().unwrap_or_default();
        let desired = conditions::for_route(outcome, pushes.programmed, pushes.total);
        let (conditions, changed) =
            conditions::merge(&current.conditions, &desired, r.metadata.generation, &now);
        let status = ModelRouteStatus {
            resolved_backends: outcome.resolved_backends,
            observed_generation: r.metadata.generation,
            conditions,
        };
        let differs = changed || status.resolved_backends != current.resolved_backends;
        if differs && write_status(ctx, memory, &**r, &status).await? {
            route_events(ctx, r, &current.conditions, &status.conditions).await;
        }
    }
    Ok(())
}

pub(crate) fn object_key(obj: &impl ResourceExt) -> ObjectKey {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Wait this long after a change before a pass, so a burst of changes
    /// (an `kubectl apply -f dir/`) becomes one config.
    pub debounce: Duration,
    /// A pass at least this often, even with no change.
    pub resync: Duration,
    /// Back-off after a failed pass: doubles from `retry_min` up to `resync`.
    pub retry_min: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(30),
            retry_min: Duration::from_millis(500),
        }
    }
}

/// Run passes while leading, until `shutdown` flips. A pass still running
/// when the term runs out is cancelled where it stands (every write it had
/// not yet sent is dropped), and the next term starts from the cluster.
pub async fn run(
    ctx: Context,
    trigger: Arc<Notify>,
    timing: Timing,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut memory = Memory::default();
    let mut wait = timing.resync;
    let mut retry = timing.retry_min;
    let mut fence = ctx.fence.clone();
    let mut leading = false;
    loop {
        tokio::select! {
            _ = trigger.notified() => {}
            _ = fence.changed_from(leading) => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tokio::time::sleep(timing.debounce).await;
        leading = ctx.fence.leads();
        ctx.metrics.leader.set(leading as i64);
        if !leading {
            // A later term starts from what the cluster says, not from us.
            memory = Memory::default();
            wait = timing.resync;
            continue;
        }
        if !ctx
            .metrics
            .synced
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            continue;
        }
        let started = Instant::now();
        let result = tokio::select! {
            result = pass(&ctx, &mut memory) => result,
            _ = ctx.fence.lost() => Err(Error::NotLeader),
        };
        ctx.metrics.observe_pass(
            started.elapsed(),
            result.as_ref().err().map(Error::metric_label),
        );
        wait = match result {
            Ok(()) => {
                retry = timing.retry_min;
                timing.resync
            }
            Err(Error::NotLeader) => {
                tracing::warn!("leadership lost during a pass; it was cancelled");
                memory = Memory::default();
                leading = false;
                ctx.metrics.leader.set(0);
                timing.resync
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "reconcile failed");
                let now = retry;
                retry = (retry * 2).min(timing.resync);
                now
            }
        };
    }
}
