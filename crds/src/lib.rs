//! infergate's custom resources, group `infergate.dev`, version `v1alpha1`.
//!
//! The YAML in `crds/` and `charts/infergate/crds/` is generated from these
//! types by `cargo run -p infergate-crds --bin crdgen`; never edit it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "infergate.dev";
/// Label that marks a Secret as an API key (its `key` entry holds the key).
pub const API_KEY_LABEL: &str = "infergate.dev/api-key";
/// Secret annotation: the API key's id (default: the Secret's name). The id
/// is what routes list in `apiKeys` and what logs and metrics show.
pub const API_KEY_ID_ANNOTATION: &str = "infergate.dev/key-id";
/// API-key Secret annotations: the key's limits across all sidecars (each
/// sidecar enforces its share: the total divided by the number of running
/// sidecars, rounded up). Absent or 0 means no limit. A value that is not a
/// whole number leaves the key out of the config until it is fixed.
pub const REQUESTS_PER_MINUTE_ANNOTATION: &str = "infergate.dev/requests-per-minute";
pub const CONCURRENT_REQUESTS_ANNOTATION: &str = "infergate.dev/concurrent-requests";
pub const TOKENS_PER_MINUTE_ANNOTATION: &str = "infergate.dev/tokens-per-minute";
/// Label that marks a pod as running an infergate sidecar.
pub const SIDECAR_LABEL: &str = "infergate.dev/sidecar";
/// Pod annotation: the sidecar's admin port (default 9090).
pub const ADMIN_PORT_ANNOTATION: &str = "infergate.dev/admin-port";

/// An OpenAI-compatible backend: where it is and how to talk to it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "infergate.dev",
    version = "v1alpha1",
    kind = "InferenceProvider",
    namespaced,
    status = "InferenceProviderStatus",
    // Not `ip`: that is IPAddress (networking.k8s.io), built in. The
    // real-server tests check every short name against discovery.
    shortname = "iprov",
    category = "infergate",
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyBackends"}"#,
    printcolumn = r#"{"name":"Attested","type":"boolean","jsonPath":".spec.attestation"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("[has(self.url), has(self.service), has(self.endpoints)].filter(x, x).size() == 1").message("set exactly one of url, service, endpoints"))]
