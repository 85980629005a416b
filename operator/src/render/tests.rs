use super::*;
use infergate_crds::{EndpointsTarget, RouteBackend, SecretKeyRef, ServiceTarget};

fn provider(url: Option<&str>) -> InferenceProviderSpec {
    serde_json::from_value(serde_json::json!({"url": url})).unwrap()
}

fn route(model: &str, providers: &[&str]) -> ModelRouteSpec {
    ModelRouteSpec {
        model: model.into(),
        aliases: vec![],
        backends: providers
            .iter()
            .map(|p| RouteBackend {
                provider: p.to_string(),
                upstream_model: None,
                weight: 1,
            })
            .collect(),
        strategy: Strategy::RoundRobin,
        prefix_affinity: None,
        sticky: None,
        api_keys: vec![],
    }
}

fn key(ns: &str, name: &str) -> ObjectKey {
    (ns.into(), name.into())
}

fn inputs() -> Inputs {
    let mut i = Inputs::default();
    i.providers
        .insert(key("ai", "ext"), provider(Some("https://api.example.com/")));
    let mut pods = provider(None);
    pods.url = None;
    pods.endpoints = Some(EndpointsTarget {
        service: "vllm".into(),
        port: 8000,
        sidecar_port: 8080,
    });
    pods.api_key_secret = Some(SecretKeyRef {
        name: "up".into(),
        key: "token".into(),
    });
    i.providers.insert(key("ai", "pods"), pods);
    i.endpoints.insert(
        key("ai", "vllm"),
        ["10.0.0.2".to_string(), "10.0.0.1".to_string()].into(),
    );
    let mut r = route("llama", &["pods"]);
    r.aliases = vec!["l".into()];
    i.routes.insert(key("ai", "llama"), r);
    i.keys
        .insert("team-a".into(), "ig-team-a-key-000000000".into());
    i
}

#[test]
fn renders_a_valid_config_with_one_backend_per_ready_pod() {
    let r = render(&inputs()).unwrap();
    let ids: Vec<&str> = r.config.backends.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["ai/ext", "ai/pods/10.0.0.1", "ai/pods/10.0.0.2"]);
    let pod = &r.config.backends[1];
    assert_eq!(pod.url, "http://10.0.0.1:8000");
    assert_eq!(pod.sidecar.as_deref(), Some("http://10.0.0.1:8080"));
    assert_eq!(
        pod.api_key_file.as_deref(),
        Some("/var/run/infergate/upstream/up/token")
    );
    assert_eq!(r.config.backends[0].url, "https://api.example.com");
    // The two pods are one group target: the route does not list them.
    assert_eq!(r.config.models[0].targets.len(), 1);
    assert_eq!(
        r.config.models[0].targets[0].group.as_deref(),
        Some("ai/pods")
    );
    assert!(r.config.backends[1..]
        .iter()
        .all(|b| b.group.as_deref() == Some("ai/pods")));
    assert_eq!(r.providers[&key("ai", "pods")].ready_backends, 2);
    assert_eq!(r.routes[&key("ai", "llama")].resolved_backends, 2);
}

#[test]
fn keys_are_hashed_never_copied() {
    let r = render(&inputs()).unwrap();
    let json = serde_json::to_string(&r.config).unwrap();
    assert!(!json.contains("ig-team-a-key-000000000"));
    assert_eq!(
        r.config.keys[0].sha256,
        infergate_config::hash_key("ig-team-a-key-000000000")
    );
    // Every route open to all keys; a key is one line whatever the routes.
    assert_eq!(r.config.keys[0].models, ["*"]);
    assert!(r.config.models.iter().all(|m| m.keys.is_empty()));
}

#[test]
fn one_key_under_two_ids_is_kept_once() {
    let mut i = inputs();
    i.keys
        .insert("team-b".into(), "ig-team-a-key-000000000".into());
    let r = render(&i).unwrap();
    let ids: Vec<&str> = r.config.keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["team-a"]);
}

#[test]
fn deterministic_whatever_the_input_order_and_version_is_the_hash() {
    let a = render(&inputs()).unwrap();
    let mut reversed = Inputs::default();
    let i = inputs();
    for (k, v) in i.providers.iter().rev() {
        reversed.providers.insert(k.clone(), v.clone());
    }
    reversed.routes = i.routes.clone();
    reversed.keys = i.keys.clone();
    reversed.endpoints = i.endpoints.clone();
    let b = render(&reversed).unwrap();
    assert_eq!(
        serde_json::to_string(&a.config).unwrap(),
        serde_json::to_string(&b.config).unwrap()
    );
    assert_eq!(a.version, a.config.computed_version());
}

