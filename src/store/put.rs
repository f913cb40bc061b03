//! Writes: [`Store::put`] and its variants.
//!
//! The header is parsed first (a bad chunk is refused before any I/O) and the namespace
//! checked against the directory; space is reserved (evicting by priority, then recency, or
//! failing with [`StoreError::NoSpace`] before writing a byte); a temporary file is written
//! while another thread verifies the payload, and hard-linked into place only if verification
//! passed. `ENOSPC` evicts and retries once, and only when evicting could make room at all.

use super::disk::{Victim, now_nanos};
use super::parallel::{cores, verify_payload_parallel, verify_payload_threads};
use super::stats::bump;
use super::{EvictReason, FsyncPolicy, Store, StoreError, check_ns, check_ns_id};
use bytes::Bytes;
use kvfs_loader::dir::{self, Commit};
use kvfs_loader::format::ChunkHeader;
use kvfs_loader::{ChunkKey, FormatError};
use std::io::{self, Write};
use std::path::PathBuf;

/// What `put` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    pub key: ChunkKey,
    pub len: u64,
    /// False when the chunk was already stored (by anyone); the existing file was kept.
    pub created: bool,
    pub path: PathBuf,
    /// Chunks evicted to make room.
    pub evicted: usize,
}

pub(super) fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    ) || e.kind() == io::ErrorKind::StorageFull
}

/// A verification failure carried through the `io::Error` of a commit closure.
#[derive(Debug)]
struct VerifyFailed(FormatError);

impl std::fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for VerifyFailed {}

impl Store {
    /// Stores a chunk (a whole `.kvc` file) under `ns_dir`, copying it for the memory tier.
    pub fn put(&self, ns_dir: &str, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        self.put_inner(ns_dir, bytes, None, true)
    }

    /// Like [`Store::put`], taking ownership so the memory tier shares the buffer (no copy).
    pub fn put_bytes(&self, ns_dir: &str, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        self.put_inner(ns_dir, &bytes, Some(&bytes), true)
    }

    pub(super) fn put_inner(
        &self,
        ns_dir: &str,
        bytes: &[u8],
        owned: Option<&Bytes>,
        notify_remote: bool,
    ) -> Result<PutOutcome, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        let fail = |e: FormatError| {
            bump(&inner.counters.verify_failures, 1);
            StoreError::from(e)
        };
        let header = ChunkHeader::parse(bytes).map_err(fail)?;
        header.check_len(bytes.len() as u64).map_err(fail)?;
        check_ns_id(ns_dir, &header.meta.namespace)?;
        let key = header.key();
        let len = bytes.len() as u64;
        let path = inner.disk.path(ns_dir, &key);
        let to_memory = || {
            if inner.memory.enabled() {
                let b = owned
                    .cloned()
                    .unwrap_or_else(|| Bytes::copy_from_slice(bytes));
                inner.memory.insert(ns_dir, key, b);
            }
        };
        if path.exists() {
            verify_payload_parallel(&header, bytes).map_err(fail)?;
            inner.disk.index().record(ns_dir, &key, len, now_nanos());
            to_memory();
            bump(&inner.counters.puts_existing, 1);
            return Ok(PutOutcome {
                key,
                len,
                created: false,
                path,
                evicted: 0,
            });
        }
        let fsync = inner.cfg.fsync == FsyncPolicy::Always;
        let mut evicted = 0;
        let mut retried = false;
        let commit = loop {
            let (reservation, victims) = inner.disk.reserve(ns_dir, &key, len)?;
            evicted += self.forget_victims(&victims, EvictReason::Capacity);
            let r = dir::commit_with(&path, fsync, |f| {
                std::thread::scope(|s| {
                    // The writer keeps one core busy; verification gets the others.
                    let verifier = s.spawn(|| {
                        verify_payload_threads(&header, bytes, cores().saturating_sub(1).max(1))
                    });
                    let written = f.write_all(bytes);
                    let verified = verifier
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p));
                    verified.map_err(|e| io::Error::other(VerifyFailed(e)))?;
                    written
                })
            });
            match r {
                Ok(c) => {
                    // The reservation becomes the chunk's row in one transaction.
                    let priority = super::priority::of_header(&header);
                    reservation.commit(ns_dir, &key, len, priority);
                    break c;
                }
                Err(e) if e.get_ref().is_some_and(|i| i.is::<VerifyFailed>()) => {
                    let inner_err = e.into_inner().expect("checked above");
                    let VerifyFailed(fe) = *inner_err.downcast::<VerifyFailed>().expect("checked");
                    return Err(fail(fe));
                }
                Err(e) if is_no_space(&e) => {
                    drop(reservation);
                    // Evict and retry once, but only if evicting could make room at all:
                    // a hopeless put must not cost committed chunks.
                    let free = inner.disk.space().map_or(0, |s| s.free);
                    let evictable = inner.disk.index().used();
                    if !retried && free + evictable >= len {
                        retried = true;
                        let v = inner.disk.evict_bytes(len);
                        if !v.is_empty() {
                            evicted += self.forget_victims(&v, EvictReason::DiskFull);
                            tracing::info!(needed = len, "disk full: evicted and retrying");
                            continue;
                        }
                    }
                    return Err(StoreError::NoSpace {
                        needed: len,
                        available: free,
                    });
                }
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        };
        to_memory();
        let created = commit == Commit::Created;
        if created {
            bump(&inner.counters.puts, 1);
            bump(&inner.counters.put_bytes, len);
            inner.metrics.committed(ns_dir, len);
            if notify_remote && let Some(r) = &inner.cfg.remote {
                r.committed(ns_dir, &key, &path);
            }
        } else {
            bump(&inner.counters.puts_existing, 1);
        }
        Ok(PutOutcome {
            key,
            len,
            created,
            path,
            evicted,
        })
    }

    pub(super) fn forget_victims(&self, victims: &[Victim], reason: EvictReason) -> usize {
        for v in victims {
            self.inner.metrics.evicted(reason, v.len);
            self.inner.memory.remove(&v.key);
            bump(&self.inner.counters.evictions, 1);
            bump(&self.inner.counters.evicted_bytes, v.len);
        }
        victims.len()
    }
}
