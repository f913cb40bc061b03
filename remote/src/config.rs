//! Configuration of the S3 remote tier.
//!
//! [`S3Config`] holds everything needed to reach a bucket: the location (`s3://bucket/prefix`),
//! an endpoint override for S3-compatible servers (MinIO, Garage, Ceph; path-style addressing
//! is the default because those servers rarely have wildcard DNS), region, credentials,
//! timeouts and retries, and the behaviour of the tier (negative-cache TTL, upload queue bound
//! and backpressure, write-through). Unset credentials fall back to the standard AWS
//! environment and credential chain through `AmazonS3Builder::from_env()`
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, instance metadata, web identity).
//!
//! **Timeouts** are per operation, so a server that accepts connections and never answers is
//! reported quickly instead of after the longest transfer: `connect_timeout` (TCP/TLS
//! connect), `list_timeout` (a whole LIST or HEAD, retries included), `first_byte_timeout`
//! (until the response of a GET or PUT begins) and `request_timeout` (one object's body
//! transfer; a 32 MiB chunk must fit in it). Each has a default here and a key in `[s3]`.
//!
//! Secrets are held in [`Secret`], whose `Debug` prints `***`, so a config can be logged.

use crate::error::RemoteError;
use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum, S3ConditionalPut};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::fmt;
use std::time::Duration;

/// A credential that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself: only for handing it to the S3 client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a commit does when the upload queue already holds `max_queued` uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backpressure {
    /// Wait (at most `block_timeout`) for the queue to drain below the bound, then fail with
    /// [`RemoteError::QueueFull`].
    #[default]
    Block,
    /// Fail at once with [`RemoteError::QueueFull`]. The chunk stays committed locally; only
    /// its upload is not queued (a later `kvfs sync push` uploads it).
    Fail,
}

/// Where and how to reach the bucket, and how the remote tier behaves.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Endpoint override, e.g. `http://127.0.0.1:3900` (none: AWS, or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Region (none: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Allow plain HTTP (loopback and test servers). Implied by an `http://` endpoint.
    pub allow_http: bool,
    /// Virtual-hosted-style addressing (`bucket.host`); false means path-style (`host/bucket`).
    pub virtual_hosted: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// TCP (and TLS) connect.
    pub connect_timeout: Duration,
    /// One LIST page or one HEAD, retries included.
    pub list_timeout: Duration,
    /// Until the response of a GET or PUT begins (retries included).
    pub first_byte_timeout: Duration,
    /// One object's body transfer (a 32 MiB chunk must fit in it).
    pub request_timeout: Duration,
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt.
    pub retry_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a remote miss is remembered.
    pub negative_ttl: Duration,
    /// After a failed remote read (server unreachable, retries spent), later reads fail fast
    /// for this long instead of each waiting through its own retries.
    pub outage_backoff: Duration,
    /// Try `If-None-Match: *` puts; servers answering 501 get HEAD-then-PUT instead.
    pub conditional_put: bool,
    /// Send a SHA-256 checksum with each put so the server rejects a body damaged in transit.
    pub upload_checksum: bool,
    /// Upload synchronously in the commit (the queue marker still makes it durable).
    pub write_through: bool,
    /// Bound of the upload queue (pending uploads).
    pub max_queued: usize,
    pub when_full: Backpressure,
    /// Longest wait of a blocked commit under [`Backpressure::Block`].
    pub block_timeout: Duration,
    /// Parallel uploads of the write-behind queue and of `sync push`.
    pub upload_concurrency: usize,
    /// Parallel downloads of `sync pull`.
    pub download_concurrency: usize,
    /// Parallel HEAD requests of one wave of a prefix lookup.
    pub lookup_parallelism: usize,
    /// Lossless codec of uploaded chunks (`raw`: as they are); downloads decode any codec.
    pub codec: kvfs_loader::Codec,
}

