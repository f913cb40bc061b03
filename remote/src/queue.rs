//! The write-behind upload queue, persisted on local disk.
//!
//! A chunk committed to the disk tier is already a durable file, so the queue only needs to
//! remember *which* chunks still have to go to the bucket. Each pending upload is one small
//! marker file `<cache root>/.uploads/<ns_dir>@<key>.up` holding the chunk's path, written
//! atomically and create-once with [`kvfs_loader::dir::commit_file`] (fsynced), and removed
//! only after the bucket acknowledged the object. So:
//!
//! - a crash or `kill -9` loses nothing: at the next open the markers are still there and the
//!   worker uploads them (put-if-absent makes a repeated upload harmless);
//! - several processes sharing one cache directory may upload the same marker twice, which is
//!   also harmless;
//! - an outage only delays: a failed batch stops at its first failure (so 1,000 queued chunks
//!   do not each wait through their own retries) and the worker retries with exponential
//!   backoff (0.2 s doubling to 10 s), or at once when a new chunk is queued.
//!
//! **The counter** of pending uploads is a cache of the marker directory's size. The worker
//! resynchronizes it from a scan (another process sharing the cache directory may have
//! uploaded some markers or queued its own); a marker created or removed by this process
//! changes the directory and the counter together under the read side of `sync`, and the
//! scan-and-store takes the write side, so a scan can never see a new marker and then have
//! the enqueue count it a second time (nor miss a removal and then count it again).
//!
//! [`status`] reads the queue without opening it (`kvfs info`): its length and the age of
//! its oldest marker.
//!
//! **Backpressure**: when `max_queued` uploads are pending, [`Backpressure::Block`] makes the
//! committing call wait up to `block_timeout` for the queue to drain, then fail with
//! [`RemoteError::QueueFull`]; [`Backpressure::Fail`] fails at once. Either way the chunk
//! itself stays committed locally; only its upload is not queued.

use crate::client::Bucket;
use crate::config::Backpressure;
use crate::error::RemoteError;
use bytes::Bytes;
use futures::StreamExt;
use kvfs_loader::dir::{Commit, commit_file, sweep_temporaries};
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, ChunkView, Verify};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Directory of the queue's markers under the cache root.
pub const UPLOADS_DIR: &str = ".uploads";
const MARKER_SUFFIX: &str = ".up";

pub(crate) struct Queue {
    root: PathBuf,
    dir: PathBuf,
    pending: AtomicUsize,
    /// Read: one marker changes with the counter. Write: a scan resets the counter.
    sync: RwLock<()>,
    /// Batches of uploads that failed (an exit drain stops waiting on a failure).
    failed_batches: AtomicU64,
    wake: tokio::sync::Notify,
    drained: (Mutex<()>, Condvar),
    shutdown: AtomicBool,
    bucket: Arc<Bucket>,
}

/// Outcome of one marker's upload attempt.
enum Attempt {
    Done,
    Skipped,
    Failed,
}

pub(crate) fn marker_name(ns_dir: &str, key: &ChunkKey) -> String {
    format!("{ns_dir}@{}{MARKER_SUFFIX}", key.to_hex())
}

fn parse_marker(name: &str) -> Option<(String, ChunkKey)> {
    let stem = name.strip_suffix(MARKER_SUFFIX)?;
    let (ns, key) = stem.split_once('@')?;
    validate_namespace_dir(ns).ok()?;
    Some((ns.to_string(), ChunkKey::from_hex(key).ok()?))
}

impl Queue {
    /// Opens (creating) the queue under `root` and counts what is pending from earlier runs.
    pub fn open(root: &Path, bucket: Arc<Bucket>) -> Result<Queue, RemoteError> {
        let dir = root.join(UPLOADS_DIR);
        kvfs_loader::dir::create_dirs(&dir).map_err(|e| RemoteError::io(&dir, e))?;
        let _ = sweep_temporaries(&dir, Duration::from_secs(60));
        let q = Queue {
            root: root.to_path_buf(),
            pending: AtomicUsize::new(0),
            sync: RwLock::new(()),
            failed_batches: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            drained: (Mutex::new(()), Condvar::new()),
            shutdown: AtomicBool::new(false),
            bucket,
            dir,
        };
        let n = q.rescan()?.len();
        if n > 0 {
            tracing::info!(pending = n, "resuming uploads queued by an earlier run");
        }
        Ok(q)
    }

