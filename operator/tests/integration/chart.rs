//! The Helm chart as `helm template` renders it: every manifest is a valid
//! Kubernetes object (each field known to the API types), RBAC grants
//! exactly what the operator uses, pods run locked down, the admin port
//! stays off the public Service, and every flag the chart passes exists in
//! the binaries. Needs helm: `INFERGATE_HELM` names it (scripts/test sets it
//! after `scripts/k8s-testbed install`); without it the test says it was
//! skipped.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde_json::Value;

/// What the operator calls, by (API group, resource, verb), from its code:
/// watchers list+watch; status and the ConfigMap by server-side apply;
/// the Lease by get/create/update; events by create/patch.
const CLUSTER_WIDE: &[(&str, &str, &str)] = &[
    ("infergate.dev", "inferenceproviders", "get"),
    ("infergate.dev", "inferenceproviders", "list"),
    ("infergate.dev", "inferenceproviders", "watch"),
    ("infergate.dev", "modelroutes", "get"),
    ("infergate.dev", "modelroutes", "list"),
    ("infergate.dev", "modelroutes", "watch"),
    ("infergate.dev", "inferenceproviders/status", "patch"),
    ("infergate.dev", "modelroutes/status", "patch"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];
/// In its own namespace only, by name where the verb allows it.
const OWN_NAMESPACE: &[(&str, &str, &str, Option<&str>)] = &[
    ("", "configmaps", "create", None),
    ("", "configmaps", "get", Some("infergate-config")),
    ("", "configmaps", "patch", Some("infergate-config")),
    ("coordination.k8s.io", "leases", "create", None),
    (
        "coordination.k8s.io",
        "leases",
        "get",
        Some("infergate-operator"),
    ),
    (
        "coordination.k8s.io",
        "leases",
        "update",
        Some("infergate-operator"),
    ),
];

/// helm, or a loud SKIPPED; a failure where the run demands the
/// Kubernetes tests (`INFERGATE_KUBE_TESTS=1`, as in `scripts/test`).
fn helm() -> Option<PathBuf> {
    match std::env::var_os("INFERGATE_HELM") {
        Some(path) => Some(path.into()),
        None if std::env::var_os("INFERGATE_KUBE_TESTS").is_some_and(|v| v == "1") => {
            panic!(
                "INFERGATE_KUBE_TESTS=1 but INFERGATE_HELM is not set: the chart tests cannot run"
            )
        }
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED chart tests: set INFERGATE_HELM to a helm binary \
                 (scripts/test does, after scripts/k8s-testbed install)"
            );
            None
        }
    }
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/infergate")
}

/// `helm template` with `--set` values, as JSON documents.
fn render(helm: &Path, sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(helm);
    cmd.args([
        "template",
        "ig",
        "--namespace",
        "infergate",
        "--include-crds",
    ])
    .arg(chart_dir());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(doc).unwrap()))
        .filter_map(|v| v.ok().filter(|v| !v.is_null()))
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn of_kind<'a>(docs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> {
    docs.iter().filter(move |d| kind(d) == k)
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

