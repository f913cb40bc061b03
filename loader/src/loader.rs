//! The loader: lookup, load and store between `.kvc` chunk files and an engine's KV blocks.
//!
//! A [`Loader`] is opened on a chunk directory (a kvfs mount, flat layout, or a cache
//! directory, fanned-out layout; [`dir::Layout::detect`]) and a [`ModelSpec`] with an optional
//! tenant salt. It turns a token sequence into prefix-chained chunk keys and then:
//!
//! - [`Loader::lookup`]: how many leading tokens are cached. Full chunks only; the first
//!   missing chunk ends the hit (a later chunk cannot be used without the ones before it).
//! - [`Loader::load`] / [`Loader::load_request`]: chunk bytes into the engine's blocks, as
//!   described by a [`Dest`] (a [`KvLayout`], a [`BlockMap`] and a [`Backend`]). The call
//!   checks the request, queues one job per (layer, chunk) on the reader pool, layer-major,
//!   and returns a [`LoadHandle`] at once: [`LoadHandle::wait_layer`] returns when one layer
//!   is in place for every chunk while later layers are still being read, and
//!   [`LoadHandle::wait`] returns the [`LoadStats`].
//! - [`Loader::store`]: engine blocks into chunk files, for full chunks not yet present,
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

use crate::backend::{Backend, HostMemory};
use crate::dir::{self, Commit};
use crate::error::FormatError;
use crate::format::{ALIGN, ChunkHeader, ChunkMeta, Verify, encode_chunk};
use crate::io::{self, AlignedBuf, ChunkFile, DIRECT_ALIGN, IoMode, Pool};
use crate::key::{ChunkKey, ChunkRef, SaltTag, chunk_keys};
use crate::layout::{BlockMap, KvLayout, LayoutError, OwnedMap, Run};
use crate::selective::Selection;
use crate::spec::{ModelSpec, NamespaceId};
use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// The sequence's tokens (at least through the last chunk loaded; only full chunks have
    /// keys).
    pub tokens: &'a [u32],
    /// Token positions to load; `None`: every full chunk of `tokens`. The end may fall inside
    /// a chunk (and a block): only the covered rows and slots are written.
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

