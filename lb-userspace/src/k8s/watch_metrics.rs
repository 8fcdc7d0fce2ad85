//! The agent's instruments of its Kubernetes watches (`sluice_k8s_*` on `/metrics`): the watch
//! loop and [`super::watch_probe`] count, `/metrics` composes them on each scrape.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// The state of the agent's Kubernetes watches, by `resource` (services, endpointslices,
/// nodes). Clones share their values.
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    up: Family<Labels, Gauge>,
    events: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    relists: Family<Labels, Counter>,
    objects: Family<Labels, Gauge>,
}

impl WatchMetrics {
    fn labels(resource: &str) -> Labels {
        vec![("resource", resource.to_owned())]
    }

    /// Whether the watch of `resource` is established (its last request succeeded, and no
    /// error came since).
    pub fn set_up(&self, resource: &str, up: bool) {
        self.up
            .get_or_create(&Self::labels(resource))
            .set(i64::from(up));
    }

    /// An added, modified or deleted object delivered by the watch (initial lists excluded).
    pub fn event(&self, resource: &str) {
        self.events.get_or_create(&Self::labels(resource)).inc();
    }

    /// A failed watch or list request, or a broken watch stream (each is retried).
    pub fn error(&self, resource: &str) {
        self.errors.get_or_create(&Self::labels(resource)).inc();
    }

    /// A full list after the first one: after 410 Gone, or a failed initial list.
    pub fn relist(&self, resource: &str) {
        self.relists.get_or_create(&Self::labels(resource)).inc();
    }

    /// Objects of `resource` held in the agent's cache.
    pub fn set_objects(&self, resource: &str, n: usize) {
        self.objects
            .get_or_create(&Self::labels(resource))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Makes every figure of `resource` appear (as zero) before anything happens to it.
    pub fn declare(&self, resource: &str) {
        let labels = Self::labels(resource);
        self.up.get_or_create(&labels).set(0);
        self.events.get_or_create(&labels).inc_by(0);
        self.errors.get_or_create(&labels).inc_by(0);
        self.relists.get_or_create(&labels).inc_by(0);
        self.objects.get_or_create(&labels).set(0);
    }

    /// Registers the watches' figures (`sluice_k8s_*`) on `registry`, as they are now.
    pub fn register(&self, registry: &mut Registry) {
        let k8s = registry.sub_registry_with_prefix("k8s");
        k8s.register(
            "watch_up",
            "1 while the watch of a resource is established, 0 while it fails and retries",
            self.up.clone(),
        );
        k8s.register(
            "watch_events",
            "Changes (added, modified, deleted objects) delivered by a watch, initial lists excluded",
            self.events.clone(),
        );
        k8s.register(
            "watch_errors",
            "Failed watch or list requests and broken watch streams (each retried with backoff)",
            self.errors.clone(),
        );
        k8s.register(
            "relists",
            "Full lists after the first (410 Gone: history compacted; or a failed list)",
            self.relists.clone(),
        );
        k8s.register(
            "objects",
            "Objects of a resource held in the agent's cache",
            self.objects.clone(),
        );
    }
}
