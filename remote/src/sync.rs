//! Bulk transfer between a cache directory and the bucket: `kvfs sync push|pull`.
//!
//! Both directions are idempotent and therefore resumable: `push` lists the bucket once per
//! namespace and uploads (put-if-absent) only the chunks it lacks; `pull` downloads only the
//! chunks the cache lacks, streaming each body into a temporary file while verifying it layer
//! by layer (see [`crate::stream`]: the same checks as `Verify::Full`, without holding the
//! object in memory), and commits it with [`kvfs_loader::dir::commit_with`] (temporary file +
//! link), so an interrupted or damaged pull leaves complete chunks or nothing, and the next
//! run continues where it stopped. Transfers run
//! `upload_concurrency` / `download_concurrency` at a time on the tier's runtime; progress is
//! reported through a callback so the CLI can draw bars without this crate knowing about them.
//!
//! Pulled chunks are written without fsync (like `cp` or `s5cmd`): a crash can lose a pulled
//! chunk, never corrupt one, and the next pull fetches it again.

use crate::Remote;
use crate::client::NAMESPACE_JSON;
use crate::error::RemoteError;
use crate::stream::StreamingChunk;
use bytes::Bytes;
use futures::StreamExt;
use kvfs_loader::dir::{Layout, commit_file, commit_with};
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, ChunkView, FormatError, Verify};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Progress of a sync, reported as it happens.
#[derive(Debug, Clone)]
pub enum SyncEvent {
    /// The work is known: chunks and bytes to transfer (after skipping what is there).
    Planned {
        chunks: u64,
        bytes: u64,
        skipped: u64,
    },
    /// One chunk transferred.
    Transferred {
        ns_dir: String,
        key: ChunkKey,
        bytes: u64,
    },
    /// One chunk failed (the sync goes on; run it again to retry).
    Failed {
        ns_dir: String,
        key: ChunkKey,
        error: String,
    },
}

/// Totals of a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub namespaces: u64,
    pub transferred: u64,
    pub bytes: u64,
    /// Already present on the other side.
    pub skipped: u64,
    pub failed: u64,
}

