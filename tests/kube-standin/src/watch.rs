//! Reads: list and watch, with label and field selectors. A watch replays
//! the changes after its resourceVersion, or (a streaming list) every
//! current object and then the bookmark that ends the initial events.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::{discovery, ok, Change, Shared, Target};

/// `a`, `a=b`, `a==b`, `a!=b`, `!a`, comma-separated.
fn selected(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
        if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else {
            label(term).is_some()
        }
    })
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Default)]
pub(crate) struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selectors {
    pub(crate) fn of(q: &BTreeMap<String, String>) -> Self {
        Selectors {
            labels: q.get("labelSelector").cloned(),
            fields: q.get("fieldSelector").cloned(),
        }
    }
}

pub(crate) fn in_scope(obj: &Value, ns: &str, sel: &Selectors) -> bool {
    let meta = &obj["metadata"];
    // Only the metadata fields every kind supports.
    let fields = json!({"metadata.name": meta["name"], "metadata.namespace": meta["namespace"]});
    (ns.is_empty() || meta["namespace"] == ns)
        && sel
            .labels
            .as_ref()
            .is_none_or(|s| selected(s, &meta["labels"]))
        && sel.fields.as_ref().is_none_or(|s| selected(s, &fields))
}

pub(crate) fn list(
    state: &Shared,
    t: &Target,
    q: &BTreeMap<String, String>,
    table: bool,
) -> Response {
    let s = state.lock().unwrap();
    let items: Vec<&Value> = s
        .objects
        .iter()
        .filter(|((c, _, _), o)| *c == t.coll && in_scope(o, &t.ns, &Selectors::of(q)))
        .map(|(_, o)| o)
        .collect();
    if table {
        return ok(200, &discovery::table(&s.kinds[&t.coll], &items, s.rv));
    }
    let (group_version, _) = t.coll.rsplit_once('/').unwrap();
    ok(
        200,
        &json!({
            "apiVersion": group_version,
            "kind": format!("{}List", s.kinds[&t.coll].kind),
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        }),
    )
}

pub(crate) fn watch(state: Shared, t: Target, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let sel = Selectors::of(&q);
    let initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let (backlog, rx) = {
        let s = state.lock().unwrap();
        let backlog: Vec<Change> = if initial {
            // A streaming list: every current object, then a bookmark that
            // marks the end of the initial events.
            let (group_version, _) = t.coll.rsplit_once('/').unwrap();
            let mut now: Vec<Change> = s
                .objects
                .iter()
                .filter(|((c, _, _), _)| *c == t.coll)
                .map(|(_, o)| Change {
                    rv: 0,
                    coll: t.coll.clone(),
                    kind: "ADDED",
                    object: o.clone(),
                })
                .collect();
            now.push(Change {
                rv: s.rv,
                coll: t.coll.clone(),
                kind: "BOOKMARK",
                object: json!({
                    "apiVersion": group_version, "kind": s.kinds[&t.coll].kind,
                    "metadata": {"resourceVersion": s.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}},
                }),
            });
            now
        } else {
            s.history.iter().filter(|c| c.rv > from).cloned().collect()
        };
        (backlog, s.changes.subscribe())
    };
    let matches = move |c: &Change| {
        c.coll == t.coll && (c.kind == "BOOKMARK" || in_scope(&c.object, &t.ns, &sel))
    };
    let line = |c: &Change| {
        let mut l = json!({"type": c.kind, "object": c.object}).to_string();
        l.push('\n');
        Ok::<_, Infallible>(Bytes::from(l))
    };
    let last = backlog.last().map_or(from, |c| c.rv);
    let first: Vec<_> = backlog.iter().filter(|c| matches(c)).map(line).collect();
    let rest = futures_util::stream::unfold((rx, last), move |(mut rx, last)| {
        let matches = matches.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.rv > last && matches(&c) => {
                        let rv = c.rv;
                        return Some((line(&c), (rx, rv)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(first), rest);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
