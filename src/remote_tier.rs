//! The S3 remote tier plugged into the store, and its configuration.
//!
//! The store knows nothing of S3: it holds an `Arc<dyn RemoteTier>` (see
//! [`crate::store::remote_seam`]). [`S3Tier`] implements that seam with
//! [`kvfs_remote::Remote`]:
//! - `fetch` (a local miss) is a verified, single-flight, negatively cached GET; an
//!   unreachable bucket is a [`StoreError::Remote`] (the read fails, it is not reported as
//!   "absent"), a damaged object is a miss;
//! - `committed` (a local commit) queues a write-behind upload as a marker file under
//!   `<cache dir>/.uploads/` (or uploads at once with `write_through`); a failure is logged,
//!   never fails the put, and the upload stays queued.
//!
//! Every process that opens the tier with a cache directory resumes the uploads earlier runs
//! left queued (every command that opens the store, `ls --remote` and `sync pull` too). When
//! the tier is dropped (a CLI command ends, a mount is unmounted) with uploads pending, it
//! waits up to `drain_on_exit_s` for the queue to drain; a process that queued none itself
//! stops waiting at the first failed batch, so an outage does not hold a short command. What
//! is left stays queued on disk for the next process with the tier (or `kvfs sync push`).
//!
//! [`S3Settings`] is the `[s3]` table of the config file; `--s3 s3://bucket/prefix` (env
//! `KVFS_S3`) sets or overrides its `url`. Credentials come from the standard AWS environment
//! and credential chain; `secret_access_key` in the file works but is discouraged, and is
//! never printed (`Debug` redacts it).
//!
//! This is library code: it knows nothing of the CLI. The commands `kvfs sync push|pull`,
//! `kvfs ls --remote` and the remote line of `kvfs stat` are in [`crate::cli::remote`].

use crate::store::{RemoteTier, StoreError};
use kvfs_loader::ChunkKey;
use kvfs_remote::{Backpressure, Remote, RemoteError, S3Config, Secret};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The `[s3]` table of the config file. Only `url` is required.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Endpoint of an S3-compatible server (`http://127.0.0.1:3900`); else AWS or
    /// `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region (else `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Allow plain HTTP (implied by an `http://` endpoint).
    pub allow_http: bool,
    /// Virtual-hosted-style requests (default: path-style).
    pub virtual_hosted: bool,
    /// Access key id (else `AWS_ACCESS_KEY_ID` and the credential chain).
    pub access_key_id: Option<String>,
    /// Secret key (prefer `AWS_SECRET_ACCESS_KEY`); never printed.
    pub secret_access_key: Option<String>,
    /// How long a remote miss is remembered, in milliseconds.
    pub negative_ttl_ms: u64,
    /// Upload within the put instead of write-behind.
    pub write_through: bool,
    /// Bound of the upload queue.
    pub max_queued: usize,
    /// `block` (wait up to `block_timeout_s`, then fail) or `fail` when the queue is full.
    pub when_full: String,
    pub block_timeout_s: u64,
    pub upload_concurrency: usize,
    pub download_concurrency: usize,
    /// TCP/TLS connect.
    pub connect_timeout_s: u64,
    /// One LIST page or HEAD (retries included): a server that never answers is reported.
    pub list_timeout_s: u64,
    /// Until a GET or PUT response begins.
    pub first_byte_timeout_s: u64,
    /// One object's body transfer (a 32 MiB chunk must fit). `request_timeout_s` is the old
    /// name of this key.
    #[serde(alias = "request_timeout_s")]
    pub body_timeout_s: u64,
    pub max_retries: usize,
    /// Try `If-None-Match` puts (servers answering 501 are detected either way).
    pub conditional_put: bool,
    /// How long a process that queued uploads waits for them when it ends.
    pub drain_on_exit_s: u64,
    /// Codec of the objects this host uploads: `raw` or `lossless` (fewer bytes in the
    /// bucket and on the wire; local chunks stay raw). Downloads decode either.
    pub codec: String,
}