    /// Whether a marker for `ns_dir/key` is in the queue (one `stat`).
    pub fn is_pending(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        self.dir.join(marker_name(ns_dir, key)).exists()
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Scans the markers and sets the counter to what the directory holds, atomically with
    /// respect to this process's own marker changes.
    fn rescan(&self) -> Result<Vec<String>, RemoteError> {
        let _w = self.sync.write().unwrap();
        let names = self.scan()?;
        self.pending.store(names.len(), Ordering::SeqCst);
        Ok(names)
    }

    /// Length and oldest entry, read from the marker files (see [`status`]); the counter
    /// alone when the directory cannot be read.
    pub fn status(&self) -> QueueStatus {
        status(&self.root).unwrap_or(QueueStatus {
            pending: self.pending(),
            oldest: None,
        })
    }

    /// Failed upload batches since open.
    pub fn failed_batches(&self) -> u64 {
        self.failed_batches.load(Ordering::SeqCst)
    }

    fn scan(&self) -> Result<Vec<String>, RemoteError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| RemoteError::io(&self.dir, e))?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(MARKER_SUFFIX) && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Records that `chunk` (already committed locally) must be uploaded. Returns the marker
    /// name. Applies backpressure first (see the module docs).
    pub fn enqueue(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        chunk: &Path,
    ) -> Result<String, RemoteError> {
        let max = self.bucket.cfg.max_queued.max(1);
        if self.pending() >= max {
            match self.bucket.cfg.when_full {
                Backpressure::Fail => {
                    return Err(RemoteError::QueueFull {
                        pending: self.pending(),
                    });
                }
                Backpressure::Block => {
                    let deadline = Instant::now() + self.bucket.cfg.block_timeout;
                    let (m, cv) = &self.drained;
                    let mut g = m.lock().unwrap();
                    while self.pending() >= max {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(RemoteError::QueueFull {
                                pending: self.pending(),
                            });
                        }
                        g = cv
                            .wait_timeout(g, (deadline - now).min(Duration::from_millis(200)))
                            .unwrap()
                            .0;
                    }
                }
            }
        }
        let name = marker_name(ns_dir, key);
        let marker = self.dir.join(&name);
        let content = chunk.as_os_str().as_encoded_bytes();
        let created = {
            let _r = self.sync.read().unwrap();
            let c = commit_file(&marker, content, true).map_err(|e| RemoteError::io(&marker, e))?;
            if c == Commit::Created {
                self.pending.fetch_add(1, Ordering::SeqCst);
            }
            c == Commit::Created
        };
        if created {
            self.wake.notify_one();
        }
        Ok(name)
    }

    /// Blocks until no marker is left (by this process or another sharing the cache
    /// directory) or `timeout` passes; true when drained. The directory is the authority, the
    /// counter only a hint.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &self.drained;
        let mut g = m.lock().unwrap();
        while self.pending() > 0 || !self.scan().map(|v| v.is_empty()).unwrap_or(true) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
        true
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn done(&self, marker: &Path) {
        let _r = self.sync.read().unwrap();
        match std::fs::remove_file(marker) {
            Ok(()) => {
                let _ = self
                    .pending
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                        Some(p.saturating_sub(1))
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(marker = %marker.display(), error = %e, "cannot remove upload marker")
            }
        }
        drop(_r);
        let (m, cv) = &self.drained;
        let _g = m.lock().unwrap();
        cv.notify_all();
    }

    /// Uploads the chunk named by one marker; removes the marker on success, or when the
    /// chunk can never be uploaded (gone, or invalid locally: logged).
    pub async fn upload_marker(&self, name: &str) -> Result<(), RemoteError> {
        let marker = self.dir.join(name);
        let Some((ns_dir, key)) = parse_marker(name) else {
            tracing::warn!(name, "removing a malformed upload marker");
            self.done(&marker);
            return Ok(());
        };
        let read = {
            let marker = marker.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<(PathBuf, Vec<u8>)>> {
                let content = match std::fs::read(&marker) {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let path = PathBuf::from(std::ffi::OsStr::from_bytes(&content));
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some((path, b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Ok(Some((path, Vec::new())))
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .expect("marker read task panicked")
        };
        let (chunk_path, bytes) = match read {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(()), // another process finished it
            Err(e) => return Err(RemoteError::io(&marker, e)),
        };
        if bytes.is_empty() {
            tracing::warn!(chunk = %chunk_path.display(), "chunk vanished before its upload; dropping it from the queue");
            self.done(&marker);
            return Ok(());
        }
        let bytes = Bytes::from(bytes);
        let checked = {
            let b = bytes.clone();
            tokio::task::spawn_blocking(move || {
                let v = ChunkView::parse(&b, Verify::Full)?;
                Ok::<_, kvfs_loader::FormatError>(v.header)
            })
            .await
            .expect("verify task panicked")
        };
        let header = match checked {
            Ok(h) if h.meta.key == key => h,
            Ok(h) => {
                tracing::error!(chunk = %chunk_path.display(), found = %h.meta.key, "local chunk does not hold its key; not uploading");
                self.done(&marker);
                return Ok(());
            }
            Err(e) => {
                tracing::error!(chunk = %chunk_path.display(), error = %e, "local chunk is invalid; not uploading");
                self.done(&marker);
                return Ok(());
            }
        };
        let json_path = self.root.join(&ns_dir).join(crate::client::NAMESPACE_JSON);
        let json = crate::nsjson::checked_or_rebuilt(
            std::fs::read(&json_path).ok(),
            &json_path.display().to_string(),
            &ns_dir,
            &header,
        );
        self.bucket.ensure_namespace_json(&ns_dir, json).await?;
        self.bucket
            .upload_verified(&ns_dir, &key, bytes, header.payload_digest)
            .await?;
        self.done(&marker);
        Ok(())
    }

    /// The worker: uploads whatever is queued until [`Queue::stop`].
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::ZERO;
        while !self.shutdown.load(Ordering::SeqCst) {
            // Resynchronize the counter with the directory (another process sharing the cache
            // directory may have uploaded some of our markers, or queued its own).
            let q = self.clone();
            let names = match tokio::task::spawn_blocking(move || q.rescan())
                .await
                .expect("queue scan panicked")
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot scan the upload queue");
                    Vec::new()
                }
            };
            if names.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let failed = AtomicBool::new(false);
            let conc = self.bucket.cfg.upload_concurrency.max(1);
            let outcomes: Vec<Attempt> = futures::stream::iter(names)
                .map(|name| {
                    let q = &self;
                    let failed = &failed;
                    async move {
                        if failed.load(Ordering::SeqCst) || q.shutdown.load(Ordering::SeqCst) {
                            return Attempt::Skipped;
                        }
                        match q.upload_marker(&name).await {
                            Ok(()) => Attempt::Done,
                            Err(e) => {
                                if !failed.swap(true, Ordering::SeqCst) {
                                    tracing::warn!(marker = name, error = %e, "upload failed; will retry");
                                }
                                Attempt::Failed
                            }
                        }
                    }
                })
                .buffer_unordered(conc)
                .collect()
                .await;
            let fails = outcomes
                .iter()
                .filter(|o| matches!(o, Attempt::Failed))
                .count();
            if fails > 0 {
                self.failed_batches.fetch_add(1, Ordering::SeqCst);
                backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(10));
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
            } else {
                backoff = Duration::ZERO;
            }
        }
    }
}

