//! Two operator processes on one Lease against a real kube-apiserver: the
//! standby takes over when the leader is killed, and at once when the
//! leader stops gracefully (it releases the Lease).

use std::time::Duration;

use crate::fixtures::*;
use crate::testbed::objects::*;
use crate::testbed::*;
use infergate_crds::{InferenceProvider, ModelRoute};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_when_the_leader_dies() {
    let Some(tb) = testbed("the_standby_takes_over_when_the_leader_dies") else {
        return;
    };
    let client = tb.client().await;
    apply_crds(&client).await;
    let ns = unique_ns("ig-failover");
    create_namespace(&client, &ns).await;
    let dir = scratch_dir("failover");

    let sidecar = spawn_sidecar("sidecar", &dir);
    sidecar_pod(&client, &ns, "sidecar", sidecar.admin_port).await;
    let mut a = spawn_operator(&tb, &ns, "op-a", &dir);
    let mut b = spawn_operator(&tb, &ns, "op-b", &dir);
    create::<InferenceProvider>(
        &client,
        &ns,
        provider("p", json!({"url": "http://127.0.0.2:8000"})),
    )
    .await;
    create::<ModelRoute>(
        &client,
        &ns,
        route("m", json!({"model": "m1", "backends": [{"provider": "p"}]})),
    )
    .await;
    sidecars_run(
        &client,
        &ns,
        &[&sidecar],
        "config from the first leader",
        |c| model_names(c) == ["m1"],
    )
    .await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.clone());
    let first = holder(&leases.get("infergate-operator").await.unwrap()).unwrap();
    let (leader, standby) = if first == a.identity {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    // Exactly one leads.
    let (_, m) = standby.get("/metrics").await.unwrap();
    assert!(m.contains("infergate_operator_leader 0"), "{m}");

    // The leader dies without releasing the Lease; a change made while no
    // one leads is delivered by the standby once the Lease expires.
    leader.proc.kill();
    let routes: Api<ModelRoute> = Api::namespaced(client.clone(), &ns);
    routes
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aliases": ["after-failover"]}})),
        )
        .await
        .unwrap();
    sidecars_run(
        &client,
        &ns,
        &[&sidecar],
        "config from the new leader",
        |c| c["models"][0]["aliases"] == json!(["after-failover"]),
    )
    .await;
    let lease = leases.get("infergate-operator").await.unwrap();
    assert_eq!(holder(&lease).as_deref(), Some(standby.identity.as_str()));
    assert!(lease.spec.unwrap().lease_transitions.unwrap_or(0) >= 1);
    let (_, m) = standby.get("/metrics").await.unwrap();
    assert!(m.contains("infergate_operator_leader 1"), "{m}");
    eventually("status written by the new leader", || async {
        let (s, _, _) = route_status(&client, &ns, "m").await?;
        (s["observedGeneration"] == 2 && condition(&s, "Programmed")?["status"] == "True")
            .then_some(())
    })
    .await;

    // A graceful stop releases the Lease: a fresh replica takes over well
    // before a lease duration would have expired.
    let c = spawn_operator(&tb, &ns, "op-c", &dir);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let survivor = if standby.identity == a.identity {
        &mut a
    } else {
        &mut b
    };
    survivor.proc.terminate();
    eventually("op-c holds the lease", || async {
        let l = leases.get("infergate-operator").await.ok()?;
        (holder(&l).as_deref() == Some("op-c")).then_some(())
    })
    .await;
    routes
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"aliases": ["third-term"]}})),
        )
        .await
        .unwrap();
    sidecars_run(&client, &ns, &[&sidecar], "config from op-c", |c| {
        c["models"][0]["aliases"] == json!(["third-term"])
    })
    .await;
    drop(c);
}
