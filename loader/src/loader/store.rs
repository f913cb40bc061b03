//! Storing: engine blocks into chunk files, for full chunks not yet present, and
//! `namespace.json` beside them once. A cache directory commits each file create-once
//! ([`dir::commit_file`]); a mount is written through (create, write, close), and the close's
//! result is the mount's verdict on the chunk.

use super::{Dest, Loader, LoaderError};
use crate::dir::{self, Commit};
use crate::format::{ChunkMeta, encode_chunk_coded_with};
use crate::identity::NAMESPACE_JSON;
use crate::importance::Importance;
use crate::layout::BlockMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Figures of one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Chunks this call wrote.
    pub written: usize,
    /// Chunks that were already present (or written by someone else meanwhile).
    pub present: usize,
    pub bytes_written: u64,
}

impl Loader {
    /// Stores the full chunks of `tokens` that are not present yet, reading their KV from
    /// `src` (positions `0..` of the sequence). Writes `namespace.json` beside the chunks once.
    pub fn store(&self, tokens: &[u32], src: &Dest<'_>) -> Result<StoreStats, LoaderError> {
        self.store_chunks(tokens, src, &[], 0, false)
    }

    /// [`Loader::store`], and the trailing partial chunk of `tokens` too when `tokens` ends
    /// inside a chunk (read from positions `full..tokens.len()` of `src`): the chunk a later
    /// request with exactly these tokens finds ([`Loader::lookup`]) and loads. An engine
    /// stores it when a prompt's prefill is complete; a prompt that extends the tail does not
    /// find it (its last chunk has other tokens) but reuses every full chunk.
    pub fn store_with_tail(
        &self,
        tokens: &[u32],
        src: &Dest<'_>,
    ) -> Result<StoreStats, LoaderError> {
        self.store_chunks(tokens, src, &[], 0, true)
    }

    /// [`Loader::store`] that writes `importance[i]` into chunk `i`'s header (format v2;
    /// chunks past the end of `importance` get none). A chunk already present keeps what it
    /// has: chunks are immutable.
    pub fn store_with_importance(
        &self,
        tokens: &[u32],
        src: &Dest<'_>,
        importance: &[Importance],
    ) -> Result<StoreStats, LoaderError> {
        self.store_chunks(tokens, src, importance, 0, false)
    }

    /// The general store: the full chunks of `tokens` not present yet, with `tail` the
    /// trailing partial chunk too ([`Loader::store_with_tail`]), `importance[i]` written into
    /// chunk `i`'s header ([`Loader::store_with_importance`]).
    pub fn store_with(
        &self,
        tokens: &[u32],
        src: &Dest<'_>,
        importance: &[Importance],
        tail: bool,
    ) -> Result<StoreStats, LoaderError> {
        self.store_chunks(tokens, src, importance, 0, tail)
    }

    /// Where a store of `tokens` ends: after the last full chunk, or with `tail` after the
    /// trailing partial chunk too.
    pub(super) fn store_end(&self, tokens: &[u32], tail: bool) -> usize {
        let ct = self.spec.chunk_tokens as usize;
        if tail {
            tokens.len()
        } else {
            tokens.len() / ct * ct
        }
    }

    /// Stores the full chunks of `tokens` that start at `from` (a chunk boundary) or later
    /// and, with `tail`, its trailing partial chunk; `src` needs rows for `from..` only.
    pub(super) fn store_chunks(
        &self,
        tokens: &[u32],
        src: &Dest<'_>,
        importance: &[Importance],
        from: usize,
        tail: bool,
    ) -> Result<StoreStats, LoaderError> {
        let end = self.store_end(tokens, tail);
        self.check_source(src, from.min(end)..end)?;
        let mut stats = StoreStats::default();
        let keys: Vec<_> = self
            .prompt_chunks(&tokens[..end])
            .into_iter()
            .filter(|c| c.start >= from)
            .collect();
        if keys.is_empty() {
            return Ok(stats);
        }
        self.write_namespace_json();
        for c in keys {
            if self.chunk_path(&c.key).exists() {
                stats.present += 1;
                continue;
            }
            let meta = ChunkMeta::for_spec(
                &self.spec,
                c.parent,
                self.salt,
                tokens[c.start..c.end].to_vec(),
            );
            self.store_chunk(
                &meta,
                c.index,
                src,
                c.start,
                importance.get(c.index),
                &mut stats,
            )?;
        }
        tracing::debug!(?stats, "store finished");
        crate::metrics::global().stored(&stats);
        Ok(stats)
    }

