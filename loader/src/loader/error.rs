//! The loader's errors: [`LoaderError`] for a call, and [`ChunkError`], why one chunk of a
//! load could not be used (carried by [`LoaderError::Chunk`] with what is still valid).

use crate::error::FormatError;
use crate::key::ChunkKey;
use crate::layout::LayoutError;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// Why one chunk could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk file is missing")]
    Missing,
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("chunk does not match the model spec: {0}")]
    Mismatch(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors of the loader.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("invalid model spec: {0}")]
    Spec(#[source] FormatError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "chunk {chunk} ({key}) failed: {source}; positions {valid_tokens:?} ({} blocks) hold valid data",
        valid_blocks.len()
    )]
    Chunk {
        /// Index of the first failing chunk in the prompt.
        chunk: usize,
        key: ChunkKey,
        path: PathBuf,
        /// Requested positions that were loaded and are valid: a prefix of the request.
        valid_tokens: Range<usize>,
        /// Block ids (block-table loads) all of whose requested slots hold valid data.
        valid_blocks: Vec<u32>,
        #[source]
        source: Arc<ChunkError>,
    },
    #[error("storing chunk {chunk} at {}: {source}", path.display())]
    Store {
        chunk: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
