//! Watching a custom resource (sluice.io) that may not be installed: the IPAddressPools and
//! the BGPPeers are optional. Probed with a one-item list at start; when the resource is not
//! there (not installed, or this agent may not list it), it is probed again every
//! [`REPROBE_EVERY`] until it is, and its watch starts then: a CustomResourceDefinition (or a
//! ClusterRole) applied after the agents started takes effect without restarting them.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client, Resource};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

/// How often a resource that is not there is probed again.
pub const REPROBE_EVERY: Duration = Duration::from_secs(30);

/// What the agent does without the resource and how to install it, for its log lines.
pub struct Absent {
    /// What the agent does meanwhile, e.g. "sluice owns no address".
    pub meanwhile: &'static str,
    /// What installs it, e.g. "apply deploy/base/05-crd-ipaddresspools.yaml".
    pub install: &'static str,
}

/// What was started once the resource was there; `None` until then.
#[derive(Clone, Debug)]
pub struct WhenInstalled<T> {
    started: watch::Receiver<Option<T>>,
}

impl<T: Clone> WhenInstalled<T> {
    /// What was started, if the resource is there yet.
    pub fn get(&self) -> Option<T> {
        self.started.borrow().clone()
    }

    /// Waits until the resource is there; `None` if it never can be (the prober is gone).
    pub async fn installed(&self) -> Option<T> {
        let mut started = self.started.clone();
        started.wait_for(Option::is_some).await.ok()?.clone()
    }
}

/// Probes resource `K`; when it is there, runs `start` (its watches, on the client given) at
/// once, otherwise (logged) again every [`REPROBE_EVERY`] until it is, then wakes `changed` so
/// that the caller reads it.
pub async fn watch_when_installed<K, T, F, Fut>(
    client: &Client,
    absent: Absent,
    changed: Arc<Notify>,
    start: F,
) -> WhenInstalled<T>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let api: Api<K> = Api::all(client.clone());
    let first = probe(&api).await;
    let (tx, started) = watch::channel(None);
    let Err(mut why) = first else {
        tx.send_replace(Some(start(client.clone()).await));
        return WhenInstalled { started };
    };
    log_absent::<K>(&why, &absent);
    let client = client.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REPROBE_EVERY).await;
            if tx.is_closed() {
                return; // nobody reads it any more
            }
            match probe(&api).await {
                Ok(()) => {
                    info!("the {} resource is there now: watching it", K::kind(&()));
                    tx.send_replace(Some(start(client).await));
                    changed.notify_one();
                    return;
                }
                // Said once, and again only when the reason changes (e.g. installed, not granted).
                Err(now) if now != why => {
                    log_absent::<K>(&now, &absent);
                    why = now;
                }
                Err(_) => {}
            }
        }
    });
    WhenInstalled { started }
}

/// Why a resource cannot be watched (yet).
#[derive(Debug, PartialEq)]
enum Missing {
    NotInstalled,
    /// Any other answer (typically 403: the ClusterRole does not grant it), as text.
    CannotList(String),
}

async fn probe<K>(api: &Api<K>) -> Result<(), Missing>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Missing::NotInstalled),
        Err(e) => Err(Missing::CannotList(e.to_string())),
    }
}

fn log_absent<K: Resource<DynamicType = ()>>(why: &Missing, absent: &Absent) {
    let every = REPROBE_EVERY.as_secs();
    match why {
        Missing::NotInstalled => info!(
            "the {} resource (sluice.io) is not installed: {} ({}); probing again every {every} s",
            K::kind(&()),
            absent.meanwhile,
            absent.install
        ),
        Missing::CannotList(e) => warn!(
            "cannot list {} ({e}): {} until it can (check the ClusterRole); probing again every {every} s",
            K::plural(&()),
            absent.meanwhile
        ),
    }
}

/// The CRD in deploy/ must be what the types generate (each resource's test calls this):
/// `SLUICE_WRITE_CRD=1` rewrites it.
#[cfg(test)]
pub(super) fn assert_deployed_crd_is_generated<K: kube::CustomResourceExt>(
    file: &str,
    module: &str,
    test: &str,
) {
    let path = format!("{}/../deploy/base/{file}", env!("CARGO_MANIFEST_DIR"));
    let kind = K::crd().spec.names.kind;
    let generated = format!(
        "# Generated from lb-userspace/src/k8s/{module} ({kind}): do not edit; the test\n\
         # {test} rewrites it with SLUICE_WRITE_CRD=1.\n{}\n",
        serde_json::to_string_pretty(&K::crd()).unwrap()
    );
    if std::env::var_os("SLUICE_WRITE_CRD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let deployed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        deployed == generated,
        "{path} is not what {kind} generates: run `SLUICE_WRITE_CRD=1 cargo test -p lb-userspace {test}` and commit it"
    );
}