/// Figures of one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Chunks this call wrote.
    pub written: usize,
    /// Chunks that were already present (or written by someone else meanwhile).
    pub present: usize,
    pub bytes_written: u64,
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

    /// Where the chunk of `key` lives.
    pub fn chunk_path(&self, key: &ChunkKey) -> PathBuf {
        self.layout.chunk_path(&self.root, &self.ns_dir, key)
    }

    /// How many leading tokens of `tokens` are cached: full chunks present, up to the first
    /// missing one.
    pub fn lookup(&self, tokens: &[u32]) -> usize {
        let mut hit = 0;
        for c in self.chunk_keys(tokens) {
            match std::fs::metadata(self.chunk_path(&c.key)) {
                Ok(m) if m.is_file() => hit = c.end,
                _ => break,
            }
        }
        hit
    }

    /// Loads every full chunk of `tokens` into `dest`.
    pub fn load(&self, tokens: &[u32], dest: &Dest<'_>) -> Result<LoadHandle, LoaderError> {
        self.load_request(
            &LoadRequest {
                tokens,
                ..Default::default()
            },
            dest,
        )
    }

    /// Starts a load; see [`LoadRequest`] and the module docs.
    pub fn load_request(
        &self,
        req: &LoadRequest<'_>,
        dest: &Dest<'_>,
    ) -> Result<LoadHandle, LoaderError> {
        let ct = self.spec.chunk_tokens as usize;
        let full = req.tokens.len() / ct * ct;
        let range = req.range.clone().unwrap_or(0..full);
        if range.start > range.end || range.end > full {
            return Err(LoaderError::Invalid(format!(
                "range {range:?} is not within the {full} tokens of full chunks"
            )));
        }
        let verify = req.verify.unwrap_or(self.opts.verify);
        let layers = self.spec.num_layers as usize;
        if let Some(s) = req.selection {
            if s.num_layers() != layers {
                return Err(LoaderError::Invalid(format!(
                    "selection has {} layers, the model {layers}",
                    s.num_layers()
                )));
            }
            if verify == Verify::Full {
                return Err(LoaderError::Invalid(
                    "Verify::Full checks whole-layer digests; a selective load reads parts of \
                     layers (use Verify::Header)"
                        .into(),
                ));
            }
        }
        dest.layout.check_spec(&self.spec)?;
        dest.layout.check_map(&dest.map, range.clone())?;

        let keys = self.chunk_keys(&req.tokens[..full]);
        let chunks: Vec<PlanChunk> = keys
            .iter()
            .filter(|c| c.start < range.end && c.end > range.start)
            .map(|c| PlanChunk {
                index: c.index,
                key: c.key,
                path: self.chunk_path(&c.key),
                start: c.start,
                local: (range.start.max(c.start) - c.start) as u32
                    ..(range.end.min(c.end) - c.start) as u32,
            })
            .collect();
        let n = chunks.len();
        let job = Arc::new(LoadJob {
            spec: self.spec.clone(),
            ns: self.ns,
            flat: self.layout == dir::Layout::Flat,
            opts: self.opts.clone(),
            verify,
            range: range.clone(),
            files: (0..n).map(|_| OnceLock::new()).collect(),
            chunks,
            selection: req.selection.cloned(),
            layout: dest.layout.clone(),
            map: OwnedMap::of(&dest.map),
            backend: dest.backend.clone(),
            progress: Mutex::new(Progress {
                jobs_left: n * layers,
                layer_jobs_left: vec![n; layers],
                layer_ready: vec![None; layers],
                failures: Vec::new(),
                elapsed: None,
            }),
            changed: Condvar::new(),
            cancel_from: AtomicUsize::new(usize::MAX),
            dropped: AtomicBool::new(false),
            bytes_needed: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            direct_files: AtomicUsize::new(0),
            backing_files: AtomicUsize::new(0),
            started: Instant::now(),
        });
        if n == 0 {
            let mut p = job.progress.lock().unwrap();
            p.layer_ready = vec![Some(Duration::ZERO); layers];
            p.elapsed = Some(Duration::ZERO);
        } else {
            let order: Vec<(usize, usize)> = match self.opts.order {
                LoadOrder::LayerMajor => (0..layers)
                    .flat_map(|l| (0..n).map(move |c| (c, l)))
                    .collect(),
                LoadOrder::ChunkMajor => (0..n)
                    .flat_map(|c| (0..layers).map(move |l| (c, l)))
                    .collect(),
            };
            self.pool.submit_all(order.into_iter().map(|(c, l)| {
                let job = job.clone();
                Box::new(move |buf: &mut AlignedBuf| job.run(c, l, buf)) as io::Job
            }));
        }
        Ok(LoadHandle { job })
    }

    /// Stores the full chunks of `tokens` that are not present yet, reading their KV from
    /// `src` (positions `0..` of the sequence). Writes `namespace.json` beside the chunks once.
    pub fn store(&self, tokens: &[u32], src: &Dest<'_>) -> Result<StoreStats, LoaderError> {
        let ct = self.spec.chunk_tokens as usize;
        let full = tokens.len() / ct * ct;
        src.layout.check_spec(&self.spec)?;
        src.layout.check_map(&src.map, 0..full)?;
        if let BlockMap::Slots(s) = src.map
            && let Some(p) = s[..full].iter().position(|&x| x < 0)
        {
            return Err(LoaderError::Invalid(format!(
                "position {p} maps to a padding slot; a stored chunk needs every row"
            )));
        }
        let mut stats = StoreStats::default();
        let keys = self.chunk_keys(&tokens[..full]);
        if keys.is_empty() {
            return Ok(stats);
        }
        self.write_namespace_json();
        let row = src.layout.row_bytes();
        let mut runs = Vec::new();
        for c in keys {
            let path = self.chunk_path(&c.key);
            if path.exists() {
                stats.present += 1;
                continue;
            }
            let meta = ChunkMeta::for_spec(
                &self.spec,
                c.parent,
                self.salt,
                tokens[c.start..c.end].to_vec(),
            );
            let mut copy_err = None;
            let bytes = encode_chunk(&meta, |layer, plane, dst| {
                runs.clear();
                src.layout.runs(
                    &src.map,
                    layer as usize,
                    plane as usize,
                    c.start..c.end,
                    &mut runs,
                );
                for r in &runs {
                    let at = (r.pos - c.start) * row;
                    let out = &mut dst[at..at + r.tokens * row];
                    // SAFETY: `check_map` proved every run lies inside a layout region, and
                    // the layout's contract keeps the region readable during this call.
                    let copied = unsafe {
                        src.backend
                            .copy_rows_out(src.layout, plane as usize, r, out)
                    };
                    if let Err(e) = copied {
                        copy_err.get_or_insert(e);
                    }
                }
            })
            .map_err(|e| LoaderError::Invalid(format!("cannot encode chunk: {e}")))?;
            let store_err = |source| LoaderError::Store {
                chunk: c.index,
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
        }
        tracing::debug!(?stats, "store finished");
        Ok(stats)
    }

    fn write_namespace_json(&self) {
        if self.namespace_written.swap(true, Ordering::Relaxed) {
            return;
        }
        let path = self.root.join(&self.ns_dir).join("namespace.json");
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

struct PlanChunk {
    index: usize,
    key: ChunkKey,
    path: PathBuf,
    /// First position of the chunk in the sequence.
    start: usize,
    /// Chunk-local tokens the request covers.
    local: Range<u32>,
}

struct Opened {
    file: ChunkFile,
    header: ChunkHeader,
}

struct Progress {
    jobs_left: usize,
    layer_jobs_left: Vec<usize>,
    layer_ready: Vec<Option<Duration>>,
    /// (plan index of the chunk, error)
    failures: Vec<(usize, Arc<ChunkError>)>,
    elapsed: Option<Duration>,
}

struct LoadJob {
    spec: ModelSpec,
    ns: NamespaceId,
    flat: bool,
    opts: LoaderOptions,
    verify: Verify,
    range: Range<usize>,
    chunks: Vec<PlanChunk>,
    files: Vec<OnceLock<Result<Arc<Opened>, Arc<ChunkError>>>>,
    selection: Option<Selection>,
    layout: KvLayout,
    map: OwnedMap,
    backend: Arc<dyn Backend>,
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Plan index of the first failed chunk: jobs of later chunks are skipped.
    cancel_from: AtomicUsize,
    /// The handle was dropped: skip every job not started.
    dropped: AtomicBool,
    bytes_needed: AtomicU64,
    bytes_read: AtomicU64,
    direct_files: AtomicUsize,
    backing_files: AtomicUsize,
    started: Instant,
}

impl LoadJob {
    fn run(&self, c: usize, layer: usize, buf: &mut AlignedBuf) {
        let result = if self.dropped.load(Ordering::Acquire)
            || c > self.cancel_from.load(Ordering::Acquire)
        {
            None
        } else {
            Some(self.read_layer(c, layer, buf))
        };
        let mut p = self.progress.lock().unwrap();
        if let Some(Err(e)) = result {
            tracing::warn!(chunk = %self.chunks[c].key, layer, error = %e, "chunk load failed");
            self.cancel_from.fetch_min(c, Ordering::AcqRel);
            p.failures.push((c, e));
        }
        p.jobs_left -= 1;
        p.layer_jobs_left[layer] -= 1;
        let now = self.started.elapsed();
        if p.layer_jobs_left[layer] == 0 {
            p.layer_ready[layer] = Some(now);
        }
        if p.jobs_left == 0 {
            p.elapsed = Some(now);
        }
        drop(p);
        self.changed.notify_all();
    }

    fn opened(&self, c: usize, buf: &mut AlignedBuf) -> Result<Arc<Opened>, Arc<ChunkError>> {
        self.files[c]
            .get_or_init(|| self.open(c, buf).map(Arc::new).map_err(Arc::new))
            .clone()
    }

    fn open(&self, c: usize, buf: &mut AlignedBuf) -> Result<Opened, ChunkError> {
        let pc = &self.chunks[c];
        if self.flat
            && self.opts.use_backing
            && let Some(backing) = io::backing_path(&pc.path)
        {
            match self.open_path(&backing, pc, buf) {
                Ok(o) => {
                    self.backing_files.fetch_add(1, Ordering::Relaxed);
                    return Ok(o);
                }
                Err(e) => tracing::debug!(
                    backing = %backing.display(), error = %e,
                    "backing file unusable; reading through the mount"
                ),
            }
        }
        self.open_path(&pc.path, pc, buf)
    }

    fn open_path(
        &self,
        path: &Path,
        pc: &PlanChunk,
        buf: &mut AlignedBuf,
    ) -> Result<Opened, ChunkError> {
        let file = io::open_chunk_file(path, self.opts.io).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ChunkError::Missing
            } else {
                ChunkError::Io(e)
            }
        })?;
        let header = read_header(&file, buf)?;
        check_header(&header, &self.spec, &self.ns, &pc.key)?;
        if file.is_direct() {
            self.direct_files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Opened { file, header })
    }

    fn read_layer(
        &self,
        c: usize,
        layer: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(), Arc<ChunkError>> {
        let opened = self.opened(c, buf)?;
        self.read_layer_of(&opened, c, layer, buf)
            .map_err(|e| Arc::new(ChunkError::from(e)))
    }

    fn read_layer_of(
        &self,
        o: &Opened,
        c: usize,
        layer: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(), ReadError> {
        let pc = &self.chunks[c];
        let g = &o.header.geometry;
        let tb = g.token_bytes as usize;
        let ranges = match &self.selection {
            Some(s) => s.chunk_ranges(
                layer,
                pc.index,
                self.spec.chunk_tokens,
                self.spec.group_tokens,
                pc.local.clone(),
            ),
            None => vec![pc.local.clone()],
        };
        if ranges.is_empty() {
            return Ok(());
        }
        let planes = g.planes as usize;
        let needed: usize = ranges.iter().map(|r| (r.end - r.start) as usize).sum();
        let whole = ranges.len() == 1 && ranges[0] == (0..g.token_count);
        let host = self.backend.host_addressable();
        let map = self.map.as_map();
        let mut runs: Vec<Run> = Vec::new();
        let mut placed = 0usize;
        let mut read = 0u64;
        let l = layer as u32;

        // A whole layer that cannot be read straight into its runs is one read of the layer
        // span (K and V together) rather than one per plane.
        let span_read = whole && {
            self.layout.runs(
                &map,
                layer,
                0,
                pc.start..pc.start + g.token_count as usize,
                &mut runs,
            );
            let first = g.token_range(l, 0, 0..g.token_count).start;
            !(host && self.read_direct_ok(&o.file, 0, &runs, first, pc.start, tb))
        };
        if self.verify == Verify::Full || span_read {
            // One read of the whole layer span; verify; copy the wanted rows out.
            let span = g.layer_span(l);
            let s = buf.slice((span.end - span.start) as usize);
            o.file.read_exact_at(s, span.start)?;
            read += span.end - span.start;
            if self.verify == Verify::Full {
                o.header.verify_layer(l, s)?;
            }
            for plane in 0..planes {
                for r in &ranges {
                    let fr = g.token_range(l, plane as u32, r.clone());
                    runs.clear();
                    let p0 = pc.start + r.start as usize;
                    self.layout
                        .runs(&map, layer, plane, p0..pc.start + r.end as usize, &mut runs);
                    let base = (fr.start - span.start) as usize;
                    placed += self.scatter(plane, &runs, p0, &s[base..], tb)?;
                }
            }
        } else {
            for plane in 0..planes {
                for r in &ranges {
                    let fr = g.token_range(l, plane as u32, r.clone());
                    let p0 = pc.start + r.start as usize;
                    runs.clear();
                    self.layout
                        .runs(&map, layer, plane, p0..pc.start + r.end as usize, &mut runs);
                    if runs.is_empty() {
                        continue;
                    }
                    if host && self.read_direct_ok(&o.file, plane, &runs, fr.start, p0, tb) {
                        for run in &runs {
                            let len = run.tokens * tb;
                            let off = fr.start + ((run.pos - p0) * tb) as u64;
                            // SAFETY: `check_map` proved the run lies inside a layout region;
                            // the layout's contract makes it writable host memory that nothing
                            // else touches while this load runs (the backend said host).
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(run.addr as *mut u8, len) };
                            o.file.read_exact_at(dst, off)?;
                            read += len as u64;
                            placed += run.tokens;
                        }
                    } else {
                        // Stage: one read of the range, widened to the O_DIRECT alignment.
                        let (a0, a1) = if o.file.is_direct() {
                            (fr.start / ALIGN * ALIGN, fr.end.div_ceil(ALIGN) * ALIGN)
                        } else {
                            (fr.start, fr.end)
                        };
                        let s = buf.slice((a1 - a0) as usize);
                        o.file.read_exact_at(s, a0)?;
                        read += a1 - a0;
                        placed +=
                            self.scatter(plane, &runs, p0, &s[(fr.start - a0) as usize..], tb)?;
                    }
                }
            }
        }
        debug_assert!(placed <= needed * planes);
        self.bytes_needed
            .fetch_add((placed * tb) as u64, Ordering::Relaxed);
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(())
    }

    /// Whether reading each run straight into host memory beats one staged read.
    fn read_direct_ok(
        &self,
        f: &ChunkFile,
        plane: usize,
        runs: &[Run],
        off0: u64,
        p0: usize,
        tb: usize,
    ) -> bool {
        // A direct read fills one contiguous range per run.
        if runs.is_empty() || !self.layout.row_contiguous(plane) {
            return false;
        }
        let total: usize = runs.iter().map(|r| r.tokens * tb).sum();
        if total / runs.len() < self.opts.direct_run_min {
            return false;
        }
        !f.is_direct()
            || runs
                .iter()
                .all(|r| io::aligned(r.addr, r.tokens * tb, off0 + ((r.pos - p0) * tb) as u64))
    }

    /// Copies rows of positions `p0..` of `plane`, held back to back in `src`, to their runs.
    fn scatter(
        &self,
        plane: usize,
        runs: &[Run],
        p0: usize,
        src: &[u8],
        tb: usize,
    ) -> Result<usize, ReadError> {
        let mut placed = 0;
        for run in runs {
            let at = (run.pos - p0) * tb;
            // SAFETY: `check_map` proved the run lies inside a layout region.
            unsafe {
                self.backend.copy_rows_in(
                    &self.layout,
                    plane,
                    run,
                    &src[at..at + run.tokens * tb],
                )?
            };
            placed += run.tokens;
        }
        Ok(placed)
    }

    fn stats(&self, p: &Progress) -> LoadStats {
        let direct = self.direct_files.load(Ordering::Relaxed);
        let opened = self
            .files
            .iter()
            .filter(|f| matches!(f.get(), Some(Ok(_))))
            .count();
        LoadStats {
            chunks: self.chunks.len(),
            tokens: self.range.len(),
            bytes_needed: self.bytes_needed.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            direct_files: direct,
            buffered_files: opened.saturating_sub(direct),
            backing_files: self.backing_files.load(Ordering::Relaxed),
            elapsed: p.elapsed.unwrap_or_default(),
            layer_ready: p
                .layer_ready
                .iter()
                .map(|d| d.unwrap_or_default())
                .collect(),
        }
    }

    fn error(&self, p: &Progress) -> Option<LoaderError> {
        let (c, e) = p.failures.iter().min_by_key(|(c, _)| *c)?;
        let pc = &self.chunks[*c];
        let valid_end = self.range.start.max(pc.start);
        let valid_tokens = self.range.start..valid_end;
        let mut valid_blocks = Vec::new();
        if let OwnedMap::Blocks(table) = &self.map {
            let bs = self.layout.block_size();
            let first = self.range.start / bs;
            let last = valid_end.div_ceil(bs);
            for (i, &b) in table.iter().enumerate().take(last).skip(first) {
                // requested slots of block i: [i*bs, (i+1)*bs) within the request range
                let end = ((i + 1) * bs).min(self.range.end);
                if end <= valid_end {
                    valid_blocks.push(b);
                }
            }
        }
        Some(LoaderError::Chunk {
            chunk: pc.index,
            key: pc.key,
            path: pc.path.clone(),
            valid_tokens,
            valid_blocks,
            source: e.clone(),
        })
    }
}

