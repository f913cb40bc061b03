//! kvfs-loader: what a serving engine links to reuse KV caches through kvfs.
//!
//! - [`spec`]: model specs and namespaces (which KV bytes are valid to reuse where);
//! - [`key`]: prefix-chained, content-addressed chunk keys;
//! - [`identity`]: the one check that a chunk is the one its place names (key and namespace
//!   directory), and the fixed names (`namespace.json`, `user.kvfs.backing`, ...);
//! - [`format`](mod@format): the `.kvc` chunk file, its writer, reader and verification;
//! - [`layout`]: an engine's paged KV memory as base pointers and strides;
//! - [`loader`]: lookup, load (layer-wise, selective) and store between chunks and blocks,
//!   over [`io`] (O_DIRECT, aligned buffers, reader threads) and a [`backend`] (host memory);
//! - [`metrics`]: this process's lookup, load and store counters and latency histograms;
//! - [`rope`]: re-encoding cached keys for new positions (blending);
//! - [`selective`]: which token groups of which layer a selective load reads;
//! - [`importance`]: per-group attention mass stored in chunk headers (format v2), and
//!   [`prefetch`]: importance-guided selective loads that prefetch across layer periods;
//! - [`ffi`]: the C ABI (`include/kvfs.h`).
//!
//! It owns what a chunk is and how an engine reads and writes one: identity, format, layouts,
//! loading. It must not know stores and tiers, mounts, S3 or CUDA: it has no async runtime, no
//! S3 client, no FUSE code and no CUDA; an engine that links it pulls in blake3, libc,
//! thiserror, tracing and kvfs-direct (the O_DIRECT stack), nothing more. The only
//! [`Backend`] is host memory.

pub mod backend;
pub mod codec;
pub mod dir;
pub mod error;
pub mod ffi;
pub mod format;
pub mod identity;
pub mod importance;
pub mod io;
pub mod key;
pub mod layout;
pub mod loader;
pub mod metrics;
pub mod prefetch;
pub mod rope;
pub mod selective;
pub mod spec;

pub use codec::{Codec, CodecError};
pub use error::FormatError;
pub use format::{
    ChunkHeader, ChunkMeta, ChunkView, Geometry, Verify, encode_chunk, encode_chunk_from,
    encode_chunk_with, synth_chunk,
};
pub use identity::{BACKING_XATTR, NAMESPACE_JSON, check_identity, namespace_suffix};
pub use key::{ChunkKey, ChunkRef, SaltTag, chunk_keys, independent_chunk_keys, prompt_chunk_keys};
pub use spec::{Dtype, KvKind, ModelSpec, NamespaceId};

pub use backend::{Backend, HostMemory};
pub use io::IoMode;
pub use layout::{BlockMap, KvLayout, LayoutError, RawRegion};
pub use loader::{
    ChunkError, Dest, LoadHandle, LoadOrder, LoadRequest, LoadStats, Loader, LoaderError,
    LoaderOptions, StoreSnapshot, StoreStats,
};
pub use rope::{RopeError, RopePairing, RopeParams};
pub use selective::Selection;
