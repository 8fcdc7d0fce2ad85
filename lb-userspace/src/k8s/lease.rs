//! One holder at a time, by a `coordination.k8s.io/v1` Lease: the election that the L2
//! announcement (one node per VIP address) and the address allocator (one agent in the
//! cluster) both use.
//!
//! Compare-and-swap on the Lease's resourceVersion: of two agents writing the same version, the
//! API server accepts one and answers 409 to the other. A lease is free when it has no holder
//! (released on SIGTERM) or when its record has not changed for its duration by this agent's
//! own clock (as client-go's leader election judges it, so clock skew between nodes does not
//! matter).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use log::info;

/// The outcome of one attempt on one lease.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Held,
    NotHeld,
}

/// Elections on the Leases of one namespace, as one holder.
pub struct Elector {
    api: Api<Lease>,
    holder: String,
    duration: Duration,
    /// Lease name -> (resourceVersion last seen, when it was first seen by our clock).
    observed: BTreeMap<String, (Option<String>, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, holder: String, duration: Duration) -> Elector {
        Elector {
            api,
            holder,
            duration,
            observed: BTreeMap::new(),
        }
    }

    /// Acquires or renews lease `name`; `what` names it in the log.
    pub async fn attempt(&mut self, name: &str, what: &str) -> Result<Attempt, kube::Error> {
        let me = self.holder.clone();
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_owned(),
                        "sluice".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration.as_secs() as i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_loss(self.api.create(&PostParams::default(), &lease).await);
        };
        let version = lease.metadata.resource_version.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(me.as_str()) {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            // When did the record last change, by our clock?
            let seen = self
                .observed
                .entry(name.to_owned())
                .or_insert((version.clone(), Instant::now()));
            if seen.0 != version {
                *seen = (version.clone(), Instant::now());
            }
            let expired = seen.1.elapsed() >= duration;
            if holder.is_some() && !expired {
                return Ok(Attempt::NotHeld);
            }
            if let Some(old) = &holder {
                info!(
                    "{what}: lease {name} of {old} expired ({duration:?} without renewal): taking over"
                );
            }
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        // resourceVersion is kept: the write succeeds only if nobody wrote in between.
        conflict_is_loss(self.api.replace(name, &PostParams::default(), &lease).await)
    }

    /// Clears this holder from lease `name` (when it still holds it).
    pub async fn release(&mut self, name: &str) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        self.api
            .replace(name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    /// Forgets what it observed of leases it no longer contends for.
    pub fn forget_except(&mut self, keep: impl Fn(&str) -> bool) {
        self.observed.retain(|name, _| keep(name));
    }
}

/// A write that lost the compare-and-swap (409: changed or created by another holder) is a
/// lost election, not an error.
fn conflict_is_loss(result: Result<Lease, kube::Error>) -> Result<Attempt, kube::Error> {
    match result {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::NotHeld),
        Err(e) => Err(e),
    }
}
