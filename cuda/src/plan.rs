//! The device load plan: a load request turned into file extents and a scatter plan.
//!
//! [`DevicePlan::build`] does everything of a load that needs no device: it checks the request
//! as [`Loader::load_request`] does (range, selection, the layout against the spec, the block
//! map against the layout), derives the chunk keys, opens every chunk in prompt order (through
//! the mount's backing file when there is one), reads and checks each header with the
//! loader's own check ([`Loader::check_chunk_header`]), and stops at the first chunk that is
//! missing, corrupt or unreadable: the chunks before it are loaded, and the load's result is
//! the loader's [`LoaderError::Chunk`] naming the valid prefix, as a host load reports it.
//!
//! Files are opened with O_DIRECT under `IoMode::Direct`, except a chunk whose every page is
//! already in the page cache (`cachestat`, the host loader's rule): re-reading it from the
//! device would be several times slower than copying it out of memory.
//!
//! It then lists, **layer-major** (layer 0 of every chunk, then layer 1, ...), the byte
//! ranges to read as kvfs-gds [`ReadExtent`]s, whose bytes back to back form the source
//! stream, and where each byte goes as [`ScatterRun`]s (destination = the layout's address,
//! a device pointer on the device path). A whole layer of a chunk is one extent (its K and V
//! extents and their padding, one aligned read); a partial or selective range is one extent
//! per plane and range. Layer marks end each layer, so the device path records layer `l`'s
//! event as soon as the fill that completes it is scattered. The destinations come from the
//! same [`KvLayout::runs`] and [`KvLayout::pieces`] that the host loader copies through, so
//! both paths place every row at the same address; `tests/plan_host.rs` checks that byte for
//! byte by running plans through kvfs-gds's host ring.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvfs_gds::{ReadExtent, ScatterPlan, ScatterRun};
use kvfs_loader::dir::Layout as DirLayout;
use kvfs_loader::format::Codec;
use kvfs_loader::layout::Run;
use kvfs_loader::{
    BlockMap, ChunkError, ChunkHeader, ChunkKey, ChunkRef, IoMode, KvLayout, LoadRequest, Loader,
    LoaderError, Verify,
};
use tracing::debug;

use crate::error::{CudaError, Result};

/// An opened, checked chunk.
struct Opened {
    file: File,
    header: ChunkHeader,
    direct: bool,
}

/// Why the load stops at a chunk, kept to report [`LoaderError::Chunk`] when it ends.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    chunk: usize,
    key: ChunkKey,
    path: PathBuf,
    valid_tokens: Range<usize>,
    valid_blocks: Vec<u32>,
    source: Arc<ChunkError>,
}

/// What a device load reads and where every byte goes. Built on the host; see the module
/// docs.
#[derive(Debug)]
pub struct DevicePlan {
    /// Open chunk files; the extents name their descriptors, so they live as long as this.
    files: Vec<File>,
    extents: Vec<ReadExtent>,
    scatter: ScatterPlan,
    chunks: usize,
    tokens: usize,
    bytes_needed: u64,
    direct_files: usize,
    failure: Option<Failure>,
}

impl Failure {
    /// The loader's error for this chunk.
    pub(crate) fn error(&self) -> LoaderError {
        LoaderError::Chunk {
            chunk: self.chunk,
            key: self.key,
            path: self.path.clone(),
            valid_tokens: self.valid_tokens.clone(),
            valid_blocks: self.valid_blocks.clone(),
            source: self.source.clone(),
        }
    }
}