impl S3Config {
    /// A config for `s3://bucket/prefix` with the defaults.
    pub fn from_url(url: &str) -> Result<S3Config, RemoteError> {
        let (bucket, prefix) = parse_s3_url(url)?;
        Ok(S3Config {
            bucket,
            prefix,
            endpoint: None,
            region: None,
            allow_http: false,
            virtual_hosted: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            connect_timeout: Duration::from_secs(3),
            list_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(120),
            max_retries: 4,
            retry_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            negative_ttl: Duration::from_secs(2),
            outage_backoff: Duration::from_secs(1),
            conditional_put: true,
            upload_checksum: true,
            write_through: false,
            max_queued: 100_000,
            when_full: Backpressure::Block,
            block_timeout: Duration::from_secs(30),
            upload_concurrency: 8,
            download_concurrency: 16,
            lookup_parallelism: 128,
            codec: kvfs_loader::Codec::Raw,
        })
    }

    /// Sets the endpoint; an `http://` endpoint also allows plain HTTP.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> S3Config {
        let e = endpoint.into();
        if e.starts_with("http://") {
            self.allow_http = true;
        }
        self.endpoint = Some(e);
        self
    }

    /// `s3://bucket/prefix` of this config.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The endpoint requests go to, for messages.
    pub fn endpoint_display(&self) -> String {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| "AWS S3".to_string())
    }

    /// Builds the object_store client: environment and credential chain first, then the
    /// explicit settings of this config on top.
    pub fn build_store(&self) -> Result<AmazonS3, RemoteError> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e);
        }
        let allow_http = self.allow_http
            || endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"));
        if let Some(r) = &self.region {
            b = b.with_region(r);
        }
        if let Some(k) = &self.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &self.secret_access_key {
            b = b.with_secret_access_key(s.expose());
        }
        if let Some(t) = &self.session_token {
            b = b.with_token(t.expose());
        }
        if self.upload_checksum {
            b = b.with_checksum_algorithm(Checksum::SHA256);
        }
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(self.connect_timeout)
            // One attempt may take the time to its first byte plus its body transfer; the
            // per-operation limits are enforced around each call (see `client`).
            .with_timeout(self.first_byte_timeout + self.request_timeout)
            .with_pool_max_idle_per_host(self.lookup_parallelism.max(self.upload_concurrency));
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        };
        b.with_allow_http(allow_http)
            .with_virtual_hosted_style_request(self.virtual_hosted)
            .with_conditional_put(if self.conditional_put {
                S3ConditionalPut::ETagMatch
            } else {
                S3ConditionalPut::Disabled
            })
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| RemoteError::Config(e.to_string()))
    }
}

/// Splits `s3://bucket/some/prefix/` into `("bucket", "some/prefix")`.
pub fn parse_s3_url(url: &str) -> Result<(String, String), RemoteError> {
    let bad = |why: &'static str| RemoteError::BadUrl {
        url: url.to_string(),
        why,
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("names no bucket"));
    }
    if bucket.len() > 63
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "bucket names are 1-63 lowercase letters, digits, `-` and `.`",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|s| s == ".." || s == ".")
        || prefix.contains("//")
        || prefix.contains(|c: char| c.is_control())
    {
        return Err(bad(
            "prefix has an empty, `.` or `..` segment or a control character",
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_s3_url("s3://b/p/q/").unwrap(),
            ("b".into(), "p/q".into())
        );
        assert_eq!(
            parse_s3_url("s3://bucket").unwrap(),
            ("bucket".into(), "".into())
        );
        for bad in [
            "",
            "b/p",
            "s3://",
            "s3:///p",
            "s3://B/p",
            "s3://b/../x",
            "s3://b/a//c",
        ] {
            assert!(
                matches!(parse_s3_url(bad), Err(RemoteError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut c = S3Config::from_url("s3://b/p").unwrap();
        c.access_key_id = Some("GKexampleid".into());
        c.secret_access_key = Some(Secret::new("very-secret-key-123"));
        c.session_token = Some(Secret::new("session-token-456"));
        let s = format!("{c:?}");
        assert!(!s.contains("very-secret-key-123"), "{s}");
        assert!(!s.contains("session-token-456"), "{s}");
        assert!(s.contains("***"));
    }

    #[test]
    fn http_endpoint_allows_http() {
        let c = S3Config::from_url("s3://b")
            .unwrap()
            .with_endpoint("http://127.0.0.1:9");
        assert!(c.allow_http);
        assert_eq!(c.url(), "s3://b");
        c.build_store().unwrap();
    }
}