/// Local chunks of one namespace in a cache directory (`Layout::Cache`).
pub fn local_chunks(root: &Path, ns_dir: &str) -> std::io::Result<Vec<(ChunkKey, PathBuf)>> {
    let mut out = Vec::new();
    let ns = root.join(ns_dir);
    let fans = match std::fs::read_dir(&ns) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for fan in fans {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(fan.path())? {
            let f = f?;
            if let Some(key) = f
                .file_name()
                .to_str()
                .and_then(|n| ChunkKey::from_file_name(n).ok())
            {
                out.push((key, f.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Namespace directories in a cache directory.
pub fn local_namespaces(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        if let Some(n) = e.file_name().to_str()
            && e.file_type()?.is_dir()
            && validate_namespace_dir(n).is_ok()
        {
            out.push(n.to_string());
        }
    }
    out.sort();
    Ok(out)
}

impl Remote {
    /// Uploads every local chunk (of `namespace`, or of all namespaces) the bucket lacks.
    pub fn push(
        &self,
        cache_root: &Path,
        namespace: Option<&str>,
        progress: &(dyn Fn(SyncEvent) + Sync),
    ) -> Result<SyncReport, RemoteError> {
        let namespaces = match namespace {
            Some(ns) => vec![ns.to_string()],
            None => local_namespaces(cache_root).map_err(|e| RemoteError::io(cache_root, e))?,
        };
        let mut plan: Vec<(String, ChunkKey, PathBuf, u64)> = Vec::new();
        let mut report = SyncReport {
            namespaces: namespaces.len() as u64,
            ..Default::default()
        };
        for ns in &namespaces {
            validate_namespace_dir(ns).map_err(RemoteError::Name)?;
            let remote: HashSet<ChunkKey> =
                self.list_chunks(ns)?.into_iter().map(|(k, _)| k).collect();
            for (key, path) in
                local_chunks(cache_root, ns).map_err(|e| RemoteError::io(cache_root, e))?
            {
                if remote.contains(&key) {
                    report.skipped += 1;
                } else {
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    plan.push((ns.clone(), key, path, len));
                }
            }
        }
        progress(SyncEvent::Planned {
            chunks: plan.len() as u64,
            bytes: plan.iter().map(|p| p.3).sum(),
            skipped: report.skipped,
        });
        let bucket = self.bucket().clone();
        let totals = Mutex::new(report);
        let conc = bucket.cfg.upload_concurrency.max(1);
        self.block_on(
            futures::stream::iter(plan)
                .map(|(ns, key, path, _)| {
                    let bucket = &bucket;
                    let totals = &totals;
                    async move {
                        let r: Result<u64, RemoteError> = async {
                            let p = path.clone();
                            let bytes = tokio::task::spawn_blocking(move || {
                                let b = std::fs::read(&p).map_err(|e| RemoteError::io(&p, e))?;
                                let v = ChunkView::parse(&b, Verify::Full).map_err(|source| {
                                    RemoteError::LocalChunk {
                                        path: p.clone(),
                                        source,
                                    }
                                })?;
                                let json = std::fs::read(
                                    p.parent()
                                        .and_then(Path::parent)
                                        .unwrap_or(&p)
                                        .join(NAMESPACE_JSON),
                                )
                                .ok()
                                .unwrap_or_else(|| v.header.meta.namespace.to_hex().into_bytes());
                                Ok::<_, RemoteError>((Bytes::from(b), Bytes::from(json)))
                            })
                            .await
                            .expect("read task panicked")?;
                            let (bytes, json) = bytes;
                            if json.first() == Some(&b'{') {
                                bucket.ensure_namespace_json(&ns, json).await?;
                            }
                            let len = bytes.len() as u64;
                            bucket
                                .put_if_absent(&bucket.chunk_path(&ns, &key), bytes)
                                .await?;
                            Ok(len)
                        }
                        .await;
                        let mut t = totals.lock().unwrap();
                        match r {
                            Ok(len) => {
                                t.transferred += 1;
                                t.bytes += len;
                                progress(SyncEvent::Transferred {
                                    ns_dir: ns,
                                    key,
                                    bytes: len,
                                });
                            }
                            Err(e) => {
                                t.failed += 1;
                                progress(SyncEvent::Failed {
                                    ns_dir: ns,
                                    key,
                                    error: e.to_string(),
                                });
                            }
                        }
                    }
                })
                .buffer_unordered(conc)
                .collect::<Vec<()>>(),
        )?;
        Ok(totals.into_inner().unwrap())
    }

    /// Downloads every remote chunk (of `namespace`, or of all namespaces) the cache lacks,
    /// verifying each before it is committed.
    pub fn pull(
        &self,
        cache_root: &Path,
        namespace: Option<&str>,
        progress: &(dyn Fn(SyncEvent) + Sync),
    ) -> Result<SyncReport, RemoteError> {
        let namespaces = match namespace {
            Some(ns) => vec![ns.to_string()],
            None => self.list_namespaces()?,
        };
        let mut plan: Vec<(String, ChunkKey, PathBuf, u64)> = Vec::new();
        let mut report = SyncReport {
            namespaces: namespaces.len() as u64,
            ..Default::default()
        };
        for ns in &namespaces {
            let chunks = self.list_chunks(ns)?;
            let json_path = cache_root.join(ns).join(NAMESPACE_JSON);
            if !json_path.exists()
                && let Some(json) = self.namespace_json(ns)?
            {
                commit_file(&json_path, &json, false)
                    .map_err(|e| RemoteError::io(&json_path, e))?;
            }
            for (key, size) in chunks {
                let path = Layout::Cache.chunk_path(cache_root, ns, &key);
                if path.exists() {
                    report.skipped += 1;
                } else {
                    plan.push((ns.clone(), key, path, size));
                }
            }
        }
        progress(SyncEvent::Planned {
            chunks: plan.len() as u64,
            bytes: plan.iter().map(|p| p.3).sum(),
            skipped: report.skipped,
        });
        let bucket = self.bucket().clone();
        let totals = Mutex::new(report);
        let conc = bucket.cfg.download_concurrency.max(1);
        self.block_on(
            futures::stream::iter(plan)
                .map(|(ns, key, path, _)| {
                    let bucket = &bucket;
                    let totals = &totals;
                    async move {
                        let r: Result<u64, RemoteError> = async {
                            use object_store::ObjectStoreExt;
                            let opath = bucket.chunk_path(&ns, &key);
                            let body = bucket.store.get(&opath).await?.into_stream();
                            crate::client::bump(&bucket.counters.fetches, 1);
                            let (nsc, p) = (ns.clone(), path.clone());
                            let handle = tokio::runtime::Handle::current();
                            tokio::task::spawn_blocking(move || {
                                download_into(handle, body, &nsc, key, &p, opath.to_string())
                            })
                            .await
                            .expect("download task panicked")
                        }
                        .await;
                        if let Ok(n) = r {
                            crate::client::bump(&bucket.counters.bytes_fetched, n);
                        }
                        let mut t = totals.lock().unwrap();
                        match r {
                            Ok(len) => {
                                t.transferred += 1;
                                t.bytes += len;
                                progress(SyncEvent::Transferred { ns_dir: ns, key, bytes: len });
                            }
                            Err(e) => {
                                if matches!(e, RemoteError::Corrupt { .. }) {
                                    crate::client::bump(&bucket.counters.corrupt, 1);
                                }
                                tracing::warn!(ns_dir = ns, %key, error = %e, "pull of a chunk failed");
                                t.failed += 1;
                                progress(SyncEvent::Failed { ns_dir: ns, key, error: e.to_string() });
                            }
                        }
                    }
                })
                .buffer_unordered(conc)
                .collect::<Vec<()>>(),
        )?;
        Ok(totals.into_inner().unwrap())
    }
}

/// Streams one object into `target` (verified as it arrives; see [`crate::stream`]) on a
/// blocking thread, pulling body frames from the runtime. Returns the chunk's length.
fn download_into(
    handle: tokio::runtime::Handle,
    mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    ns_dir: &str,
    key: ChunkKey,
    target: &Path,
    object: String,
) -> Result<u64, RemoteError> {
    let mut invalid: Option<FormatError> = None;
    let mut network: Option<object_store::Error> = None;
    let mut len = 0;
    let r = commit_with(target, false, |f| {
        let mut chunk = StreamingChunk::new(ns_dir, key);
        while let Some(frame) = handle.block_on(body.next()) {
            let frame = frame.map_err(|e| {
                network = Some(e);
                std::io::Error::other("download failed")
            })?;
            chunk.feed(&frame, f).map_err(|e| match e {
                FormatError::Io(e) => e,
                e => {
                    invalid = Some(e);
                    std::io::Error::other("invalid chunk")
                }
            })?;
        }
        len = chunk.finish().map_err(|e| {
            invalid = Some(e);
            std::io::Error::other("invalid chunk")
        })?;
        Ok(())
    });
    match (r, invalid, network) {
        (_, Some(source), _) => Err(RemoteError::Corrupt {
            path: object,
            source,
        }),
        (_, None, Some(e)) => Err(RemoteError::Store(e)),
        (Ok(_), None, None) => Ok(len),
        (Err(e), None, None) => Err(RemoteError::io(target, e)),
    }
}
