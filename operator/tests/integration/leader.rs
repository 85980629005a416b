//! Lease election rules against an in-process fake of the Lease API that
//! keeps resourceVersions and refuses stale writes with 409, as the API
//! server does. Time is tokio's paused clock, so expiry is exact and fast.
//! tests/failover.rs shows the same with real processes and a real API
//! server.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use infergate_operator::leader::{self, Fence, LeaseLock};
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{json, Value};

#[derive(Default)]
struct Stored {
    lease: Option<Value>,
    version: u64,
    /// Answer the next write with 409, as when another replica wrote first.
    conflict_next_write: bool,
    /// Answer everything with 503, as an API server this replica cannot reach.
    unreachable: bool,
}

fn reply(code: u16, body: Value) -> Result<Response<Body>, Infallible> {
    Ok(Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap())
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code})
}

fn fake_lease_api() -> (Client, Arc<Mutex<Stored>>) {
    let stored: Arc<Mutex<Stored>> = Arc::default();
    let state = stored.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let state = state.clone();
        async move {
            let method = req.method().clone();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let mut s = state.lock().unwrap();
            let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if s.unreachable {
                return reply(503, status(503, "ServiceUnavailable"));
            }
            if method != "GET" && std::mem::take(&mut s.conflict_next_write) {
                return reply(409, status(409, "Conflict"));
            }
            match (method.as_str(), s.lease.clone()) {
                ("GET", None) => reply(404, status(404, "NotFound")),
                ("GET", Some(l)) => reply(200, l),
                ("POST", Some(_)) => reply(409, status(409, "AlreadyExists")),
                ("PUT", Some(l))
                    if sent["metadata"]["resourceVersion"] != l["metadata"]["resourceVersion"] =>
                {
                    reply(409, status(409, "Conflict"))
                }
                ("POST", None) | ("PUT", Some(_)) => {
                    s.version += 1;
                    let mut l = sent;
                    l["metadata"]["resourceVersion"] = json!(s.version.to_string());
                    s.lease = Some(l.clone());
                    reply(200, l)
                }
                _ => reply(405, status(405, "MethodNotAllowed")),
            }
        }
    });
    (Client::new(service, "ops"), stored)
}

fn holder(stored: &Mutex<Stored>) -> Option<String> {
    stored.lock().unwrap().lease.as_ref()?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn one_holder_at_a_time_takeover_only_after_expiry_and_at_once_after_release() {
    let (client, stored) = fake_lease_api();
    let api: Api<Lease> = Api::namespaced(client, "ops");
    let duration = Duration::from_secs(3);
    let mut a = LeaseLock::new(api.clone(), "op", "a", duration);
    let mut b = LeaseLock::new(api, "op", "b", duration);

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a creates the Lease"
    );
    assert!(!b.try_acquire_or_renew().await.unwrap());
    // While a renews, b never takes over, however long it waits.
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
    }
    assert_eq!(holder(&stored).as_deref(), Some("a"));

    // a stops renewing: b waits one full duration from when it last saw a
    // change, then takes over and counts a transition.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!b.try_acquire_or_renew().await.unwrap(), "not expired yet");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "expired: b takes over"
    );
    assert_eq!(holder(&stored).as_deref(), Some("b"));
    let transitions = |s: &Mutex<Stored>| {
        s.lock().unwrap().lease.as_ref().unwrap()["spec"]["leaseTransitions"].clone()
    };
    assert_eq!(transitions(&stored), 1);
    // The old leader, back, sees it lost.
    assert!(!a.try_acquire_or_renew().await.unwrap());

    // b releases on shutdown: a takes over without waiting.
    b.release().await.unwrap();
    assert_eq!(holder(&stored), None);
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&stored).as_deref(), Some("a"));
    assert_eq!(transitions(&stored), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lost_race_is_not_an_error() {
    let (client, stored) = fake_lease_api();
    let api: Api<Lease> = Api::namespaced(client, "ops");
    let mut a = LeaseLock::new(api.clone(), "op", "a", Duration::from_secs(3));
    let mut b = LeaseLock::new(api, "op", "b", Duration::from_secs(3));
    stored.lock().unwrap().conflict_next_write = true;
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "lost the create race"
    );
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    tokio::time::advance(Duration::from_secs(3)).await;
    stored.lock().unwrap().conflict_next_write = true;
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "lost the takeover race"
    );
    assert_eq!(holder(&stored).as_deref(), Some("a"));
}

#[tokio::test(start_paused = true)]
async fn the_term_ends_before_a_standby_may_take_over_and_at_once_when_the_lease_is_taken() {
    let (client, stored) = fake_lease_api();
    let api: Api<Lease> = Api::namespaced(client, "ops");
    let duration = Duration::from_secs(3);
    let (term, fence) = Fence::new();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let start = tokio::time::Instant::now();
    tokio::spawn(leader::run(
        LeaseLock::new(api.clone(), "op", "a", duration),
        term,
        shutdown,
    ));
    fence.clone().changed_from(false).await;
    assert!(fence.leads());
    let mut b = LeaseLock::new(api, "op", "b", duration);
    assert!(!b.try_acquire_or_renew().await.unwrap());

    // a can no longer reach the API after its first renewal: its term runs
    // out two thirds of a duration after that renewal was sent, a third of
    // a duration before b may take over.
    stored.lock().unwrap().unreachable = true;
    tokio::time::sleep_until(start + Duration::from_millis(1990)).await;
    assert!(fence.leads());
    tokio::time::sleep_until(start + Duration::from_millis(2010)).await;
    assert!(!fence.leads(), "term still open after 2/3 of the lease");
    tokio::time::timeout(Duration::from_millis(1), fence.lost())
        .await
        .expect("lost() resolves once the term ran out");
    stored.lock().unwrap().unreachable = false;
    tokio::time::sleep_until(start + Duration::from_millis(3100)).await;
    // a renews again at its next round (b has not taken over): a new term.
    assert!(fence.leads());

    // Now b takes the Lease (a stalled past the duration as far as b can
    // tell): a sees it at its next round and its term ends there.
    tokio::time::advance(Duration::from_secs(3)).await;
    {
        let mut s = stored.lock().unwrap();
        let lease = s.lease.as_mut().unwrap();
        lease["spec"]["holderIdentity"] = json!("b");
        lease["spec"]["renewTime"] = json!("2030-01-01T00:00:00.000000Z");
    }
    tokio::time::timeout(Duration::from_millis(1100), fence.lost())
        .await
        .expect("the term ends within a renewal period of the takeover");
    assert!(!fence.leads());
}
