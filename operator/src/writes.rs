//! What a pass writes to the API server: the ConfigMap and each object's
//! status by server-side apply (owning only the fields written here), and
//! events. A status the cache has not caught up with is not written twice.

use infergate_crds::ModelRoute;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource};
use serde::Serialize;

use crate::reconcile::{object_key, Context, Memory, CONFIG_KEY, FIELD_MANAGER};
use crate::render::Rendered;
use crate::Result;

/// The ConfigMap a restarted sidecar can boot from, by server-side apply of
/// only the fields the operator owns: its data entry and version annotation.
/// Helm owns the chart's labels; taking one (even the same value, with
/// force) would make the next `helm upgrade` fail on the conflict.
fn config_map_apply(name: &str, rendered: &Rendered) -> serde_json::Value {
    let json = serde_json::to_string_pretty(&rendered.config).expect("config serialises");
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "annotations": {"infergate.dev/config-version": rendered.version},
        },
        "data": {CONFIG_KEY: json},
    })
}

pub(crate) async fn store_config(ctx: &Context, rendered: &Rendered) -> Result<()> {
    let cm = config_map_apply(&ctx.config_map, rendered);
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    api.patch(
        &ctx.config_map,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await?;
    Ok(())
}

/// Server-side apply of `status`; `Ok(false)` when skipped because we wrote
/// exactly this already and the cache has not caught up, or the object is
/// gone.
pub(crate) async fn write_status<K>(
    ctx: &Context,
    memory: &mut Memory,
    obj: &K,
    status: &impl Serialize,
) -> Result<bool>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let (ns, name) = object_key(obj);
    let status = serde_json::to_value(status).expect("status serialises");
    let key = (K::kind(&()).into_owned(), ns.clone(), name.clone());
    let version = obj.meta().resource_version.clone();
    if let Some((seen, written)) = memory.statuses.get(&key) {
        if *seen == version && same_but_timestamps(written, &status) {
            return Ok(false);
        }
    }
    ctx.fenced()?;
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    tracing::debug!(kind = %K::kind(&()), namespace = %ns, name = %name, "status written");
    memory.statuses.insert(key, (version, status));
    Ok(true)
}

fn same_but_timestamps(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    fn strip(v: &serde_json::Value) -> serde_json::Value {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            for c in cs {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                }
            }
        }
        v
    }
    strip(a) == strip(b)
}

/// A Warning event when a route's `ResolvedRefs` or `Accepted` turns false
/// (or its reason changes), not on every pass.
pub(crate) async fn route_events(
    ctx: &Context,
    route: &ModelRoute,
    before: &[Condition],
    after: &[Condition],
) {
    for kind in ["Accepted", "ResolvedRefs"] {
        let Some(now) = after.iter().find(|c| c.type_ == kind) else {
            continue;
        };
        let was = before.iter().find(|c| c.type_ == kind);
        let news = was.is_none_or(|w| w.status != now.status || w.reason != now.reason);
        if now.status == "False" && news {
            let reference = route.object_ref(&());
            warn_event(ctx, &reference, &now.reason, now.message.clone()).await;
        }
    }
}

pub(crate) async fn warn_event(
    ctx: &Context,
    regarding: &ObjectReference,
    reason: &str,
    note: String,
) {
    if ctx.fenced().is_err() {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}
