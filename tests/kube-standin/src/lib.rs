//! A stand-in Kubernetes API server over real HTTP, for machines where no
//! kube-apiserver can be installed (no package registry reachable from
//! infergate's CI ships one).
//!
//! It implements the part of the API that the operator, kube-rs clients and
//! `kubectl apply --server-side` / `kubectl get` use, with
//! the semantics they rely on: namespaced and cluster-wide list and watch
//! (with resourceVersions and label selectors), create (409 on a clash),
//! replace (409 on a stale resourceVersion, as leader election needs),
//! merge and server-side-apply patches (apply creates), the status
//! subresource (status writes touch only status; spec writes bump
//! `metadata.generation`), delete with a DELETED event, Secret
//! `stringData`, and CRDs that become Established and serve their kind.
//! Discovery and server-side tables (`discovery.rs`) are enough for kubectl;
//! `--rbac` authorizes by the stored RBAC objects (`rbac.rs`).
//! It does not check schemas, CEL rules or field ownership: the real
//! API server does (scripts/test runs the same tests against one where it
//! exists).

mod discovery;
mod rbac;
mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// (group/version/resource, namespace, name); cluster-scoped objects have
/// an empty namespace.
type Key = (String, String, String);

#[derive(Clone)]
struct Change {
    rv: u64,
    coll: String,
    kind: &'static str,
    object: Value,
}

pub(crate) struct Kind {
    kind: String,
    singular: String,
    short_names: Vec<String>,
    namespaced: bool,
    status_subresource: bool,
    /// CRD `additionalPrinterColumns` of this version, for `kubectl get`.
    columns: Vec<Value>,
}

struct State {
    /// Authorize requests by the stored RBAC objects (`--rbac`).
    rbac: bool,
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, so a watch from an older resourceVersion replays.
    history: Vec<Change>,
    kinds: BTreeMap<String, Kind>,
    changes: broadcast::Sender<Change>,
    uid: u64,
}

type Shared = Arc<Mutex<State>>;

fn builtin_kinds() -> BTreeMap<String, Kind> {
    let k = |kind: &str, namespaced| Kind {
        kind: kind.into(),
        singular: kind.to_lowercase(),
        short_names: Vec::new(),
        namespaced,
        status_subresource: false,
        columns: Vec::new(),
    };
    [
        ("v1/namespaces", k("Namespace", false)),
        ("v1/pods", k("Pod", true)),
        ("v1/secrets", k("Secret", true)),
        ("v1/configmaps", k("ConfigMap", true)),
        ("v1/serviceaccounts", k("ServiceAccount", true)),
        ("v1/services", k("Service", true)),
        ("v1/events", k("Event", true)),
        (
            "discovery.k8s.io/v1/endpointslices",
            k("EndpointSlice", true),
        ),
        ("events.k8s.io/v1/events", k("Event", true)),
        ("coordination.k8s.io/v1/leases", k("Lease", true)),
        ("rbac.authorization.k8s.io/v1/roles", k("Role", true)),
        (
            "rbac.authorization.k8s.io/v1/rolebindings",
            k("RoleBinding", true),
        ),
        (
            "rbac.authorization.k8s.io/v1/clusterroles",
            k("ClusterRole", false),
        ),
        (
            "rbac.authorization.k8s.io/v1/clusterrolebindings",
            k("ClusterRoleBinding", false),
        ),
        (
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            k("CustomResourceDefinition", false),
        ),
    ]
    .into_iter()
    .map(|(c, mut k)| {
        // Pods have a status subresource the tests write (as a kubelet would).
        k.status_subresource = c == "v1/pods" || c.ends_with("customresourcedefinitions");
        let short: &[&str] = match c {
            "v1/namespaces" => &["ns"],
            "v1/pods" => &["po"],
            "v1/configmaps" => &["cm"],
            "v1/serviceaccounts" => &["sa"],
            "v1/services" => &["svc"],
            "apiextensions.k8s.io/v1/customresourcedefinitions" => &["crd", "crds"],
            _ => &[],
        };
        k.short_names = short.iter().map(|s| s.to_string()).collect();
        (c.to_owned(), k)
    })
    .collect()
}

/// Serve on `listener` until the runtime ends; with `rbac`, requests are
/// authorized by the RBAC objects stored (see `rbac.rs`).
pub async fn serve(listener: tokio::net::TcpListener, rbac: bool) {
    let (changes, _) = broadcast::channel(16384);
    let state: Shared = Arc::new(Mutex::new(State {
        rbac,
        rv: 1,
        objects: BTreeMap::new(),
        history: Vec::new(),
        kinds: builtin_kinds(),
        changes,
        uid: 0,
    }));
    let app = axum::Router::new().fallback(move |method, uri, headers, body| {
        handle(state.clone(), method, uri, headers, body)
    });
    let _ = axum::serve(listener, app).await;
}

/// Serve on 127.0.0.1:0 on the current runtime; returns the base URL.
pub async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, false));
    url
}

