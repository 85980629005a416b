//! Pushing to real sidecar admin listeners on 127.0.0.1:0.

use std::net::SocketAddr;

use infergate_operator::push::{push_all, Pushed, Sidecar};
use infergate_operator::render::{render, Inputs};
use infergate_sidecar::serve::{serve, ServeOptions};
use infergate_sidecar::{admin_app, AppState, Options};

const TOKEN: &str = "operator-push-token";

async fn sidecar() -> (std::sync::Arc<AppState>, SocketAddr) {
    let state = AppState::new(
        None,
        Options {
            admin_token: Some(TOKEN.into()),
            ..Options::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        admin_app(state.clone()),
        ServeOptions::default(),
        std::future::pending(),
    ));
    (state, addr)
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
    let (_a, a_addr) = sidecar().await;
    let (b, b_addr) = sidecar().await;
    let sidecars = vec![
        Sidecar {
            name: "a".into(),
            admin_url: format!("http://{a_addr}"),
        },
        Sidecar {
            name: "b".into(),
            admin_url: format!("http://{b_addr}"),
        },
    ];
    let client = reqwest::Client::new();
    let rendered = render(&inputs());
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
    assert_eq!(b.current_version(), rendered.version);

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
    broken.models[0].targets[0].backend = "nope".into();
    let refused = push_all(&client, &sidecars[1..], &broken, "v-broken", TOKEN).await;
    match &refused[0] {
        Pushed::Failed(msg) => assert!(msg.contains("not defined"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.current_version(), rendered.version);

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
        name: "gone".into(),
        admin_url: "http://127.0.0.1:1".into(),
    };
    let unreachable = push_all(&client, &[gone], &rendered.config, &rendered.version, TOKEN).await;
    assert_eq!(
        unreachable,
        vec![Pushed::Failed("sidecar unreachable".into())]
    );
}
