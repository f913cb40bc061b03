//! Stores that do not keep the engine waiting on the disk: [`Loader::snapshot`] copies the
//! rows a store needs out of the engine's blocks into memory the snapshot owns, and
//! [`Loader::store_snapshot`] encodes, hashes and writes them later, on any thread.
//!
//! An engine takes the snapshot in the step that computed the chunks (the copy is a gather of
//! the rows, no hashing, no I/O), after which its blocks may be freed or reused at once: the
//! stored bytes are the snapshot's, never whatever the blocks hold later. A writer thread then
//! calls `store_snapshot`; the chunk becomes visible to lookups when that store commits it
//! (create-once, as [`Loader::store`]), and a snapshot that is never stored (the process
//! ends first) is a future miss, never a wrong chunk.
//!
//! Only chunks absent when the snapshot is taken are copied: from the first absent chunk to
//! the end (a prompt whose head was loaded from kvfs copies only its new chunks). The snapshot
//! remembers the namespace and salt of its loader, and another loader refuses it (its rows
//! would be stored under another model's keys).

use super::{Dest, Loader, LoaderError, StoreStats};
use crate::key::SaltTag;
use crate::layout::{BlockMap, KvLayout, RawRegion, Run};
use crate::spec::NamespaceId;

/// Rows of the chunks a store will write, copied out of engine memory
/// ([`Loader::snapshot`]).
pub struct StoreSnapshot {
    ns: NamespaceId,
    salt: SaltTag,
    tokens: Vec<u32>,
    tail: bool,
    /// First position held (a chunk boundary); positions before it are not stored.
    from: usize,
    /// `slots[p]`: the pool slot of position `p` (`p - from`), -1 before `from`.
    slots: Vec<i64>,
    /// A token pool over `mem`, one K and one V buffer per layer (K only for MLA); None when
    /// nothing is held.
    layout: Option<KvLayout>,
    /// The pool's memory; `layout` points into these heap buffers, which never move.
    _mem: Vec<Vec<u8>>,
}

impl std::fmt::Debug for StoreSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSnapshot")
            .field("tokens", &self.tokens.len())
            .field("tail", &self.tail)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl StoreSnapshot {
    /// Bytes of KV the snapshot holds.
    pub fn bytes(&self) -> usize {
        self._mem.iter().map(Vec::len).sum()
    }

    /// Token positions held: `from..end` (empty when every chunk was present).
    pub fn positions(&self) -> std::ops::Range<usize> {
        self.from..self.slots.len()
    }
}

impl Loader {
    /// Copies out of `src` the rows of every chunk that [`Loader::store`] (or, with `tail`,
    /// [`Loader::store_with_tail`]) of `tokens` would write now, so the store can run later
    /// ([`Loader::store_snapshot`]) while the engine reuses its blocks. Chunks already present
    /// are not copied.
    pub fn snapshot(
        &self,
        tokens: &[u32],
        src: &Dest<'_>,
        tail: bool,
    ) -> Result<StoreSnapshot, LoaderError> {
        let end = self.store_end(tokens, tail);
        let from = self
            .prompt_chunks(&tokens[..end])
            .into_iter()
            .find(|c| !self.chunk_path(&c.key).exists())
            .map_or(end, |c| c.start);
        self.check_source(src, from..end)?;
        let mut snap = StoreSnapshot {
            ns: self.ns,
            salt: self.salt,
            tokens: tokens[..end].to_vec(),
            tail,
            from,
            slots: (0..end)
                .map(|p| if p < from { -1 } else { (p - from) as i64 })
                .collect(),
            layout: None,
            _mem: Vec::new(),
        };
        if from == end {
            return Ok(snap);
        }
        let n = end - from;
        let row = src.layout.row_bytes();
        let planes = src.layout.planes();
        let layers = self.spec.num_layers as usize;
        // one buffer per (layer, plane), layer-major: K of layer 0, V of layer 0, ...
        let mut mem: Vec<Vec<u8>> = (0..layers * planes).map(|_| vec![0u8; n * row]).collect();
        let mut runs: Vec<Run> = Vec::new();
        for (i, buf) in mem.iter_mut().enumerate() {
            let (layer, plane) = (i / planes, i % planes);
            runs.clear();
            src.layout
                .runs(&src.map, layer, plane, from..end, &mut runs);
            for r in &runs {
                let at = (r.pos - from) * row;
                // SAFETY: `check_source` proved every run of `from..end` lies inside a region
                // of the layout, whose contract keeps it readable during this call.
                unsafe {
                    src.backend.copy_rows_out(
                        src.layout,
                        plane,
                        r,
                        &mut buf[at..at + r.tokens * row],
                    )
                }
                .map_err(|e| LoaderError::Store {
                    chunk: from / self.spec.chunk_tokens as usize,
                    path: self.root.clone(),
                    source: e,
                })?;
            }
        }
        let regions: Vec<RawRegion> = mem.iter_mut().map(|b| RawRegion::of(b)).collect();
        let (k, v): (Vec<RawRegion>, Vec<RawRegion>) = if planes == 2 {
            (
                regions.iter().step_by(2).copied().collect(),
                regions.iter().skip(1).step_by(2).copied().collect(),
            )
        } else {
            (regions, Vec::new())
        };
        // SAFETY: the regions are the heap buffers of `mem`, which the snapshot owns next to
        // the layout and never resizes; nothing else holds them.
        let layout = unsafe {
            KvLayout::token_pool(
                &k,
                &v,
                n,
                self.spec.num_kv_heads,
                self.spec.head_dim,
                self.spec.dtype,
            )
        }?;
        snap.layout = Some(layout);
        snap._mem = mem;
        Ok(snap)
    }

    /// Stores the chunks of a [`Loader::snapshot`] of this loader that are still absent.
    pub fn store_snapshot(&self, snap: &StoreSnapshot) -> Result<StoreStats, LoaderError> {
        if snap.ns != self.ns || snap.salt != self.salt {
            return Err(LoaderError::Invalid(
                "the snapshot was taken by a loader of another namespace or salt".into(),
            ));
        }
        let Some(layout) = &snap.layout else {
            return Ok(StoreStats::default());
        };
        let src = Dest::host(layout, BlockMap::Slots(&snap.slots));
        self.store_chunks(&snap.tokens, &src, &[], snap.from, snap.tail)
    }
}
