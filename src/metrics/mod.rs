//! Prometheus metrics of the daemon: `kvfs mount --metrics-addr ADDR` serves `/metrics`.
//!
//! ## The crate
//! `prometheus-client`, the Prometheus project's own Rust client, over the `metrics` facade
//! with `metrics-exporter-prometheus`: its label sets are Rust types (a struct of enums), so
//! a label can only take the values its type has and cardinality is bounded where the code
//! is written, not by convention; it has no global registry (each component hands its
//! metrics to the registry the daemon builds, and tests build their own); it brings no HTTP
//! server or runtime of its own (four small crates), and it encodes the Prometheus text
//! format (0.0.4) itself, so nothing here formats the exposition by hand.
//!
//! ## Who owns what
//! Each component keeps its own metrics and registers them when asked, so nothing is global
//! and the hot paths touch only their own atomics:
//! - the store (`crate::store`, its `metrics` module): lookups, hits by tier and misses by
//!   namespace, bytes by tier, commits, evictions by reason, quarantines, and at scrape time
//!   verification failures and the tiers' use against their bounds;
//! - the S3 tier (`kvfs_remote::metrics`, through the store's `RemoteTier` seam): requests by
//!   operation and outcome with latency, fetch and upload results, negative-cache hits, the
//!   upload queue's depth and oldest age;
//! - the mount (`kvfs_fs::FsMetrics`, which `crate::mount::StoreBackend` feeds from kvfs-fs's
//!   `ChunkBackend::observe_op` hook): FUSE operations by kind and outcome, with latency.
//!
//! [`serve`] answers `GET /metrics` on a thread of its own; [`scrape`] is the client `kvfs
//! status` uses. This module is a leaf: it uses nothing else of the crate.
//!
//! ## Bounded namespaces
//! Namespaces are open-ended (one per model, rank and tenant), so the `namespace` label is
//! bounded by [`NamespaceLabels`]: the first [`DEFAULT_NAMESPACE_LABELS`] namespaces a
//! process sees get their own label value, every later one is counted under `other`. The
//! loader's engines usually serve a handful of models, so the bound is rarely reached; when
//! it is, the totals stay right and only the split is coarser.

pub mod scrape;
pub mod serve;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use serve::{MetricsServer, ServeError};

/// Prefix of every metric name.
pub const PREFIX: &str = "kvfs";

/// Namespaces that get their own `namespace` label value before the rest share `other`.
pub const DEFAULT_NAMESPACE_LABELS: usize = 64;

/// The `namespace` label value of namespaces past the bound. No namespace directory has this
/// name (they end in `-<16 hex>`).
pub const OTHER_NAMESPACE: &str = "other";

/// A registry whose metrics are all named `kvfs_*`.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// The registry's metrics in the Prometheus text format (0.0.4).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// A `namespace` label value: a namespace directory name, or [`OTHER_NAMESPACE`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespaceLabel(Arc<str>);

impl NamespaceLabel {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for NamespaceLabel {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, &self.0)
    }
}

/// Bounds the `namespace` label: the first `max` namespaces seen keep their name, the rest
/// are [`OTHER_NAMESPACE`] (see the module docs).
#[derive(Debug)]
pub struct NamespaceLabels {
    max: usize,
    seen: RwLock<HashMap<Box<str>, NamespaceLabel>>,
    other: NamespaceLabel,
}

impl Default for NamespaceLabels {
    fn default() -> Self {
        NamespaceLabels::new(DEFAULT_NAMESPACE_LABELS)
    }
}

impl NamespaceLabels {
    pub fn new(max: usize) -> NamespaceLabels {
        NamespaceLabels {
            max,
            seen: RwLock::new(HashMap::new()),
            other: NamespaceLabel(OTHER_NAMESPACE.into()),
        }
    }

    /// The label value for namespace directory `ns_dir`.
    pub fn label(&self, ns_dir: &str) -> NamespaceLabel {
        if let Some(l) = self.seen.read().unwrap().get(ns_dir) {
            return l.clone();
        }
        let mut seen = self.seen.write().unwrap();
        if let Some(l) = seen.get(ns_dir) {
            return l.clone();
        }
        if seen.len() >= self.max {
            return self.other.clone();
        }
        let l = NamespaceLabel(ns_dir.into());
        seen.insert(ns_dir.into(), l.clone());
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_past_the_bound_share_other() {
        let labels = NamespaceLabels::new(2);
        assert_eq!(
            labels.label("a-0000000000000001").as_str(),
            "a-0000000000000001"
        );
        assert_eq!(
            labels.label("b-0000000000000002").as_str(),
            "b-0000000000000002"
        );
        assert_eq!(labels.label("c-0000000000000003").as_str(), OTHER_NAMESPACE);
        // A namespace seen before the bound keeps its label afterwards.
        assert_eq!(
            labels.label("a-0000000000000001").as_str(),
            "a-0000000000000001"
        );
    }
}
