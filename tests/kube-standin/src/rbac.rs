//! Optional RBAC (`--rbac`): who a bearer token is, and whether the stored
//! Roles, ClusterRoles and their bindings allow the request, by the rules
//! of the RBAC authorizer: a rule matches when its apiGroups, resources
//! (`plural` or `plural/status`), verbs and, if set, resourceNames all
//! match; `*` matches anything. Role bindings grant in their namespace
//! only, cluster role bindings everywhere.
//!
//! Who: the `Impersonate-User` header when present (kubectl `--as`, a
//! kubeconfig's `as:`), as the real server does for an admin that may
//! impersonate; otherwise the admin. A bearer token other than `standin` is
//! refused. (kubectl sends no token over plain HTTP, so the admin is
//! whoever reaches the loopback port, as with the testbed's admin token.)

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Key;

pub(crate) const ADMIN_TOKEN: &str = "standin";

pub(crate) enum Identity {
    Admin,
    User(String),
}

pub(crate) fn identify(bearer: Option<&str>, impersonate: Option<&str>) -> Option<Identity> {
    if bearer.is_some_and(|t| t != ADMIN_TOKEN) {
        return None;
    }
    Some(match impersonate {
        Some(user) => Identity::User(user.to_owned()),
        None => Identity::Admin,
    })
}

impl Identity {
    pub(crate) fn user(&self) -> &str {
        match self {
            Identity::Admin => "admin",
            Identity::User(u) => u,
        }
    }
}

/// What is asked: the attributes the RBAC authorizer looks at.
pub(crate) struct Request<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `plural` or `plural/subresource`.
    pub resource: &'a str,
    pub namespace: &'a str,
    pub name: Option<&'a str>,
}

fn strings(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn has(list: &Value, want: &str) -> bool {
    strings(list).any(|s| s == "*" || s == want)
}

fn rule_allows(rule: &Value, req: &Request) -> bool {
    let names = &rule["resourceNames"];
    has(&rule["apiGroups"], req.group)
        && has(&rule["resources"], req.resource)
        && has(&rule["verbs"], req.verb)
        && (strings(names).next().is_none()
            || req.name.is_some_and(|n| strings(names).any(|s| s == n)))
}

fn binds(binding: &Value, who: &Identity) -> bool {
    let Identity::User(user) = who else {
        return false;
    };
    let account = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| match s["kind"].as_str() {
            Some("User") => s["name"] == user.as_str(),
            Some("ServiceAccount") => {
                account.is_some_and(|(ns, name)| s["name"] == name && s["namespace"] == ns)
            }
            _ => false,
        })
}

pub(crate) fn allowed(objects: &BTreeMap<Key, Value>, who: &Identity, req: &Request) -> bool {
    if matches!(who, Identity::Admin) {
        return true;
    }
    const RBAC: &str = "rbac.authorization.k8s.io/v1";
    let get = |res: &str, ns: &str, name: &str| {
        objects.get(&(format!("{RBAC}/{res}"), ns.to_owned(), name.to_owned()))
    };
    let role_rules = |binding: &Value, ns: &str| -> Vec<Value> {
        let role = &binding["roleRef"];
        let name = role["name"].as_str().unwrap_or_default();
        let found = match role["kind"].as_str() {
            Some("ClusterRole") => get("clusterroles", "", name),
            Some("Role") => get("roles", ns, name),
            _ => None,
        };
        found
            .and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    let mut grants = Vec::new();
    for ((coll, ns, _), binding) in objects {
        if !binds(binding, who) {
            continue;
        }
        if coll == &format!("{RBAC}/clusterrolebindings") {
            grants.extend(role_rules(binding, ""));
        } else if coll == &format!("{RBAC}/rolebindings")
            && !req.namespace.is_empty()
            && ns == req.namespace
        {
            grants.extend(role_rules(binding, ns));
        }
    }
    grants.iter().any(|rule| rule_allows(rule, req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(res: &str, ns: &str, name: &str) -> Key {
        (
            format!("rbac.authorization.k8s.io/v1/{res}"),
            ns.into(),
            name.into(),
        )
    }

    #[test]
    fn bindings_grant_their_rules_in_their_scope() {
        let sa = json!([{"kind": "ServiceAccount", "name": "op", "namespace": "sys"}]);
        let objects: BTreeMap<Key, Value> = [
            (
                key("clusterroles", "", "watch"),
                json!({"rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]}),
            ),
            (
                key("clusterrolebindings", "", "watch"),
                json!({"subjects": sa,
                "roleRef": {"kind": "ClusterRole", "name": "watch"}}),
            ),
            (
                key("roles", "sys", "cm"),
                json!({"rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"],
                 "resourceNames": ["mine"]}]}),
            ),
            (
                key("rolebindings", "sys", "cm"),
                json!({"subjects": sa,
                "roleRef": {"kind": "Role", "name": "cm"}}),
            ),
        ]
        .into();
        let op = identify(None, Some("system:serviceaccount:sys:op")).unwrap();
        let ask = |verb, resource, namespace, name| Request {
            verb,
            group: "",
            resource,
            namespace,
            name,
        };
        assert!(allowed(&objects, &op, &ask("watch", "pods", "", None)));
        assert!(allowed(&objects, &op, &ask("list", "pods", "other", None)));
        assert!(!allowed(
            &objects,
            &op,
            &ask("get", "pods", "sys", Some("p"))
        ));
        assert!(allowed(
            &objects,
            &op,
            &ask("patch", "configmaps", "sys", Some("mine"))
        ));
        assert!(!allowed(
            &objects,
            &op,
            &ask("patch", "configmaps", "sys", Some("other"))
        ));
        assert!(!allowed(
            &objects,
            &op,
            &ask("patch", "configmaps", "elsewhere", Some("mine"))
        ));
        let stranger = identify(None, Some("system:serviceaccount:sys:nobody")).unwrap();
        assert!(!allowed(
            &objects,
            &stranger,
            &ask("list", "pods", "", None)
        ));
        assert!(identify(Some("garbage"), None).is_none());
        let admin = identify(Some(ADMIN_TOKEN), None).unwrap();
        assert!(allowed(&objects, &admin, &ask("delete", "x", "y", None)));
    }
}
