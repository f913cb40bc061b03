//! Prometheus metrics of the remote tier: S3 requests by operation and outcome with their
//! latency, and (read at scrape time) the tier's counters and its upload queue.
//!
//! Requests are timed where they are made: every S3 call of this crate goes through one of
//! `Bucket::timed`, `Bucket::timed_found`, `Bucket::put`, `Bucket::confirm_bucket` or
//! `Bucket::list_raw`, and each wraps its `tokio::time::timeout(..)` in
//! [`RequestMetrics::observe`], which counts the request under its outcome and records how
//! long it took. Both label sets are closed enums ([`S3Op`], [`Outcome`]), so the number of
//! series is fixed.
//!
//! Everything else is already counted by the tier ([`RemoteStats`], relaxed atomics) or held
//! by the queue (its marker files), so [`RemoteCollector`] turns those into metrics when a
//! scrape asks instead of counting twice on the hot path: fetch results, bytes fetched and
//! uploaded, upload results, negative-cache hits, the queue's depth and oldest age.
//!
//! This crate registers nothing by itself: the daemon that serves metrics calls
//! [`crate::Remote::register_metrics`] with its registry.

use crate::client::{Bucket, RemoteStats};
use crate::queue::Queue;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// An S3 operation, as the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum S3Op {
    /// GET up to the response headers (first byte).
    Get,
    /// Reading a GET's body.
    GetBody,
    Head,
    Put,
    List,
}

impl S3Op {
    /// The operation a request named in errors and logs (`"GET"`, `"GET body"`, `"HEAD"`,
    /// `"PUT"`, `"LIST"`) stands for; a name this crate does not use counts as a GET.
    pub(crate) fn of(name: &str) -> S3Op {
        match name {
            "GET body" => S3Op::GetBody,
            "HEAD" => S3Op::Head,
            "PUT" => S3Op::Put,
            "LIST" => S3Op::List,
            _ => S3Op::Get,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            S3Op::Get => "get",
            S3Op::GetBody => "get_body",
            S3Op::Head => "head",
            S3Op::Put => "put",
            S3Op::List => "list",
        }
    }
}

/// How a request ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    /// 404: a miss, not a failure.
    NotFound,
    /// A conditional put found the object there (412 / already exists): not a failure.
    Exists,
    /// No answer within the operation's timeout.
    Timeout,
    /// Any other error (refused, unreachable, 5xx).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Exists => "exists",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }

    fn of<T>(r: &Result<object_store::Result<T>, tokio::time::error::Elapsed>) -> Outcome {
        match r {
            Ok(Ok(_)) => Outcome::Ok,
            Ok(Err(object_store::Error::NotFound { .. })) => Outcome::NotFound,
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => Outcome::Exists,
            Ok(Err(_)) => Outcome::Error,
            Err(_) => Outcome::Timeout,
        }
    }
}

macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    };
}
label_value!(S3Op);
label_value!(Outcome);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    operation: S3Op,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    operation: S3Op,
}

/// Upper bounds of the S3 latency buckets, in seconds: 1 ms to about 33 s by factors of 2
/// (a loopback request takes about a millisecond; the default request timeout is 30 s).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 16)
}

/// Requests by operation and outcome, and their latency. Cheap to clone (shared inside).
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<OpLabels, Histogram, fn() -> Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
        }
    }
}

impl RequestMetrics {
    /// Awaits one timed S3 request, counting it under `op` and its outcome.
    pub(crate) async fn observe<T>(
        &self,
        op: S3Op,
        request: impl Future<Output = Result<object_store::Result<T>, tokio::time::error::Elapsed>>,
    ) -> Result<object_store::Result<T>, tokio::time::error::Elapsed> {
        let started = Instant::now();
        let r = request.await;
        self.record(op, Outcome::of(&r), started.elapsed().as_secs_f64());
        r
    }

    fn record(&self, op: S3Op, outcome: Outcome, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                operation: op,
                outcome,
            })
            .inc();
        self.duration
            .get_or_create(&OpLabels { operation: op })
            .observe(seconds);
    }

    /// Requests counted under `op` and `outcome` so far.
    pub fn count(&self, op: S3Op, outcome: Outcome) -> u64 {
        self.requests
            .get(&RequestLabels {
                operation: op,
                outcome,
            })
            .map_or(0, |c| c.get())
    }
}