/// A read or verification failed for one layer of one chunk.
#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Format(FormatError),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}
impl From<FormatError> for ReadError {
    fn from(e: FormatError) -> Self {
        ReadError::Format(e)
    }
}
impl From<ReadError> for ChunkError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => ChunkError::Io(e),
            ReadError::Format(e) => ChunkError::Format(e),
        }
    }
}

/// Reads and parses a chunk header with aligned reads (fit for O_DIRECT).
fn read_header(f: &ChunkFile, buf: &mut AlignedBuf) -> Result<ChunkHeader, ChunkError> {
    let len = f.size()?;
    let first = len.min(DIRECT_ALIGN as u64) as usize;
    let s = buf.slice(first);
    f.read_exact_at(s, 0)?;
    let header_len = ChunkHeader::peek_header_len(s)?;
    if header_len > len {
        return Err(FormatError::Truncated {
            needed: header_len,
            have: len,
        }
        .into());
    }
    let s = if header_len as usize > first {
        let s = buf.slice(header_len as usize);
        f.read_exact_at(s, 0)?;
        s
    } else {
        &buf.slice(first)[..]
    };
    let header = ChunkHeader::parse(s)?;
    header.check_len(len)?;
    Ok(header)
}

/// Checks a parsed header is the chunk that was asked for, in the loader's spec.
fn check_header(
    h: &ChunkHeader,
    spec: &ModelSpec,
    ns: &NamespaceId,
    key: &ChunkKey,
) -> Result<(), ChunkError> {
    let m = &h.meta;
    if m.namespace != *ns {
        return Err(FormatError::NamespaceMismatch {
            expected: ns.to_hex(),
            found: m.namespace.to_hex(),
        }
        .into());
    }
    if m.key != *key {
        return Err(FormatError::NameMismatch {
            name: key.file_name(),
            key: m.key.to_hex(),
        }
        .into());
    }
    let checks = [
        ("dtype", m.dtype as u32, spec.dtype as u32),
        ("kv_kind", m.kv_kind as u32, spec.kv_kind as u32),
        ("num_layers", m.num_layers, spec.num_layers),
        ("num_heads", m.num_heads, spec.num_kv_heads),
        ("head_dim", m.head_dim, spec.head_dim),
        ("group_tokens", m.group_tokens, spec.group_tokens),
        ("token_count", m.tokens.len() as u32, spec.chunk_tokens),
    ];
    for (what, found, want) in checks {
        if found != want {
            return Err(ChunkError::Mismatch(format!(
                "{what} is {found}, the spec says {want}"
            )));
        }
    }
    Ok(())
}

