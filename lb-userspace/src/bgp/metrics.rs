//! The BGP speaker's instruments: BFD datagrams dropped, by reason (`sluice_bfd_drops_total`).
//! The BFD task counts them as they happen; `/metrics` composes them on each scrape.

use std::sync::Arc;

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::bfd::Drops;

/// What the speaker counts for `/metrics`. Clones share their counts.
#[derive(Clone, Debug, Default)]
pub struct BgpMetrics {
    /// BFD's drop counters (the BFD task counts into these).
    pub bfd_drops: Arc<Drops>,
}

impl BgpMetrics {
    /// Registers `bfd_drops` (a counter by `reason`: `ttl`, `malformed`, `unknown_source`,
    /// `wrong_discriminator`; four label values at most).
    pub fn register(&self, registry: &mut Registry) {
        let family = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "bfd_drops",
            "BFD datagrams dropped, by reason: TTL below 255 (not a directly connected sender), \
             malformed, from an address that is no peer, for another session's discriminator",
            family.clone(),
        );
        let c = self.bfd_drops.counts();
        for (reason, value) in [
            ("ttl", c.ttl),
            ("malformed", c.malformed),
            ("unknown_source", c.unknown_source),
            ("wrong_discriminator", c.wrong_discriminator),
        ] {
            family
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_exported_by_reason() {
        let metrics = BgpMetrics::default();
        metrics.bfd_drops.add_for_test(2, 0, 1, 3);
        let mut registry = Registry::with_prefix("sluice");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE sluice_bfd_drops counter",
            "sluice_bfd_drops_total{reason=\"ttl\"} 2",
            "sluice_bfd_drops_total{reason=\"malformed\"} 0",
            "sluice_bfd_drops_total{reason=\"unknown_source\"} 1",
            "sluice_bfd_drops_total{reason=\"wrong_discriminator\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
