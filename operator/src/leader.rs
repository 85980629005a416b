//! Leader election on a coordination.k8s.io/v1 Lease, the way client-go does
//! it: the holder renews `renewTime`; a candidate takes the Lease over once
//! it has seen the record unchanged for a whole lease duration. Expiry is
//! judged by the candidate's own clock since it last saw a change, never by
//! comparing timestamps written by another machine, so clock skew between
//! replicas cannot make two leaders.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The holder and renew time last seen, and when we saw them change.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` when this
    /// replica holds it afterwards. A lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let held_by_us = holder.as_deref() == Some(self.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let seen_at = self.observed.as_ref().map_or_else(Instant::now, |o| o.2);
        let expired = holder.is_none() || seen_at.elapsed() >= duration;
        if !held_by_us && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if held_by_us {
            LeaseSpec {
                renew_time: Some(now),
                lease_duration_seconds: Some(self.duration.as_secs() as i32),
                ..spec
            }
        } else {
            self.spec(now.clone(), now, transitions + 1)
        });
        // `replace` carries the resourceVersion we read: if another replica
        // wrote in between, the API server refuses with 409 and we lost.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Give the Lease up on shutdown, so the standby takes over at once.
    pub async fn release(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
        .map(drop)
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

fn conflict_is_false(result: kube::Result<Lease>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Until when this replica may write as leader. The leader task moves the
/// instant forward on each renewal: two thirds of a lease duration after the
/// renewal was *sent*, so it runs out before any standby can take over (a
/// standby waits a whole duration after it last saw the record change).
/// Every write checks it, and a pass in flight is cancelled when it runs
/// out or leadership is lost: a deposed leader writes nothing more.
#[derive(Clone, Debug)]
pub struct Fence(watch::Receiver<Option<Instant>>);

/// What the leader task publishes: `Some(until)` while leading.
pub type Term = watch::Sender<Option<Instant>>;

impl Fence {
    pub fn new() -> (Term, Fence) {
        let (tx, rx) = watch::channel(None);
        (tx, Fence(rx))
    }

    /// Leading now, and the term has not run out.
    pub fn leads(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Resolves when this replica must stop writing: the term runs out or
    /// the leader task says leadership is lost. At once if not leading.
    pub async fn lost(&self) {
        let mut rx = self.0.clone();
        loop {
            let until = *rx.borrow_and_update();
            match until {
                Some(until) if Instant::now() < until => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => return,
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
                _ => return,
            }
        }
    }

    /// Resolves when the leader task publishes a term that is (or is not)
    /// current, unlike `leading`. A term that merely runs out publishes
    /// nothing: writes are fenced regardless, and `run` notices on resync.
    pub async fn changed_from(&mut self, leading: bool) {
        let current = |until: &Option<Instant>| until.is_some_and(|u| Instant::now() < u);
        let _ = self.0.wait_for(|until| current(until) != leading).await;
    }
}

/// Keep trying every third of the lease duration and publish the term.
/// A leader that cannot renew stops writing two thirds of a duration after
/// its last successful renewal was sent, before any standby may take over,
/// so two leaders' writes never overlap. When `shutdown` flips, a leader
/// releases the Lease so its standby takes over at once instead of after a
/// lease duration.
pub async fn run(mut lock: LeaseLock, term: Term, mut shutdown: watch::Receiver<bool>) {
    let period = lock.duration / 3;
    let validity = lock.duration * 2 / 3;
    loop {
        let was = term.borrow().is_some();
        let sent = Instant::now();
        let holds = match lock.try_acquire_or_renew().await {
            Ok(true) => {
                term.send_replace(Some(sent + validity));
                true
            }
            Ok(false) => {
                term.send_replace(None);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %lock.name, "lease round failed");
                // The current term, if any, runs out by itself.
                term.borrow().is_some_and(|until| Instant::now() < until)
            }
        };
        if !holds && term.borrow().is_some() {
            term.send_replace(None);
        }
        if was != holds {
            tracing::info!(identity = %lock.identity, leading = holds, "leadership changed");
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                term.send_replace(None);
                if holds {
                    if let Err(e) = lock.release().await {
                        tracing::warn!(error = %e, "could not release the lease");
                    }
                }
                return;
            }
        }
    }
}