/// What a queue holds, read without opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStatus {
    /// Uploads waiting.
    pub pending: usize,
    /// Age of the oldest waiting upload.
    pub oldest: Option<Duration>,
}

/// Length and oldest entry of the upload queue under cache root `root` (empty when there
/// is no queue).
pub fn status(root: &Path) -> std::io::Result<QueueStatus> {
    let dir = root.join(UPLOADS_DIR);
    let rd = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(QueueStatus::default()),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut st = QueueStatus::default();
    for e in rd {
        let e = e?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if parse_marker(&name).is_none() {
            continue;
        }
        st.pending += 1;
        if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
            let age = now.duration_since(m).unwrap_or_default();
            st.oldest = Some(st.oldest.map_or(age, |o| o.max(age)));
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_round_trip_and_reject() {
        let key = ChunkKey([7; 32]);
        let n = marker_name("kvfs-tiny-test-0123456789abcdef", &key);
        assert_eq!(
            parse_marker(&n),
            Some(("kvfs-tiny-test-0123456789abcdef".to_string(), key))
        );
        for bad in [
            "x.up",
            "../x@ab.up",
            &n.replace(".up", ""),
            &n.replace('@', "-"),
        ] {
            assert!(parse_marker(bad).is_none(), "{bad}");
        }
    }
}
