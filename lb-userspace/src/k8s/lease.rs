//! One holder at a time, by a `coordination.k8s.io/v1` Lease: the election that the L2
//! announcement (one node per VIP address) and the address allocator (one agent in the
//! cluster) both use.
//!
//! Compare-and-swap on the Lease's resourceVersion: of two agents writing the same version, the
//! API server accepts one and answers 409 to the other. A lease is free when it has no holder
//! (released on SIGTERM) or when its record has not changed for its duration by this agent's
//! own clock (as client-go's leader election judges it, so clock skew between nodes does not
//! matter).
//!
//! The allocator reads its one Lease with a GET per attempt ([`Elector::attempt`]); the
//! announcer reads them all from one watch and passes what its cache holds
//! ([`Elector::attempt_with`], [`Elector::standing`]), so that it only writes.

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

/// What a lease is to this holder, by its own clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// This holder's (as last written or seen).
    Mine,
    /// Another holder's, renewed within its duration.
    Held(String),
    /// Nobody's: absent, released, or expired; free since `since` (by this agent's clock).
    Vacant { since: Instant },
}

/// Elections on the Leases of one namespace, as one holder.
pub struct Elector {
    api: Api<Lease>,
    holder: String,
    duration: Duration,
    labels: BTreeMap<String, String>,
    /// Lease name -> (resourceVersion last seen, when it was first seen by our clock).
    observed: BTreeMap<String, (Option<String>, Instant)>,
    /// Lease name -> (the resourceVersion our last write replaced, what it wrote): a watch
    /// cache that still shows the replaced version is behind our own write. Also (None, what a
    /// GET found) for a Lease the watch does not show.
    written: BTreeMap<String, (Option<String>, Lease)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, holder: String, duration: Duration) -> Elector {
        Elector {
            api,
            holder,
            duration,
            labels: BTreeMap::from([("app.kubernetes.io/name".to_owned(), "sluice".to_owned())]),
            observed: BTreeMap::new(),
            written: BTreeMap::new(),
        }
    }

    /// Also puts label `key=value` on every Lease it writes (what a watch selects them by).
    pub fn with_label(mut self, key: &str, value: &str) -> Elector {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Acquires or renews lease `name` as the API server has it now (one GET); `what` names it
    /// in the log.
    pub async fn attempt(&mut self, name: &str, what: &str) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(name).await?;
        self.attempt_with(name, what, current.as_ref()).await
    }

    /// Acquires or renews lease `name`, `cached` being what a watch holds of it: writes when it
    /// is this holder's or vacant, and never reads.
    pub async fn attempt_with(
        &mut self,
        name: &str,
        what: &str,
        cached: Option<&Lease>,
    ) -> Result<Attempt, kube::Error> {
        let current = self.current(name, cached);
        match self.judge(name, current.as_ref()) {
            Standing::Held(_) => return Ok(Attempt::NotHeld),
            Standing::Mine | Standing::Vacant { .. } => {}
        }
        let Some(lease) = current else {
            match self.write(name, None, self.fresh_lease(name)).await {
                // Created meanwhile, or a Lease the watch does not select (written before it
                // carried the label): judge what the API server holds.
                Ok(Attempt::NotHeld) => {
                    let Some(lease) = self.api.get_opt(name).await? else {
                        return Ok(Attempt::NotHeld);
                    };
                    // Kept as if written: the watch may never show it (an older agent holds
                    // it unlabelled), and it is judged by its record until then, not fetched
                    // again every round.
                    self.written.insert(name.to_owned(), (None, lease.clone()));
                    if let Standing::Held(_) = self.judge(name, Some(&lease)) {
                        return Ok(Attempt::NotHeld);
                    }
                    return self.renew_or_take(name, what, lease).await;
                }
                other => return other,
            }
        };
        self.renew_or_take(name, what, lease).await
    }

    /// What lease `name` is to this holder, `cached` being what a watch holds of it.
    pub fn standing(&mut self, name: &str, cached: Option<&Lease>) -> Standing {
        let current = self.current(name, cached);
        self.judge(name, current.as_ref())
    }

    /// Clears this holder from lease `name` as the API server has it now (one GET).
    pub async fn release(&mut self, name: &str) -> Result<(), kube::Error> {
        let current = self.api.get_opt(name).await?;
        self.release_with(name, current.as_ref()).await
    }

    /// Clears this holder from lease `name` (when it still holds it), `cached` being what a
    /// watch holds of it.
    pub async fn release_with(
        &mut self,
        name: &str,
        cached: Option<&Lease>,
    ) -> Result<(), kube::Error> {
        let Some(mut lease) = self.current(name, cached) else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        let replaced = lease.metadata.resource_version.clone();
        let result = self.api.replace(name, &PostParams::default(), &lease).await;
        self.written.remove(name);
        if let Ok(written) = &result {
            self.written
                .insert(name.to_owned(), (replaced, written.clone()));
        }
        result.map(drop)
    }

    /// Forgets what it observed of leases it no longer contends for.
    pub fn forget_except(&mut self, keep: impl Fn(&str) -> bool) {
        self.observed.retain(|name, _| keep(name));
        self.written.retain(|name, _| keep(name));
    }

    /// The fresher of the watch's copy and this holder's own last write.
    fn current(&self, name: &str, cached: Option<&Lease>) -> Option<Lease> {
        let Some((replaced, mine)) = self.written.get(name) else {
            return cached.cloned();
        };
        match cached {
            // The cache has not seen our write yet.
            None if replaced.is_none() => Some(mine.clone()),
            Some(c) if c.metadata.resource_version == *replaced => Some(mine.clone()),
            // Deleted, or written by someone after us: the cache is newer.
            other => other.cloned(),
        }
    }

    fn judge(&mut self, name: &str, lease: Option<&Lease>) -> Standing {
        let spec = lease.and_then(|l| l.spec.as_ref());
        let holder = spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.holder.as_str()) {
            return Standing::Mine;
        }
        let version = lease.and_then(|l| l.metadata.resource_version.clone());
        // When did the record last change, by our clock?
        let seen = self
            .observed
            .entry(name.to_owned())
            .or_insert((version.clone(), Instant::now()));
        if seen.0 != version {
            *seen = (version, Instant::now());
        }
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        match holder {
            None => Standing::Vacant { since: seen.1 },
            Some(h) if seen.1.elapsed() < duration => Standing::Held(h),
            Some(_) => Standing::Vacant {
                since: seen.1 + duration,
            },
        }
    }

    /// A new Lease held by this holder.
    fn fresh_lease(&self, name: &str) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(self.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.holder.clone()),
                lease_duration_seconds: Some(self.duration.as_secs() as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Renews `lease` when it is this holder's, takes it when it is vacant.
    async fn renew_or_take(
        &mut self,
        name: &str,
        what: &str,
        mut lease: Lease,
    ) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.holder.clone();
        let labels = lease.metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.extend(self.labels.clone());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(me.as_str()) {
            if let Some(old) = &holder {
                info!(
                    "{what}: lease {name} of {old} expired ({:?} without renewal): taking over",
                    spec.lease_duration_seconds
                        .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64))
                );
            }
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        // resourceVersion is kept: the write succeeds only if nobody wrote in between.
        let replaced = lease.metadata.resource_version.clone();
        self.write(name, replaced, lease).await
    }

    /// Creates (`replaced` None and no resourceVersion) or replaces lease `name`; remembers
    /// what it wrote.
    async fn write(
        &mut self,
        name: &str,
        replaced: Option<String>,
        lease: Lease,
    ) -> Result<Attempt, kube::Error> {
        let result = if lease.metadata.resource_version.is_none() {
            self.api.create(&PostParams::default(), &lease).await
        } else {
            self.api.replace(name, &PostParams::default(), &lease).await
        };
        self.written.remove(name);
        if let Ok(written) = &result {
            self.written
                .insert(name.to_owned(), (replaced, written.clone()));
        }
        conflict_is_loss(result)
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
