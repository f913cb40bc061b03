//! Reads: [`Store::get`], [`Store::read_at`], [`Store::stat`] and [`Store::contains`].
//!
//! One fall-through serves them all ([`Store::locate`]): memory, then the disk tier's file,
//! then (for reads, not for `stat`) the remote tier, whose bytes are verified in full and
//! committed to disk like a `put` before they are served. Each caller then does its own job
//! with what was found: the whole chunk, a range, or the header.

use super::disk::{self, now_nanos};
use super::parallel::verify_payload_parallel;
use super::stats::bump;
use super::{Store, StoreError, check_ns};
use bytes::Bytes;
use kvfs_loader::format::{ChunkHeader, Verify, read_full_at};
use kvfs_loader::{ChunkKey, FormatError, identity};
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The tier a chunk was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Memory,
    Disk,
    Remote,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        })
    }
}

/// A chunk's header and where it is.
#[derive(Debug, Clone)]
pub struct ChunkStat {
    pub ns_dir: String,
    pub header: ChunkHeader,
    pub len: u64,
    /// The fastest tier holding it.
    pub tier: Tier,
    /// The disk tier file (absent if another process evicted it while memory still holds it).
    pub path: PathBuf,
    pub mtime: Option<SystemTime>,
    pub priority: u8,
}

/// How far [`Store::locate`] goes, and whether the lookup counts as a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// A read: a memory hit is counted, and a local miss falls through to the remote tier.
    Read,
    /// A look (`stat`): nothing is counted and the lookup stops at the local tiers.
    Look,
}

/// Where the fall-through found a chunk.
enum Found {
    /// The whole chunk in hand, with the tier it came from: a memory hit, or a remote fetch
    /// (verified, committed to disk and counted by `fetch_remote`).
    Bytes(Bytes, Tier),
    /// The disk tier's file, open, its header not yet checked.
    Disk(File, PathBuf),
}