/// A kubeconfig for `url` as the admin (no TLS). With RBAC on, add
/// `as: system:serviceaccount:NS:NAME` under the user to act as that
/// service account.
pub fn kubeconfig(url: &str) -> String {
    let token = rbac::ADMIN_TOKEN;
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {url}\n\
         users:\n- name: tests\n  user:\n    token: {token}\ncontexts:\n- name: standin\n  \
         context: {{cluster: standin, user: tests}}\ncurrent-context: standin\n"
    )
}

struct Target {
    coll: String,
    ns: String,
    name: Option<String>,
    status: bool,
}

fn parse(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (res, name, sub) = match rest {
        [res] => (*res, None, None),
        [res, name] => (*res, Some(name.to_string()), None),
        [res, name, sub] => (*res, Some(name.to_string()), Some(*sub)),
        _ => return None,
    };
    if sub.is_some_and(|s| s != "status") {
        return None;
    }
    Some(Target {
        coll: format!("{gv}/{res}"),
        ns,
        name,
        status: sub.is_some(),
    })
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code});
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    axum::extract::Query::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

/// RFC 7386 JSON merge patch (also used for apply: objects merge, lists
/// are replaced, which is what the operator's full-object applies need).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn without_meta_and_status(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl State {
    fn record(&mut self, coll: &str, kind: &'static str, object: &Value) {
        let change = Change {
            rv: self.rv,
            coll: coll.to_owned(),
            kind,
            object: object.clone(),
        };
        self.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// What every stored object gets from the server.
    fn stamp(&mut self, coll: &str, obj: &mut Value, ns: &str, old: Option<&Value>) {
        let kind = &self.kinds[coll];
        let (group_version, _) = coll.rsplit_once('/').unwrap();
        obj["apiVersion"] = json!(group_version);
        obj["kind"] = json!(kind.kind);
        if kind.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        match old {
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    obj["metadata"][k] = old["metadata"][k].clone();
                }
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let changed = without_meta_and_status(old) != without_meta_and_status(obj);
                obj["metadata"]["generation"] = json!(generation + i64::from(changed));
            }
            None => {
                self.uid += 1;
                obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
                obj["metadata"]["creationTimestamp"] = json!(discovery::now_rfc3339());
                obj["metadata"]["generation"] = json!(1);
            }
        }
        if let Some(data) = obj
            .as_object_mut()
            .and_then(|o| o.remove("stringData"))
            .and_then(|d| d.as_object().cloned())
        {
            use base64::Engine;
            for (k, v) in data {
                obj["data"][&k] = json!(
                    base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""))
                );
            }
        }
        if coll.ends_with("customresourcedefinitions") {
            self.register_crd(obj);
        }
        if coll == "v1/namespaces" {
            obj["status"] = json!({"phase": "Active"});
        }
    }

    fn register_crd(&mut self, crd: &mut Value) {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default();
        let plural = spec["names"]["plural"].as_str().unwrap_or_default();
        let names = &spec["names"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        for v in spec["versions"].as_array().into_iter().flatten() {
            let coll = format!(
                "{group}/{}/{plural}",
                v["name"].as_str().unwrap_or_default()
            );
            self.kinds.insert(
                coll,
                Kind {
                    kind: names["kind"].as_str().unwrap_or_default().into(),
                    singular: names["singular"].as_str().unwrap_or_default().into(),
                    short_names: strings(&names["shortNames"]),
                    namespaced: spec["scope"] == "Namespaced",
                    status_subresource: v["subresources"]["status"].is_object(),
                    columns: v["additionalPrinterColumns"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                },
            );
        }
        crd["status"] = json!({
            "acceptedNames": spec["names"].clone(),
            "storedVersions": spec["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        });
    }
}

/// The API verb a request asks for, as RBAC names it.
fn verb(method: &Method, t: &Target, watching: bool) -> &'static str {
    match (method, &t.name) {
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    }
}

/// The refusal, if any: with RBAC on, 401 for an unknown token, 403
/// (worded as the real API server words it) when no binding allows it.
fn authorize(state: &Shared, verb: &str, headers: &HeaderMap, t: &Target) -> Option<Response> {
    let s = state.lock().unwrap();
    if !s.rbac {
        return None;
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let impersonate = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok());
    let Some(who) = rbac::identify(bearer, impersonate) else {
        return Some(status(401, "Unauthorized", "Unauthorized".into()));
    };
    let (group_version, plural) = t.coll.rsplit_once('/').unwrap();
    let group = group_version.rsplit_once('/').map_or("", |(g, _)| g);
    let resource = if t.status {
        format!("{plural}/status")
    } else {
        plural.to_owned()
    };
    let req = rbac::Request {
        verb,
        group,
        resource: &resource,
        namespace: &t.ns,
        name: t.name.as_deref(),
    };
    if rbac::allowed(&s.objects, &who, &req) {
        return None;
    }
    let scope = if t.ns.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", t.ns)
    };
    let what = match &t.name {
        Some(name) => format!("{plural} \"{name}\""),
        None => plural.to_owned(),
    };
    Some(status(
        403,
        "Forbidden",
        format!(
            "{what} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" \
             in API group \"{group}\" {scope}",
            who.user()
        ),
    ))
}

async fn handle(
    state: Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET {
        if let Some(resp) = discovery::answer(&state.lock().unwrap().kinds, uri.path()) {
            return resp;
        }
    }
    let Some(t) = parse(uri.path()) else {
        return status(404, "NotFound", format!("no route {}", uri.path()));
    };
    let table = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    if !state.lock().unwrap().kinds.contains_key(&t.coll) {
        return status(
            404,
            "NotFound",
            format!("the server could not find {}", t.coll),
        );
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        // Only JSON is served; kubectl sends JSON for apply and patch.
        return status(
            415,
            "UnsupportedMediaType",
            format!("{content_type} is not served here"),
        );
    }
    let apply = content_type.starts_with("application/apply-patch");
    let q = query(&uri);
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if let Some(refused) = authorize(&state, verb(&method, &t, watching), &headers, &t) {
        return refused;
    }
    // An apply that creates is also authorized as `create`, as upstream does.
    if method == Method::PATCH && apply {
        let key = (
            t.coll.clone(),
            t.ns.clone(),
            t.name.clone().unwrap_or_default(),
        );
        let exists = state.lock().unwrap().objects.contains_key(&key);
        if !exists {
            if let Some(refused) = authorize(&state, "create", &headers, &t) {
                return refused;
            }
        }
    }
    let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method, t.name.clone()) {
        (Method::GET, None) if watching => watch::watch(state, t, q),
        (Method::GET, None) => watch::list(&state, &t, &q, table),
        (Method::GET, Some(name)) => {
            let s = state.lock().unwrap();
            match s.objects.get(&(t.coll.clone(), t.ns.clone(), name.clone())) {
                Some(o) if table => ok(200, &discovery::table(&s.kinds[&t.coll], &[o], s.rv)),
                Some(o) => ok(200, o),
                None => status(404, "NotFound", format!("{} \"{name}\" not found", t.coll)),
            }
        }
        (Method::POST, None) => {
            let name = sent["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            write(&state, &t, &name, None, sent, true)
        }
        (Method::PUT, Some(name)) => write(&state, &t, &name, None, sent, false),
        (Method::PATCH, Some(name)) => write(&state, &t, &name, Some(apply), sent, false),
        (Method::DELETE, Some(name)) => {
            let mut s = state.lock().unwrap();
            let key = (t.coll.clone(), t.ns.clone(), name.clone());
            match s.objects.remove(&key) {
                Some(mut o) => {
                    let rv = s.next_rv();
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    s.record(&t.coll, "DELETED", &o);
                    ok(200, &o)
                }
                None => status(404, "NotFound", format!("{} \"{name}\" not found", t.coll)),
            }
        }
        (m, _) => status(405, "MethodNotAllowed", format!("{m} not supported here")),
    }
}

/// Create (`create`), replace (`patch` None) or patch (`Some(apply)`).
fn write(
    state: &Shared,
    t: &Target,
    name: &str,
    patch: Option<bool>,
    sent: Value,
    create: bool,
) -> Response {
    let mut s = state.lock().unwrap();
    let key = (t.coll.clone(), t.ns.clone(), name.to_owned());
    let old = s.objects.get(&key).cloned();
    let status_sub = s.kinds[&t.coll].status_subresource;
    let mut obj = match (&old, patch, create) {
        (Some(_), _, true) => {
            return status(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", t.coll),
            )
        }
        (None, _, true) => sent,
        (None, Some(true), false) if !t.status => sent,
        (None, _, false) => {
            return status(404, "NotFound", format!("{} \"{name}\" not found", t.coll))
        }
        (Some(old), None, false) => {
            let want = sent["metadata"]["resourceVersion"].as_str();
            if want.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
                return status(
                    409,
                    "Conflict",
                    format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified", t.coll),
                );
            }
            sent
        }
        (Some(old), Some(_), false) => {
            let mut o = old.clone();
            merge(&mut o, &sent);
            o
        }
    };
    if obj["metadata"]["name"].is_null() {
        obj["metadata"]["name"] = json!(name);
    }
    if status_sub {
        // Status writes change only status; other writes never change it.
        let base = old.clone().unwrap_or(Value::Null);
        if t.status {
            let new_status = obj["status"].clone();
            obj = base;
            obj["status"] = new_status;
        } else {
            match base.get("status") {
                Some(st) => obj["status"] = st.clone(),
                None => {
                    if let Some(o) = obj.as_object_mut() {
                        if !t.coll.ends_with("customresourcedefinitions") && t.coll != "v1/pods" {
                            o.remove("status");
                        }
                    }
                }
            }
        }
    }
    s.stamp(&t.coll, &mut obj, &t.ns, old.as_ref());
    let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
    s.objects.insert(key, obj.clone());
    s.record(&t.coll, kind, &obj);
    ok(if old.is_some() { 200 } else { 201 }, &obj)
}
