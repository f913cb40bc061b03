//! Reading a running daemon's metrics: one `GET /metrics` ([`fetch`]), the text format's
//! samples ([`parse`]) and the few figures `kvfs status` prints ([`Summary`]).
//!
//! The parser reads what a Prometheus server would: `name{label="value",...} value` lines,
//! with `\\`, `\"` and `\n` escapes in label values, skipping comments. It is only as
//! general as `kvfs status` needs (no timestamps kept, no exemplars).

use super::serve::METRICS_PATH;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(
        "cannot reach the metrics endpoint at {addr}: {why} (is `kvfs mount --metrics-addr` running?)"
    )]
    Unreachable { addr: SocketAddr, why: String },
    #[error("{addr}{METRICS_PATH} answered {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    #[error("line {line} of the metrics is not in the text format: {text:?}")]
    Syntax { line: usize, text: String },
}

/// One sample: a series (name and labels) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET http://addr/metrics` within `timeout`: the body.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, ScrapeError> {
    let unreachable = |why: String| ScrapeError::Unreachable { addr, why };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    rt.block_on(async {
        let get = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let req = Request::get(METRICS_PATH)
                .header(hyper::header::HOST, addr.to_string())
                .body(Empty::<Bytes>::new())
                .expect("a valid request");
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            if resp.status() != StatusCode::OK {
                return Err(ScrapeError::Status {
                    addr,
                    status: resp.status(),
                });
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok(String::from_utf8_lossy(&body).into_owned())
        };
        tokio::time::timeout(timeout, get)
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
    })
}

/// The samples of a text-format exposition.
pub fn parse(text: &str) -> Result<Vec<Sample>, ScrapeError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = || ScrapeError::Syntax {
            line: i + 1,
            text: line.to_string(),
        };
        let name_end = line.find(['{', ' ']).ok_or_else(syntax)?;
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                rest = rest.trim_start_matches(',');
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find('=').ok_or_else(syntax)?;
                let key = rest[..eq].trim().to_string();
                let mut chars = rest[eq + 1..].char_indices();
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(syntax());
                }
                let mut value = String::new();
                let mut end = None;
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => return Err(syntax()),
                        },
                        '"' => {
                            end = Some(eq + 1 + j + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                rest = &rest[end.ok_or_else(syntax)?..];
                labels.push((key, value));
            }
        }
        let value = rest.split_whitespace().next().ok_or_else(syntax)?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| syntax())?,
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// The sum of the samples named `name` whose labels include every pair of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// What `kvfs status` prints: the daemon's figures since it started.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub lookups: f64,
    pub hits_memory: f64,
    pub hits_disk: f64,
    pub hits_remote: f64,
    pub misses: f64,
    /// Hits over lookups (None before the first lookup).
    pub hit_rate: Option<f64>,
    pub read_bytes: f64,
    pub chunks_committed: f64,
    pub evictions: f64,
    pub verify_failures: f64,
    pub quarantined: f64,
    pub s3_requests: f64,
    /// S3 requests that failed or timed out (a 404 is a miss, not an error).
    pub s3_errors: f64,
    /// Uploads waiting, and the age of the oldest (None without an S3 tier).
    pub upload_queue_depth: Option<f64>,
    pub upload_queue_oldest_seconds: Option<f64>,
    pub fuse_operations: f64,
    pub fuse_errors: f64,
    pub disk_used_bytes: f64,
    pub disk_capacity_bytes: f64,
}

impl Summary {
    pub fn of(samples: &[Sample]) -> Summary {
        let s = |name: &str, with: &[(&str, &str)]| sum(samples, name, with);
        let present = |name: &str| samples.iter().any(|x| x.name == name);
        let hits = s("kvfs_hits_total", &[]);
        let lookups = s("kvfs_lookups_total", &[]);
        Summary {
            lookups,
            hits_memory: s("kvfs_hits_total", &[("tier", "memory")]),
            hits_disk: s("kvfs_hits_total", &[("tier", "disk")]),
            hits_remote: s("kvfs_hits_total", &[("tier", "remote")]),
            misses: s("kvfs_misses_total", &[]),
            hit_rate: (lookups > 0.0).then(|| hits / lookups),
            read_bytes: s("kvfs_read_bytes_total", &[]),
            chunks_committed: s("kvfs_chunks_committed_total", &[]),
            evictions: s("kvfs_evictions_total", &[]),
            verify_failures: s("kvfs_verify_failures_total", &[]),
            quarantined: s("kvfs_quarantined_total", &[]),
            s3_requests: s("kvfs_s3_requests_total", &[]),
            s3_errors: s("kvfs_s3_requests_total", &[("outcome", "error")])
                + s("kvfs_s3_requests_total", &[("outcome", "timeout")]),
            upload_queue_depth: present("kvfs_upload_queue_depth")
                .then(|| s("kvfs_upload_queue_depth", &[])),
            upload_queue_oldest_seconds: present("kvfs_upload_queue_oldest_age_seconds")
                .then(|| s("kvfs_upload_queue_oldest_age_seconds", &[])),
            fuse_operations: s("kvfs_fuse_operations_total", &[]),
            fuse_errors: s("kvfs_fuse_operations_total", &[("outcome", "error")]),
            disk_used_bytes: s("kvfs_tier_used_bytes", &[("tier", "disk")]),
            disk_capacity_bytes: s("kvfs_tier_capacity_bytes", &[("tier", "disk")]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let text = "# HELP x_total help\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"q\\\"uo\\\\te\\n\"} 3\n\
                    y 2.5\n\
                    h_bucket{le=\"+Inf\"} 7\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].label("a"), Some("1"));
        assert_eq!(s[0].label("b"), Some("q\"uo\\te\n"));
        assert_eq!(s[0].value, 3.0);
        assert_eq!(
            s[1],
            Sample {
                name: "y".into(),
                labels: vec![],
                value: 2.5
            }
        );
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(sum(&s, "x_total", &[("a", "1")]), 3.0);
        assert_eq!(sum(&s, "x_total", &[("a", "2")]), 0.0);
    }

    #[test]
    fn a_broken_line_is_a_syntax_error() {
        for bad in ["x{a=1} 2", "x{a=\"1\" 2", "x", "x{a=\"1\"} nope"] {
            assert!(
                matches!(parse(bad), Err(ScrapeError::Syntax { line: 1, .. })),
                "{bad}"
            );
        }
    }
}
