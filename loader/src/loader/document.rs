//! Documents as position-independent chunks (format v2, blending; docs/BLEND.md).
//!
//! A document (a retrieved passage, a file) is cut into chunks of `chunk_tokens` tokens, the
//! last one partial, each keyed by its own tokens only ([`independent_chunk_keys`]), so the
//! same document is found wherever it lands in a prompt. The engine computes each chunk's KV
//! without the text before it and stores it with the position it was computed at (the
//! chunk's origin, in the header). A load places a document at any start position: each
//! chunk's V rows are copied as they are and its K rows are rotated from the origin to the
//! new positions ([`RopeParams`]) in host memory on the way into the engine's blocks.
//!
//! This path reads each chunk file whole, in the calling thread: documents are a few chunks,
//! and the rotation needs the K plane in host memory anyway. A device back end would rotate
//! on the device after a plain load; none exists yet, so a destination that is not host
//! addressable is refused.

use super::{ChunkError, Dest, Loader, LoaderError, StoreStats};
use crate::format::{ChunkMeta, ChunkView};
use crate::key::{ChunkRef, independent_chunk_keys};
use crate::rope::RopeParams;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Figures of one document load.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentLoad {
    pub chunks: usize,
    pub tokens: usize,
    pub bytes_read: u64,
    pub elapsed: Duration,
}

impl Loader {
    /// The position-independent chunks of `document` (ranges relative to the document).
    pub fn document_chunks(&self, document: &[u32]) -> Vec<ChunkRef> {
        independent_chunk_keys(
            &self.ns,
            &self.salt,
            self.spec.chunk_tokens as usize,
            document,
        )
    }

    /// Whether every chunk of `document` is cached (a document is used whole or not at all).
    pub fn lookup_document(&self, document: &[u32]) -> bool {
        !document.is_empty()
            && self
                .document_chunks(document)
                .iter()
                .all(|c| std::fs::metadata(self.chunk_path(&c.key)).is_ok_and(|m| m.is_file()))
    }

    /// Stores the chunks of `document` that are not present yet. Their KV is in `src` at
    /// positions `at..at + document.len()`, each chunk computed without the tokens before it
    /// and at its own positions, which become its origin.
    pub fn store_document(
        &self,
        document: &[u32],
        src: &Dest<'_>,
        at: usize,
    ) -> Result<StoreStats, LoaderError> {
        if document.is_empty() {
            return Err(LoaderError::Invalid("empty document".into()));
        }
        let origin_end = u32::try_from(at + document.len())
            .map_err(|_| LoaderError::Invalid(format!("position {at} is past u32")))?;
        self.check_source(src, at..origin_end as usize)?;
        self.write_namespace_json();
        let mut stats = StoreStats::default();
        for c in self.document_chunks(document) {
            if self.chunk_path(&c.key).exists() {
                stats.present += 1;
                continue;
            }
            let meta = ChunkMeta::independent(
                &self.spec,
                self.salt,
                document[c.start..c.end].to_vec(),
                (at + c.start) as u32,
            );
            self.store_chunk(&meta, c.index, src, at + c.start, None, &mut stats)?;
        }
        tracing::debug!(?stats, tokens = document.len(), "document stored");
        Ok(stats)
    }