impl Default for S3Settings {
    fn default() -> Self {
        let d = S3Config::from_url("s3://default").expect("static url");
        S3Settings {
            url: String::new(),
            endpoint: None,
            region: None,
            allow_http: false,
            virtual_hosted: false,
            access_key_id: None,
            secret_access_key: None,
            negative_ttl_ms: d.negative_ttl.as_millis() as u64,
            write_through: d.write_through,
            max_queued: d.max_queued,
            when_full: "block".into(),
            block_timeout_s: d.block_timeout.as_secs(),
            upload_concurrency: d.upload_concurrency,
            download_concurrency: d.download_concurrency,
            connect_timeout_s: d.connect_timeout.as_secs(),
            list_timeout_s: d.list_timeout.as_secs(),
            first_byte_timeout_s: d.first_byte_timeout.as_secs(),
            body_timeout_s: d.request_timeout.as_secs(),
            max_retries: d.max_retries,
            conditional_put: d.conditional_put,
            drain_on_exit_s: 30,
            codec: "raw".into(),
        }
    }
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("write_through", &self.write_through)
            .field("max_queued", &self.max_queued)
            .field("when_full", &self.when_full)
            .finish_non_exhaustive()
    }
}

impl S3Settings {
    /// The remote tier's configuration these settings describe.
    pub fn to_config(&self) -> Result<S3Config, RemoteError> {
        let mut c = S3Config::from_url(&self.url)?;
        if let Some(e) = &self.endpoint {
            c = c.with_endpoint(e);
        }
        c.allow_http |= self.allow_http;
        c.region = self.region.clone();
        c.virtual_hosted = self.virtual_hosted;
        c.access_key_id = self.access_key_id.clone();
        c.secret_access_key = self.secret_access_key.clone().map(Secret::new);
        c.negative_ttl = Duration::from_millis(self.negative_ttl_ms);
        c.write_through = self.write_through;
        c.max_queued = self.max_queued.max(1);
        c.when_full = match self.when_full.as_str() {
            "block" => Backpressure::Block,
            "fail" => Backpressure::Fail,
            _ => {
                return Err(RemoteError::Config(format!(
                    "when_full `{}` is neither `block` nor `fail`",
                    self.when_full
                )));
            }
        };
        c.block_timeout = Duration::from_secs(self.block_timeout_s);
        c.upload_concurrency = self.upload_concurrency.max(1);
        c.download_concurrency = self.download_concurrency.max(1);
        c.connect_timeout = Duration::from_secs(self.connect_timeout_s.max(1));
        c.list_timeout = Duration::from_secs(self.list_timeout_s.max(1));
        c.first_byte_timeout = Duration::from_secs(self.first_byte_timeout_s.max(1));
        c.request_timeout = Duration::from_secs(self.body_timeout_s.max(1));
        c.max_retries = self.max_retries;
        c.conditional_put = self.conditional_put;
        c.codec = kvfs_loader::Codec::parse(&self.codec)
            .map_err(|e| RemoteError::Config(format!("codec: {e}")))?;
        if !c.codec.is_lossless() {
            return Err(RemoteError::Config(format!(
                "codec `{}` is lossy; the remote codec must be lossless (`raw` or `lossless`): \
                 a lossy cache is a namespace of its own (the model spec's codec)",
                self.codec
            )));
        }
        Ok(c)
    }

    /// Opens the remote tier (with the upload queue under `cache_dir` when given).
    pub fn open(&self, cache_dir: Option<&Path>) -> Result<Remote, RemoteError> {
        Remote::open(self.to_config()?, cache_dir)
    }
}

/// The store's remote tier, backed by S3.
pub struct S3Tier {
    remote: Arc<Remote>,
    drain: Duration,
    queued_here: AtomicBool,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("remote", &self.remote)
            .finish()
    }
}

impl S3Tier {
    pub fn new(remote: Arc<Remote>, drain: Duration) -> S3Tier {
        S3Tier {
            remote,
            drain,
            queued_here: AtomicBool::new(false),
        }
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }
}

impl RemoteTier for S3Tier {
    fn fetch(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.remote.fetch(ns_dir, key).map_err(|e| {
            tracing::warn!(ns_dir, %key, error = %e, "remote tier fetch failed");
            StoreError::Remote(e.to_string())
        })
    }

    fn committed(&self, ns_dir: &str, key: &ChunkKey, path: &Path) {
        self.queued_here.store(true, Ordering::Relaxed);
        if let Err(e) = self.remote.committed(ns_dir, key, path) {
            tracing::warn!(ns_dir, %key, error = %e,
                "chunk committed locally but its upload is not done; `kvfs sync push` uploads it");
        }
    }

