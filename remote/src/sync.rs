//! Bulk transfer between a cache directory and the bucket: `kvfs sync push|pull`.
//!
//! Both directions are idempotent and therefore resumable: `push` lists the bucket once per
//! namespace and uploads only what the bucket lacks or holds wrong. A listed object of the
//! chunk's size is checked with one HEAD against the payload digest the uploader stored in its
//! metadata (the local side reads only the chunk's header); an object of another size, or
//! without or with another digest, is read back and verified, and replaced from the verified
//! local chunk when it fails ([`crate::client`]'s read-repair). `push --verify`
//! ([`Remote::scrub`]) goes further and reads every object of the bucket back, verifying it in
//! full: damage at rest (a flipped byte under a correct digest) is only found that way. With
//! a remote codec (`[s3] codec`) sizes never match the raw local chunks, so every listed
//! object gets the HEAD, and the raw digest the uploader recorded beside the coded one says
//! whether it holds the local chunk: a push of a synced cache encodes nothing. A
//! damaged object is repaired when this host has a verified copy, else reported. `pull`
//! downloads only the
//! chunks the cache lacks, streaming each body into a temporary file while verifying it layer
//! by layer (see [`crate::stream`]: the same checks as `Verify::Full`, without holding the
//! object in memory), and commits it with [`kvfs_loader::dir::commit_with`] (temporary file +
//! link), so an interrupted or damaged pull leaves complete chunks or nothing, and the next
//! run continues where it stopped. Transfers run
//! `upload_concurrency` / `download_concurrency` at a time on the tier's runtime; progress is
//! reported through a callback so the CLI can draw bars without this crate knowing about them.
//!
//! `namespace.json` is checked ([`crate::nsjson`]) before it is committed or uploaded: a bad
//! one in the bucket is not copied (the cache gets one built from a verified chunk header, and
//! a bad one already in the cache is replaced), a bad local one is not uploaded.
//!
//! Pulled chunks are written without fsync (like `cp` or `s5cmd`): a crash can lose a pulled
//! chunk, never corrupt one, and the next pull fetches it again.

