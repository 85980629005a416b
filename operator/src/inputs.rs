//! Cluster objects -> what `render` and `push` consume. Pure functions over
//! the cached objects, so the rules (which endpoint is ready, which key id a
//! Secret gets, which sidecar is pushed to) are unit-tested without a cluster.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};

use infergate_config::KeyLimits;
use infergate_crds::{
    InferenceProvider, ModelRoute, ADMIN_PORT_ANNOTATION, API_KEY_ID_ANNOTATION,
    CONCURRENT_REQUESTS_ANNOTATION, REQUESTS_PER_MINUTE_ANNOTATION, TOKENS_PER_MINUTE_ANNOTATION,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::push::{PodRef, Sidecar};
use crate::render::{Inputs, ObjectKey};

/// Admin port of a sidecar pod without the annotation.
pub const DEFAULT_ADMIN_PORT: u16 = 9090;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn key_of(meta: &impl ResourceExt) -> ObjectKey {
    (meta.namespace().unwrap_or_default(), meta.name_any())
}

pub fn gather(
    providers: &[impl Borrow<InferenceProvider>],
    routes: &[impl Borrow<ModelRoute>],
    secrets: &[impl Borrow<Secret>],
    slices: &[impl Borrow<EndpointSlice>],
    sidecars: usize,
) -> Inputs {
    let (keys, limits) = api_keys(secrets);
    Inputs {
        providers: providers
            .iter()
            .map(|p| (key_of(p.borrow()), p.borrow().spec.clone()))
            .collect(),
        routes: routes
            .iter()
            .map(|r| (key_of(r.borrow()), r.borrow().spec.clone()))
            .collect(),
        keys,
        limits,
        sidecars: sidecars as u32,
        endpoints: ready_endpoints(slices),
    }
}

/// Key id -> key, and key id -> limits. When two Secrets claim one id, the
/// first by (namespace, name) wins, so the outcome never depends on watch
/// order. A key whose limit annotation does not parse is left out (fails
/// closed: a typo must not make a limited key unlimited).
pub fn api_keys(
    secrets: &[impl Borrow<Secret>],
) -> (BTreeMap<String, String>, BTreeMap<String, KeyLimits>) {
    let mut sorted: Vec<&Secret> = secrets.iter().map(Borrow::borrow).collect();
    sorted.sort_by_key(|s| key_of(*s));
    let mut keys = BTreeMap::new();
    let mut all_limits = BTreeMap::new();
    for secret in sorted {
        let Some(key) = secret_key(secret) else {
            continue;
        };
        let id = secret
            .annotations()
            .get(API_KEY_ID_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| secret.name_any());
        if keys.contains_key(&id) {
            continue;
        }
        match limits(secret) {
            Ok(Some(l)) => {
                all_limits.insert(id.clone(), l);
            }
            Ok(None) => {}
            Err(annotation) => {
                tracing::warn!(key_id = %id, annotation, "API key left out: its limit is not a number");
                continue;
            }
        }
        keys.insert(id, key);
    }
    (keys, all_limits)
}

/// The key's total limits from its Secret's annotations (see
/// `infergate_crds::REQUESTS_PER_MINUTE_ANNOTATION`); `Err` names the one
/// that does not parse.
fn limits(secret: &Secret) -> Result<Option<KeyLimits>, &'static str> {
    let annotations = secret.annotations();
    let read = |name: &'static str| -> Result<u64, &'static str> {
        annotations
            .get(name)
            .map_or(Ok(0), |v| v.trim().parse::<u64>().map_err(|_| name))
    };
    let rpm = read(REQUESTS_PER_MINUTE_ANNOTATION)?;
    let concurrent = read(CONCURRENT_REQUESTS_ANNOTATION)?;
    let tpm = read(TOKENS_PER_MINUTE_ANNOTATION)?;
    if rpm == 0 && concurrent == 0 && tpm == 0 {
        return Ok(None);
    }
    Ok(Some(KeyLimits {
        requests_per_minute: u32::try_from(rpm).map_err(|_| REQUESTS_PER_MINUTE_ANNOTATION)?,
        concurrent_requests: u32::try_from(concurrent)
            .map_err(|_| CONCURRENT_REQUESTS_ANNOTATION)?,
        tokens_per_minute: tpm,
    }))
}

/// The `key` entry, trimmed: `kubectl create secret --from-file` keeps the
/// file's trailing newline, which no client sends.
fn secret_key(secret: &Secret) -> Option<String> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get("key"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok());
    let from_string = || secret.string_data.as_ref()?.get("key").cloned();
    let key = from_data.or_else(from_string)?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

/// (namespace, service) -> addresses of ready endpoints. An endpoint whose
/// `ready` condition is absent counts as ready (the API's own rule).
pub fn ready_endpoints(
    slices: &[impl Borrow<EndpointSlice>],
) -> BTreeMap<ObjectKey, BTreeSet<String>> {
    let mut out: BTreeMap<ObjectKey, BTreeSet<String>> = BTreeMap::new();
    for slice in slices.iter().map(Borrow::borrow) {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) else {
            continue;
        };
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
        // Addresses of one endpoint are fungible: the first one stands for it.
        let addresses = ready.filter_map(|e| e.addresses.first().cloned());
        out.entry((slice.namespace().unwrap_or_default(), service.clone()))
            .or_default()
            .extend(addresses);
    }
    out
}

