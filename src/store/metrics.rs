//! The store's Prometheus metrics ([`StoreMetrics`]) and [`Store::register_metrics`], which
//! hands them, the store's scrape-time figures and the remote tier's metrics to a registry.
//!
//! Counted where they happen, by one call beside the existing [`StoreStats`] counter:
//! lookups, hits by tier and misses, labelled by namespace (bounded: [`NamespaceLabels`]);
//! bytes read by tier and written to disk; chunks committed by namespace; evictions and
//! evicted bytes by reason; quarantines. Read when a scrape asks ([`StoreCollector`]):
//! verification failures (already counted in [`StoreStats`]) and each tier's use against its
//! bound.
//!
//! A *lookup* is a chunk asked for by name that ended in a hit or a miss: a read of a whole
//! chunk (`get`, ranged reads, in the tier that served them) or a mount's lookup of a chunk
//! name ([`Store::count_lookup`], the name found locally, fetched, or missing), so
//! `lookups = hits + misses` and `hits / lookups` is the hit rate. Lookups that failed (a
//! corrupt chunk, an S3 outage) are neither: they show in `kvfs_verify_failures_total` and
//! the S3 request outcomes.

use super::stats::StoreStats;
use super::{Store, Tier};
use crate::metrics::{NamespaceLabel, NamespaceLabels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

impl EncodeLabelValue for Tier {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_fmt(e, format_args!("{self}"))
    }
}

/// Why chunks left the disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// To make room for a new chunk within the capacity and free-space bounds.
    Capacity,
    /// The file system said ENOSPC while writing, before the bounds said full.
    DiskFull,
    /// `kvfs gc` (or `Store::gc`) enforcing the bounds.
    Gc,
}

