//! The eviction priority a chunk's importance implies (ContiguousKV, issue 14).
//!
//! The disk tier evicts by `(priority, last use)` ([`super::index`]). A chunk written with an
//! importance section (format v2) starts with the priority that section implies,
//! [`kvfs_loader::importance::Importance::eviction_priority`]: its share of its prompt's
//! attention in sixteenths, so the chunks the prompt's last queries attend to most (the one
//! holding the attention sink first) are evicted last, and chunks of about the same share by
//! recency. A chunk without importance starts at 0.
//!
//! The priority is derived where a chunk's row is first inserted into the index
//! ([`super::index::upsert_chunk`]), the one step every way in passes: a put, a streamed put
//! or a mount write (both through a reservation's commit), a writer's crash recovery, a
//! read or `stat` adopting a file an engine's loader committed, and the maintenance pass.
//! A put passes the priority of the header it verified; the other ways read the chunk's
//! header from its file (the header alone, a page or two). A row that
//! exists keeps its priority, so an engine's explicit [`super::Store::set_priority`] wins
//! over the derived one and survives re-puts and restarts.

use kvfs_loader::format::ChunkHeader;
use std::fs::File;
use std::path::Path;

/// The priority the importance in `header` implies; 0 when it has none.
pub(crate) fn of_header(header: &ChunkHeader) -> u8 {
    header
        .importance
        .as_ref()
        .map_or(0, |imp| imp.eviction_priority())
}

/// The priority the importance in the header of the chunk file at `path` implies; 0 when it
/// has none, or its header cannot be read (the file is checked on every read anyway; a bad
/// one is quarantined there, not here).
pub(crate) fn of_chunk_file(path: &Path) -> u8 {
    let header = File::open(path)
        .map_err(kvfs_loader::FormatError::from)
        .and_then(|f| ChunkHeader::read_from(&f));
    match header {
        Ok(h) => of_header(&h),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no priority from importance");
            0
        }
    }
}
