//! What kubectl needs besides objects: legacy discovery (`/api`, `/apis`,
//! resource lists per group version), `/version`, and server-side tables
//! for `kubectl get` (CRD printer columns, evaluated with the small
//! JSONPath subset they use).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::Kind;

fn ok(body: Value) -> Option<Response> {
    Some(
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response(),
    )
}

/// Group versions served, as `"v1"` or `"group/version"`.
fn group_versions(kinds: &BTreeMap<String, Kind>) -> Vec<String> {
    let mut gvs: Vec<String> = kinds
        .keys()
        .map(|c| c.rsplit_once('/').unwrap().0.to_owned())
        .collect();
    gvs.dedup();
    gvs
}

pub(crate) fn answer(kinds: &BTreeMap<String, Kind>, path: &str) -> Option<Response> {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => ok(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-standin",
            "platform": "linux/amd64",
        })),
        "/api" => ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        })),
        "/apis" => {
            let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for gv in group_versions(kinds) {
                if let Some((g, v)) = gv.split_once('/') {
                    groups.entry(g.to_owned()).or_default().push(v.to_owned());
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        _ => {
            let gv = path
                .strip_prefix("/api/")
                .or_else(|| path.strip_prefix("/apis/"))?;
            if !group_versions(kinds).iter().any(|g| g == gv) {
                return None;
            }
            let mut resources = Vec::new();
            for (coll, k) in kinds {
                let (g, plural) = coll.rsplit_once('/').unwrap();
                if g != gv {
                    continue;
                }
                resources.push(json!({
                    "name": plural, "singularName": k.singular, "namespaced": k.namespaced,
                    "kind": k.kind, "shortNames": k.short_names,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }));
                if k.status_subresource {
                    resources.push(json!({
                        "name": format!("{plural}/status"), "singularName": "",
                        "namespaced": k.namespaced, "kind": k.kind,
                        "verbs": ["get", "patch", "update"],
                    }));
                }
            }
            ok(json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": gv, "resources": resources,
            }))
        }
    }
}

/// A `meta.k8s.io/v1` Table of `items`: the name, the kind's printer
/// columns, and the objects themselves.
pub(crate) fn table(kind: &Kind, items: &[&Value], rv: u64) -> Value {
    let mut defs = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "", "priority": 0})];
    defs.extend(kind.columns.iter().map(|c| {
        json!({"name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
            "description": c["description"].as_str().unwrap_or(""),
            "priority": c["priority"].as_i64().unwrap_or(0)})
    }));
    if kind.columns.is_empty() {
        defs.push(
            json!({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0}),
        );
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            if kind.columns.is_empty() {
                cells.push(json!(age(&o["metadata"]["creationTimestamp"])));
            }
            for c in &kind.columns {
                let v = lookup(o, c["jsonPath"].as_str().unwrap_or(""));
                cells.push(match (c["type"].as_str(), v) {
                    (Some("date"), Some(t)) => json!(age(&t)),
                    (_, Some(v)) => v,
                    (_, None) => Value::Null,
                });
            }
            json!({"cells": cells, "object": o})
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": defs, "rows": rows,
    })
}

/// `.a.b`, `.a[0].b` and `.a[?(@.k=="v")].b`.
fn lookup(obj: &Value, path: &str) -> Option<Value> {
    let mut cur = obj.clone();
    let mut rest = path.strip_prefix('.')?;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        if !field.is_empty() {
            cur = cur.get(field)?.clone();
        }
        rest = tail;
        if let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']')?;
            let (sel, tail) = inner.split_at(close);
            rest = &tail[1..];
            cur = if let Some(filter) = sel.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = filter.split_once("==")?;
                let v = v.trim_matches(['"', '\'']);
                cur.as_array()?
                    .iter()
                    .find(|e| e.get(k).and_then(Value::as_str) == Some(v))?
                    .clone()
            } else {
                cur.get(sel.parse::<usize>().ok()?)?.clone()
            };
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(cur)
}

fn age(ts: &Value) -> String {
    let Some(then) = ts.as_str().and_then(parse_rfc3339) else {
        return "<unknown>".into();
    };
    let secs = now_secs().saturating_sub(then);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn parse_rfc3339(s: &str) -> Option<u64> {
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let days = days_from_civil(n(0, 4)?, n(5, 7)?, n(8, 10)?);
    let secs = days * 86_400 + n(11, 13)? * 3600 + n(14, 16)? * 60 + n(17, 19)?;
    u64::try_from(secs).ok()
}

pub(crate) fn now_rfc3339() -> String {
    let secs = i64::try_from(now_secs()).unwrap_or_default();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_civil_dates() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-25T07:15:33Z"), Some(1_795_590_933));
        let now = now_rfc3339();
        assert_eq!(parse_rfc3339(&now).unwrap().abs_diff(now_secs()), 0);
    }

    #[test]
    fn printer_column_paths() {
        let o = json!({"status": {"conditions": [
            {"type": "Accepted", "status": "True"}, {"type": "Programmed", "status": "False"}]}});
        let p = r#".status.conditions[?(@.type=="Programmed")].status"#;
        assert_eq!(lookup(&o, p), Some(json!("False")));
        assert_eq!(
            lookup(&o, ".status.conditions[0].type"),
            Some(json!("Accepted"))
        );
        assert_eq!(lookup(&o, ".spec.model"), None);
    }
}
