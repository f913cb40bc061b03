//! The loader: lookup, load and store between `.kvc` chunk files and an engine's KV blocks.
//!
//! A [`Loader`] is opened on a chunk directory (a kvfs mount, flat layout, or a cache
//! directory, fanned-out layout; [`dir::Layout::detect`]) and a [`ModelSpec`] with an optional
//! tenant salt. It turns a token sequence into prefix-chained chunk keys and then:
//!
//! - [`Loader::lookup`]: how many leading tokens are cached. The first missing chunk ends the
//!   hit (a later chunk cannot be used without the ones before it); after the full chunks,
//!   one probe for the prompt's trailing partial chunk ([`crate::key::prompt_chunk_keys`]).
//! - [`Loader::load`] / [`Loader::load_request`]: chunk bytes into the engine's blocks, as
//!   described by a [`Dest`] (a [`KvLayout`], a [`BlockMap`] and a [`Backend`]). The call
//!   checks the request, queues one job per (layer, chunk) on the reader pool, layer-major,
//!   and returns a [`LoadHandle`] at once: [`LoadHandle::wait_layer`] returns when one layer
//!   is in place for every chunk while later layers are still being read, and
//!   [`LoadHandle::wait`] returns the [`LoadStats`].
//! - [`Loader::store`]: engine blocks into chunk files, for full chunks not yet present
//!   ([`Loader::store_with_tail`]: and the trailing partial chunk, once a prompt is complete),
//!   committed create-once with [`dir::commit_file`] (cache directory) or written through the
//!   mount (create, write, close: the mount checks the chunk at close).
//!
//! **How a job reads.** A job knows the chunk-local token ranges it needs for one layer (the
//! requested positions, narrowed by a [`Selection`] when loading selectively) and, per plane
//! and range, the destination runs (rows back to back in engine memory). When the destination
//! is host memory and the runs are large (or the file is read buffered), each run is read
//! straight into engine memory: one copy, kernel to blocks. Otherwise (small runs under
//! O_DIRECT, a device back end, or full verification) the job reads the byte range, widened
//! to 4096 bytes for O_DIRECT, into its thread's aligned buffer and copies the rows out.
//! Whole-layer reads are one read of the layer's span (K and V together).
//!
//! **Verification.** Every chunk's header is parsed and checked (checksum, shape, key) and
//! must match the spec and the expected key. With [`Verify::Full`] each layer's digest is also
//! checked on the bytes read, which is possible only when the whole layer is read: partial
//! ranges are widened to the whole layer (read amplification shows it), and a selective load
//! with `Verify::Full` is refused.
//!
//! **Failure.** When a chunk is missing, corrupt or unreadable, jobs of later chunks are
//! skipped, earlier chunks finish, and `wait` (or `wait_layer`) returns
//! [`LoaderError::Chunk`], which says which positions and which blocks hold valid data.
//! Dropping a handle cancels what has not started and waits for what has, so no read lands
//! in engine memory after the handle is gone.
//!
//! **Files.** One job per file: this module holds the [`Loader`] (open, lookup, where a chunk
//! lives), its options and the load request types; `error` the errors ([`LoaderError`],
//! [`ChunkError`]); `store` writing chunks and `namespace.json`; `job` the load plan and the
//! job that reads it (reader threads, header checks, progress); `handle` the [`LoadHandle`]
//! an engine waits on; `snapshot` stores split in two (copy the rows out of the engine's
//! blocks now, encode and write them later on another thread); `document` the
//! position-independent chunks of documents (blending):
//! store, look up, and load at a new place with the keys re-encoded ([`crate::rope`]).

mod document;
mod error;
mod handle;
mod job;
mod snapshot;
mod store;

pub use error::{ChunkError, LoaderError};
pub use handle::LoadHandle;
pub use snapshot::StoreSnapshot;
pub use store::StoreStats;

