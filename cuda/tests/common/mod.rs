//! Shared by the kvfs-cuda tests: random cases (model shape, layout kind, block table, range,
//! selection), chunk files, and layouts over an arena at any base address (host memory for
//! the CPU tests, device memory for tests/gpu.rs).

#![allow(dead_code)]

use kvfs_loader::dir::{self, Layout};
use kvfs_loader::format::{Verify, synth_chunk};
use kvfs_loader::layout::{KvLayout, RawRegion};
use kvfs_loader::loader::{Loader, LoaderOptions};
use kvfs_loader::{Dtype, IoMode, KvKind, ModelSpec, SaltTag, Selection};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const SENTINEL: u8 = 0x5A;

/// Where test files go: `KVFS_GDS_TEST_DIR`, else cargo's scratch directory for tests (when
/// it exists: staged binaries run on another machine), else the working directory. A disk
/// file system, not tmpfs, so O_DIRECT cases really use O_DIRECT.
pub fn test_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KVFS_GDS_TEST_DIR") {
        return PathBuf::from(d);
    }
    let cargo = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if cargo.is_dir() {
        cargo.to_path_buf()
    } else {
        PathBuf::from(".")
    }
}

/// xorshift64*: reproducible cases without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    FlashAttn,
    FlashInfer,
    /// Element-strided K (a token's heads apart, K elements `block_size` apart).
    VllmCpu,
    Mla,
}

pub fn spec(kind: Kind, dtype: Dtype, layers: u32, chunk: u32, group: u32) -> ModelSpec {
    let (heads, dim) = if kind == Kind::Mla { (1, 24) } else { (2, 16) };
    let mut s = ModelSpec::new("kvfs/cuda-plan-test", dtype, layers, heads, dim);
    if kind == Kind::Mla {
        s.kv_kind = KvKind::MlaLatent;
    }
    s.chunk_tokens = chunk;
    s.group_tokens = group;
    s
}

pub fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 50000)
        .collect()
}

/// Writes the full chunks of `toks` into a cache directory; returns their paths.
pub fn write_chunks(root: &Path, spec: &ModelSpec, toks: &[u32]) -> Vec<PathBuf> {
    let mut parent = None;
    let mut paths = Vec::new();
    for c in toks.chunks_exact(spec.chunk_tokens as usize) {
        let (meta, bytes) = synth_chunk(spec, parent, SaltTag::of(b""), c.to_vec()).unwrap();
        let path = Layout::Cache.chunk_path(root, &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
        paths.push(path);
    }
    paths
}

/// Bytes of an arena holding every layer of `kind` for `num_blocks` blocks of `block_size`.
pub fn arena_len(spec: &ModelSpec, num_blocks: usize, block_size: usize) -> usize {
    let row = spec.num_kv_heads as usize * spec.head_dim as usize * spec.dtype.size();
    spec.kv_kind.planes() * num_blocks * block_size * row * spec.num_layers as usize
}

/// The layout of `kind` over an arena of [`arena_len`] bytes at `base`, layer after layer.
///
/// # Safety
/// `base .. base + arena_len` must be memory the caller owns for as long as the layout is
/// used (host memory for host loads, device memory for device loads).
pub unsafe fn layout_at(
    spec: &ModelSpec,
    kind: Kind,
    num_blocks: usize,
    block_size: usize,
    base: *mut u8,
) -> KvLayout {
    let layers = spec.num_layers as usize;
    let per_layer = arena_len(spec, num_blocks, block_size) / layers;
    let regions: Vec<RawRegion> = (0..layers)
        .map(|l| RawRegion::new(base.wrapping_add(l * per_layer), per_layer))
        .collect();
    let (h, d, dt) = (spec.num_kv_heads, spec.head_dim, spec.dtype);
    // SAFETY: forwarded from this function's contract; the regions are disjoint.
    unsafe {
        match kind {
            Kind::FlashAttn => {
                KvLayout::vllm_flash_attn(&regions, num_blocks, block_size, h, d, dt)
            }
            Kind::FlashInfer => {
                KvLayout::vllm_flashinfer(&regions, num_blocks, block_size, h, d, dt)
            }
            Kind::VllmCpu => KvLayout::vllm_cpu(&regions, num_blocks, block_size, h, d, dt),
            Kind::Mla => KvLayout::mla(&regions, num_blocks, block_size, d, dt),
        }
    }
    .unwrap()
}

pub struct Case {
    pub spec: ModelSpec,
    pub kind: Kind,
    pub num_blocks: usize,
    pub block_size: usize,
    pub table: Vec<u32>,
    pub toks: Vec<u32>,
    pub range: Range<usize>,
    pub selection: Option<Selection>,
    pub io: IoMode,
    pub slots: usize,
    pub buf: usize,
}

pub fn random_case(rng: &mut Rng) -> Case {
    let kind = [Kind::FlashAttn, Kind::FlashInfer, Kind::VllmCpu, Kind::Mla][rng.below(4)];
    let dtype = [Dtype::F16, Dtype::Bf16, Dtype::F32][rng.below(3)];
    let chunk = [16u32, 32, 48][rng.below(3)];
    let group = [4u32, 8, 16][rng.below(3)].min(chunk);
    let spec = spec(kind, dtype, 1 + rng.below(4) as u32, chunk, group);
    let block_size = [4usize, 8, 16, 32][rng.below(4)];
    let n_chunks = 1 + rng.below(4);
    let full = n_chunks * chunk as usize;
    let toks = tokens(full + rng.below(chunk as usize), rng.below(1000) as u32);
    let start = rng.below(full);
    let end = start + 1 + rng.below(full - start);
    let needed = end.div_ceil(block_size);
    let num_blocks = needed + rng.below(4);
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut ids);
    ids.truncate(needed);
    let selection = (rng.below(3) == 0).then(|| {
        let groups = full.div_ceil(group as usize) as u32;
        Selection::new(
            (0..spec.num_layers)
                .map(|_| (0..groups).filter(|_| rng.below(2) == 0).collect())
                .collect(),
        )
    });
    Case {
        spec,
        kind,
        num_blocks,
        block_size,
        table: ids,
        toks,
        range: start..end,
        selection,
        io: [IoMode::Direct, IoMode::Buffered][rng.below(2)],
        slots: 2 + rng.below(3),
        buf: 4096 * (2 + rng.below(7)),
    }
}

pub fn open(root: &Path, spec: &ModelSpec, io: IoMode) -> Loader {
    let opts = LoaderOptions {
        io,
        verify: Verify::Header,
        threads: 2,
        ..Default::default()
    };
    Loader::open_with(root, spec.clone(), b"", opts).unwrap()
}

/// Writes `paths` back and drops them from the page cache, so O_DIRECT opens stay O_DIRECT
/// (a resident chunk is read through the cache).
pub fn drop_from_cache(paths: &[PathBuf]) {
    for p in paths {
        let f = std::fs::File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: plain advice on an open descriptor; no memory is passed.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0, "posix_fadvise");
    }
}
