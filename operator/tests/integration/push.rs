//! Pushing to real sidecar processes (the `infergate-sidecar` binary) on
//! ports of their own choosing.

use crate::testbed::{running_version, scratch_dir, spawn_sidecar, TOKEN};
use infergate_operator::push::{push_all, Payload, PodRef, Pushed, Sidecar};
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
        &Payload::new(&rendered.config, &rendered.version, None),
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
        &Payload::new(&rendered.config, &rendered.version, None),
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
    let refused = push_all(
        &client,
        &sidecars[1..],
        &Payload::new(&broken, "v-broken", None),
        TOKEN,
    )
    .await;
    match &refused[0] {
        Pushed::Failed(msg) => assert!(msg.contains("not defined"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(running_version(b.admin_port).await, rendered.version);

    let wrong_token = push_all(
        &client,
        &sidecars[1..],
        &Payload::new(&rendered.config, "v-other", None),
        "wrong",
    )
    .await;
    assert!(matches!(wrong_token[0], Pushed::Failed(_)));

    let gone = Sidecar {
        pod: pod("gone"),
        admin_url: "http://127.0.0.1:1".into(),
    };
    let unreachable = push_all(
        &client,
        &[gone],
        &Payload::new(&rendered.config, &rendered.version, None),
        TOKEN,
    )
    .await;
    assert_eq!(
        unreachable,
        vec![Pushed::Failed("sidecar unreachable".into())]
    );
}

#[tokio::test]
async fn a_sidecar_on_the_previous_version_gets_only_the_change() {
    let dir = scratch_dir("push-delta");
    let (on_previous, elsewhere) = (spawn_sidecar("prev", &dir), spawn_sidecar("other", &dir));
    let sidecar = |name: &str, port: u16| Sidecar {
        pod: pod(name),
        admin_url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let mut i = inputs();
    for n in 0..200 {
        i.keys.insert(
            format!("team-{n:03}"),
            format!("ig-key-{n:03}-0123456789abcdef"),
        );
    }
    let before = render(&i).unwrap();
    let first = Payload::new(&before.config, &before.version, None);
    let prev = sidecar("prev", on_previous.admin_port);
    assert_eq!(
        push_all(&client, std::slice::from_ref(&prev), &first, TOKEN).await,
        [Pushed::Applied(vec![])]
    );

    // One key revoked: its id is the whole change.
    i.keys.remove("team-042");
    let after = render(&i).unwrap();
    let payload = Payload::new(
        &after.config,
        &after.version,
        Some((&before.config, &before.version)),
    );
    let (full, delta) = payload.sizes();
    let delta = delta.expect("a revocation is a delta");
    // The whole config goes gzipped; the revocation is its id.
    assert!(
        delta < 200 && full > 20 * delta,
        "delta {delta} B, full {full} B"
    );
    let other = sidecar("other", elsewhere.admin_port);
    let results = push_all(&client, &[prev, other], &payload, TOKEN).await;
    assert_eq!(results, [Pushed::Patched(vec![]), Pushed::Applied(vec![])]);
    for port in [on_previous.admin_port, elsewhere.admin_port] {
        assert_eq!(running_version(port).await, after.version);
        let config = crate::testbed::sidecar_config(port).await.unwrap();
        let ids: Vec<&str> = config["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 200);
        assert!(!ids.contains(&"team-042"));
    }

    // A delta for a version the sidecar does not run falls back to the
    // whole config.
    i.keys.remove("team-043");
    let third = render(&i).unwrap();
    let stale = Payload::new(
        &third.config,
        &third.version,
        Some((&before.config, &before.version)),
    );
    let prev = sidecar("prev", on_previous.admin_port);
    assert_eq!(
        push_all(&client, &[prev], &stale, TOKEN).await,
        [Pushed::Applied(vec![])]
    );
    assert_eq!(running_version(on_previous.admin_port).await, third.version);
}