use crate::backend::{Backend, HostMemory};
use crate::dir;
use crate::format::Verify;
use crate::io::{IoMode, Pool};
use crate::key::{ChunkKey, ChunkRef, SaltTag, chunk_keys, prompt_chunk_keys};
use crate::layout::{BlockMap, KvLayout};
use crate::selective::Selection;
use crate::spec::{ModelSpec, NamespaceId};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Tuning of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub io: IoMode,
    pub verify: Verify,
    /// Reader threads: the number of reads in flight.
    pub threads: usize,
    /// fsync stored chunks (cache layout) before `store` returns.
    pub fsync: bool,
    /// On a mount, read the local file named by `user.kvfs.backing` instead of going through
    /// FUSE.
    pub use_backing: bool,
    /// Reads straight into host destination memory when runs average at least this many
    /// bytes; smaller runs are staged through one larger read.
    pub direct_run_min: usize,
    /// In which order (layer, chunk) reads are queued.
    pub order: LoadOrder,
}

/// The order in which a load queues its reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadOrder {
    /// Layer 0 of every chunk, then layer 1, ...: layers become ready one after the other, so
    /// an engine computes layer `i` while later layers load (`wait_layer`).
    #[default]
    LayerMajor,
    /// Chunk 0 whole, then chunk 1, ...: each file is read front to back, which some devices
    /// serve faster; no layer is ready before the last chunk's reads start.
    ChunkMajor,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            io: IoMode::Direct,
            verify: Verify::Header,
            threads: 4,
            fsync: false,
            use_backing: true,
            direct_run_min: 64 * 1024,
            order: LoadOrder::LayerMajor,
        }
    }
}

/// Where a load puts KV bytes (or a store takes them from).
#[derive(Debug, Clone)]
pub struct Dest<'a> {
    pub layout: &'a KvLayout,
    pub map: BlockMap<'a>,
    pub backend: Arc<dyn Backend>,
}

impl<'a> Dest<'a> {
    /// Host memory described by `layout`, slots chosen by `map`.
    pub fn host(layout: &'a KvLayout, map: BlockMap<'a>) -> Dest<'a> {
        Dest {
            layout,
            map,
            backend: Arc::new(HostMemory),
        }
    }
}

/// A load with every option.
#[derive(Debug, Clone, Default)]
pub struct LoadRequest<'a> {
    /// The sequence's tokens (at least through the last chunk loaded). A range that ends past
    /// the last full chunk loads the trailing partial chunk of all of `tokens` (its key is
    /// that of exactly these tail tokens).
    pub tokens: &'a [u32],
    /// Token positions to load; `None`: every full chunk of `tokens`. The end may fall inside
    /// a chunk (and a block): only the covered rows and slots are written. It may reach
    /// `tokens.len()` (the trailing partial chunk).
    pub range: Option<Range<usize>>,
    /// Load only these groups per layer.
    pub selection: Option<&'a Selection>,
    /// Overrides the loader's verification level.
    pub verify: Option<Verify>,
}

/// Figures of one finished load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadStats {
    pub chunks: usize,
    /// Token positions in the request.
    pub tokens: usize,
    /// Bytes the request needs (rows actually placed).
    pub bytes_needed: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Chunk files read with O_DIRECT, and buffered.
    pub direct_files: usize,
    pub buffered_files: usize,
    /// Chunk files read from the backing file named by the mount.
    pub backing_files: usize,
    /// From `load` to the last byte in place.
    pub elapsed: Duration,
    /// From `load` to each layer in place for every chunk.
    pub layer_ready: Vec<Duration>,
}

impl LoadStats {
    /// Bytes read / bytes needed (1.0 when nothing was needed).
    pub fn read_amplification(&self) -> f64 {
        if self.bytes_needed == 0 {
            1.0
        } else {
            self.bytes_read as f64 / self.bytes_needed as f64
        }
    }
}

