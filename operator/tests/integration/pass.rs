//! One reconcile pass with the Kubernetes API answered in-process (kube's
//! mocked-client pattern) and a real sidecar process: which writes a
//! pass makes, what they carry, and that a pass with nothing new writes
//! nothing. Runs everywhere; tests/reconcile.rs does the same against a real
//! kube-apiserver when one is available.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fixtures::{self, stored};
use crate::testbed::{running_version, scratch_dir, spawn_sidecar, Sidecar, TOKEN};
use http::{Request, Response};
use http_body_util::BodyExt;
use infergate_crds::{InferenceProvider, ModelRoute};
use infergate_operator::cache::Stores;
use infergate_operator::leader::{Fence, Term};
use infergate_operator::metrics::Metrics;
use infergate_operator::reconcile::{self, pass, Context, Memory, Timing};
use infergate_operator::Error;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};

/// Every request the operator made: (method, path?query, body).
type Log = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Answers like an API server would for the calls a pass makes: a patch
/// returns the object (with the patched status), a create echoes its body.
fn fake_api(objects: HashMap<String, Value>) -> (Client, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let (log, objects) = (seen.clone(), objects.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            let full = parts.uri.path_and_query().unwrap().to_string();
            log.lock()
                .unwrap()
                .push((parts.method.to_string(), full, sent.clone()));
            let reply = match objects.get(path.trim_end_matches("/status")) {
                Some(obj) => {
                    let mut obj = obj.clone();
                    obj["status"] = sent["status"].clone();
                    obj
                }
                None => sent,
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            )
        }
    });
    (Client::new(service, "default"), log)
}

fn store<K>(objects: Vec<Value>) -> Vec<Store<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
{
    let mut writer = Writer::<K>::new(());
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(o).unwrap()));
    }
    vec![writer.as_reader()]
}

fn provider() -> Value {
    stored(
        fixtures::provider("p", json!({"url": "http://127.0.0.1:1"})),
        "ai",
    )
}

fn route(name: &str, provider: &str, status: Option<&Value>) -> Value {
    let spec = json!({"model": format!("{name}-model"), "backends": [{"provider": provider}]});
    let mut r = stored(fixtures::route(name, spec), "ai");
    if let Some(s) = status {
        r["status"] = s.clone();
        r["metadata"]["resourceVersion"] = json!("2");
    }
    r
}

fn stores(admin_port: u16, routes: Vec<Value>, provider_status: Option<&Value>) -> Stores {
    let mut p = provider();
    if let Some(s) = provider_status {
        p["status"] = s.clone();
        p["metadata"]["resourceVersion"] = json!("2");
    }
    Stores {
        providers: store::<InferenceProvider>(vec![p]),
        routes: store::<ModelRoute>(routes),
        secrets: store::<Secret>(vec![json!({
            "metadata": {"name": "team", "namespace": "ai", "labels": {"infergate.dev/api-key": ""}},
            "data": {"key": "aWctdGVhbS1rZXktMDAwMDAwMDAwMA=="}, // ig-team-key-0000000000
        })]),
        slices: store::<EndpointSlice>(vec![]),
        pods: store::<Pod>(vec![json!({
            "metadata": {"name": "sidecar-0", "namespace": "ai",
                "annotations": {"infergate.dev/admin-port": admin_port.to_string()}},
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        })]),
    }
}

fn sidecar() -> (Sidecar, u16) {
    let sidecar = spawn_sidecar("sidecar", &scratch_dir("pass"));
    let port = sidecar.admin_port;
    (sidecar, port)
}

fn context(client: Client, stores: Stores, token_file: &std::path::Path) -> Context {
    let (term, fence) = leading(Duration::from_secs(3600));
    // These tests lead throughout: the term outlives them.
    Box::leak(Box::new(term));
    context_with(client, stores, token_file, fence)
}

fn leading(term: Duration) -> (Term, Fence) {
    let (tx, fence) = Fence::new();
    tx.send_replace(Some(tokio::time::Instant::now() + term));
    (tx, fence)
}