    /// Loads every chunk of `document` into `dest` at positions `at..at + document.len()`,
    /// rotating each chunk's keys from its origin to its new positions with `rope`, which must
    /// describe this loader's spec ([`RopeParams::from_spec`]).
    pub fn load_document(
        &self,
        document: &[u32],
        at: usize,
        rope: &RopeParams,
        dest: &Dest<'_>,
    ) -> Result<DocumentLoad, LoaderError> {
        let t0 = Instant::now();
        if document.is_empty() {
            return Err(LoaderError::Invalid("empty document".into()));
        }
        if rope.theta != self.spec.rope_theta || rope.head_dim != self.spec.head_dim as usize {
            return Err(LoaderError::Invalid(format!(
                "RoPE parameters (theta {}, head dim {}) are not this namespace's ({}, {})",
                rope.theta, rope.head_dim, self.spec.rope_theta, self.spec.head_dim
            )));
        }
        if !dest.backend.host_addressable() {
            return Err(LoaderError::Invalid(
                "re-encoding keys needs a host-addressable destination".into(),
            ));
        }
        dest.layout.check_spec(&self.spec)?;
        dest.layout.check_map(&dest.map, at..at + document.len())?;
        let row = dest.layout.row_bytes();
        let mut load = DocumentLoad {
            chunks: 0,
            tokens: document.len(),
            bytes_read: 0,
            elapsed: Duration::ZERO,
        };
        let mut runs = Vec::new();
        // A coded chunk's planes are decoded here, one at a time.
        let mut coder = crate::codec::Coder::new();
        let mut decoded = Vec::new();
        for c in self.document_chunks(document) {
            let path = self.chunk_path(&c.key);
            let fail = |source: ChunkError| LoaderError::Chunk {
                chunk: c.index,
                key: c.key,
                path: path.clone(),
                valid_tokens: at..at + c.start,
                valid_blocks: Vec::new(),
                source: Arc::new(source),
            };
            let bytes = std::fs::read(&path).map_err(|e| {
                fail(if e.kind() == std::io::ErrorKind::NotFound {
                    ChunkError::Missing
                } else {
                    ChunkError::Io(e)
                })
            })?;
            load.bytes_read += bytes.len() as u64;
            let view = ChunkView::parse(&bytes, self.opts.verify)
                .map_err(|e| fail(ChunkError::Format(e)))?;
            let meta = &view.header.meta;
            let origin = self
                .check_document_chunk(meta, &c)
                .map_err(|m| fail(ChunkError::Mismatch(m)))?;
            let base = at + c.start;
            let delta = base as i64 - origin as i64;
            for layer in 0..meta.num_layers {
                for plane in 0..view.header.geometry.planes {
                    let mut rotated;
                    let mut rows = view
                        .decoded_plane(&mut coder, layer, plane, &mut decoded)
                        .map_err(|e| fail(ChunkError::Format(e)))?;
                    if plane == 0 {
                        rotated = rows.to_vec();
                        rope.rotate_bytes(meta.dtype, &mut rotated, delta)
                            .map_err(|e| LoaderError::Invalid(e.to_string()))?;
                        rows = &rotated;
                    }
                    runs.clear();
                    dest.layout.runs(
                        &dest.map,
                        layer as usize,
                        plane as usize,
                        base..at + c.end,
                        &mut runs,
                    );
                    for r in &runs {
                        let off = (r.pos - base) * row;
                        // SAFETY: `check_map` proved every run lies inside a layout region of
                        // host memory (`host_addressable`), which the layout's contract keeps
                        // writable and otherwise untouched during this call.
                        unsafe {
                            dest.backend.copy_rows_in(
                                dest.layout,
                                plane as usize,
                                r,
                                &rows[off..off + r.tokens * row],
                            )
                        }
                        .map_err(|e| fail(ChunkError::Io(e)))?;
                    }
                }
            }
            load.chunks += 1;
        }
        load.elapsed = t0.elapsed();
        tracing::debug!(?load, at, "document loaded");
        Ok(load)
    }

    /// Checks that a document chunk read from disk is the one asked for, of this spec, and
    /// independent; returns its origin.
    fn check_document_chunk(&self, meta: &ChunkMeta, c: &ChunkRef) -> Result<u32, String> {
        if meta.key != c.key || meta.namespace != self.ns {
            return Err(format!(
                "file holds chunk {} of namespace {}",
                meta.key, meta.namespace
            ));
        }
        let origin = meta
            .origin
            .ok_or_else(|| "not a position-independent chunk".to_string())?;
        let spec = &self.spec;
        if (
            meta.dtype,
            meta.kv_kind,
            meta.num_layers,
            meta.num_heads,
            meta.head_dim,
        ) != (
            spec.dtype,
            spec.kv_kind,
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
        ) {
            return Err("chunk shape differs from the spec".into());
        }
        Ok(origin)
    }
}