use crate::Remote;
use crate::client::{Bucket, NAMESPACE_JSON, PutOutcome, bump};
use crate::error::RemoteError;
use crate::nsjson;
use crate::stream::StreamingChunk;
use bytes::Bytes;
use futures::StreamExt;
use kvfs_loader::dir::{Layout, commit_with};
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkHeader, ChunkKey, ChunkView, FormatError, Verify};
use std::collections::HashMap;
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
    /// A damaged object in the bucket was replaced from the verified local chunk.
    Repaired { ns_dir: String, key: ChunkKey },
    /// A damaged object in the bucket that this host cannot repair (no verified copy).
    Damaged {
        ns_dir: String,
        key: ChunkKey,
        cause: String,
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
    /// Damaged objects replaced from a verified local chunk.
    pub repaired: u64,
    /// Damaged objects left as they are (no verified copy here).
    pub damaged: u64,
    /// Objects read back and verified in full (`push --verify`).
    pub verified: u64,
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

/// What push does with one local chunk.
enum PushStep {
    /// The bucket lacks it, or holds an object of another size: read, verify, upload.
    Upload,
    /// The bucket holds an object of its size: compare digests first.
    Compare,
}

/// Reads a local chunk's header only (the digest comparison of `push`), through the
/// loader's reader (header length bounded before allocation, file length checked).
fn read_header(path: &Path) -> Result<ChunkHeader, RemoteError> {
    let f = std::fs::File::open(path).map_err(|e| RemoteError::io(path, e))?;
    ChunkHeader::read_from(&f).map_err(|source| RemoteError::LocalChunk {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and verifies the local chunk at `path` off the async threads, and makes sure the
/// bucket has its namespace's `namespace.json` before the chunk is uploaded (push and scrub).
async fn read_for_upload(
    bucket: &Bucket,
    path: std::path::PathBuf,
    ns_dir: &str,
    key: ChunkKey,
) -> Result<(Bytes, ChunkHeader), RemoteError> {
    let n = ns_dir.to_string();
    let (bytes, header, json) = tokio::task::spawn_blocking(move || read_verified(&path, &n, &key))
        .await
        .expect("read task panicked")?;
    bucket.ensure_namespace_json(ns_dir, json).await?;
    Ok((bytes, header))
}

/// Reads and fully verifies a local chunk as `ns_dir/key`, with its checked namespace.json.
fn read_verified(
    path: &Path,
    ns_dir: &str,
    key: &ChunkKey,
) -> Result<(Bytes, ChunkHeader, Bytes), RemoteError> {
    let b = std::fs::read(path).map_err(|e| RemoteError::io(path, e))?;
    let header = ChunkView::parse(&b, Verify::Full)
        .and_then(|v| {
            crate::client::check_identity(&v.header, ns_dir, key)?;
            Ok(v.header)
        })
        .map_err(|source| RemoteError::LocalChunk {
            path: path.to_path_buf(),
            source,
        })?;
    let json_path = path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(path)
        .join(NAMESPACE_JSON);
    let json = nsjson::checked_or_rebuilt(
        std::fs::read(&json_path).ok(),
        &json_path.display().to_string(),
        ns_dir,
        &header,
    );
    Ok((Bytes::from(b), header, json))
}

/// How one chunk of a push or scrub ended.
enum Done {
    Uploaded(u64),
    Repaired(u64),
    AlreadyThere,
    Verified,
    Damaged(String),
}

impl Remote {
    /// Uploads every local chunk (of `namespace`, or of all namespaces) the bucket lacks or
    /// holds wrong (see the module docs).
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
        let mut plan: Vec<(String, ChunkKey, PathBuf, PushStep)> = Vec::new();
        let mut bytes = 0;
        let coded = self.bucket().cfg.codec != kvfs_loader::Codec::Raw;
        for ns in &namespaces {
            validate_namespace_dir(ns).map_err(RemoteError::Name)?;
            let remote: HashMap<ChunkKey, u64> = self.list_chunks(ns)?.into_iter().collect();
            for (key, path) in
                local_chunks(cache_root, ns).map_err(|e| RemoteError::io(cache_root, e))?
            {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                // With a remote codec an object's size says nothing about the raw local
                // chunk: compare the digests recorded at upload.
                let step = match remote.get(&key) {
                    Some(size) if *size == len || coded => PushStep::Compare,
                    _ => {
                        bytes += len;
                        PushStep::Upload
                    }
                };
                plan.push((ns.clone(), key, path, step));
            }
        }
        progress(SyncEvent::Planned {
            chunks: plan
                .iter()
                .filter(|p| matches!(p.3, PushStep::Upload))
                .count() as u64,
            bytes,
            skipped: plan
                .iter()
                .filter(|p| matches!(p.3, PushStep::Compare))
                .count() as u64,
        });
        let report = SyncReport {
            namespaces: namespaces.len() as u64,
            ..Default::default()
        };
        let bucket = self.bucket().clone();
        let jobs = plan.into_iter().map(|(ns, key, path, step)| {
            let bucket = bucket.clone();
            async move {
                let r = async {
                    if let PushStep::Compare = step {
                        let p = path.clone();
                        let header = tokio::task::spawn_blocking(move || read_header(&p))
                            .await
                            .expect("read task panicked")?;
                        let opath = bucket.chunk_path(&ns, &key);
                        if bucket.damage(&opath).is_none()
                            && let Some(h) = bucket.head_meta(&opath).await?
                            && h.records(&header.payload_digest)
                        {
                            return Ok(Done::AlreadyThere);
                        }
                    }
                    let (bytes, header) = read_for_upload(&bucket, path.clone(), &ns, key).await?;
                    let len = bytes.len() as u64;
                    Ok(
                        match bucket
                            .upload_verified(&ns, &key, bytes, header.payload_digest)
                            .await?
                        {
                            PutOutcome::Created => Done::Uploaded(len),
                            PutOutcome::Replaced => Done::Repaired(len),
                            PutOutcome::AlreadyPresent => Done::AlreadyThere,
                        },
                    )
                }
                .await;
                (ns, key, r)
            }
        });
        self.run_jobs(jobs, bucket.cfg.upload_concurrency, report, progress)
    }

    /// The namespaces a bucket-wide command works on: the one named, else every namespace
    /// in the bucket.
    fn bucket_namespaces(&self, namespace: Option<&str>) -> Result<Vec<String>, RemoteError> {
        match namespace {
            Some(ns) => Ok(vec![ns.to_string()]),
            None => self.list_namespaces(),
        }
    }

    /// Reads every object of the bucket (of `namespace`, or of all namespaces) back and
    /// verifies it in full; a damaged one is repaired from this cache's verified copy when
    /// there is one, else reported (`kvfs sync push --verify`).
    pub fn scrub(
        &self,
        cache_root: &Path,
        namespace: Option<&str>,
        progress: &(dyn Fn(SyncEvent) + Sync),
    ) -> Result<SyncReport, RemoteError> {
        let namespaces = self.bucket_namespaces(namespace)?;
        let mut plan = Vec::new();
        let mut bytes = 0;
        for ns in &namespaces {
            for (key, size) in self.list_chunks(ns)? {
                bytes += size;
                plan.push((ns.clone(), key));
            }
            self.scrub_namespace_json(cache_root, ns)?;
        }
        progress(SyncEvent::Planned {
            chunks: plan.len() as u64,
            bytes,
            skipped: 0,
        });
        let report = SyncReport {
            namespaces: namespaces.len() as u64,
            ..Default::default()
        };
        let bucket = self.bucket().clone();
        let root = cache_root.to_path_buf();
        let jobs = plan.into_iter().map(|(ns, key)| {
            let (bucket, root) = (bucket.clone(), root.clone());
            async move {
                let r = async {
                    let opath = bucket.chunk_path(&ns, &key);
                    bump(&bucket.counters.fetches, 1);
                    let Some((object, _)) = bucket.get_object(&opath).await? else {
                        // Deleted since the listing.
                        return Ok(Done::AlreadyThere);
                    };
                    bump(&bucket.counters.bytes_fetched, object.len() as u64);
                    let cause = match bucket.verify_off_thread(object, &ns, &key).await {
                        Ok(()) => return Ok(Done::Verified),
                        Err(e) => e.to_string(),
                    };
                    bump(&bucket.counters.corrupt, 1);
                    bucket.note_damage(&opath, &cause);
                    let local = Layout::Cache.chunk_path(&root, &ns, &key);
                    if !local.exists() {
                        return Ok(Done::Damaged(cause));
                    }
                    let (bytes, header) = read_for_upload(&bucket, local, &ns, key).await?;
                    let len = bytes.len() as u64;
                    Ok(
                        match bucket
                            .repair(&ns, &key, bytes, header.payload_digest)
                            .await?
                        {
                            PutOutcome::AlreadyPresent => Done::Verified,
                            _ => Done::Repaired(len),
                        },
                    )
                }
                .await;
                (ns, key, r)
            }
        });
        self.run_jobs(jobs, bucket.cfg.upload_concurrency, report, progress)
    }

    /// Checks the bucket's `namespace.json` of `ns_dir` and replaces a bad one with the local
    /// one (when valid) or one built from a verified local chunk header.
    fn scrub_namespace_json(&self, cache_root: &Path, ns_dir: &str) -> Result<(), RemoteError> {
        let Some(found) = self.namespace_json(ns_dir)? else {
            return Ok(());
        };
        let Err(e) = nsjson::check(&found, ns_dir, None) else {
            return Ok(());
        };
        let local = local_chunks(cache_root, ns_dir).map_err(|e| RemoteError::io(cache_root, e))?;
        let Some((key, path)) = local.first() else {
            tracing::warn!(ns_dir, error = %e,
                "namespace.json in the bucket is invalid and this cache has no chunk of it to rebuild it from");
            return Ok(());
        };
        let (_, _, json) = read_verified(path, ns_dir, key)?;
        self.block_on(self.bucket().ensure_namespace_json(ns_dir, json))?
    }

    /// Runs push or scrub jobs `conc` at a time, counting and reporting each.
    fn run_jobs<F>(
        &self,
        jobs: impl Iterator<Item = F>,
        conc: usize,
        report: SyncReport,
        progress: &(dyn Fn(SyncEvent) + Sync),
    ) -> Result<SyncReport, RemoteError>
    where
        F: std::future::Future<Output = (String, ChunkKey, Result<Done, RemoteError>)>,
    {
        let totals = Mutex::new(report);
        self.block_on(
            futures::stream::iter(jobs)
                .buffer_unordered(conc.max(1))
                .for_each(|(ns, key, r)| {
                    let mut t = totals.lock().unwrap();
                    match r {
                        Ok(Done::Uploaded(len)) => {
                            t.transferred += 1;
                            t.bytes += len;
                            progress(SyncEvent::Transferred {
                                ns_dir: ns,
                                key,
                                bytes: len,
                            });
                        }
                        Ok(Done::Repaired(len)) => {
                            t.transferred += 1;
                            t.repaired += 1;
                            t.bytes += len;
                            progress(SyncEvent::Repaired {
                                ns_dir: ns.clone(),
                                key,
                            });
                            progress(SyncEvent::Transferred {
                                ns_dir: ns,
                                key,
                                bytes: len,
                            });
                        }
                        Ok(Done::AlreadyThere) => t.skipped += 1,
                        Ok(Done::Verified) => t.verified += 1,
                        Ok(Done::Damaged(cause)) => {
                            t.damaged += 1;
                            progress(SyncEvent::Damaged {
                                ns_dir: ns,
                                key,
                                cause,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(ns_dir = ns, %key, error = %e, "sync of a chunk failed");
                            t.failed += 1;
                            progress(SyncEvent::Failed {
                                ns_dir: ns,
                                key,
                                error: e.to_string(),
                            });
                        }
                    }
                    futures::future::ready(())
                }),
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
        let namespaces = self.bucket_namespaces(namespace)?;
        let mut plan: Vec<(String, ChunkKey, PathBuf, u64)> = Vec::new();
        let mut report = SyncReport {
            namespaces: namespaces.len() as u64,
            ..Default::default()
        };
        for ns in &namespaces {
            let chunks = self.list_chunks(ns)?;
            self.pull_namespace_json(cache_root, ns)?;
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
                            let opath = bucket.chunk_path(&ns, &key);
                            let got = bucket
                                .timed(
                                    "GET",
                                    bucket.cfg.first_byte_timeout,
                                    "first_byte_timeout_s",
                                    bucket.store.get_opts(&opath, Default::default()),
                                )
                                .await?;
                            let body = got.into_stream();
                            bump(&bucket.counters.fetches, 1);
                            let (nsc, p) = (ns.clone(), path.clone());
                            let handle = tokio::runtime::Handle::current();
                            let limit = bucket.cfg.request_timeout;
                            let r = tokio::task::spawn_blocking(move || {
                                download_into(handle, body, limit, &nsc, key, &p, opath.to_string())
                            })
                            .await
                            .expect("download task panicked");
                            if let Err(RemoteError::Corrupt { source, .. }) = &r {
                                bucket.note_damage(&bucket.chunk_path(&ns, &key), &source.to_string());
                            }
                            r
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
        for ns in &namespaces {
            rebuild_namespace_json(cache_root, ns);
        }
        Ok(totals.into_inner().unwrap())
    }

    /// Commits the bucket's `namespace.json` of `ns_dir` into the cache when the cache has no
    /// valid one and the bucket's passes [`nsjson::check`]; a bad one is not copied.
    fn pull_namespace_json(&self, cache_root: &Path, ns_dir: &str) -> Result<(), RemoteError> {
        let path = cache_root.join(ns_dir).join(NAMESPACE_JSON);
        if std::fs::read(&path).is_ok_and(|b| nsjson::check(&b, ns_dir, None).is_ok()) {
            return Ok(());
        }
        let Some(json) = self.namespace_json(ns_dir)? else {
            return Ok(());
        };
        match nsjson::check(&json, ns_dir, None) {
            Ok(()) => replace_file(&path, &json),
            Err(e) => {
                tracing::warn!(ns_dir, error = %e,
                    "namespace.json in the bucket is invalid; not copied (one is built from a verified chunk header)");
                Ok(())
            }
        }
    }
}

/// Writes `bytes` at `path` in place of what is there (temporary file, then rename).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), RemoteError> {
    let dir = path.parent().unwrap_or(path);
    kvfs_loader::dir::create_dirs(dir).map_err(|e| RemoteError::io(dir, e))?;
    let tmp = kvfs_loader::dir::temp_path_for(path);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            RemoteError::io(path, e)
        })
}

/// Gives the cache a valid `namespace.json` of `ns_dir` when it has none or a bad one, built
/// from the header of one of its (verified) chunks, with a warning.
fn rebuild_namespace_json(cache_root: &Path, ns_dir: &str) {
    let path = cache_root.join(ns_dir).join(NAMESPACE_JSON);
    let found = std::fs::read(&path).ok();
    if found
        .as_deref()
        .is_some_and(|b| nsjson::check(b, ns_dir, None).is_ok())
    {
        return;
    }
    let Ok(chunks) = local_chunks(cache_root, ns_dir) else {
        return;
    };
    let Some(header) = chunks.iter().find_map(|(_, p)| read_header(p).ok()) else {
        return;
    };
    if found.is_some() {
        tracing::warn!(file = %path.display(),
            "invalid namespace.json in the cache; replacing it with one built from a chunk header");
    }
    if let Err(e) = replace_file(&path, &nsjson::from_header(ns_dir, &header)) {
        tracing::warn!(error = %e, "could not write namespace.json");
    }
}

/// Streams one object into `target` (verified as it arrives; see [`crate::stream`]) on a
/// blocking thread, pulling body frames from the runtime. Returns the chunk's length.
fn download_into(
    handle: tokio::runtime::Handle,
    mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    limit: std::time::Duration,
    ns_dir: &str,
    key: ChunkKey,
    target: &Path,
    object: String,
) -> Result<u64, RemoteError> {
    let mut invalid: Option<FormatError> = None;
    let mut network: Option<object_store::Error> = None;
    let mut stalled = false;
    let deadline = tokio::time::Instant::now() + limit;
    let mut len = 0;
    let r = commit_with(target, false, |f| {
        let mut chunk = StreamingChunk::new(ns_dir, key);
        loop {
            let Ok(frame) = handle.block_on(tokio::time::timeout_at(deadline, body.next())) else {
                stalled = true;
                return Err(std::io::Error::other("body transfer timed out"));
            };
            let Some(frame) = frame else { break };
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
        (Err(_), None, None) if stalled => Err(RemoteError::Timeout {
            op: "GET body",
            after: limit,
            key: "body_timeout_s",
        }),
        (Ok(_), None, None) => Ok(len),
        (Err(e), None, None) => Err(RemoteError::io(target, e)),
    }
}
