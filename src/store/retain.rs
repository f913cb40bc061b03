//! Retention by importance in the memory tier (ContiguousKV's attention-guided cache
//! management, issue 14): hold a chunk's header and its most important groups in memory,
//! without the rest, so a pruned reuse (which reads only those groups) is served from memory.
//!
//! [`Store::retain_important`] reads the chunk from the disk tier, verifies it in full (the
//! memory tier only ever holds verified bytes), ranks each layer's groups by the importance in
//! the header (format v2) and keeps the top `share` of them per layer: for every layer and
//! plane, the byte ranges of the kept groups (adjacent groups merged), plus the header. The
//! entry replaces any whole copy in memory and is weighted by the bytes it holds. Ranged reads
//! ([`Store::read_at`], which the mount serves) inside a held range come from memory; any
//! other read falls through to disk as usual. A chunk without importance is refused with a
//! typed error and nothing changes.

use super::{Store, StoreError, check_ns};
use bytes::Bytes;
use kvfs_loader::format::{ChunkView, Verify};
use kvfs_loader::identity;
use kvfs_loader::importance::top_groups;
use kvfs_loader::{ChunkKey, FormatError};

/// Part of a chunk file held in memory: non-overlapping `(file offset, bytes)` ranges, sorted.
pub(crate) struct Retained {
    ranges: Vec<(u64, Bytes)>,
}

impl Retained {
    pub(crate) fn held_bytes(&self) -> u64 {
        self.ranges.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Copies `[offset, offset + buf.len())` when one held range covers it.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Option<usize> {
        let i = self
            .ranges
            .partition_point(|(s, _)| *s <= offset)
            .checked_sub(1)?;
        let (start, bytes) = &self.ranges[i];
        let from = (offset - start) as usize;
        let end = from.checked_add(buf.len())?;
        if end > bytes.len() {
            return None;
        }
        buf.copy_from_slice(&bytes[from..end]);
        Some(buf.len())
    }
}

/// What [`Store::retain_important`] kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainReport {
    /// Groups kept per layer.
    pub groups_per_layer: usize,
    /// Of the chunk's groups per layer.
    pub groups: usize,
    /// Bytes now held in memory (header included).
    pub bytes: u64,
    /// Bytes of the whole chunk file.
    pub chunk_bytes: u64,
}

impl Store {
    /// Holds in memory the header and, per layer, the top `share` (in `(0, 1]`) of a chunk's
    /// groups by the importance in its header; see the module docs.
    pub fn retain_important(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        share: f64,
    ) -> Result<RetainReport, StoreError> {
        check_ns(ns_dir)?;
        if !(share > 0.0 && share <= 1.0) {
            return Err(StoreError::from(FormatError::BadField {
                field: "importance",
                reason: format!("share {share} is not in (0, 1]"),
            }));
        }
        let path = self.inner.disk.path(ns_dir, key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    ns_dir: ns_dir.to_string(),
                    key: *key,
                });
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let view =
            ChunkView::parse(&bytes, Verify::Full).map_err(|e| self.rejected(Some(&path), e))?;
        let h = &view.header;
        identity::check_identity(h, ns_dir, key).map_err(|e| self.rejected(Some(&path), e))?;
        let Some(imp) = &h.importance else {
            return Err(StoreError::format(
                &path,
                FormatError::BadField {
                    field: "importance",
                    reason: "the chunk has no importance section (written without one)".into(),
                },
            ));
        };
        let g = &h.geometry;
        let mut ranges = vec![(0, bytes.slice(0..g.header_len as usize))];
        let mut kept = 0;
        for layer in 0..g.num_layers {
            let top = top_groups(imp.layer(layer), share);
            kept = top.len();
            for plane in 0..g.planes {
                let mut last: Option<(u64, u64)> = None;
                let mut flush = |r: (u64, u64)| {
                    ranges.push((r.0, bytes.slice(r.0 as usize..r.1 as usize)));
                };
                for &grp in &top {
                    let r = g.token_range(layer, plane, g.group_tokens_range(grp));
                    last = match last {
                        Some((s, e)) if e == r.start => Some((s, r.end)),
                        Some(prev) => {
                            flush(prev);
                            Some((r.start, r.end))
                        }
                        None => Some((r.start, r.end)),
                    };
                }
                if let Some(prev) = last {
                    flush(prev);
                }
            }
        }
        let part = Retained { ranges };
        let report = RetainReport {
            groups_per_layer: kept,
            groups: g.groups() as usize,
            bytes: part.held_bytes(),
            chunk_bytes: bytes.len() as u64,
        };
        self.inner.memory.insert_retained(ns_dir, *key, part);
        tracing::debug!(%key, ?report, "retained important groups in memory");
        Ok(report)
    }
}