#[serde(rename_all = "camelCase")]
pub struct InferenceProviderSpec {
    /// A fixed base URL, e.g. `https://api.example.com` for an external provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Service in this namespace: one backend at `http://NAME.NS.svc:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceTarget>,
    /// One backend per ready endpoint of a Service (its EndpointSlices), each
    /// reached through the infergate sidecar on the same pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<EndpointsTarget>,
    /// Model names the upstream serves. When set, a ModelRoute backend that
    /// asks this provider for another model is not used, and the route's
    /// `ResolvedRefs` says `ModelNotServed`. Empty: not checked.
    #[serde(default)]
    pub models: Vec<String>,
    /// Secret holding the upstream's API key; mounted into the sidecars at
    /// `/var/run/infergate/upstream/<name>/<key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Sign answers from this provider (off for external providers).
    #[serde(default = "yes")]
    pub attestation: bool,
    /// Concurrent requests each sidecar sends to one backend (0 = unbounded).
    #[serde(default)]
    pub max_concurrent_requests: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<ProviderTimeouts>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTarget {
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsTarget {
    /// The Service whose EndpointSlices list the model pods.
    pub service: String,
    /// The model server's port on each pod.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The sidecar's public port on each pod.
    #[serde(default = "sidecar_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub sidecar_port: u16,
}

fn sidecar_port() -> u16 {
    8080
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceProviderStatus {
    #[serde(default)]
    pub ready_backends: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A public model name, its aliases, and where its requests go.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "infergate.dev",
    version = "v1alpha1",
    kind = "ModelRoute",
    namespaced,
    status = "ModelRouteStatus",
    shortname = "mr",
    category = "infergate",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Backends","type":"integer","jsonPath":".status.resolvedBackends"}"#,
    printcolumn = r#"{"name":"Refs","type":"string","jsonPath":".status.conditions[?(@.type==\"ResolvedRefs\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.aliases) || !(self.model in self.aliases)").message("an alias must differ from the model name"))]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteSpec {
    /// The public model name clients ask for.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[schemars(length(min = 1))]
    pub backends: Vec<RouteBackend>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Tuning of the `prefixAffinity` strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_affinity: Option<PrefixAffinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyKey>,
    /// Ids of the API keys (Secret names) that may use this model; empty
    /// means every key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteBackend {
    /// An InferenceProvider in this namespace.
    pub provider: String,
    /// Model name on the upstream; defaults to the route's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    #[default]
    RoundRobin,
    /// Fewest requests in flight, fleet-wide (pods' vLLM metrics, shared by
    /// the sidecars).
    LeastInFlight,
    /// Rendezvous hashing on the prompt's prefix with bounded load: the pod
    /// that holds a prefix in its KV cache gets it, from every sidecar.
    PrefixAffinity,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefixAffinity {
    /// Bytes of the prompt's head (system messages and first turn) hashed
    /// into the key; default 16384.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 1048576))]
    pub key_bytes: Option<u32>,
    /// A pod above this times the mean load is skipped; default 1.25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub load_factor: Option<f64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StickyKey {
    /// A request header carrying a session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The request's `user` field.
    #[serde(default)]
    pub user: bool,
    /// The Responses API's `previous_response_id` (on by default).
    #[serde(default = "yes")]
    pub previous_response_id: bool,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteStatus {
    #[serde(default)]
    pub resolved_backends: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The CRDs as the API server gets them: schemars' `format`s for unsigned
/// integers (`uint16`, `uint32`, `uint64`) are not OpenAPI formats the
/// server knows (it warns on every apply), so they become the signed ones
/// that hold their range; `minimum`/`maximum` keep the bounds.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    [InferenceProvider::crd(), ModelRoute::crd()]
        .into_iter()
        .map(|crd| {
            let mut value = serde_json::to_value(crd).expect("CRD serialises");
            known_formats(&mut value);
            serde_json::from_value(value).expect("CRD round-trips")
        })
        .collect()
}

fn known_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(format)) = map.get_mut("format") {
                match format.as_str() {
                    "uint8" | "uint16" | "int8" | "int16" => *format = "int32".into(),
                    "uint32" | "uint64" | "uint" => *format = "int64".into(),
                    _ => {}
                }
            }
            map.values_mut().for_each(known_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(known_formats),
        _ => {}
    }
}

/// The generated CRD YAML documents, in a stable order.
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    let mut crds = crds().into_iter();
    let mut next =
        || serde_yaml::to_string(&crds.next().expect("two CRDs")).expect("CRD serialises");
    vec![
        ("infergate.dev_inferenceproviders.yaml", next()),
        ("infergate.dev_modelroutes.yaml", next()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_carry_names_columns_and_cel_rules() {
        let ip = serde_json::to_string(&InferenceProvider::crd()).unwrap();
        assert!(ip.contains("\"inferenceproviders.infergate.dev\""));
        assert!(ip.contains("\"shortNames\":[\"iprov\"]"));
        assert!(ip.contains("x-kubernetes-validations"));
        assert!(ip.contains("exactly one of url, service, endpoints"));
        let mr = serde_json::to_string(&ModelRoute::crd()).unwrap();
        assert!(mr.contains("\"Programmed\""));
        assert!(mr.contains("an alias must differ"));
    }

    #[test]
    fn schemas_use_only_formats_the_api_server_knows() {
        let text = serde_json::to_string(&crds()).unwrap();
        for format in ["uint8", "uint16", "uint32", "uint64"] {
            assert!(
                !text.contains(&format!("\"{format}\"")),
                "{format} left in a schema"
            );
        }
        assert!(text.contains("\"maximum\":65535.0"), "port bounds kept");
    }

    #[test]
    fn defaults_apply_when_fields_are_absent() {
        let spec: InferenceProviderSpec = serde_json::from_str(r#"{"url":"http://x"}"#).unwrap();
        assert!(spec.attestation);
        let route: ModelRouteSpec =
            serde_json::from_str(r#"{"model":"m","backends":[{"provider":"p"}]}"#).unwrap();
        assert_eq!(route.backends[0].weight, 1);
        assert_eq!(route.strategy, Strategy::RoundRobin);
    }
}