    /// Checks that `src` holds rows of this spec for every position of `positions`.
    pub(super) fn check_source(
        &self,
        src: &Dest<'_>,
        positions: Range<usize>,
    ) -> Result<(), LoaderError> {
        src.layout.check_spec(&self.spec)?;
        src.layout.check_map(&src.map, positions.clone())?;
        if let BlockMap::Slots(s) = src.map
            && let Some(p) = s[positions].iter().position(|&x| x < 0)
        {
            return Err(LoaderError::Invalid(format!(
                "position {p} maps to a padding slot; a stored chunk needs every row"
            )));
        }
        Ok(())
    }

    /// Encodes one chunk from the rows of positions `at..at + meta.tokens.len()` of `src` and
    /// commits it create-once, counting it in `stats`. `index` names the chunk in errors.
    pub(super) fn store_chunk(
        &self,
        meta: &ChunkMeta,
        index: usize,
        src: &Dest<'_>,
        at: usize,
        importance: Option<&Importance>,
        stats: &mut StoreStats,
    ) -> Result<(), LoaderError> {
        let path = self.chunk_path(&meta.key);
        let row = src.layout.row_bytes();
        let positions = at..at + meta.tokens.len();
        let mut runs = Vec::new();
        let mut copy_err = None;
        let fill = |layer: u32, plane: u32, dst: &mut [u8]| {
            runs.clear();
            src.layout.runs(
                &src.map,
                layer as usize,
                plane as usize,
                positions.clone(),
                &mut runs,
            );
            for r in &runs {
                let off = (r.pos - at) * row;
                let out = &mut dst[off..off + r.tokens * row];
                // SAFETY: the caller's `check_map` proved every run lies inside a layout
                // region, and the layout's contract keeps the region readable during this call.
                let copied = unsafe {
                    src.backend
                        .copy_rows_out(src.layout, plane as usize, r, out)
                };
                if let Err(e) = copied {
                    copy_err.get_or_insert(e);
                }
            }
        };
        let bytes = encode_chunk_coded_with(meta, self.spec.codec, importance, fill)
            .map_err(|e| LoaderError::Invalid(format!("cannot encode chunk: {e}")))?;
        let store_err = |source| LoaderError::Store {
            chunk: index,
            path: path.clone(),
            source,
        };
        if let Some(e) = copy_err {
            return Err(store_err(e));
        }
        let created = match self.layout {
            dir::Layout::Cache => {
                dir::commit_file(&path, &bytes, self.opts.fsync).map_err(store_err)?
                    == Commit::Created
            }
            dir::Layout::Flat => write_through_mount(&path, &bytes).map_err(store_err)?,
        };
        if created {
            stats.written += 1;
            stats.bytes_written += bytes.len() as u64;
        } else {
            stats.present += 1;
        }
        Ok(())
    }

    pub(super) fn write_namespace_json(&self) {
        if self.namespace_written.swap(true, Ordering::Relaxed) {
            return;
        }
        let path = self.root.join(&self.ns_dir).join(NAMESPACE_JSON);
        if path.exists() {
            return;
        }
        let json = self.spec.to_json();
        let r = match self.layout {
            dir::Layout::Cache => {
                dir::commit_file(&path, json.as_bytes(), self.opts.fsync).map(|_| ())
            }
            dir::Layout::Flat => write_through_mount(&path, json.as_bytes()).map(|_| ()),
        };
        if let Err(e) = r {
            // Not fatal: the chunks are self-describing; namespace.json is for people.
            tracing::warn!(path = %path.display(), error = %e, "could not write namespace.json");
        }
    }
}

/// Creates `path` through a mount (create, write, close) without replacing an existing file.
/// The mount checks the chunk when it is closed, so the close is checked too. Returns whether
/// this call created it.
fn write_through_mount(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    f.write_all(bytes)?;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released from the File, so this is its only owner and it is closed
    // exactly once. (Dropping a File would ignore close's result, which is the mount's verdict.)
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}
