//! The schema as users write it: parsing, references, the version.
use crate::*;

const EXAMPLE: &str = r#"
keys:
  - id: team-a
    sha256: "0000000000000000000000000000000000000000000000000000000000000001"
    models: [llama]
backends:
  - id: sim-0
    url: http://127.0.0.1:8000
models:
  - name: llama-3
    aliases: [llama]
    targets:
      - backend: sim-0
        upstreamModel: meta-llama/Llama-3
"#;

#[test]
fn parses_yaml_with_defaults() {
    let cfg = GatewayConfig::from_yaml(EXAMPLE).unwrap();
    assert_eq!(cfg.models[0].targets[0].weight, 1);
    assert_eq!(cfg.models[0].strategy, Strategy::RoundRobin);
    assert!(cfg.backends[0].attestation);
    assert_eq!(cfg.timeouts.idle_ms, 30_000);
}

#[test]
fn version_is_stable_and_ignores_stated_version() {
    let a = GatewayConfig::from_yaml(EXAMPLE).unwrap();
    let mut b = a.clone();
    b.version = Some("whatever".into());
    assert_eq!(a.computed_version(), b.computed_version());
    assert_eq!(a.computed_version().len(), 64);
    let mut c = a.clone();
    c.models[0].aliases.push("other".into());
    assert_ne!(a.computed_version(), c.computed_version());
}

#[test]
fn rejects_dangling_and_duplicate_references() {
    let dangling = EXAMPLE.replace("backend: sim-0", "backend: nope");
    let err = GatewayConfig::from_yaml(&dangling).unwrap_err();
    assert!(err.to_string().contains("\"nope\" is not defined"), "{err}");

    let unknown_model = EXAMPLE.replace("models: [llama]", "models: [gpt]");
    assert!(GatewayConfig::from_yaml(&unknown_model).is_err());

    let dup_alias = EXAMPLE.replace("aliases: [llama]", "aliases: [llama-3]");
    assert!(GatewayConfig::from_yaml(&dup_alias).is_err());

    let unknown_field = EXAMPLE.replace("aliases:", "alias:");
    assert!(matches!(
        GatewayConfig::from_yaml(&unknown_field),
        Err(ConfigError::Parse(_))
    ));
}

#[test]
fn canonical_json_sorts_keys() {
    let v: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"d":2,"c":[3]}}"#).unwrap();
    assert_eq!(canonical_json(&v), r#"{"a":{"c":[3],"d":2},"b":1}"#);
}