fn context_with(
    client: Client,
    stores: Stores,
    token_file: &std::path::Path,
    fence: Fence,
) -> Context {
    Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "infergate-operator".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        http: reqwest::Client::new(),
        namespace: "infergate-system".into(),
        config_map: "infergate-config".into(),
        admin_token_file: token_file.to_owned(),
        metrics: Arc::new(Metrics::default()),
        stores,
        fence,
    }
}

fn writes(log: &Log) -> Vec<(String, String, Value)> {
    std::mem::take(&mut *log.lock().unwrap())
}

fn find<'a>(log: &'a [(String, String, Value)], method: &str, path: &str) -> Option<&'a Value> {
    log.iter()
        .find(|(m, p, _)| m == method && p.starts_with(path))
        .map(|(_, _, body)| body)
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
}

#[tokio::test]
async fn a_pass_stores_pushes_and_writes_status_once() {
    let (sidecar, port) = sidecar();
    let token_file = std::env::temp_dir().join(format!("ig-pass-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let routes = || vec![route("good", "p", None), route("broken", "nope", None)];
    let objects: HashMap<String, Value> = routes()
        .into_iter()
        .map(|r| {
            let name = r["metadata"]["name"].as_str().unwrap().to_owned();
            (
                format!("/apis/infergate.dev/v1alpha1/namespaces/ai/modelroutes/{name}"),
                r,
            )
        })
        .chain([(
            "/apis/infergate.dev/v1alpha1/namespaces/ai/inferenceproviders/p".to_owned(),
            provider(),
        )])
        .collect();
    let (client, log) = fake_api(objects);
    let mut memory = Memory::default();

    let ctx = context(client.clone(), stores(port, routes(), None), &token_file);
    pass(&ctx, &mut memory).await.unwrap();
    let first = writes(&log);

    // The ConfigMap, by server-side apply, holds what the sidecar now runs.
    let cm_path = "/api/v1/namespaces/infergate-system/configmaps/infergate-config?";
    let cm = find(&first, "PATCH", cm_path).expect("ConfigMap applied");
    let (_, query, _) = first
        .iter()
        .find(|(_, p, _)| p.starts_with(cm_path))
        .unwrap();
    assert!(query.contains("fieldManager=infergate-operator") && query.contains("force=true"));
    // Only the fields the operator owns: Helm owns the chart's labels, and a
    // forced apply of one breaks the next `helm upgrade` on a real server.
    assert_eq!(
        cm["metadata"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["annotations", "name"]
    );
    assert_eq!(
        cm["data"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["config.json"]
    );
    let config: Value = serde_json::from_str(cm["data"]["config.json"].as_str().unwrap()).unwrap();
    assert_eq!(config["version"], running_version(sidecar.admin_port).await);
    assert_eq!(config["models"].as_array().unwrap().len(), 1);
    assert!(!cm.to_string().contains("ig-team-key-0000000000"));

    // Status: programmed on 1/1 sidecars; the broken route names `nope`.
    let status_path = "/apis/infergate.dev/v1alpha1/namespaces/ai/modelroutes";
    let good = find(&first, "PATCH", &format!("{status_path}/good/status")).unwrap();
    assert_eq!(good["kind"], "ModelRoute");
    assert_eq!(condition(&good["status"], "Programmed")["status"], "True");
    assert_eq!(
        condition(&good["status"], "Programmed")["message"],
        "1/1 sidecars run the config with this route"
    );
    assert_eq!(good["status"]["observedGeneration"], 1);
    let broken = find(&first, "PATCH", &format!("{status_path}/broken/status")).unwrap();
    let refs = condition(&broken["status"], "ResolvedRefs");
    assert_eq!(refs["reason"], "ProviderNotFound");
    assert!(refs["message"].as_str().unwrap().contains("nope"));
    let p = find(
        &first,
        "PATCH",
        "/apis/infergate.dev/v1alpha1/namespaces/ai/inferenceproviders/p/status",
    )
    .unwrap();
    assert_eq!(p["status"]["readyBackends"], 1);
    let event = find(
        &first,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/ai/events",
    )
    .unwrap();
    assert_eq!(event["reason"], "ProviderNotFound");
    assert_eq!(event["regarding"]["name"], "broken");
    assert_eq!(event["type"], "Warning");

    // Same inputs, caches not yet showing our writes: nothing is written.
    pass(&ctx, &mut memory).await.unwrap();
    assert_eq!(writes(&log), vec![], "a pass with nothing new wrote");

    // Caches caught up (statuses as written): still nothing, even for a
    // fresh leader with no memory of its writes.
    let seen = vec![
        route("good", "p", Some(&good["status"])),
        route("broken", "nope", Some(&broken["status"])),
    ];
    let ctx = context(
        client.clone(),
        stores(port, seen.clone(), Some(&p["status"])),
        &token_file,
    );
    pass(&ctx, &mut memory).await.unwrap();
    assert_eq!(writes(&log), vec![]);
    let mut fresh = Memory::default();
    pass(&ctx, &mut fresh).await.unwrap();
    let only_cm: Vec<_> = writes(&log).into_iter().map(|(m, p, _)| (m, p)).collect();
    assert_eq!(only_cm.len(), 1, "{only_cm:?}");
    assert!(only_cm[0].1.starts_with(cm_path));

    // The good route is deleted: the next config differs and is pushed.
    let before = running_version(sidecar.admin_port).await;
    let ctx = context(
        client,
        stores(port, seen[1..].to_vec(), Some(&p["status"])),
        &token_file,
    );
    pass(&ctx, &mut memory).await.unwrap();
    let after = writes(&log);
    let cm = find(&after, "PATCH", cm_path).expect("new config stored");
    let config: Value = serde_json::from_str(cm["data"]["config.json"].as_str().unwrap()).unwrap();
    assert_ne!(running_version(sidecar.admin_port).await, before);
    assert_eq!(config["version"], running_version(sidecar.admin_port).await);
    assert_eq!(config["models"], json!([]));
    let _ = std::fs::remove_file(token_file);
}

/// An admin port that accepts and never answers: a push to it hangs, as to
/// a stalled sidecar. Resolves each connection's end (EOF from the client).
async fn silent_sidecar() -> (u16, tokio::sync::mpsc::UnboundedReceiver<&'static str>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let _ = tx.send("connected");
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                let _ = tx.send("closed");
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_mid_pass_writes_nothing_after() {
    let (port, mut sidecar) = silent_sidecar().await;
    let token_file = std::env::temp_dir().join(format!("ig-fence-token-{}", std::process::id()));
    std::fs::write(&token_file, TOKEN).unwrap();
    let (client, log) = fake_api(HashMap::new());
    let (term, fence) = leading(Duration::from_secs(60));
    let ctx = context_with(
        client,
        stores(port, vec![route("good", "p", None)], None),
        &token_file,
        fence,
    );
    let metrics = ctx.metrics.clone();
    metrics
        .synced
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let trigger = Arc::new(tokio::sync::Notify::new());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let timing = Timing {
        debounce: Duration::from_millis(10),
        ..Timing::default()
    };
    let run = tokio::spawn(reconcile::run(ctx, trigger.clone(), timing, shutdown));
    trigger.notify_one();

    // The pass stored the config and is now stuck pushing to the sidecar.
    assert_eq!(sidecar.recv().await, Some("connected"));
    let before = writes(&log);
    assert!(
        before
            .iter()
            .any(|(m, p, _)| m == "PATCH" && p.contains("/configmaps/")),
        "{before:?}"
    );
    assert!(!before.iter().any(|(_, p, _)| p.ends_with("/status")));

    // Another replica takes the Lease: the pass is cancelled where it
    // stands (its push connection is dropped) and writes nothing more.
    term.send_replace(None);
    let closed = tokio::time::timeout(Duration::from_secs(5), sidecar.recv()).await;
    assert_eq!(closed, Ok(Some("closed")), "the push was not cancelled");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(writes(&log), vec![], "a deposed leader wrote");
    let text = metrics.encode();
    assert!(
        text.contains("infergate_operator_reconcile_failures_total{error=\"not_leader\"} 1"),
        "{text}"
    );
    assert!(text.contains("infergate_operator_leader 0"), "{text}");
    run.abort();
    let _ = std::fs::remove_file(token_file);
}

#[tokio::test]
async fn a_term_that_ran_out_fences_every_write() {
    let (_sidecar, port) = sidecar();
    let (client, log) = fake_api(HashMap::new());
    // Renewed last 20 s ago with a 10 s term: no write may go out, even
    // before the leader task notices.
    let (tx, fence) = Fence::new();
    let expired = tokio::time::Instant::now()
        .checked_sub(Duration::from_secs(10))
        .unwrap();
    tx.send_replace(Some(expired));
    let ctx = context_with(
        client,
        stores(port, vec![route("good", "p", None)], None),
        std::path::Path::new("/nonexistent-token"),
        fence,
    );
    let err = pass(&ctx, &mut Memory::default()).await.unwrap_err();
    assert!(matches!(err, Error::NotLeader), "{err}");
    assert_eq!(writes(&log), vec![]);
}

/// The stores of `stores`, with the key limited to `rpm` a minute and one
/// running sidecar pod per admin port.
fn stores_with_pods(admin_ports: &[u16], rpm: u32) -> Stores {
    let mut stores = stores(admin_ports[0], vec![route("good", "p", None)], None);
    stores.secrets = store::<Secret>(vec![json!({
        "metadata": {"name": "team", "namespace": "ai", "labels": {"infergate.dev/api-key": ""},
            "annotations": {"infergate.dev/requests-per-minute": rpm.to_string()}},
        "data": {"key": "aWctdGVhbS1rZXktMDAwMDAwMDAwMA=="},
    })]);
    stores.pods = store::<Pod>(
        admin_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                json!({
                    "metadata": {"name": format!("sidecar-{i}"), "namespace": "ai",
                        "annotations": {"infergate.dev/admin-port": port.to_string()}},
                    "status": {"phase": "Running", "podIP": "127.0.0.1"},
                })
            })
            .collect(),
    );
    stores
}

/// `limits` and `clusterLimits` requests per minute of the one key a
/// sidecar runs.
async fn key_rpm(admin_port: u16) -> (Value, Value) {
    let config = crate::testbed::sidecar_config(admin_port).await.unwrap();
    let key = &config["keys"][0];
    (
        key["limits"]["requestsPerMinute"].clone(),
        key["clusterLimits"]["requestsPerMinute"].clone(),
    )
}

#[tokio::test]
async fn a_keys_local_share_follows_the_number_of_sidecars() {
    let (_a, a) = sidecar();
    let (_b, b) = sidecar();
    let token_file = std::env::temp_dir().join(format!("ig-share-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let objects: HashMap<String, Value> = [
        (
            "/apis/infergate.dev/v1alpha1/namespaces/ai/modelroutes/good".to_owned(),
            route("good", "p", None),
        ),
        (
            "/apis/infergate.dev/v1alpha1/namespaces/ai/inferenceproviders/p".to_owned(),
            provider(),
        ),
    ]
    .into();
    let (client, _log) = fake_api(objects);
    let mut memory = Memory::default();

    // One sidecar: it enforces the whole 12 a minute.
    let ctx = context(client.clone(), stores_with_pods(&[a], 12), &token_file);
    pass(&ctx, &mut memory).await.unwrap();
    assert_eq!(key_rpm(a).await, (json!(12), json!(12)));

    // A second sidecar joins: each enforces half, and both know the whole
    // (for a shared quota store).
    let ctx = context(client, stores_with_pods(&[a, b], 12), &token_file);
    pass(&ctx, &mut memory).await.unwrap();
    for port in [a, b] {
        assert_eq!(key_rpm(port).await, (json!(6), json!(12)));
    }
}
