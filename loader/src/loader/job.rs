//! Loading: the plan of a request (which chunks, which chunk-local tokens) and the
//! [`LoadJob`] the reader threads run, one job per (layer, chunk): open each chunk once
//! (through the mount's backing file when it can), read and check its header against the
//! spec and the expected key, read the wanted rows (straight into host memory or staged
//! through the thread's aligned buffer), and record progress and the first failure for the
//! [`LoadHandle`](super::LoadHandle). See the parent module for how a job reads.

mod decode;

use super::document::{Rekey, check_document_header};
use super::{ChunkError, Dest, LoadHandle, LoadOrder, LoadRequest, LoadStats, Loader};
use super::{LoaderError, LoaderOptions};
use crate::backend::Backend;
use crate::dir;
use crate::error::FormatError;
use crate::format::{ALIGN, ChunkHeader, Verify};
use crate::io::{self, AlignedBuf, ChunkFile, DIRECT_ALIGN};
use crate::key::ChunkKey;
use crate::layout::{KvLayout, OwnedMap, Run};
use crate::selective::Selection;
use crate::spec::{ModelSpec, NamespaceId};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

impl Loader {
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
        if range.start > range.end || range.end > req.tokens.len() {
            return Err(LoaderError::Invalid(format!(
                "range {range:?} is not within the {} tokens of the sequence",
                req.tokens.len()
            )));
        }
        // Past the last full chunk: the trailing partial chunk of all of `tokens`.
        let tail = range.end > full;
        if tail && req.selection.is_some() {
            return Err(LoaderError::Invalid(format!(
                "range {range:?} reaches into the partial chunk after {full} tokens; a \
                 selective load covers full chunks only"
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

        let keys = if tail {
            self.prompt_chunks(req.tokens)
        } else {
            self.chunk_keys(&req.tokens[..full])
        };
        let chunks: Vec<PlanChunk> = keys
            .iter()
            .filter(|c| c.start < range.end && c.end > range.start)
            .map(|c| PlanChunk {
                index: c.index,
                key: c.key,
                path: self.chunk_path(&c.key),
                start: c.start,
                token_count: (c.end - c.start) as u32,
                local: (range.start.max(c.start) - c.start) as u32
                    ..(range.end.min(c.end) - c.start) as u32,
            })
            .collect();
        self.start_load(chunks, range, verify, req.selection, dest, None)
    }

    /// Queues the jobs of a planned load: one per (layer, chunk) on the reader pool, in the
    /// loader's order. `rekey`: the chunks are a document's position-independent chunks,
    /// their keys rotated to their plan positions on the way in (`document`).
    pub(super) fn start_load(
        &self,
        chunks: Vec<PlanChunk>,
        range: Range<usize>,
        verify: Verify,
        selection: Option<&Selection>,
        dest: &Dest<'_>,
        rekey: Option<Rekey>,
    ) -> Result<LoadHandle, LoaderError> {
        let layers = self.spec.num_layers as usize;
        let n = chunks.len();
        let job = Arc::new(LoadJob {
            spec: self.spec.clone(),
            ns: self.ns,
            flat: self.layout == dir::Layout::Flat,
            opts: self.opts.clone(),
            verify,
            range,
            files: (0..n).map(|_| OnceLock::new()).collect(),
            chunks,
            selection: selection.cloned(),
            rekey,
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
}

pub(super) struct PlanChunk {
    pub(super) index: usize,
    pub(super) key: ChunkKey,
    pub(super) path: PathBuf,
    /// First position of the chunk in the sequence.
    pub(super) start: usize,
    /// Tokens the chunk holds: `chunk_tokens`, less for a trailing partial chunk (of a prompt
    /// or a document).
    pub(super) token_count: u32,
    /// Chunk-local tokens the request covers.
    pub(super) local: Range<u32>,
}

struct Opened {
    file: ChunkFile,
    header: ChunkHeader,
}

pub(super) struct Progress {
    pub(super) jobs_left: usize,
    pub(super) layer_jobs_left: Vec<usize>,
    layer_ready: Vec<Option<Duration>>,
    /// (plan index of the chunk, error)
    pub(super) failures: Vec<(usize, Arc<ChunkError>)>,
    elapsed: Option<Duration>,
}

pub(super) struct LoadJob {
    pub(super) spec: ModelSpec,
    ns: NamespaceId,
    flat: bool,
    opts: LoaderOptions,
    verify: Verify,
    pub(super) range: Range<usize>,
    pub(super) chunks: Vec<PlanChunk>,
    files: Vec<OnceLock<Result<Arc<Opened>, Arc<ChunkError>>>>,
    selection: Option<Selection>,
    /// Document chunks: rotate K from each chunk's origin to its plan position.
    rekey: Option<Rekey>,
    layout: KvLayout,
    map: OwnedMap,
    backend: Arc<dyn Backend>,
    pub(super) progress: Mutex<Progress>,
    pub(super) changed: Condvar,
    /// Plan index of the first failed chunk: jobs of later chunks are skipped.
    cancel_from: AtomicUsize,
    /// The handle was dropped: skip every job not started.
    pub(super) dropped: AtomicBool,
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
        match &self.rekey {
            None => check_header(&header, &self.spec, &self.ns, &pc.key, pc.token_count)?,
            Some(_) => check_document_header(&header, &self.spec, &self.ns, pc)?,
        }
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
        let shift = self.key_shift(o, pc);
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
        if let Some(t) = o.header.stored() {
            let (placed, read) = self.read_coded_layer(o, t, pc, layer, &ranges, buf)?;
            debug_assert!(placed <= needed * planes);
            let tb = tb as u64;
            self.bytes_needed
                .fetch_add(placed as u64 * tb, Ordering::Relaxed);
            self.bytes_read.fetch_add(read, Ordering::Relaxed);
            return Ok(());
        }
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
                    placed += self.scatter(plane, &runs, p0, &s[base..], tb, shift)?;
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
                        placed += self.scatter(
                            plane,
                            &runs,
                            p0,
                            &s[(fr.start - a0) as usize..],
                            tb,
                            shift,
                        )?;
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
        // A direct read fills one contiguous range per run; keys to re-encode go through
        // `scatter`.
        if runs.is_empty() || !self.layout.row_contiguous(plane) || self.rekeys(plane) {
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

    /// Copies rows of positions `p0..` of `plane`, held back to back in `src`, to their runs;
    /// K rows of a document chunk are rotated by `shift` positions on the way
    /// ([`Rekey::rotate`]).
    fn scatter(
        &self,
        plane: usize,
        runs: &[Run],
        p0: usize,
        src: &[u8],
        tb: usize,
        shift: Option<i64>,
    ) -> Result<usize, ReadError> {
        let mut placed = 0;
        let mut rotated = Vec::new();
        for run in runs {
            let at = (run.pos - p0) * tb;
            let mut rows = &src[at..at + run.tokens * tb];
            if let (true, Some(rekey), Some(delta)) = (self.rekeys(plane), &self.rekey, shift) {
                rows = rekey.rotate(self.spec.dtype, rows, delta, &mut rotated)?;
            }
            // SAFETY: `check_map` proved the run lies inside a layout region.
            unsafe { self.backend.copy_rows_in(&self.layout, plane, run, rows)? };
            placed += run.tokens;
        }
        Ok(placed)
    }

    /// Whether `plane`'s rows are rotated on the way in (the K plane of a document load).
    fn rekeys(&self, plane: usize) -> bool {
        plane == 0 && self.rekey.is_some()
    }

    /// Positions a document chunk's keys move by: its plan position less the origin its
    /// header records (`None` for prefix chunks).
    fn key_shift(&self, o: &Opened, pc: &PlanChunk) -> Option<i64> {
        self.rekey.as_ref()?;
        Some(pc.start as i64 - i64::from(o.header.meta.origin?))
    }

    pub(super) fn stats(&self, p: &Progress) -> LoadStats {
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

    pub(super) fn error(&self, p: &Progress) -> Option<LoaderError> {
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
pub(super) enum ReadError {
    Io(std::io::Error),
    Format(FormatError),
    Rope(crate::rope::RopeError),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}
impl From<crate::rope::RopeError> for ReadError {
    fn from(e: crate::rope::RopeError) -> Self {
        ReadError::Rope(e)
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
            ReadError::Rope(e) => ChunkError::Mismatch(e.to_string()),
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

/// Checks a parsed header is the chunk that was asked for, in the loader's spec, holding
/// `token_count` tokens (the chunk size, less for a prompt's trailing partial chunk).
pub(super) fn check_header(
    h: &ChunkHeader,
    spec: &ModelSpec,
    ns: &NamespaceId,
    key: &ChunkKey,
    token_count: u32,
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
        ("token_count", m.tokens.len() as u32, token_count),
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
