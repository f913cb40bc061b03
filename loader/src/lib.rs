//! kvfs-loader: what a serving engine links to reuse KV caches through kvfs.
//!
//! - [`spec`]: model specs and namespaces (which KV bytes are valid to reuse where);
//! - [`key`]: prefix-chained, content-addressed chunk keys;
//! - [`format`]: the `.kvc` chunk file, its writer, reader and verification.
//!
//! This crate has no async runtime, no S3 client and no FUSE code: an engine that links it
//! pulls in blake3, libc, thiserror and tracing, nothing more.

pub mod dir;
pub mod error;
pub mod format;
pub mod key;
pub mod spec;

pub use error::FormatError;
pub use format::{
    ChunkHeader, ChunkMeta, ChunkView, Geometry, Verify, encode_chunk, encode_chunk_from,
    synth_chunk,
};
pub use key::{ChunkKey, ChunkRef, SaltTag, chunk_keys};
pub use spec::{Dtype, KvKind, ModelSpec, NamespaceId};