impl EncodeLabelValue for EvictReason {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            e,
            match self {
                EvictReason::Capacity => "capacity",
                EvictReason::DiskFull => "disk_full",
                EvictReason::Gc => "gc",
            },
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Ns {
    namespace: NamespaceLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NsTier {
    namespace: NamespaceLabel,
    tier: Tier,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TierOnly {
    tier: Tier,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Reason {
    reason: EvictReason,
}

/// The store's counters as Prometheus families. Cheap to clone (shared inside).
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    namespaces: std::sync::Arc<NamespaceLabels>,
    lookups: Family<Ns, Counter>,
    hits: Family<NsTier, Counter>,
    misses: Family<Ns, Counter>,
    read_bytes: Family<TierOnly, Counter>,
    written_bytes: Family<TierOnly, Counter>,
    committed: Family<Ns, Counter>,
    evictions: Family<Reason, Counter>,
    evicted_bytes: Family<Reason, Counter>,
    quarantined: Counter,
}

impl StoreMetrics {
    fn ns(&self, ns_dir: &str) -> Ns {
        Ns {
            namespace: self.namespaces.label(ns_dir),
        }
    }

    /// A lookup that found the chunk in `tier`.
    pub(super) fn hit(&self, ns_dir: &str, tier: Tier) {
        let ns = self.ns(ns_dir);
        self.lookups.get_or_create(&ns).inc();
        self.hits
            .get_or_create(&NsTier {
                namespace: ns.namespace,
                tier,
            })
            .inc();
    }

    /// A lookup that found the chunk nowhere.
    pub(super) fn miss(&self, ns_dir: &str) {
        let ns = self.ns(ns_dir);
        self.lookups.get_or_create(&ns).inc();
        self.misses.get_or_create(&ns).inc();
    }

    pub(super) fn read(&self, tier: Tier, bytes: u64) {
        self.read_bytes
            .get_or_create(&TierOnly { tier })
            .inc_by(bytes);
    }

    /// A chunk of `bytes` committed to the disk tier (by a put, a write through the mount, or
    /// a fill from the remote tier).
    pub(super) fn committed(&self, ns_dir: &str, bytes: u64) {
        self.committed.get_or_create(&self.ns(ns_dir)).inc();
        self.written_bytes
            .get_or_create(&TierOnly { tier: Tier::Disk })
            .inc_by(bytes);
    }

    pub(super) fn evicted(&self, reason: EvictReason, bytes: u64) {
        let r = Reason { reason };
        self.evictions.get_or_create(&r).inc();
        self.evicted_bytes.get_or_create(&r).inc_by(bytes);
    }

    pub(super) fn quarantined(&self) {
        self.quarantined.inc();
    }

    fn register(&self, registry: &mut Registry) {
        let m = self.clone();
        registry.register(
            "lookups",
            "Chunk reads asked of the store, by namespace",
            m.lookups,
        );
        registry.register(
            "hits",
            "Chunk reads served, by namespace and the tier that held the chunk",
            m.hits,
        );
        registry.register(
            "misses",
            "Chunk reads of chunks no tier holds, by namespace",
            m.misses,
        );
        registry.register(
            "read_bytes",
            "Bytes the store served, by the tier they came from",
            m.read_bytes,
        );
        registry.register(
            "written_bytes",
            "Bytes of chunks committed to the disk tier",
            m.written_bytes,
        );
        registry.register(
            "chunks_committed",
            "Chunks newly committed to the disk tier, by namespace",
            m.committed,
        );
        registry.register(
            "evictions",
            "Chunks evicted from the disk tier, by reason",
            m.evictions,
        );
        registry.register(
            "evicted_bytes",
            "Bytes evicted from the disk tier, by reason",
            m.evicted_bytes,
        );
        registry.register(
            "quarantined",
            "Chunk files moved to the quarantine after failing verification",
            m.quarantined,
        );
    }
}

/// The store's figures read at scrape time: verification failures and the tiers' use.
#[derive(Debug)]
struct StoreCollector {
    store: Store,
}

impl Collector for StoreCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: StoreStats = self.store.stats();
        let failures = ConstCounter::new(stats.verify_failures);
        failures.encode(e.encode_descriptor(
            "verify_failures",
            "Chunks that failed verification when read, put, fetched or scrubbed",
            None,
            failures.metric_type(),
        )?)?;
        let cap = self.store.capacity();
        let tiers = |e: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     memory: u64,
                     disk: u64|
         -> Result<(), std::fmt::Error> {
            let mut m =
                e.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (tier, v) in [(Tier::Memory, memory), (Tier::Disk, disk)] {
                ConstGauge::new(v as i64).encode(m.encode_family(&TierOnly { tier })?)?;
            }
            Ok(())
        };
        tiers(
            &mut e,
            "tier_used_bytes",
            "Bytes of chunks held, by tier",
            cap.memory_used_bytes,
            cap.used_bytes,
        )?;
        tiers(
            &mut e,
            "tier_capacity_bytes",
            "Bound on the bytes a tier holds (the disk's from capacity and min_free)",
            cap.memory_limit_bytes,
            cap.limit_bytes,
        )?;
        let free = ConstGauge::new(cap.fs_free_bytes as i64);
        free.encode(e.encode_descriptor(
            "disk_fs_free_bytes",
            "Free bytes on the cache directory's file system",
            None,
            free.metric_type(),
        )?)
    }
}

impl Store {
    /// Counts a lookup of a chunk name answered without a read of this store: found in
    /// `tier`, or (`None`) nowhere. What the mount calls for a name it resolved with
    /// [`Store::stat`], which counts nothing itself (`kvfs stat` is not traffic).
    pub fn count_lookup(&self, ns_dir: &str, tier: Option<Tier>) {
        match tier {
            Some(t) => self.inner.metrics.hit(ns_dir, t),
            None => self.inner.metrics.miss(ns_dir),
        }
    }

    /// Registers the store's metrics, its scrape-time figures and the remote tier's metrics
    /// (if it has one) with `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
        registry.register_collector(Box::new(StoreCollector {
            store: self.clone(),
        }));
        if let Some(remote) = &self.inner.cfg.remote {
            remote.register_metrics(registry);
        }
    }
}
