//! The informer caches: one reflector per kind (and per watched namespace),
//! each poking a shared `Notify` on every change. Since every object feeds
//! the one rendered config, the reconciler does not care *what* changed,
//! only *that* something did.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures_util::StreamExt;
use infergate_crds::{InferenceProvider, ModelRoute, API_KEY_LABEL, SIDECAR_LABEL};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;

#[derive(Clone)]
pub struct Stores {
    pub providers: Vec<Store<InferenceProvider>>,
    pub routes: Vec<Store<ModelRoute>>,
    pub secrets: Vec<Store<Secret>>,
    pub slices: Vec<Store<EndpointSlice>>,
    pub pods: Vec<Store<Pod>>,
}

/// Every cached object of one kind, across the watched namespaces.
pub fn all<K>(stores: &[Store<K>]) -> Vec<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    stores.iter().flat_map(Store::state).collect()
}

impl Stores {
    /// Resolves once every watch has listed its objects at least once.
    pub async fn wait_ready(&self) {
        async fn each<K>(stores: &[Store<K>])
        where
            K: Resource + Clone + 'static,
            K::DynamicType: Eq + Hash + Clone,
        {
            for s in stores {
                // Only fails if the writer is gone, i.e. at shutdown.
                let _ = s.wait_until_ready().await;
            }
        }
        each(&self.providers).await;
        each(&self.routes).await;
        each(&self.secrets).await;
        each(&self.slices).await;
        each(&self.pods).await;
    }
}

/// Start the watches on `tasks`. An empty `namespaces` watches all of them.
pub fn start(
    client: &Client,
    namespaces: &[String],
    trigger: &Arc<Notify>,
    tasks: &mut JoinSet<()>,
) -> Stores {
    let plain = watcher::Config::default();
    Stores {
        providers: watch(apis(client, namespaces), plain.clone(), trigger, tasks),
        routes: watch(apis(client, namespaces), plain.clone(), trigger, tasks),
        secrets: watch(
            apis(client, namespaces),
            plain.clone().labels(API_KEY_LABEL),
            trigger,
            tasks,
        ),
        slices: watch(apis(client, namespaces), plain.clone(), trigger, tasks),
        pods: watch(
            apis(client, namespaces),
            plain.labels(&format!("{SIDECAR_LABEL}=true")),
            trigger,
            tasks,
        ),
    }
}

fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

fn watch<K>(
    apis: Vec<Api<K>>,
    config: watcher::Config,
    trigger: &Arc<Notify>,
    tasks: &mut JoinSet<()>,
) -> Vec<Store<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    apis.into_iter()
        .map(|api| {
            let (reader, writer) = reflector::store();
            let trigger = trigger.clone();
            let events = watcher(api, config.clone())
                .default_backoff()
                // managedFields are never read here; don't keep them in memory.
                .modify(|o: &mut K| o.meta_mut().managed_fields = None)
                .reflect(writer);
            tasks.spawn(events.for_each(move |event| {
                match event {
                    Ok(_) => trigger.notify_one(),
                    // The error names the request, never object contents, so
                    // Secret data cannot end up in the log.
                    Err(e) => tracing::warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying"),
                }
                std::future::ready(())
            }));
            reader
        })
        .collect()
}
