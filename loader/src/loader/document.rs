//! Documents as position-independent chunks (format v2, blending; docs/BLEND.md).
//!
//! A document (a retrieved passage, a file) is cut into chunks of `chunk_tokens` tokens, the
//! last one partial, each keyed by its own tokens only ([`independent_chunk_keys`]), so the
//! same document is found wherever it lands in a prompt. The engine computes each chunk's KV
//! without the text before it and stores it with the position it was computed at (the
//! chunk's origin, in the header). A load places a document at any start position: each
//! chunk's V rows are copied as they are and its K rows are rotated from the origin to the
//! new positions ([`RopeParams`]) on the way into the engine's blocks.
//!
//! A document load is an ordinary load of the loader (`job`): the same reader threads, one job
//! per (layer, chunk), the same open (backing file of a mount, page cache or O_DIRECT per
//! [`LoaderOptions`](super::LoaderOptions)), header checks, [`Verify::Full`] layer digests
//! before any row is placed, the codec's decode, the metrics and [`LoadStats`]. What differs
//! is the plan (the document's independent chunks at `at + offset`, the last one partial, each
//! header checked as independent and of its length) and one step, [`Rekey`]: the K plane is
//! never read straight into the blocks; its rows, staged in the reader's buffer after
//! verification, are rotated by the chunk's shift (its place less the origin its header
//! records) as they are scattered, so no unrotated or unverified key reaches the blocks. The
//! rotation runs on the host rows before the back end copies them in, so a device destination
//! works as a host one does.

use super::job::{PlanChunk, check_header};
use super::{ChunkError, Dest, LoadHandle, LoadStats, Loader, LoaderError, StoreStats};
use crate::format::{ChunkHeader, ChunkMeta, Verify};
use crate::key::{ChunkRef, independent_chunk_keys};
use crate::rope::{RopeError, RopeParams};
use crate::spec::Dtype;
use crate::spec::{ModelSpec, NamespaceId};

/// The step a document load adds to the loader's jobs: K rows rotated from the chunk's
/// origin to its place.
#[derive(Debug, Clone)]
pub(super) struct Rekey {
    rope: RopeParams,
}

impl Rekey {
    /// `rows` (K rows of `dtype`) rotated by `delta` positions, in `scratch`.
    pub(super) fn rotate<'a>(
        &self,
        dtype: Dtype,
        rows: &[u8],
        delta: i64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], RopeError> {
        scratch.clear();
        scratch.extend_from_slice(rows);
        self.rope.rotate_bytes(dtype, scratch, delta)?;
        Ok(scratch)
    }
}

/// Checks a document chunk's header: the chunk asked for, of the spec's shape, of the
/// length the plan expects, and position-independent (it records its origin).
pub(super) fn check_document_header(
    h: &ChunkHeader,
    spec: &ModelSpec,
    ns: &NamespaceId,
    pc: &PlanChunk,
) -> Result<(), ChunkError> {
    check_header(h, spec, ns, &pc.key, pc.token_count)?;
    if h.meta.origin.is_none() {
        return Err(ChunkError::Mismatch(
            "not a position-independent chunk (no origin)".into(),
        ));
    }
    Ok(())
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
    /// describe this loader's spec ([`RopeParams::from_spec`]); waits for the load.
    pub fn load_document(
        &self,
        document: &[u32],
        at: usize,
        rope: &RopeParams,
        dest: &Dest<'_>,
    ) -> Result<LoadStats, LoaderError> {
        let stats = self.start_document_load(document, at, rope, dest)?.wait()?;
        tracing::debug!(?stats, at, "document loaded");
        Ok(stats)
    }

    /// Starts loading `document` at `at` ([`Loader::load_document`]) on the reader threads
    /// and returns its handle, as [`Loader::load_request`] does.
    pub fn start_document_load(
        &self,
        document: &[u32],
        at: usize,
        rope: &RopeParams,
        dest: &Dest<'_>,
    ) -> Result<LoadHandle, LoaderError> {
        if document.is_empty() {
            return Err(LoaderError::Invalid("empty document".into()));
        }
        if rope.theta != self.spec.rope_theta || rope.head_dim != self.spec.head_dim as usize {
            return Err(LoaderError::Invalid(format!(
                "RoPE parameters (theta {}, head dim {}) are not this namespace's ({}, {})",
                rope.theta, rope.head_dim, self.spec.rope_theta, self.spec.head_dim
            )));
        }
        // Keys of this dtype can be rotated at all (fp8 cannot).
        rope.rotate_bytes(self.spec.dtype, &mut [], 1)
            .map_err(|e| LoaderError::Invalid(e.to_string()))?;
        let range = at..at + document.len();
        dest.layout.check_spec(&self.spec)?;
        dest.layout.check_map(&dest.map, range.clone())?;
        let chunks = self
            .document_chunks(document)
            .into_iter()
            .map(|c| PlanChunk {
                index: c.index,
                path: self.chunk_path(&c.key),
                key: c.key,
                start: at + c.start,
                token_count: (c.end - c.start) as u32,
                local: 0..(c.end - c.start) as u32,
            })
            .collect();
        let rekey = Rekey { rope: rope.clone() };
        let verify: Verify = self.opts.verify;
        self.start_load(chunks, range, verify, None, dest, Some(rekey))
    }
}
