//! Pushing to real sidecar processes (the `infergate-sidecar` binary) on
//! ports of their own choosing.

use crate::testbed::{running_version, scratch_dir, spawn_sidecar, TOKEN};
use infergate_operator::push::{push_all, PodRef, Pushed, Sidecar};
use infergate_operator::render::{render, Inputs};

fn pod(name: &str) -> PodRef {
    PodRef {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn inputs() -> Inputs {
    let mut i = Inputs::default();
    let provider =
        serde_json::from_value(serde_json::json!({"url": "http://127.0.0.1:1"})).unwrap();
    i.providers.insert(("ns".into(), "p".into()), provider);
    let route =
        serde_json::from_value(serde_json::json!({"model": "m", "backends": [{"provider": "p"}]}))
            .unwrap();
    i.routes.insert(("ns".into(), "r".into()), route);
    i.keys
        .insert("team".into(), "ig-team-key-0000000000".into());
    i
}

#[tokio::test]
async fn pushes_only_where_the_version_differs_and_reports_refusals() {
    let dir = scratch_dir("push");
    let a = spawn_sidecar("a", &dir);
    let b = spawn_sidecar("b", &dir);
    let sidecars = vec![
        Sidecar {
            pod: pod("a"),
            admin_url: format!("http://127.0.0.1:{}", a.admin_port),
        },
        Sidecar {
            pod: pod("b"),
            admin_url: format!("http://127.0.0.1:{}", b.admin_port),
        },
    ];
    let client = reqwest::Client::new();
    let rendered = render(&inputs()).unwrap();
    let first = push_all(
        &client,
        &sidecars,
        &rendered.config,
        &rendered.version,
        TOKEN,
    )
    .await;
    assert_eq!(
        first,
        vec![Pushed::Applied(vec![]), Pushed::Applied(vec![])]
    );
    assert_eq!(running_version(b.admin_port).await, rendered.version);

    let again = push_all(
        &client,
        &sidecars,
        &rendered.config,
        &rendered.version,
        TOKEN,
    )
    .await;
    assert_eq!(
        again,
        vec![Pushed::Current(vec![]), Pushed::Current(vec![])]
    );

    // A config the sidecar refuses: the refusal's message comes back.
    let mut broken = rendered.config.clone();
    broken.models[0].targets[0].backend = Some("nope".into());
    broken.models[0].targets[0].group = None;
    let refused = push_all(&client, &sidecars[1..], &broken, "v-broken", TOKEN).await;
    match &refused[0] {
        Pushed::Failed(msg) => assert!(msg.contains("not defined"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(running_version(b.admin_port).await, rendered.version);

    let wrong_token = push_all(
        &client,
        &sidecars[1..],
        &rendered.config,
        "v-other",
        "wrong",
    )
    .await;
    assert!(matches!(wrong_token[0], Pushed::Failed(_)));

    let gone = Sidecar {
        pod: pod("gone"),
        admin_url: "http://127.0.0.1:1".into(),
    };
    let unreachable = push_all(&client, &[gone], &rendered.config, &rendered.version, TOKEN).await;
    assert_eq!(
        unreachable,
        vec![Pushed::Failed("sidecar unreachable".into())]
    );
}
