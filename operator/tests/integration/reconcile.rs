//! The operator against a real kube-apiserver (see testbed/mod.rs for how
//! one is found): CRDs applied from the generated YAML, the operator binary
//! and real `infergate-sidecar` processes on loopback, Pod and
//! EndpointSlice objects standing in for what a kubelet and the endpoint
//! controller would write. The model pods' addresses are from 192.0.2.0/24
//! (TEST-NET-1): the API server refuses loopback endpoints, and these are
//! only rendered into configs, never connected to (tests/python's end to
//! end test serves real traffic from pods in network namespaces).

use std::time::Duration;

use crate::fixtures::*;
use crate::testbed::objects::*;
use crate::testbed::*;
use infergate_crds::{InferenceProvider, ModelRoute};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

const KEY: &str = "ig-integration-team-a-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn renders_stores_pushes_and_reports_status_through_updates_and_deletes() {
    let Some(tb) = testbed("renders_stores_pushes_and_reports_status") else {
        return;
    };
    let client = tb.client().await;
    apply_crds(&client).await;
    let ns = unique_ns("ig-reconcile");
    create_namespace(&client, &ns).await;
    let dir = scratch_dir("reconcile");

    let s0 = spawn_sidecar("sidecar-0", &dir);
    let mut s1 = spawn_sidecar("sidecar-1", &dir);
    sidecar_pod(&client, &ns, "sidecar-0", s0.admin_port).await;
    sidecar_pod(&client, &ns, "sidecar-1", s1.admin_port).await;
    let op = spawn_operator(&tb, &ns, "op-a", &dir);

    // An API key, two providers (a fixed URL; per-pod through EndpointSlices),
    // a route with an alias and a route naming a provider that is not there.
    create::<Secret>(&client, &ns, api_key_secret("team-a", KEY)).await;
    create::<InferenceProvider>(
        &client,
        &ns,
        provider(
            "ext",
            json!({"url": "https://api.example.invalid/", "attestation": false, "models": ["gpt"]}),
        ),
    )
    .await;
    create::<InferenceProvider>(
        &client,
        &ns,
        provider(
            "pods",
            json!({
                "endpoints": {"service": "vllm", "port": 8000, "sidecarPort": 8080},
                "models": ["meta-llama/Llama-3"],
                "maxConcurrentRequests": 8,
                "timeouts": {"connectMs": 500, "idleMs": 10000},
            }),
        ),
    )
    .await;
    create::<EndpointSlice>(
        &client,
        &ns,
        slice(&[("192.0.2.2", true), ("192.0.2.3", false)]),
    )
    .await;
    create::<ModelRoute>(&client, &ns, route("llama", json!({
            "model": "llama-3", "aliases": ["llama"],
            "backends": [{"provider": "pods", "upstreamModel": "meta-llama/Llama-3", "weight": 3}],
            "strategy": "leastInFlight",
            "sticky": {"header": "x-session-id", "user": true},
        })))
    .await;
    create::<ModelRoute>(
        &client,
        &ns,
        route(
            "broken",
            json!({"model": "other", "backends": [{"provider": "nope"}]}),
        ),
    )
    .await;

    // The ConfigMap and both sidecar processes hold the same rendered config.
    let config = sidecars_run(
        &client,
        &ns,
        &[&s0, &s1],
        "first config on both sidecars",
        |c| model_names(c) == ["llama-3"] && c["keys"].as_array().is_some_and(|k| k.len() == 1),
    )
    .await;
    let text = config.to_string();
    assert!(
        !text.contains(KEY),
        "the raw API key leaked into the config"
    );
    assert_eq!(config["keys"][0]["id"], "team-a");
    assert_eq!(config["keys"][0]["sha256"], infergate_config::hash_key(KEY));
    let backends: Vec<&str> = config["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        backends,
        [format!("{ns}/ext"), format!("{ns}/pods/192.0.2.2")]
    );
    let pod_backend = &config["backends"][1];
    assert_eq!(pod_backend["url"], "http://192.0.2.2:8000");
    assert_eq!(pod_backend["sidecar"], "http://192.0.2.2:8080");
    assert_eq!(pod_backend["maxInFlight"], 8);
    assert_eq!(pod_backend["timeouts"]["connectMs"], 500);
    let route = &config["models"][0];
    assert_eq!(route["aliases"], json!(["llama"]));
    assert_eq!(route["strategy"], "leastInFlight");
    // The provider's pods are one group target, however many there are.
    assert_eq!(route["targets"][0]["group"], format!("{ns}/pods"));
    assert_eq!(route["targets"][0]["weight"], 3);
    assert_eq!(route["targets"][0]["upstreamModel"], "meta-llama/Llama-3");
    let parsed: infergate_config::GatewayConfig = serde_json::from_value(config.clone()).unwrap();
    assert_eq!(config["version"], parsed.computed_version());

    // Status: the good route is programmed on 2/2 sidecars; the broken one
    // names its missing provider, and an event says so too.
    let (status, generation, _) = eventually("llama route programmed", || async {
        let s = route_status(&client, &ns, "llama").await?;
        (condition(&s.0, "Programmed")?["status"] == "True").then_some(s)
    })
    .await;
    assert_eq!(condition(&status, "Accepted").unwrap()["status"], "True");
    assert_eq!(
        condition(&status, "ResolvedRefs").unwrap()["status"],
        "True"
    );
    assert!(condition(&status, "Programmed").unwrap()["message"]
        .as_str()
        .unwrap()
        .starts_with("2/2"));
    assert_eq!(status["observedGeneration"], generation);
    assert_eq!(status["resolvedBackends"], 1);
    let (broken, _, _) = eventually("broken route status", || async {
        let s = route_status(&client, &ns, "broken").await?;
        condition(&s.0, "ResolvedRefs").is_some().then_some(s)
    })
    .await;
    let refs = condition(&broken, "ResolvedRefs").unwrap();
    assert_eq!(refs["status"], "False");
    assert_eq!(refs["reason"], "ProviderNotFound");
    assert!(refs["message"].as_str().unwrap().contains("nope"));
    assert_eq!(condition(&broken, "Programmed").unwrap()["status"], "False");
    let provider = Api::<InferenceProvider>::namespaced(client.clone(), &ns)
        .get("pods")
        .await
        .unwrap();
    assert_eq!(provider.status.unwrap().ready_backends, 1);
    eventually("ProviderNotFound event", || async {
        events(&client, &ns)
            .await?
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ProviderNotFound")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
            })
            .then_some(())
    })
    .await;

    // Nothing changes: several resync passes later, no status was rewritten.
    let (_, _, rv_before) = route_status(&client, &ns, "llama").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, _, rv_after) = route_status(&client, &ns, "llama").await.unwrap();
    assert_eq!(rv_before, rv_after, "status rewritten with nothing changed");

    // Updates: a new alias, and the second pod turns ready.
    let routes: Api<ModelRoute> = Api::namespaced(client.clone(), &ns);
    routes
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aliases": ["llama", "l3"]}})),
        )
        .await
        .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), &ns)
        .replace("vllm-1", &PostParams::default(), &{
            let mut s: EndpointSlice =
                serde_json::from_value(slice(&[("192.0.2.2", true), ("192.0.2.3", true)])).unwrap();
            s.metadata.resource_version = Api::<EndpointSlice>::namespaced(client.clone(), &ns)
                .get("vllm-1")
                .await
                .unwrap()
                .metadata
                .resource_version;
            s
        })
        .await
        .unwrap();
    let config = sidecars_run(&client, &ns, &[&s0, &s1], "alias and second pod", |c| {
        c["models"][0]["aliases"] == json!(["llama", "l3"])
            && c["backends"].as_array().is_some_and(|bs| {
                bs.iter()
                    .filter(|b| b["group"] == format!("{ns}/pods"))
                    .count()
                    == 2
            })
    })
    .await;
    assert_eq!(config["backends"].as_array().unwrap().len(), 3);
    eventually("observedGeneration follows the update", || async {
        let (s, generation, _) = route_status(&client, &ns, "llama").await?;
        (generation == 2
            && s["observedGeneration"] == 2
            && s["resolvedBackends"] == 2
            && condition(&s, "Programmed")?["observedGeneration"] == 2)
            .then_some(())
    })
    .await;

    // The missing provider appears: the broken route resolves and is served.
    create::<InferenceProvider>(
        &client,
        &ns,
        crate::fixtures::provider("nope", json!({"service": {"name": "backup", "port": 8000}})),
    )
    .await;
    let config = sidecars_run(&client, &ns, &[&s0, &s1], "late provider resolves", |c| {
        model_names(c) == ["llama-3", "other"]
    })
    .await;
    assert!(config["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["url"] == format!("http://backup.{ns}.svc:8000")));
    eventually("broken route resolved", || async {
        let (s, _, _) = route_status(&client, &ns, "broken").await?;
        (condition(&s, "ResolvedRefs")?["status"] == "True").then_some(())
    })
    .await;

    // A sidecar is down while the config changes: Programmed says 1/2, its
    // pod gets an event, the failure is counted. Restarted with no config,
    // the next resync gives it back.
    let (admin, public) = (s1.admin_port, s1.public_port);
    s1.proc.kill();
    routes
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aliases": ["llama", "l3", "while-down"]}})),
        )
        .await
        .unwrap();
    eventually("a sidecar down is reported", || async {
        let (s, _, _) = route_status(&client, &ns, "llama").await?;
        let programmed = condition(&s, "Programmed")?;
        (programmed["status"] == "False" && programmed["message"].as_str()?.starts_with("1/2"))
            .then_some(())
    })
    .await;
    eventually("ConfigPushFailed event on the pod", || async {
        events(&client, &ns)
            .await?
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("ConfigPushFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sidecar-1")
            })
            .filter(|e| e.note.as_deref() == Some("sidecar unreachable"))
            .map(|_| ())
    })
    .await;
    // The pass that raised the event counts its failure when it ends.
    eventually("the failed pass counted", || async {
        let (_, metrics) = op.get("/metrics").await?;
        metrics
            .contains("infergate_operator_reconcile_failures_total{error=\"push\"}")
            .then_some(())
    })
    .await;
    s1 = spawn_sidecar_on("sidecar-1-restarted", &dir, admin, public);
    sidecars_run(
        &client,
        &ns,
        &[&s0, &s1],
        "restarted sidecar re-pushed",
        |c| model_names(c) == ["llama-3", "other"] && c.to_string().contains("\"while-down\""),
    )
    .await;

    // An upstream key file the sidecars cannot read (the Secret is not
    // mounted in these processes): the config is still taken, everything
    // else keeps working, that provider's backend is left out and its
    // status says why; removing the reference recovers.
    let providers: Api<InferenceProvider> = Api::namespaced(client.clone(), &ns);
    providers
        .patch(
            "nope",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"apiKeySecret": {"name": "up", "key": "token"}}})),
        )
        .await
        .unwrap();
    sidecars_run(
        &client,
        &ns,
        &[&s0, &s1],
        "config with the key file taken",
        |c| {
            c["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b.get("apiKeyFile").is_some())
        },
    )
    .await;
    let unreadable = eventually("provider reports the unreadable key", || async {
        let p = providers.get("nope").await.ok()?;
        let status = serde_json::to_value(p.status?).ok()?;
        let refs = condition(&status, "ResolvedRefs")?.clone();
        (refs["reason"] == "UpstreamKeyUnreadable").then_some(refs)
    })
    .await;
    assert_eq!(unreadable["status"], "False");
    let message = unreadable["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{ns}/nope (2/2 sidecars)")),
        "{message}"
    );
    let (llama, _, _) = route_status(&client, &ns, "llama").await.unwrap();
    assert_eq!(condition(&llama, "Programmed").unwrap()["status"], "True");
    providers
        .patch(
            "nope",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"apiKeySecret": null}})),
        )
        .await
        .unwrap();
    eventually("provider recovers", || async {
        let p = providers.get("nope").await.ok()?;
        let status = serde_json::to_value(p.status?).ok()?;
        (condition(&status, "ResolvedRefs")?["status"] == "True").then_some(())
    })
    .await;

    // Deletes: a route, a provider and the key leave the next config.
    routes
        .delete("broken", &DeleteParams::default())
        .await
        .unwrap();
    providers
        .delete("ext", &DeleteParams::default())
        .await
        .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    let config = sidecars_run(&client, &ns, &[&s0, &s1], "deletes applied", |c| {
        model_names(c) == ["llama-3"] && c["keys"].as_array().is_some_and(|k| k.is_empty())
    })
    .await;
    assert!(config["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["id"] != format!("{ns}/ext")));

    // The operator's own endpoints.
    assert_eq!(op.get("/healthz").await.unwrap().0, 200);
    assert_eq!(op.get("/readyz").await.unwrap().0, 200);
    let (_, metrics) = op.get("/metrics").await.unwrap();
    for line in [
        "infergate_operator_leader 1",
        "infergate_operator_sidecars_programmed 2",
        "infergate_operator_pushes_total{result=\"applied\"}",
        "infergate_operator_pushes_total{result=\"current\"}",
        "infergate_operator_reconcile_duration_seconds_count",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(!op.proc.log().contains(KEY), "the API key reached the log");
}
