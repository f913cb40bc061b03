//! Importance from Python (ContiguousKV, issue 14): `Loader.store(..., importance=...)` writes
//! each chunk's per-layer, per-group attention mass into its header (format v2), and
//! `Loader.importance_selection(tokens, upto, share)` ranks the stored scores into the groups
//! a pruned load keeps, as `Loader::importance_selection` does in Rust. This module converts
//! the Python lists and maps the errors to the package's exceptions.

use crate::{ChunkError, InvalidRequest, KvfsIOError, to_py as loader_to_py};
use kvfs_loader::importance::Importance;
use kvfs_loader::prefetch::PrefetchError;
use kvfs_loader::{FormatError, Loader};
use pyo3::prelude::*;

/// Chunk `c`'s scores as `lists[c][layer][group]`, checked against the loader's shape.
pub(crate) fn from_lists(
    loader: &Loader,
    lists: Vec<Vec<Vec<f32>>>,
    observed_queries: u32,
) -> PyResult<Vec<Importance>> {
    let spec = loader.spec();
    let groups = spec.chunk_tokens.div_ceil(spec.group_tokens) as usize;
    lists
        .into_iter()
        .enumerate()
        .map(|(c, layers)| {
            if layers.len() != spec.num_layers as usize
                || layers.iter().any(|row| row.len() != groups)
            {
                return Err(InvalidRequest::new_err(format!(
                    "importance of chunk {c}: want {} layers of {groups} groups",
                    spec.num_layers
                )));
            }
            Importance::new(
                spec.num_layers,
                groups as u32,
                observed_queries,
                layers.concat(),
            )
            .map_err(|e| InvalidRequest::new_err(format!("importance of chunk {c}: {e}")))
        })
        .collect()
}

/// The Python exception for a pruned-load error: a chunk without importance or a bad budget
/// is an `InvalidRequest`, an unreadable header a `KvfsIOError` (missing) or a `ChunkError`
/// (corrupt; nothing was loaded, so `valid_tokens` is 0).
pub(crate) fn to_py(e: PrefetchError) -> PyErr {
    let msg = e.to_string();
    match e {
        PrefetchError::Budget(_)
        | PrefetchError::Periods(_)
        | PrefetchError::NoImportance { .. } => InvalidRequest::new_err(msg),
        PrefetchError::Header {
            source: FormatError::Io(_),
            ..
        } => KvfsIOError::new_err(msg),
        PrefetchError::Header { chunk, path, .. } => Python::attach(|py| {
            let err = ChunkError::new_err(msg);
            let value = err.value(py);
            let attrs = [
                value.setattr("chunk", chunk),
                value.setattr("path", path.to_string_lossy().into_owned()),
                value.setattr("valid_tokens", 0),
                value.setattr("valid_blocks", Vec::<u32>::new()),
            ];
            match attrs.into_iter().find_map(Result::err) {
                Some(e) => e,
                None => err,
            }
        }),
        PrefetchError::Loader(e) => loader_to_py(e),
    }
}