/// A load in progress. Dropping it cancels what has not started and waits for the rest.
pub struct LoadHandle {
    job: Arc<LoadJob>,
}

impl std::fmt::Debug for LoadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadHandle")
            .field("range", &self.job.range)
            .field("chunks", &self.job.chunks.len())
            .finish()
    }
}

impl LoadHandle {
    /// Token positions this load fills.
    pub fn range(&self) -> Range<usize> {
        self.job.range.clone()
    }

    pub fn num_layers(&self) -> usize {
        self.job.spec.num_layers as usize
    }

    /// Returns once layer `layer` is in place for every chunk (later layers may still be
    /// loading). On a failure it waits for the whole load and returns its error.
    pub fn wait_layer(&self, layer: usize) -> Result<(), LoaderError> {
        if layer >= self.num_layers() {
            return Err(LoaderError::Invalid(format!(
                "layer {layer} of {}",
                self.num_layers()
            )));
        }
        let mut p = self.job.progress.lock().unwrap();
        while p.layer_jobs_left[layer] > 0 && p.failures.is_empty() {
            p = self.job.changed.wait(p).unwrap();
        }
        if p.failures.is_empty() {
            return Ok(());
        }
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
        Err(self.job.error(&p).expect("a failure was recorded"))
    }

    /// Whether every job has finished.
    pub fn is_done(&self) -> bool {
        self.job.progress.lock().unwrap().jobs_left == 0
    }

    /// Waits for the whole load.
    pub fn wait(self) -> Result<LoadStats, LoaderError> {
        let mut p = self.job.progress.lock().unwrap();
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
        match self.job.error(&p) {
            Some(e) => Err(e),
            None => Ok(self.job.stats(&p)),
        }
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.job.dropped.store(true, Ordering::Release);
        let mut p = self.job.progress.lock().unwrap();
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
    }
}