#[test]
fn a_route_to_a_missing_provider_says_which_and_is_left_out() {
    let mut i = inputs();
    i.routes
        .insert(key("ai", "broken"), route("other", &["nope"]));
    let mut partial = route("partial", &["ext", "gone"]);
    partial.api_keys = vec!["someone-else".into()];
    i.routes.insert(key("ai", "partial"), partial);
    let r = render(&i).unwrap();
    assert_eq!(r.routes[&key("ai", "broken")].missing, ["nope"]);
    assert!(r.config.models.iter().all(|m| m.name != "other"));
    assert_eq!(r.routes[&key("ai", "partial")].missing, ["gone"]);
    assert_eq!(r.routes[&key("ai", "partial")].resolved_backends, 1);
    // The partial route names its keys; team-a is not among them.
    let partial = r
        .config
        .models
        .iter()
        .find(|m| m.name == "partial")
        .unwrap();
    assert_eq!(partial.keys, ["someone-else"]);
}

#[test]
fn name_clashes_reject_the_later_route() {
    let mut i = inputs();
    i.routes.insert(key("ai", "zz-dup"), route("l", &["ext"]));
    let r = render(&i).unwrap();
    assert!(r.routes[&key("ai", "zz-dup")].rejected.is_some());
    assert_eq!(r.config.models.len(), 1);
}

#[test]
fn services_render_to_cluster_dns_and_deleted_objects_disappear() {
    let mut i = inputs();
    let mut svc = provider(None);
    svc.url = None;
    svc.service = Some(ServiceTarget {
        name: "vllm-svc".into(),
        port: 8000,
    });
    i.providers.insert(key("ai", "svc"), svc);
    let r = render(&i).unwrap();
    assert!(r
        .config
        .backends
        .iter()
        .any(|b| b.url == "http://vllm-svc.ai.svc:8000"));
    i.routes.clear();
    i.providers.remove(&key("ai", "pods"));
    let r = render(&i).unwrap();
    assert!(r.config.models.is_empty());
    assert!(r
        .config
        .backends
        .iter()
        .all(|b| !b.id.as_str().starts_with("ai/pods")));
}

#[test]
fn a_provider_that_lists_its_models_is_used_only_for_those() {
    let mut i = inputs();
    i.providers.get_mut(&key("ai", "ext")).unwrap().models = vec!["gpt-4o".into()];
    let mut served = route("gpt", &["ext"]);
    served.backends[0].upstream_model = Some("gpt-4o".into());
    i.routes.insert(key("ai", "gpt"), served);
    // Asks `ext` for a model it does not list, and `pods` (no list) for it.
    i.routes
        .insert(key("ai", "mixed"), route("claude", &["ext", "pods"]));
    let r = render(&i).unwrap();
    assert!(r.routes[&key("ai", "gpt")].unserved.is_empty());
    assert_eq!(r.routes[&key("ai", "gpt")].resolved_backends, 1);
    let mixed = &r.routes[&key("ai", "mixed")];
    assert_eq!(mixed.unserved, ["ext: claude"]);
    assert_eq!(mixed.resolved_backends, 2);
    let targets: Vec<&str> = r
        .config
        .models
        .iter()
        .find(|m| m.name == "claude")
        .unwrap()
        .targets
        .iter()
        .map(|t| t.group.as_deref().unwrap())
        .collect();
    // One group target stands for the provider's two pods.
    assert_eq!(targets, ["ai/pods"]);
}

#[test]
fn key_limits_are_rendered_as_each_sidecars_share() {
    let mut i = inputs();
    i.limits.insert(
        "team-a".into(),
        KeyLimits {
            requests_per_minute: 600,
            concurrent_requests: 5,
            tokens_per_minute: 0,
        },
    );
    i.sidecars = 2;
    let r = render(&i).unwrap();
    assert_eq!(
        r.config.keys[0].limits,
        Some(KeyLimits {
            requests_per_minute: 300,
            concurrent_requests: 3,
            tokens_per_minute: 0,
        })
    );
    i.sidecars = 0;
    assert_eq!(
        render(&i).unwrap().config.keys[0]
            .limits
            .unwrap()
            .requests_per_minute,
        600
    );
}

#[test]
fn prefix_affinity_renders_with_its_tuning_over_the_defaults() {
    let mut i = inputs();
    let mut r = route("m", &["ext"]);
    r.strategy = Strategy::PrefixAffinity;
    r.prefix_affinity = Some(infergate_crds::PrefixAffinity {
        key_bytes: None,
        load_factor: Some(1.5),
    });
    i.routes.insert(key("ai", "m"), r);
    let r = render(&i).unwrap();
    r.config.validate().unwrap();
    let m = r.config.models.iter().find(|m| m.name == "m").unwrap();
    assert_eq!(m.strategy, config::Strategy::PrefixAffinity);
    assert_eq!(m.prefix.load_factor, 1.5);
    assert_eq!(
        m.prefix.key_bytes,
        config::PrefixAffinity::default().key_bytes
    );
}