    fn upload_pending(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        self.remote.upload_pending(ns_dir, key)
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.remote.register_metrics(registry);
    }

    fn namespaces_holding(&self, key: &ChunkKey) -> Result<Vec<String>, StoreError> {
        let remote_err = |e: RemoteError| StoreError::Remote(e.to_string());
        let mut found = Vec::new();
        for ns in self.remote.list_namespaces().map_err(remote_err)? {
            if self
                .remote
                .object_size(&ns, key)
                .map_err(remote_err)?
                .is_some()
            {
                found.push(ns);
            }
        }
        Ok(found)
    }
}

impl Drop for S3Tier {
    fn drop(&mut self) {
        if self.remote.pending_uploads() == 0 {
            return;
        }
        if !self.queued_here.load(Ordering::Relaxed) {
            // Uploads earlier runs left: every process with the tier resumes them, and waits
            // for them at exit unless the bucket refuses them (an outage must not hold a
            // short command for the whole drain time).
            resume_at_exit(&self.remote, self.drain);
            return;
        }
        tracing::info!(
            pending = self.remote.pending_uploads(),
            "waiting for queued uploads"
        );
        if !self.remote.wait_uploaded(self.drain) {
            tracing::warn!(
                pending = self.remote.pending_uploads(),
                "uploads still queued at exit; the next kvfs process with S3 (or `kvfs sync push`) resumes them"
            );
        }
    }
}

/// Waits (at most `drain`, less when uploads fail) for uploads earlier runs left queued.
pub fn resume_at_exit(remote: &Remote, drain: Duration) {
    let pending = remote.pending_uploads();
    if pending == 0 {
        return;
    }
    tracing::info!(pending, "finishing uploads queued by earlier runs");
    if !remote.wait_uploaded_unless_failing(drain) {
        tracing::warn!(
            pending = remote.pending_uploads(),
            "uploads still queued at exit; the next kvfs process with S3 (or `kvfs sync push`) resumes them"
        );
    }
}

/// The upload queue of `cache_dir` for `kvfs info`: uploads waiting and the oldest's age.
pub fn queue_summary(cache_dir: &Path) -> (usize, Option<Duration>) {
    let st = kvfs_remote::queue::status(cache_dir).unwrap_or_default();
    (st.pending, st.oldest)
}

/// The remote tier for a store rooted at `cache_dir`, when `[s3]` (or `--s3`) is set. This
/// is the one place a store gets its S3 tier; nothing is opened while a configuration is
/// built.
pub fn attach(
    settings: Option<&S3Settings>,
    cache_dir: &Path,
) -> Result<Option<Arc<dyn RemoteTier>>, RemoteError> {
    let Some(s) = settings.filter(|s| !s.url.is_empty()) else {
        return Ok(None);
    };
    let remote = s.open(Some(cache_dir))?;
    Ok(Some(Arc::new(S3Tier::new(
        Arc::new(remote),
        Duration::from_secs(s.drain_on_exit_s),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_redact() {
        let s: S3Settings = toml::from_str(
            "url = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:3900\"\nsecret_access_key = \"hunter2-secret\"\nwhen_full = \"fail\"\n",
        )
        .unwrap();
        let c = s.to_config().unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("b", "p"));
        assert!(c.allow_http);
        assert_eq!(c.when_full, Backpressure::Fail);
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let bad = S3Settings {
            url: "s3://b".into(),
            when_full: "sometimes".into(),
            ..Default::default()
        };
        assert!(matches!(bad.to_config(), Err(RemoteError::Config(_))));
        assert!(toml::from_str::<S3Settings>("urll = \"s3://b\"").is_err());
    }

    #[test]
    fn the_remote_codec_is_lossless_or_refused() {
        let parse = |codec: &str| {
            toml::from_str::<S3Settings>(&format!("url = \"s3://b\"\ncodec = \"{codec}\"\n"))
                .unwrap()
                .to_config()
        };
        assert_eq!(
            parse("lossless").unwrap().codec,
            kvfs_loader::Codec::Lossless
        );
        assert_eq!(parse("raw").unwrap().codec, kvfs_loader::Codec::Raw);
        for bad in ["fp8", "kivi4", "gzip"] {
            let e = parse(bad).unwrap_err();
            assert!(
                matches!(&e, RemoteError::Config(m) if m.contains(bad)),
                "{e}"
            );
        }
    }
}
