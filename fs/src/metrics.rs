//! FUSE operations by kind and outcome, with latency, and the bytes reads and writes moved,
//! as Prometheus metrics: what the file system reports through
//! [`ChunkBackend::observe_op`](crate::ChunkBackend::observe_op) for every request it
//! answers. A backend that wants them (the daemon's) holds an [`FsMetrics`], forwards each
//! report to [`FsMetrics::observe`] and registers it where its metrics are served; this
//! crate serves nothing.
//!
//! Requests served by FUSE passthrough (reads of chunks on local disk, Linux 6.9+) never
//! reach the daemon, so they are not counted here: the `read` series then counts only reads
//! of chunks that are not local or of status files.

use crate::backend::{FsOp, OpReport};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Op(FsOp);

impl EncodeLabelValue for Op {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(e, self.0.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Ok,
    Error,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            e,
            match self {
                Outcome::Ok => "ok",
                Outcome::Error => "error",
            },
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpOutcome {
    operation: Op,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpOnly {
    operation: Op,
}

/// Upper bounds of the FUSE latency buckets, in seconds: 10 µs to about 10 s by factors of 4
/// (a cached getattr answers in microseconds; a lookup that fetches from S3 takes up to the
/// request timeout).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1e-5, 4.0, 11)
}

/// FUSE operations of one mount. Cheap to clone (shared inside).
#[derive(Debug, Clone)]
pub struct FsMetrics {
    ops: Family<OpOutcome, Counter>,
    duration: Family<OpOnly, Histogram, fn() -> Histogram>,
    bytes: Family<OpOnly, Counter>,
}

impl Default for FsMetrics {
    fn default() -> Self {
        FsMetrics {
            ops: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            bytes: Family::default(),
        }
    }
}

impl FsMetrics {
    /// Counts one request.
    pub fn observe(&self, r: &OpReport) {
        let op = r.op;
        let outcome = if r.ok { Outcome::Ok } else { Outcome::Error };
        self.ops
            .get_or_create(&OpOutcome {
                operation: Op(op),
                outcome,
            })
            .inc();
        self.duration
            .get_or_create(&OpOnly { operation: Op(op) })
            .observe(r.elapsed.as_secs_f64());
        if r.bytes > 0 {
            self.bytes
                .get_or_create(&OpOnly { operation: Op(op) })
                .inc_by(r.bytes);
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fuse_operations",
            "FUSE requests answered by the daemon, by kind and outcome",
            self.ops.clone(),
        );
        registry.register(
            "fuse_operation_duration_seconds",
            "Time the daemon took to answer FUSE requests, by kind",
            self.duration.clone(),
        );
        registry.register(
            "fuse_bytes",
            "Bytes answered to FUSE reads and taken from FUSE writes (operation read, write)",
            self.bytes.clone(),
        );
    }
}
