//! The address allocator: on one agent at a time (the holder of the `sluice-allocator` Lease),
//! it writes the allocation (`ipam`) into the Services' `status.loadBalancer.ingress`, posts
//! Events on them (allocated, refused and why), and marks each IPAddressPool valid or not.
//!
//! It keeps no state that matters: every pass lists the Services afresh (a consistent read, not
//! the watch cache, so that a new holder sees what the previous one wrote just before it died),
//! computes the allocation from their status, and writes only the differences, each with the
//! Service's resourceVersion as a precondition (a Service changed meanwhile is left to the next
//! pass). A holder that could not renew its Lease for most of its duration stops writing before
//! anyone else may take over, so two allocators never write in the same period.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource as _};
use log::{debug, info, warn};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::crd_watch::WhenInstalled;
use super::lease::{Attempt, Elector};
use super::pools::{ClassPolicy, IPAddressPool, PoolCondition, claim, pool_spec};
use crate::ipam::{self, Claim, Notice, Pools};

/// The allocator's Lease, in the agents' namespace.
pub const LEASE_NAME: &str = "sluice-allocator";
/// How long the Lease lasts without renewal: a new holder takes over within it.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// Renewal (and a pass when nothing changed).
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A holder writes only this long after its last successful renewal (well inside the lease).
const WRITE_WINDOW: Duration = Duration::from_secs(6);
/// The reporting controller of the Events.
const CONTROLLER: &str = "sluice.io/allocator";

/// What the allocator needs.
#[derive(Clone, Debug)]
pub struct AllocatorConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// This agent's identity (its node's name).
    pub node_name: String,
    pub class: ClassPolicy,
}