impl DevicePlan {
    /// Plans loading `req` into the memory `layout` describes, positions mapped by `map`.
    ///
    /// Errors (before any byte moves): a malformed request or a layout that does not fit
    /// ([`CudaError::Loader`]), and [`Verify::Full`] ([`CudaError::Unsupported`]: per-layer
    /// digests are checked on host bytes, which the device paths never hold). A chunk that
    /// cannot be used is not an error here: the plan covers the chunks before it, and
    /// [`DevicePlan::failure`] reports it.
    pub fn build(
        loader: &Loader,
        req: &LoadRequest<'_>,
        layout: &KvLayout,
        map: &BlockMap<'_>,
    ) -> Result<DevicePlan> {
        let spec = loader.spec();
        let ct = spec.chunk_tokens as usize;
        let full = req.tokens.len() / ct * ct;
        let range = req.range.clone().unwrap_or(0..full);
        if range.start > range.end || range.end > full {
            return Err(LoaderError::Invalid(format!(
                "range {range:?} is not within the {full} tokens of full chunks"
            ))
            .into());
        }
        if req.verify.unwrap_or(loader.options().verify) == Verify::Full {
            return Err(CudaError::Unsupported(
                "Verify::Full checks each layer's digest on host bytes, which GDS and the \
                 staging ring never hold: use Verify::Header, or load through CudaBackend as \
                 the loader's Backend (staged through host memory)"
                    .into(),
            ));
        }
        let layers = spec.num_layers as usize;
        if let Some(s) = req.selection
            && s.num_layers() != layers
        {
            return Err(LoaderError::Invalid(format!(
                "selection has {} layers, the model {layers}",
                s.num_layers()
            ))
            .into());
        }
        layout.check_spec(spec).map_err(LoaderError::from)?;
        layout
            .check_map(map, range.clone())
            .map_err(LoaderError::from)?;

        let chunks: Vec<ChunkRef> = loader
            .chunk_keys(&req.tokens[..full])
            .into_iter()
            .filter(|c| c.start < range.end && c.end > range.start)
            .collect();
        let mut opened = Vec::with_capacity(chunks.len());
        let mut failure = None;
        for c in &chunks {
            match open_chunk(loader, &c.key) {
                Ok(o) => opened.push(o),
                Err((path, e)) => {
                    debug!(chunk = c.index, path = %path.display(), error = %e, "chunk unusable; the device load stops before it");
                    let valid_end = range.start.max(c.start);
                    failure = Some(Failure {
                        chunk: c.index,
                        key: c.key,
                        path,
                        valid_tokens: range.start..valid_end,
                        valid_blocks: valid_blocks(layout, map, &range, valid_end),
                        source: Arc::new(e),
                    });
                    break;
                }
            }
        }
        let direct_files = opened.iter().filter(|o| o.direct).count();

        let tb = layout.row_bytes();
        let mut extents = Vec::new();
        let mut runs = Vec::new();
        let mut layer_ends = Vec::with_capacity(layers);
        let mut stream = 0u64;
        let mut placed = 0usize;
        let mut dst = Vec::new();
        for layer in 0..layers {
            let l = layer as u32;
            for (c, o) in chunks.iter().zip(&opened) {
                let g = &o.header.geometry;
                let fd = o.file.as_raw_fd();
                let local = (range.start.max(c.start) - c.start) as u32
                    ..(range.end.min(c.end) - c.start) as u32;
                let ranges = match req.selection {
                    Some(s) => {
                        s.chunk_ranges(layer, c.index, spec.chunk_tokens, spec.group_tokens, local)
                    }
                    None => vec![local],
                };
                let ranges: Vec<Range<u32>> =
                    ranges.into_iter().filter(|r| r.start < r.end).collect();
                if ranges.len() == 1 && ranges[0] == (0..g.token_count) {
                    // The whole layer: one read of its span (K, V and their padding).
                    let span = g.layer_span(l);
                    extents.push(ReadExtent {
                        file: fd,
                        offset: span.start,
                        len: span.end - span.start,
                    });
                    for plane in 0..g.planes {
                        let src0 = stream + (g.extent(l, plane).start - span.start);
                        let positions = c.start..c.start + g.token_count as usize;
                        placed += place(
                            layout,
                            map,
                            layer,
                            plane as usize,
                            positions,
                            src0,
                            &mut dst,
                            &mut runs,
                        );
                    }
                    stream += span.end - span.start;
                } else {
                    for plane in 0..g.planes {
                        for r in &ranges {
                            let fr = g.token_range(l, plane, r.clone());
                            extents.push(ReadExtent {
                                file: fd,
                                offset: fr.start,
                                len: fr.end - fr.start,
                            });
                            let positions = c.start + r.start as usize..c.start + r.end as usize;
                            placed += place(
                                layout,
                                map,
                                layer,
                                plane as usize,
                                positions,
                                stream,
                                &mut dst,
                                &mut runs,
                            );
                            stream += fr.end - fr.start;
                        }
                    }
                }
            }
            layer_ends.push(stream);
        }
        let scatter = ScatterPlan::new(runs, layer_ends)?;
        Ok(DevicePlan {
            files: opened.into_iter().map(|o| o.file).collect(),
            extents,
            scatter,
            chunks: chunks.len(),
            tokens: range.len(),
            bytes_needed: (placed * tb) as u64,
            direct_files,
            failure,
        })
    }

    /// The byte ranges to read, in source-stream order (descriptors of files this plan owns).
    pub fn extents(&self) -> &[ReadExtent] {
        &self.extents
    }