/// Registers the request metrics and a [`RemoteCollector`] for `bucket` and `queue`.
pub(crate) fn register(registry: &mut Registry, bucket: &Arc<Bucket>, queue: Option<&Arc<Queue>>) {
    registry.register(
        "s3_requests",
        "S3 requests by operation and outcome",
        bucket.metrics.requests.clone(),
    );
    registry.register(
        "s3_request_duration_seconds",
        "Latency of S3 requests by operation",
        bucket.metrics.duration.clone(),
    );
    registry.register_collector(Box::new(RemoteCollector {
        bucket: bucket.clone(),
        queue: queue.cloned(),
    }));
}

/// The remote tier's counters and its queue, read at scrape time.
pub(crate) struct RemoteCollector {
    bucket: Arc<Bucket>,
    queue: Option<Arc<Queue>>,
}

impl std::fmt::Debug for RemoteCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCollector")
            .field("bucket", &self.bucket)
            .field("queue", &self.queue.is_some())
            .finish()
    }
}

/// Writes one counter family (`name`, one series per label value) through `e`.
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    series: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for &(value, n) in series {
        ConstCounter::new(n).encode(m.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    n: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(n);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for RemoteCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s: RemoteStats = self.bucket.counters.snapshot();
        counters(
            &mut e,
            "s3_fetches",
            "Chunk fetches from the bucket by result (corrupt objects are never served)",
            "result",
            &[
                ("hit", s.hits),
                ("miss", s.misses - s.corrupt.min(s.misses)),
                ("corrupt", s.corrupt),
                ("error", s.fetch_errors),
            ],
        )?;
        counter(
            &mut e,
            "s3_negative_cache_hits",
            "Misses answered by the negative cache without a request",
            s.negative_hits,
        )?;
        counter(
            &mut e,
            "s3_coalesced_fetches",
            "Fetches that waited for another caller's fetch of the same chunk",
            s.coalesced,
        )?;
        counter(
            &mut e,
            "s3_fetched_bytes",
            "Bytes of chunk objects fetched from the bucket",
            s.bytes_fetched,
        )?;
        counters(
            &mut e,
            "s3_uploads",
            "Chunk uploads by result",
            "result",
            &[
                ("created", s.uploads),
                ("already_present", s.already_present),
                ("error", s.upload_errors),
            ],
        )?;
        counter(
            &mut e,
            "s3_uploaded_bytes",
            "Bytes of chunk objects uploaded to the bucket",
            s.bytes_uploaded,
        )?;
        counter(
            &mut e,
            "s3_repairs",
            "Damaged objects replaced from a verified local copy",
            s.repaired,
        )?;
        if let Some(q) = &self.queue {
            let st = q.status();
            gauge(
                &mut e,
                "upload_queue_depth",
                "Chunks waiting for their write-behind upload",
                st.pending as f64,
            )?;
            gauge(
                &mut e,
                "upload_queue_oldest_age_seconds",
                "Age of the oldest chunk waiting for its upload (0 when none waits)",
                st.oldest.map_or(0.0, |d| d.as_secs_f64()),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation name this crate gives its requests has its own label.
    #[test]
    fn request_names_map_to_their_operations() {
        for (name, op) in [
            ("GET", S3Op::Get),
            ("GET body", S3Op::GetBody),
            ("HEAD", S3Op::Head),
            ("PUT", S3Op::Put),
            ("LIST", S3Op::List),
        ] {
            assert_eq!(S3Op::of(name), op, "{name}");
        }
    }

    #[test]
    fn a_request_is_counted_under_its_outcome() {
        let m = RequestMetrics::default();
        m.record(S3Op::Head, Outcome::NotFound, 0.01);
        m.record(S3Op::Head, Outcome::NotFound, 0.02);
        m.record(S3Op::Put, Outcome::Exists, 0.01);
        assert_eq!(m.count(S3Op::Head, Outcome::NotFound), 2);
        assert_eq!(m.count(S3Op::Put, Outcome::Exists), 1);
        assert_eq!(m.count(S3Op::Put, Outcome::Ok), 0);
    }
}