/// A KV-cache loader bound to one chunk directory and one model namespace.
pub struct Loader {
    root: PathBuf,
    layout: dir::Layout,
    spec: ModelSpec,
    ns: NamespaceId,
    ns_dir: String,
    salt: SaltTag,
    opts: LoaderOptions,
    pool: Arc<Pool>,
    namespace_written: AtomicBool,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("root", &self.root)
            .field("layout", &self.layout)
            .field("ns_dir", &self.ns_dir)
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// Opens `root` for `spec` with default options. `salt` isolates a tenant (empty = none).
    pub fn open(root: &Path, spec: ModelSpec, salt: &[u8]) -> Result<Loader, LoaderError> {
        Loader::open_with(root, spec, salt, LoaderOptions::default())
    }

    pub fn open_with(
        root: &Path,
        spec: ModelSpec,
        salt: &[u8],
        opts: LoaderOptions,
    ) -> Result<Loader, LoaderError> {
        spec.validate().map_err(LoaderError::Spec)?;
        let io_err = |source| LoaderError::Io {
            path: root.to_path_buf(),
            source,
        };
        if !std::fs::metadata(root).map_err(io_err)?.is_dir() {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let layout = dir::Layout::detect(root);
        let ns = spec.namespace_id();
        let ns_dir = dir::find_namespace_dir(root, &ns)
            .map_err(io_err)?
            .unwrap_or_else(|| spec.namespace_dir());
        let pool = Arc::new(Pool::new(opts.threads).map_err(io_err)?);
        tracing::debug!(root = %root.display(), ?layout, ns_dir, "loader opened");
        Ok(Loader {
            root: root.to_path_buf(),
            layout,
            spec,
            ns,
            ns_dir,
            salt: SaltTag::of(salt),
            opts,
            pool,
            namespace_written: AtomicBool::new(false),
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    pub fn dir_layout(&self) -> dir::Layout {
        self.layout
    }
    pub fn namespace_dir(&self) -> &str {
        &self.ns_dir
    }
    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    /// Keys of the full chunks of `tokens`.
    pub fn chunk_keys(&self, tokens: &[u32]) -> Vec<ChunkRef> {
        chunk_keys(
            &self.ns,
            &self.salt,
            self.spec.chunk_tokens as usize,
            tokens,
        )
    }

    /// Keys of every chunk of `tokens`: the full chunks, then the trailing partial chunk if
    /// `tokens` does not end on a chunk boundary ([`prompt_chunk_keys`]).
    pub fn prompt_chunks(&self, tokens: &[u32]) -> Vec<ChunkRef> {
        prompt_chunk_keys(
            &self.ns,
            &self.salt,
            self.spec.chunk_tokens as usize,
            tokens,
        )
    }

    /// Where the chunk of `key` lives.
    pub fn chunk_path(&self, key: &ChunkKey) -> PathBuf {
        self.layout.chunk_path(&self.root, &self.ns_dir, key)
    }

    /// Checks a header that a caller read itself (a device back end reading chunk files
    /// with its own I/O) against this loader's spec, namespace and the expected `key`: the
    /// checks every [`Loader::load`] makes on each chunk.
    pub fn check_chunk_header(
        &self,
        header: &crate::format::ChunkHeader,
        key: &ChunkKey,
    ) -> Result<(), ChunkError> {
        job::check_header(header, &self.spec, &self.ns, key, self.spec.chunk_tokens)
    }

    /// How many leading tokens of `tokens` are cached: full chunks present, up to the first
    /// missing one; when every full chunk is present and `tokens` ends inside a chunk, one
    /// more probe for that trailing partial chunk (stored by [`Loader::store_with_tail`]):
    /// present, the hit is all of `tokens`.
    pub fn lookup(&self, tokens: &[u32]) -> usize {
        let mut hit = 0;
        for c in self.prompt_chunks(tokens) {
            match std::fs::metadata(self.chunk_path(&c.key)) {
                Ok(m) if m.is_file() => hit = c.end,
                _ => break,
            }
        }
        crate::metrics::global().lookup(tokens.len(), hit);
        hit
    }
}