    /// Where each byte of the source stream goes, with one layer mark per model layer.
    pub fn scatter(&self) -> &ScatterPlan {
        &self.scatter
    }

    /// Chunks the request covers (including any after a failed one, which are not read).
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Chunk files opened (and read by the load).
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// Of those, files open with O_DIRECT.
    pub fn direct_files(&self) -> usize {
        self.direct_files
    }

    /// Token positions in the request.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Bytes placed in destination memory (rows the request needs, of the usable chunks).
    pub fn bytes_needed(&self) -> u64 {
        self.bytes_needed
    }

    /// Bytes the extents read (before 4096-byte widening).
    pub fn bytes_read(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The chunk that ends the load early, as the loader reports it: which chunk, why, and
    /// which positions and blocks hold valid data once the load is done.
    pub fn failure(&self) -> Option<LoaderError> {
        self.failure.as_ref().map(Failure::error)
    }

    pub(crate) fn failure_info(&self) -> Option<Failure> {
        self.failure.clone()
    }
}

/// Appends the scatter runs of `positions` of one plane of one layer, whose rows start at
/// source offset `src0` back to back; returns the rows placed.
#[allow(clippy::too_many_arguments)]
fn place(
    layout: &KvLayout,
    map: &BlockMap<'_>,
    layer: usize,
    plane: usize,
    positions: Range<usize>,
    src0: u64,
    dst: &mut Vec<Run>,
    out: &mut Vec<ScatterRun>,
) -> usize {
    let tb = layout.row_bytes();
    dst.clear();
    layout.runs(map, layer, plane, positions.clone(), dst);
    let mut placed = 0;
    for run in dst.iter() {
        let at = (run.pos - positions.start) * tb;
        for (addr, off, len) in layout.pieces(plane, run) {
            out.push(ScatterRun {
                src: src0 + (at + off) as u64,
                dst: addr as u64,
                len: len as u64,
            });
        }
        placed += run.tokens;
    }
    placed
}

/// Block ids (block-table maps) all of whose requested slots lie before `valid_end`.
fn valid_blocks(
    layout: &KvLayout,
    map: &BlockMap<'_>,
    range: &Range<usize>,
    valid_end: usize,
) -> Vec<u32> {
    let BlockMap::Blocks(table) = map else {
        return Vec::new();
    };
    let bs = layout.block_size();
    let (first, last) = (range.start / bs, valid_end.div_ceil(bs));
    (first..last.min(table.len()))
        .filter(|&i| ((i + 1) * bs).min(range.end) <= valid_end)
        .map(|i| table[i])
        .collect()
}

/// Opens the chunk of `key` (its backing file first, on a mount) and checks its header.
fn open_chunk(loader: &Loader, key: &ChunkKey) -> Result<Opened, (PathBuf, ChunkError)> {
    let path = loader.chunk_path(key);
    if loader.dir_layout() == DirLayout::Flat
        && loader.options().use_backing
        && let Some(backing) = kvfs_loader::io::backing_path(&path)
    {
        match open_path(loader, key, &backing) {
            Ok(o) => return Ok(o),
            Err(e) => debug!(
                backing = %backing.display(), error = %e,
                "backing file unusable; reading through the mount"
            ),
        }
    }
    open_path(loader, key, &path).map_err(|e| (path, e))
}

fn open_path(loader: &Loader, key: &ChunkKey, path: &Path) -> Result<Opened, ChunkError> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ChunkError::Missing
        } else {
            ChunkError::Io(e)
        }
    })?;
    let header = ChunkHeader::read_from(&f)?;
    loader.check_chunk_header(&header, key)?;
    if header.codec != Codec::Raw {
        return Err(ChunkError::Mismatch(format!(
            "codec {:?}: the device path moves raw payloads only",
            header.codec
        )));
    }
    let cached = kvfs_loader::io::page_cached(&f, 0, header.geometry.file_len);
    let (file, direct) = match loader.options().io {
        // The loader's policy, per file: a chunk wholly in the page cache (just stored, or
        // read by another process) is read through it rather than from the device again.
        IoMode::Direct if cached => (f, false),
        IoMode::Direct => {
            let o = kvfs_direct::open_with(path, OpenOptions::new().read(true))
                .map_err(|e| ChunkError::Io(std::io::Error::other(e)))?;
            (o.file, o.direct)
        }
        IoMode::Buffered => (f, false),
    };
    Ok(Opened {
        file,
        header,
        direct,
    })
}