/// Every leaf of `sent` is in `back` with the same value: nothing the
/// chart writes is a field the API types do not know (which the API server
/// would drop or refuse).
fn missing_fields(path: &str, sent: &Value, back: &Value, out: &mut Vec<String>) {
    match (sent, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let empty = v.is_null()
                    || v.as_object().is_some_and(|o| o.is_empty())
                    || v.as_array().is_some_and(|a| a.is_empty());
                match b.get(k) {
                    Some(w) => missing_fields(&format!("{path}.{k}"), v, w, out),
                    None if empty => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing_fields(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Vec<String> {
    let typed: T = match serde_json::from_value(doc.clone()) {
        Ok(t) => t,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let back = serde_json::to_value(typed).unwrap();
    let mut out = Vec::new();
    missing_fields("", doc, &back, &mut out);
    out
}

fn check_schema(docs: &[Value]) {
    let mut problems = Vec::new();
    for doc in docs {
        let found = match kind(doc) {
            "Deployment" => roundtrip::<Deployment>(doc),
            "Service" => roundtrip::<Service>(doc),
            "ServiceAccount" => roundtrip::<ServiceAccount>(doc),
            "Secret" => roundtrip::<Secret>(doc),
            "ConfigMap" => roundtrip::<ConfigMap>(doc),
            "ClusterRole" => roundtrip::<ClusterRole>(doc),
            "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc),
            "Role" => roundtrip::<Role>(doc),
            "RoleBinding" => roundtrip::<RoleBinding>(doc),
            "NetworkPolicy" => roundtrip::<NetworkPolicy>(doc),
            "PodDisruptionBudget" => roundtrip::<PodDisruptionBudget>(doc),
            "CustomResourceDefinition" => roundtrip::<CustomResourceDefinition>(doc),
            other => vec![format!("unexpected kind {other}")],
        };
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{} {}: {p}", kind(doc), name(doc))),
        );
    }
    assert!(
        problems.is_empty(),
        "invalid manifests:\n{}",
        problems.join("\n")
    );
}

/// (group, resource, verb, resourceName) for every grant in `rules`.
fn grants(rules: &Value) -> BTreeSet<(String, String, String, Option<String>)> {
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        let names = list(&rule["resourceNames"]);
        for g in list(&rule["apiGroups"]) {
            for r in list(&rule["resources"]) {
                for v in list(&rule["verbs"]) {
                    if names.is_empty() {
                        out.insert((g.clone(), r.clone(), v.clone(), None));
                    }
                    for n in &names {
                        out.insert((g.clone(), r.clone(), v.clone(), Some(n.clone())));
                    }
                }
            }
        }
    }
    out
}

fn expected(rows: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String, Option<String>)> {
    rows.iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string(), None))
        .collect()
}

fn pod_spec(deploy: &Value) -> PodSpec {
    serde_json::from_value(deploy["spec"]["template"]["spec"].clone()).unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Non-root, read-only root filesystem, no privilege escalation, no
/// capabilities, the runtime's seccomp profile.
fn assert_locked_down(spec: &PodSpec, c: &Container) {
    let pod = spec.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let who = &c.name;
    assert!(
        sc.run_as_non_root.or(pod.run_as_non_root) == Some(true),
        "{who} may run as root"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{who}: writable root fs"
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{who}: privilege escalation"
    );
    let drop = sc.capabilities.and_then(|c| c.drop).unwrap_or_default();
    assert!(drop.iter().any(|d| d == "ALL"), "{who}: capabilities kept");
    let seccomp = sc.seccomp_profile.or(pod.seccomp_profile).map(|p| p.type_);
    assert_eq!(seccomp.as_deref(), Some("RuntimeDefault"), "{who}: seccomp");
}

/// Flags of the form `--name` or `--name=value` in `args`.
fn flags(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap().to_owned())
        .collect()
}

fn assert_flags_exist(bin: &Path, args: &[String], extra: &[&str]) {
    let help = Command::new(bin)
        .args(extra)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for f in flags(args) {
        assert!(
            help.contains(&format!("--{f}")),
            "{bin:?} has no flag --{f}"
        );
    }
}

#[test]
fn default_install_is_valid_least_privilege_and_locked_down() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[]);
    check_schema(&docs);

    // CRDs ship with the chart, exactly as generated.
    let crds: Vec<&str> = of_kind(&docs, "CustomResourceDefinition")
        .map(name)
        .collect();
    assert_eq!(
        crds,
        [
            "inferenceproviders.infergate.dev",
            "modelroutes.infergate.dev"
        ]
    );

    // RBAC: exactly the operator's calls, cluster-wide for what it watches,
    // by name in its own namespace for its ConfigMap and Lease.
    let cluster: Vec<&Value> = of_kind(&docs, "ClusterRole").collect();
    assert_eq!(cluster.len(), 1);
    assert_eq!(grants(&cluster[0]["rules"]), expected(CLUSTER_WIDE));
    let own: Vec<&Value> = of_kind(&docs, "Role").collect();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0]["metadata"]["namespace"], "infergate");
    let want: BTreeSet<_> = OWN_NAMESPACE
        .iter()
        .map(|(g, r, v, n)| {
            (
                g.to_string(),
                r.to_string(),
                v.to_string(),
                n.map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(grants(&own[0]["rules"]), want);
    let sa = of_kind(&docs, "ServiceAccount").next().unwrap();
    for binding in of_kind(&docs, "ClusterRoleBinding").chain(of_kind(&docs, "RoleBinding")) {
        assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "infergate");
    }

    // The operator: two replicas electing a leader, locked down, its token
    // from the chart's Secret, every flag known to the binary.
    let op = of_kind(&docs, "Deployment").next().unwrap();
    assert_eq!(op["spec"]["replicas"], 2);
    let spec = pod_spec(op);
    assert_eq!(
        spec.service_account_name.as_deref(),
        sa["metadata"]["name"].as_str()
    );
    let c = container(&spec, "operator");
    assert_locked_down(&spec, c);
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"));
    assert_flags_exist(
        &crate::testbed::operator_bin(),
        c.args.as_deref().unwrap(),
        &[],
    );
    let token_secret = spec.volumes.as_ref().unwrap()[0]
        .secret
        .as_ref()
        .unwrap()
        .secret_name
        .clone()
        .unwrap();
    assert!(of_kind(&docs, "Secret").any(|s| name(s) == token_secret));
    // The release owns the operator's ConfigMap (so uninstall removes it)
    // but leaves its data to the operator.
    let cm: Vec<&Value> = of_kind(&docs, "ConfigMap").collect();
    assert_eq!(cm.len(), 1);
    assert_eq!(name(cm[0]), "infergate-config");
    assert!(cm[0].get("data").is_none());
    // No example workload unless asked for.
    assert_eq!(of_kind(&docs, "Deployment").count(), 1);
    assert_eq!(of_kind(&docs, "NetworkPolicy").count(), 0);
}

#[test]
fn example_workload_keeps_the_admin_port_private() {
    let Some(helm) = helm() else { return };
    let docs = render(
        &helm,
        &["example.enabled=true", "networkPolicy.enabled=true"],
    );
    check_schema(&docs);

    let vllm = of_kind(&docs, "Deployment")
        .find(|d| name(d) == "vllm")
        .expect("example Deployment");
    let labels = &vllm["spec"]["template"]["metadata"];
    assert_eq!(labels["labels"]["infergate.dev/sidecar"], "true");
    assert_eq!(labels["annotations"]["infergate.dev/admin-port"], "9090");
    let spec = pod_spec(vllm);
    let sidecar = container(&spec, "infergate");
    assert_locked_down(&spec, sidecar);
    let model = container(&spec, "vllm").security_context.clone().unwrap();
    assert_eq!(model.allow_privilege_escalation, Some(false));
    let args = sidecar.args.clone().unwrap();
    assert_flags_exist(&crate::testbed::sidecar_bin(), &args, &[]);
    assert!(args.contains(&"--admin-listen=0.0.0.0:9090".to_owned()));
    // Worker threads sized for a sidecar, not for every core of the node.
    let env = sidecar.env.clone().unwrap();
    let workers = env.iter().find(|e| e.name == "TOKIO_WORKER_THREADS");
    assert_eq!(workers.and_then(|e| e.value.as_deref()), Some("2"));
    let limited = render(
        &helm,
        &[
            "example.enabled=true",
            "example.sidecar.resources.limits.cpu=3",
        ],
    );
    let vllm = of_kind(&limited, "Deployment")
        .find(|d| name(d) == "vllm")
        .unwrap();
    let spec = pod_spec(vllm);
    let env = container(&spec, "infergate").env.clone().unwrap();
    let workers = env
        .iter()
        .find(|e| e.name == "TOKIO_WORKER_THREADS")
        .unwrap();
    let field = workers
        .value_from
        .as_ref()
        .and_then(|v| v.resource_field_ref.as_ref());
    assert_eq!(field.map(|f| f.resource.as_str()), Some("limits.cpu"));
    // Probes on the admin port.
    for probe in [&sidecar.readiness_probe, &sidecar.liveness_probe] {
        let port = &probe.as_ref().unwrap().http_get.as_ref().unwrap().port;
        assert_eq!(serde_json::to_value(port).unwrap(), "admin");
    }
    // Signing keys and the admin token come from Secrets the chart made.
    let secrets: Vec<&str> = of_kind(&docs, "Secret").map(name).collect();
    for v in spec.volumes.as_ref().unwrap() {
        if let Some(s) = &v.secret {
            assert!(secrets.contains(&s.secret_name.as_deref().unwrap()));
        }
    }
    let keys = of_kind(&docs, "Secret")
        .find(|s| name(s).ends_with("signing-keys"))
        .unwrap();
    let keys: Secret = serde_json::from_value(keys.clone()).unwrap();
    let data = keys.data.unwrap();
    for k in ["ecdsa", "ed25519"] {
        let hex = String::from_utf8(data[k].0.clone()).unwrap();
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k} is not 32 bytes of hex"
        );
    }

    // The Service carries the public port only.
    let svc = of_kind(&docs, "Service")
        .find(|s| name(s) == "vllm")
        .unwrap();
    let ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["targetPort"], "public");
    assert!(!svc.to_string().contains("9090"));

    // NetworkPolicy: the admin port only from the operator's pods.
    let np = of_kind(&docs, "NetworkPolicy")
        .find(|n| name(n) == "vllm")
        .unwrap();
    let admin_rule = np["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ports"][0]["port"] == 9090)
        .expect("a rule for the admin port");
    let from = admin_rule["from"].as_array().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
}

#[test]
fn watching_named_namespaces_needs_no_cluster_role() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &["operator.watchNamespaces={team-a,team-b}"]);
    check_schema(&docs);
    assert_eq!(of_kind(&docs, "ClusterRole").count(), 0);
    assert_eq!(of_kind(&docs, "ClusterRoleBinding").count(), 0);
    let watch_roles: Vec<&str> = of_kind(&docs, "Role")
        .filter(|r| name(r).ends_with("-watch"))
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(watch_roles, ["team-a", "team-b"]);
    for r in of_kind(&docs, "Role").filter(|r| name(r).ends_with("-watch")) {
        assert_eq!(grants(&r["rules"]), expected(CLUSTER_WIDE));
    }
    let op = of_kind(&docs, "Deployment").next().unwrap();
    let args = pod_spec(op).containers[0].args.clone().unwrap();
    assert!(args.contains(&"--watch-namespaces=team-a,team-b".to_owned()));
}

mod tee;