/// Running sidecar pods with an IP, sorted by (namespace, name).
///
/// Running, not Ready: a pod is Ready only when every container is, and the
/// sidecar's own readiness waits for a config, while vLLM's waits for the
/// model to load. Requiring Ready would hold back the very push that makes
/// the pod ready. A sidecar not listening yet fails its push, which retries.
pub fn sidecars(pods: &[impl Borrow<Pod>]) -> Vec<Sidecar> {
    let mut out: Vec<Sidecar> = pods
        .iter()
        .map(Borrow::borrow)
        .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_running(p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_ref()?;
            let port = p
                .annotations()
                .get(ADMIN_PORT_ANNOTATION)
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(DEFAULT_ADMIN_PORT);
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            let (namespace, name) = key_of(p);
            Some(Sidecar {
                pod: PodRef { namespace, name },
                admin_url: format!("http://{host}:{port}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

fn pod_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Running")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn secret(ns: &str, name: &str, key: &str, id: Option<&str>) -> Secret {
        let mut m = meta(ns, name);
        if let Some(id) = id {
            m.annotations = Some([(API_KEY_ID_ANNOTATION.to_string(), id.to_string())].into());
        }
        Secret {
            metadata: m,
            data: Some([("key".to_string(), ByteString(key.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn key_ids_come_from_the_annotation_or_the_name_and_the_first_claim_wins() {
        let secrets = vec![
            secret("b", "team", "ig-second-claim-00000", None),
            secret("a", "team", "ig-first-claim-000000\n", None),
            secret("a", "other", "ig-other-0000000000", Some("renamed")),
            secret("a", "empty", "  \n", None),
        ];
        let (keys, limits) = api_keys(&secrets);
        assert_eq!(keys.len(), 2);
        assert!(limits.is_empty());
        assert_eq!(keys["team"], "ig-first-claim-000000");
        assert_eq!(keys["renamed"], "ig-other-0000000000");
    }

    #[test]
    fn limits_come_from_the_secrets_annotations_and_a_bad_one_leaves_the_key_out() {
        let mut limited = secret("a", "limited", "ig-limited-00000000000", None);
        let mut bad = secret("a", "typo", "ig-typo-0000000000000", None);
        limited.metadata.annotations = Some(
            [
                (
                    REQUESTS_PER_MINUTE_ANNOTATION.to_string(),
                    "600".to_string(),
                ),
                (
                    TOKENS_PER_MINUTE_ANNOTATION.to_string(),
                    " 200000 ".to_string(),
                ),
            ]
            .into(),
        );
        bad.metadata.annotations = Some(
            [(
                CONCURRENT_REQUESTS_ANNOTATION.to_string(),
                "16x".to_string(),
            )]
            .into(),
        );
        let (keys, limits) = api_keys(&[limited, bad]);
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["limited"]);
        assert_eq!(
            limits["limited"],
            KeyLimits {
                requests_per_minute: 600,
                concurrent_requests: 0,
                tokens_per_minute: 200_000
            }
        );
    }

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_group_by_service_and_skip_unready_ones() {
        let mut m = meta("ai", "vllm-abc");
        m.labels = Some([(SERVICE_NAME_LABEL.to_string(), "vllm".to_string())].into());
        let mut second = m.clone();
        second.name = Some("vllm-def".into());
        let slices = vec![
            EndpointSlice {
                metadata: m,
                address_type: "IPv4".into(),
                endpoints: vec![
                    endpoint("10.0.0.1", Some(true)),
                    endpoint("10.0.0.2", Some(false)),
                ],
                ports: None,
            },
            EndpointSlice {
                metadata: second,
                address_type: "IPv4".into(),
                endpoints: vec![endpoint("10.0.0.3", None)],
                ports: None,
            },
            EndpointSlice {
                metadata: meta("ai", "unlabelled"),
                address_type: "IPv4".into(),
                endpoints: vec![endpoint("10.0.0.9", Some(true))],
                ports: None,
            },
        ];
        let eps = ready_endpoints(&slices);
        assert_eq!(eps.len(), 1);
        let ips: Vec<&String> = eps[&("ai".into(), "vllm".into())].iter().collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.3"]);
    }

    fn pod(name: &str, ip: &str, phase: &str, port: Option<&str>) -> Pod {
        let mut m = meta("ai", name);
        m.annotations = port.map(|p| [(ADMIN_PORT_ANNOTATION.to_string(), p.to_string())].into());
        Pod {
            metadata: m,
            spec: None,
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                phase: Some(phase.into()),
                // Not ready (vLLM still loading): still a push target.
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "False".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn running_pods_are_sidecars_and_the_annotation_sets_the_admin_port() {
        let mut gone = pod("e", "10.0.0.5", "Running", None);
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let pods = vec![
            pod("b", "127.0.0.1", "Running", Some("19091")),
            pod("a", "10.0.0.1", "Running", None),
            pod("c", "10.0.0.3", "Pending", None),
            pod("d", "fd00::1", "Running", Some("not-a-port")),
            gone,
        ];
        let s = sidecars(&pods);
        let urls: Vec<&str> = s.iter().map(|s| s.admin_url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://10.0.0.1:9090",
                "http://127.0.0.1:19091",
                "http://[fd00::1]:9090"
            ]
        );
        assert_eq!(s[0].pod.to_string(), "ai/a");
    }
}