impl Store {
    /// The one memory -> disk -> remote fall-through. A file another process evicted is
    /// dropped from the index; a miss everywhere is [`StoreError::NotFound`].
    fn locate(&self, ns_dir: &str, key: &ChunkKey, reach: Reach) -> Result<Found, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        if let Some(b) = inner.memory.get(ns_dir, key) {
            if reach == Reach::Read {
                bump(&inner.counters.memory_hits, 1);
            }
            return Ok(Found::Bytes(b, Tier::Memory));
        }
        let path = inner.disk.path(ns_dir, key);
        match File::open(&path) {
            Ok(f) => Ok(Found::Disk(f, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                inner.disk.index().forget(ns_dir, key);
                match reach {
                    Reach::Read => Ok(Found::Bytes(self.fetch_remote(ns_dir, key)?, Tier::Remote)),
                    Reach::Look => Err(StoreError::NotFound {
                        ns_dir: ns_dir.to_string(),
                        key: *key,
                    }),
                }
            }
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// The whole chunk file; payload verified per policy (see the module docs).
    pub fn get(&self, ns_dir: &str, key: &ChunkKey) -> Result<Bytes, StoreError> {
        self.get_with(ns_dir, key, Verify::Header)
    }

    /// Like [`Store::get`], with `Verify::Full` forcing a payload check of disk reads even
    /// when `verify_reads` is off (what `kvfs get` uses before it writes a byte).
    pub fn get_with(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        verify: Verify,
    ) -> Result<Bytes, StoreError> {
        let inner = &*self.inner;
        match self.locate(ns_dir, key, Reach::Read)? {
            Found::Bytes(b, Tier::Memory) => {
                bump(&inner.counters.read_bytes, b.len() as u64);
                inner.disk.index().touch(ns_dir, key);
                Ok(b)
            }
            Found::Bytes(b, _) => Ok(b),
            Found::Disk(f, path) => {
                let full =
                    verify == Verify::Full || inner.cfg.verify_reads || inner.memory.enabled();
                let bytes = self.read_verified(ns_dir, key, &path, &f, full)?;
                bump(&inner.counters.disk_hits, 1);
                bump(&inner.counters.read_bytes, bytes.len() as u64);
                inner
                    .disk
                    .index()
                    .adopt(ns_dir, key, bytes.len() as u64, now_nanos());
                inner.disk.index().touch(ns_dir, key);
                inner.memory.insert(ns_dir, *key, bytes.clone());
                Ok(bytes)
            }
        }
    }

    fn read_verified(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        path: &Path,
        mut f: &File,
        full: bool,
    ) -> Result<Bytes, StoreError> {
        let len = f.metadata().map_err(|e| StoreError::io(path, e))?.len();
        let mut v = Vec::with_capacity(len as usize);
        f.read_to_end(&mut v).map_err(|e| StoreError::io(path, e))?;
        self.check_read(ns_dir, key, path, &v, full)?;
        Ok(Bytes::from(v))
    }

    fn check_read(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        path: &Path,
        v: &[u8],
        full: bool,
    ) -> Result<ChunkHeader, StoreError> {
        let r = (|| {
            let header = ChunkHeader::parse(v)?;
            header.check_len(v.len() as u64)?;
            identity::check_identity(&header, ns_dir, key)?;
            if full {
                verify_payload_parallel(&header, v)?;
            }
            Ok(header)
        })();
        // The error goes back to the caller, which reports it (the CLI prints it; the mount
        // logs it with the errno it answers): logging it here too would say it twice.
        r.map_err(|e| {
            tracing::debug!(path = %path.display(), error = %e, "chunk failed verification");
            self.rejected(Some(path), e)
        })
    }

    fn fetch_remote(&self, ns_dir: &str, key: &ChunkKey) -> Result<Bytes, StoreError> {
        let inner = &*self.inner;
        let not_found = || {
            bump(&inner.counters.misses, 1);
            StoreError::NotFound {
                ns_dir: ns_dir.to_string(),
                key: *key,
            }
        };
        let Some(remote) = &inner.cfg.remote else {
            return Err(not_found());
        };
        let Some(v) = remote.fetch(ns_dir, key)? else {
            return Err(not_found());
        };
        let bytes = Bytes::from(v);
        let header = ChunkHeader::parse(&bytes).map_err(StoreError::from)?;
        identity::check_identity(&header, ns_dir, key).map_err(|e| self.rejected(None, e))?;
        // Verifies in full, commits to disk and fills memory; not echoed back to the remote.
        match self.put_inner(ns_dir, &bytes, Some(&bytes), false) {
            Ok(_) => {}
            // No room on disk: still serve the (verified) bytes, uncached.
            Err(StoreError::NoSpace { needed, available }) => {
                verify_payload_parallel(&header, &bytes).map_err(|e| {
                    bump(&inner.counters.verify_failures, 1);
                    StoreError::from(e)
                })?;
                tracing::warn!(
                    ns_dir,
                    key = %key,
                    needed,
                    available,
                    "no room on disk for a fetched chunk; serving it uncached"
                );
            }
            Err(e) => return Err(e),
        }
        bump(&inner.counters.remote_hits, 1);
        bump(&inner.counters.read_bytes, bytes.len() as u64);
        Ok(bytes)
    }

    /// Reads up to `buf.len()` bytes of the chunk file at `offset` without loading the whole
    /// chunk (unless it has to come from the remote tier). The header is checked on every
    /// call; with `verify_reads`, so are the digests of the layers the range touches.
    /// Returns the bytes read; 0 at or past the end.
    pub fn read_at(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        if let Some(n) = inner.memory.read_retained(ns_dir, key, offset, buf) {
            bump(&inner.counters.memory_hits, 1);
            bump(&inner.counters.read_bytes, n as u64);
            return Ok(n);
        }
        let (f, path) = match self.locate(ns_dir, key, Reach::Read)? {
            Found::Bytes(b, _) => {
                let start = (offset.min(b.len() as u64)) as usize;
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
                return Ok(n);
            }
            Found::Disk(f, path) => (f, path),
        };
        let header = ChunkHeader::read_from(&f).map_err(|e| {
            bump(&inner.counters.verify_failures, 1);
            StoreError::format(&path, e)
        })?;
        identity::check_identity(&header, ns_dir, key)
            .map_err(|e| self.rejected(Some(&path), e))?;
        if inner.cfg.verify_reads {
            self.verify_range(&header, &f, &path, offset, buf.len() as u64)?;
        }
        let n = read_full_at(&f, buf, offset).map_err(|e| StoreError::io(&path, e))?;
        bump(&inner.counters.disk_hits, 1);
        bump(&inner.counters.read_bytes, n as u64);
        inner.disk.index().touch(ns_dir, key);
        Ok(n)
    }

    /// Verifies the payload digests of every layer that `[offset, offset + len)` touches (the
    /// header was checked already): a ranged read with `verify_reads` costs the layers it
    /// reads, not the whole chunk.
    fn verify_range(
        &self,
        header: &ChunkHeader,
        f: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let g = &header.geometry;
        let end = offset.saturating_add(len).min(g.file_len);
        let mut span_buf = Vec::new();
        for layer in 0..g.num_layers {
            let span = g.layer_span(layer);
            if span.end <= offset || span.start >= end {
                continue;
            }
            span_buf.resize((span.end - span.start) as usize, 0);
            let n =
                read_full_at(f, &mut span_buf, span.start).map_err(|e| StoreError::io(path, e))?;
            let r = if n < span_buf.len() {
                Err(FormatError::Truncated {
                    needed: span.end,
                    have: span.start + n as u64,
                })
            } else {
                header.verify_layer(layer, &span_buf)
            };
            r.map_err(|e| {
                bump(&self.inner.counters.verify_failures, 1);
                StoreError::format(path, e)
            })?;
        }
        Ok(())
    }

    /// Header, size, tier and backing file of a chunk.
    pub fn stat(&self, ns_dir: &str, key: &ChunkKey) -> Result<ChunkStat, StoreError> {
        let inner = &*self.inner;
        let priority = inner
            .disk
            .index()
            .entry(ns_dir, key)
            .map_or(0, |e| e.priority);
        let (f, path) = match self.locate(ns_dir, key, Reach::Look)? {
            Found::Bytes(b, tier) => {
                let header = ChunkHeader::parse(&b)?;
                let path = inner.disk.path(ns_dir, key);
                let mtime = fs::metadata(&path).and_then(|m| m.modified()).ok();
                return Ok(ChunkStat {
                    ns_dir: ns_dir.to_string(),
                    header,
                    len: b.len() as u64,
                    tier,
                    path,
                    mtime,
                    priority,
                });
            }
            Found::Disk(f, path) => (f, path),
        };
        let md = f.metadata().map_err(|e| StoreError::io(&path, e))?;
        let header = ChunkHeader::read_from(&f).map_err(|e| StoreError::format(&path, e))?;
        identity::check_identity(&header, ns_dir, key)
            .map_err(|e| self.rejected(Some(&path), e))?;
        inner
            .disk
            .index()
            .adopt(ns_dir, key, md.len(), disk::file_recency(&md));
        Ok(ChunkStat {
            ns_dir: ns_dir.to_string(),
            header,
            len: md.len(),
            tier: Tier::Disk,
            path,
            mtime: md.modified().ok(),
            priority,
        })
    }

    /// Whether the chunk is held locally (memory or disk). Checks the file system, so a
    /// chunk committed or evicted by another process is seen.
    pub fn contains(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        let inner = &*self.inner;
        if check_ns(ns_dir).is_err() {
            return false;
        }
        if inner.memory.contains(ns_dir, key) {
            return true;
        }
        let path = inner.disk.path(ns_dir, key);
        match fs::metadata(&path) {
            Ok(md) if md.is_file() => {
                inner
                    .disk
                    .index()
                    .adopt(ns_dir, key, md.len(), disk::file_recency(&md));
                true
            }
            _ => {
                inner.disk.index().forget(ns_dir, key);
                false
            }
        }
    }
}
