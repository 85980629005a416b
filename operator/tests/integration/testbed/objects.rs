//! Creating and reading the objects the tests use.

use infergate_crds::ModelRoute;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use super::{eventually, sidecar_config, Sidecar};

pub async fn create<K>(client: &Client, ns: &str, obj: Value) -> K
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

pub fn slice(ready: &[(&str, bool)]) -> Value {
    json!({
        "metadata": {"name": "vllm-1", "labels": {"kubernetes.io/service-name": "vllm"}},
        "addressType": "IPv4",
        "endpoints": ready.iter().map(|(ip, r)| json!({
            "addresses": [ip], "conditions": {"ready": r}
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
    })
}

pub async fn config_map(client: &Client, ns: &str) -> Option<Value> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("infergate-config")
        .await
        .ok()??;
    serde_json::from_str(cm.data?.get("config.json")?).ok()
}

/// The events in `ns`, or `None` while the API does not answer.
pub async fn events(client: &Client, ns: &str) -> Option<Vec<Event>> {
    let list = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .ok()?;
    Some(list.items)
}

pub fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

pub async fn route_status(client: &Client, ns: &str, name: &str) -> Option<(Value, i64, String)> {
    let r = Api::<ModelRoute>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    let status = serde_json::to_value(r.status?).ok()?;
    Some((status, r.metadata.generation?, r.metadata.resource_version?))
}

/// The public model names in a config, sorted (the config orders them by
/// route, not by name).
pub fn model_names(config: &Value) -> Vec<String> {
    let mut names: Vec<String> = config["models"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Both sidecars run exactly the ConfigMap's version, which `check` accepts.
pub async fn sidecars_run(
    client: &Client,
    ns: &str,
    sidecars: &[&Sidecar],
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, || async {
        let stored = config_map(client, ns).await?;
        if !check(&stored) {
            return None;
        }
        for s in sidecars {
            let running = sidecar_config(s.admin_port).await?;
            if running["version"] != stored["version"] {
                return None;
            }
        }
        Some(stored)
    })
    .await
}
