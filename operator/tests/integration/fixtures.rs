//! Test objects, built in one place: each takes what a test varies and
//! fills in the rest.

use serde_json::{json, Value};

const API_VERSION: &str = "infergate.dev/v1alpha1";

pub fn provider(name: &str, spec: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "InferenceProvider",
        "metadata": {"name": name}, "spec": spec})
}

pub fn route(name: &str, spec: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "ModelRoute",
        "metadata": {"name": name}, "spec": spec})
}

/// A Secret the operator takes as an API key.
pub fn api_key_secret(name: &str, key: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"infergate.dev/api-key": "true"}},
        "stringData": {"key": key},
    })
}

/// `obj` as a watch cache holds it: in namespace `ns`, generation 1, with a
/// resourceVersion and a uid.
pub fn stored(mut obj: Value, ns: &str) -> Value {
    let name = obj["metadata"]["name"].as_str().unwrap_or("x").to_owned();
    let meta = &mut obj["metadata"];
    meta["namespace"] = json!(ns);
    meta["generation"] = json!(1);
    meta["resourceVersion"] = json!("1");
    meta["uid"] = json!(format!("u-{name}"));
    obj
}