/// Runs the election and, while holding it, the allocation passes, until `stop`.
pub async fn run(
    client: Client,
    config: AllocatorConfig,
    pools: WhenInstalled<Store<IPAddressPool>>,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    // No pool resource, nothing to allocate: no election until it is installed.
    let pools = tokio::select! {
        pools = pools.installed() => match pools {
            Some(pools) => pools,
            None => return,
        },
        _ = stop.changed() => return,
    };
    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &config.namespace),
        config.node_name.clone(),
        LEASE_DURATION,
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER.into(),
            instance: Some(config.node_name.clone()),
        },
    );
    let mut a = Allocator {
        client,
        class: config.class,
        recorder,
        renewed: None,
        posted: BTreeSet::new(),
        pool_conditions: BTreeMap::new(),
    };
    let mut holding = false;
    loop {
        match elector.attempt(LEASE_NAME, "address allocator").await {
            Ok(Attempt::Held) => {
                a.renewed = Some(Instant::now());
                if !holding {
                    info!(
                        "address allocator: {} holds lease {}/{LEASE_NAME}: assigning pool addresses",
                        config.node_name, config.namespace
                    );
                    holding = true;
                }
            }
            Ok(Attempt::NotHeld) => {
                if holding {
                    info!("address allocator: lease {LEASE_NAME} lost: no longer assigning");
                }
                holding = false;
                a.renewed = None;
                a.posted.clear();
                a.pool_conditions.clear();
            }
            Err(e) => warn!("address allocator: lease {LEASE_NAME}: {e} (retrying)"),
        }
        if a.may_write()
            && let Err(e) = a.pass(&pools.state()).await
        {
            warn!("address allocator: {e:#} (retrying)");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = changed.notified() => {
                // Coalesce a burst of Service creations into one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    if holding && let Err(e) = elector.release(LEASE_NAME).await {
        warn!("address allocator: releasing lease {LEASE_NAME}: {e} (it expires by itself)");
    }
}

struct Allocator {
    client: Client,
    class: ClassPolicy,
    recorder: Recorder,
    /// When the lease was last renewed by this agent (None: not held).
    renewed: Option<Instant>,
    /// Notices already posted while holding (the Recorder also folds repeats into a series).
    posted: BTreeSet<Notice>,
    /// Pool name -> the condition last written.
    pool_conditions: BTreeMap<String, PoolCondition>,
}

impl Allocator {
    fn may_write(&self) -> bool {
        self.renewed.is_some_and(|t| t.elapsed() < WRITE_WINDOW)
    }

    /// One pass: a fresh list, the allocation, the differences written.
    async fn pass(&mut self, pool_objects: &[Arc<IPAddressPool>]) -> anyhow::Result<()> {
        if pool_objects.is_empty() {
            // No pool: sluice owns no address, and the status is another controller's.
            return Ok(());
        }
        let pools = Pools::validate(pool_objects.iter().map(|p| pool_spec(p)).collect());
        self.write_pool_conditions(pool_objects, &pools).await;
        let api: Api<Service> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await?;
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut claims: Vec<Claim> = Vec::new();
        for svc in list.items {
            if !self.class.owns(&svc) {
                continue;
            }
            match claim(&svc) {
                Ok(c) => {
                    services.insert(c.key.clone(), svc);
                    claims.push(c);
                }
                Err(e) => {
                    let key = format!(
                        "{}/{}",
                        svc.metadata.namespace.as_deref().unwrap_or_default(),
                        svc.metadata.name.as_deref().unwrap_or_default()
                    );
                    self.post(
                        &svc,
                        Notice {
                            service: key,
                            warning: true,
                            reason: "AllocationFailed",
                            message: e,
                        },
                    )
                    .await;
                }
            }
        }
        let allocation = ipam::allocate(&pools, &claims);
        for c in &claims {
            let Some(svc) = services.get(&c.key) else {
                continue;
            };
            let want: Vec<IpAddr> = if c.load_balancer {
                allocation
                    .addresses
                    .get(&c.key)
                    .cloned()
                    .unwrap_or_default()
            } else if !c.current.is_empty() && c.current.iter().all(|a| pools.pool_of(*a).is_some())
            {
                // No longer a LoadBalancer: its pool addresses are freed.
                Vec::new()
            } else {
                continue;
            };
            if sorted(&want) == sorted(&c.current) {
                continue;
            }
            if !self.may_write() {
                return Ok(());
            }
            self.write_status(svc, &want).await;
        }
        for n in allocation.notices {
            if let Some(svc) = services.get(&n.service) {
                self.post(svc, n).await;
            }
        }
        Ok(())
    }

    async fn write_status(&self, svc: &Service, addrs: &[IpAddr]) {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ingress: Vec<_> = addrs.iter().map(|a| json!({"ip": a.to_string()})).collect();
        // The resourceVersion makes the write conditional: a Service changed since the list
        // (by a user, or another holder) is answered 409 and left to the next pass.
        let patch = json!({
            "metadata": {"resourceVersion": svc.metadata.resource_version},
            "status": {"loadBalancer": {"ingress": ingress}},
        });
        let api: Api<Service> = Api::namespaced(self.client.clone(), &ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
                info!(
                    "address allocator: service {ns}/{name}: status.loadBalancer.ingress = [{}]",
                    list.join(", ")
                );
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!("address allocator: service {ns}/{name} changed meanwhile: next pass");
            }
            Err(e) => warn!("address allocator: writing the status of service {ns}/{name}: {e}"),
        }
    }

    async fn post(&mut self, svc: &Service, n: Notice) {
        if self.posted.contains(&n) || !self.may_write() {
            return;
        }
        let event = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.into(),
            note: Some(n.message.clone()),
            action: "Allocate".into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &svc.object_ref(&())).await {
            Ok(()) => {
                if n.warning {
                    warn!("address allocator: service {}: {}", n.service, n.message);
                }
                self.posted.insert(n);
            }
            Err(e) => warn!(
                "address allocator: posting an Event on service {}: {e}",
                n.service
            ),
        }
    }

    /// `status.conditions` of each pool: Valid True, or False with the reason.
    async fn write_pool_conditions(&mut self, objects: &[Arc<IPAddressPool>], pools: &Pools) {
        let api: Api<IPAddressPool> = Api::all(self.client.clone());
        for p in objects {
            let name = p.metadata.name.clone().unwrap_or_default();
            let cond = match pools.invalid.get(&name) {
                None => PoolCondition {
                    type_: "Valid".into(),
                    status: "True".into(),
                    reason: "Valid".into(),
                    message: "in use".into(),
                },
                Some(why) => PoolCondition {
                    type_: "Valid".into(),
                    status: "False".into(),
                    reason: "Invalid".into(),
                    message: why.clone(),
                },
            };
            let current = p.status.as_ref().and_then(|s| s.conditions.first());
            if current == Some(&cond) || self.pool_conditions.get(&name) == Some(&cond) {
                continue;
            }
            if cond.status == "False" {
                warn!("IPAddressPool {name}: {}; it is not used", cond.message);
            }
            let patch = json!({"status": {"conditions": [cond]}});
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.pool_conditions.insert(name, cond);
                }
                Err(e) => {
                    warn!("address allocator: writing the status of IPAddressPool {name}: {e}")
                }
            }
        }
    }
}

fn sorted(v: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = v.to_vec();
    v.sort();
    v
}
