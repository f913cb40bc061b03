//! The loader against real chunk files: loads match a plain reference copy for every layout,
//! block size, dtype and range; selective loads touch only the chosen groups; corrupt and
//! missing chunks give typed errors that say what is valid; stores round-trip.

use kvfs_loader::dir::{self, Layout};
use kvfs_loader::format::{ChunkView, Verify, synth_chunk};
use kvfs_loader::layout::{BlockMap, KvLayout, RawRegion};
use kvfs_loader::loader::{
    ChunkError, Dest, LoadOrder, LoadRequest, Loader, LoaderError, LoaderOptions,
};
use kvfs_loader::{Dtype, FormatError, IoMode, KvKind, ModelSpec, SaltTag, Selection};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

#[path = "../../tests/support/require.rs"]
mod require;

const SENTINEL: u8 = 0xA5;

fn spec(dtype: Dtype, kind: KvKind, chunk: u32, group: u32) -> ModelSpec {
    let (heads, dim) = match kind {
        KvKind::KeyValue => (2, 32),
        KvKind::MlaLatent => (1, 48),
    };
    let mut s = ModelSpec::new("kvfs/loader-test", dtype, 3, heads, dim);
    s.kv_kind = kind;
    s.chunk_tokens = chunk;
    s.group_tokens = group;
    s
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 50000)
        .collect()
}

/// Writes synthetic chunks for the full chunks of `toks` into a cache directory and returns
/// the chunk files' bytes.
fn write_chunks(root: &Path, spec: &ModelSpec, salt: &[u8], toks: &[u32]) -> Vec<Vec<u8>> {
    let ct = spec.chunk_tokens as usize;
    let mut parent = None;
    let mut out = Vec::new();
    for c in toks.chunks_exact(ct) {
        let (meta, bytes) = synth_chunk(spec, parent, SaltTag::of(salt), c.to_vec()).unwrap();
        let path = Layout::Cache.chunk_path(root, &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
        out.push(bytes);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    FlashAttn,
    FlashInfer,
    Mla,
    Pool,
    /// vLLM's CPU back end: head-major blocks, a token's heads apart.
    VllmCpu,
}

/// Engine memory owned by the test, and the layout over it.
struct Mem {
    bufs: Vec<Vec<u8>>,
    layout: KvLayout,
}

fn alloc(spec: &ModelSpec, kind: Kind, num_blocks: usize, block_size: usize) -> Mem {
    let row = spec.num_kv_heads as usize * spec.head_dim as usize * spec.dtype.size();
    let layers = spec.num_layers as usize;
    let (h, d, dt) = (spec.num_kv_heads, spec.head_dim, spec.dtype);
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let layout = match kind {
        Kind::FlashAttn | Kind::FlashInfer => {
            for _ in 0..layers {
                bufs.push(vec![SENTINEL; 2 * num_blocks * block_size * row]);
            }
            let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
            // SAFETY: the buffers live in the returned Mem alongside the layout; the tests
            // only read them after loads finish.
            unsafe {
                if kind == Kind::FlashAttn {
                    KvLayout::vllm_flash_attn(&regions, num_blocks, block_size, h, d, dt)
                } else {
                    KvLayout::vllm_flashinfer(&regions, num_blocks, block_size, h, d, dt)
                }
            }
        }
        Kind::VllmCpu => {
            for _ in 0..layers {
                bufs.push(vec![SENTINEL; 2 * num_blocks * block_size * row]);
            }
            let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
            // SAFETY: as above.
            unsafe { KvLayout::vllm_cpu(&regions, num_blocks, block_size, h, d, dt) }
        }
        Kind::Mla => {
            for _ in 0..layers {
                bufs.push(vec![SENTINEL; num_blocks * block_size * row]);
            }
            let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
            // SAFETY: as above.
            unsafe { KvLayout::mla(&regions, num_blocks, block_size, d, dt) }
        }
        Kind::Pool => {
            let planes = spec.kv_kind.planes();
            for _ in 0..layers * planes {
                bufs.push(vec![SENTINEL; num_blocks * block_size * row]);
            }
            let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
            let (k, v): (Vec<_>, Vec<_>) = if planes == 2 {
                (
                    regions.iter().step_by(2).copied().collect(),
                    regions.iter().skip(1).step_by(2).copied().collect(),
                )
            } else {
                (regions, Vec::new())
            };
            // SAFETY: as above.
            unsafe { KvLayout::token_pool(&k, &v, num_blocks * block_size, h, d, dt) }
        }
    }
    .unwrap();
    Mem { bufs, layout }
}

fn slot(map: &BlockMap<'_>, bs: usize, p: usize) -> Option<usize> {
    match map {
        BlockMap::Blocks(t) => Some(t[p / bs] as usize * bs + p % bs),
        BlockMap::Slots(s) => (s[p] >= 0).then_some(s[p] as usize),
    }
}

/// One slot's `[heads, head_dim]` row, gathered piece by piece (vLLM's CPU layout keeps a
/// token's heads apart and its K elements `block_size` apart).
fn row_at(mem: &Mem, layer: usize, plane: usize, slot: usize) -> Vec<u8> {
    let l = &mem.layout;
    let run = kvfs_loader::layout::Run {
        addr: l.slot_addr(layer, plane, slot),
        pos: 0,
        tokens: 1,
    };
    let mut row = vec![0u8; l.row_bytes()];
    for (addr, off, len) in l.pieces(plane, &run) {
        // SAFETY: every piece of the slot lies inside one of mem's buffers (the layout checked
        // the shape) and no load is running.
        row[off..off + len]
            .copy_from_slice(unsafe { std::slice::from_raw_parts(addr as *const u8, len) });
    }
    row
}

/// Checks every slot: positions in `loaded(layer, p)` equal the reference row, all other
/// slots still hold the sentinel.
fn check(
    mem: &Mem,
    map: &BlockMap<'_>,
    spec: &ModelSpec,
    files: &[Vec<u8>],
    positions: usize,
    loaded: impl Fn(usize, usize) -> bool,
) {
    let ct = spec.chunk_tokens as usize;
    let bs = mem.layout.block_size();
    let row = mem.layout.row_bytes();
    let views: Vec<_> = files
        .iter()
        .map(|b| ChunkView::parse(b, Verify::Full).unwrap())
        .collect();
    let mut touched = std::collections::HashSet::new();
    for layer in 0..spec.num_layers as usize {
        for plane in 0..mem.layout.planes() {
            for p in 0..positions {
                let Some(s) = slot(map, bs, p) else { continue };
                if !loaded(layer, p) {
                    continue;
                }
                touched.insert((layer, plane, s));
                let t = p % ct;
                let want = &views[p / ct].plane(layer as u32, plane as u32).unwrap()
                    [t * row..(t + 1) * row];
                assert_eq!(
                    row_at(mem, layer, plane, s),
                    want.to_vec(),
                    "layer {layer} plane {plane} position {p} slot {s}"
                );
            }
            for s in 0..mem.layout.num_blocks() * bs {
                if !touched.contains(&(layer, plane, s)) {
                    assert!(
                        row_at(mem, layer, plane, s).iter().all(|&b| b == SENTINEL),
                        "layer {layer} plane {plane} slot {s} was written but not requested"
                    );
                }
            }
        }
    }
}

fn shuffled_blocks(n: usize, total: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..total as u32).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v.truncate(n);
    v
}

fn opts(io: IoMode) -> LoaderOptions {
    LoaderOptions {
        io,
        threads: 3,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Loads equal the reference copy, for every layout, dtype, block size, range, and both
    /// I/O modes; slots outside the range stay untouched.
    #[test]
    fn loads_match_reference(
        kind in prop_oneof![Just(Kind::FlashAttn), Just(Kind::FlashInfer), Just(Kind::Mla), Just(Kind::Pool), Just(Kind::VllmCpu)],
        dtype in prop::sample::select(Dtype::ALL.to_vec()),
        block_size in prop::sample::select(vec![1usize, 3, 8, 16, 32]),
        chunk in prop::sample::select(vec![16u32, 32, 48]),
        chunks in 1usize..4,
        start_frac in 0.0f64..1.0,
        end_frac in 0.0f64..1.0,
        direct in any::<bool>(),
        run_min in prop::sample::select(vec![0usize, 64 * 1024]),
        chunk_major in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mla = kind == Kind::Mla || (kind == Kind::Pool && seed % 2 == 0);
        let kv = if mla { KvKind::MlaLatent } else { KvKind::KeyValue };
        let spec = spec(dtype, kv, chunk, 8);
        let d = tempfile::tempdir().unwrap();
        let toks = tokens(chunks * chunk as usize + 5, seed as u32);
        let files = write_chunks(d.path(), &spec, b"", &toks);
        let full = chunks * chunk as usize;
        let end = ((full as f64 * end_frac) as usize).max(1);
        let start = (end as f64 * start_frac) as usize;
        let io = if direct { IoMode::Direct } else { IoMode::Buffered };
        let order = if chunk_major { LoadOrder::ChunkMajor } else { LoadOrder::LayerMajor };
        let o = LoaderOptions { direct_run_min: run_min, order, ..opts(io) };
        let loader = Loader::open_with(d.path(), spec.clone(), b"", o).unwrap();
        prop_assert_eq!(loader.lookup(&toks), full);

        let (mem, owned_blocks, owned_slots);
        let map = if kind == Kind::Pool {
            let n = full.div_ceil(block_size) * block_size + 7;
            mem = alloc(&spec, kind, n, 1);
            let perm = shuffled_blocks(full, n, seed);
            owned_slots = perm.iter().map(|&s| if s % 11 == 3 { -1 } else { s as i64 }).collect::<Vec<_>>();
            BlockMap::Slots(&owned_slots)
        } else {
            let nb = full.div_ceil(block_size);
            mem = alloc(&spec, kind, nb + 2, block_size);
            owned_blocks = shuffled_blocks(nb, nb + 2, seed);
            BlockMap::Blocks(&owned_blocks)
        };
        let req = LoadRequest { tokens: &toks, range: Some(start..end), ..Default::default() };
        let h = loader.load_request(&req, &Dest::host(&mem.layout, map)).unwrap();
        for l in 0..spec.num_layers as usize {
            h.wait_layer(l).unwrap();
        }
        let stats = h.wait().unwrap();
        prop_assert_eq!(stats.tokens, end - start);
        prop_assert!(stats.bytes_read >= stats.bytes_needed);
        check(&mem, &map, &spec, &files, full, |_, p| (start..end).contains(&p));
    }

    /// Selective loads equal the reference on the chosen groups and leave the others untouched;
    /// with 4096-byte groups nothing more than needed is read.
    #[test]
    fn selective_loads_read_only_chosen_groups(
        picks in prop::collection::vec(prop::collection::vec(0u32..12, 0..8), 3),
        direct in any::<bool>(),
        seed in any::<u32>(),
    ) {
        // 2 heads x 32 dims x f32 = 256 bytes per row; 16-token groups are 4096 bytes.
        let spec = spec(Dtype::F32, KvKind::KeyValue, 64, 16);
        let d = tempfile::tempdir().unwrap();
        let toks = tokens(3 * 64, seed);
        let files = write_chunks(d.path(), &spec, b"", &toks);
        let io = if direct { IoMode::Direct } else { IoMode::Buffered };
        let loader = Loader::open_with(d.path(), spec.clone(), b"", opts(io)).unwrap();
        let mem = alloc(&spec, Kind::FlashAttn, 12, 16);
        let table: Vec<u32> = (0..12).rev().collect();
        let map = BlockMap::Blocks(&table);
        let sel = Selection::new(picks.clone());
        let req = LoadRequest { tokens: &toks, selection: Some(&sel), ..Default::default() };
        let stats = loader.load_request(&req, &Dest::host(&mem.layout, map)).unwrap().wait().unwrap();
        let chosen = |layer: usize, p: usize| sel.groups(layer).contains(&((p / 16) as u32));
        check(&mem, &map, &spec, &files, 3 * 64, chosen);
        let groups: usize = (0..3).map(|l| sel.groups(l).len()).sum();
        prop_assert_eq!(stats.bytes_needed, (groups * 2 * 4096) as u64);
        prop_assert_eq!(stats.read_amplification(), 1.0);
    }
}

/// Fills every byte of `mem` with a pseudo-random pattern `x = x * mul + add` from `seed`
/// (the heap buffers do not move, so the layout stays valid).
fn fill_pattern(mem: &mut Mem, seed: u8, mul: u8, add: u8) {
    let mut x = seed;
    for b in mem.bufs.iter_mut() {
        for v in b.iter_mut() {
            x = x.wrapping_mul(mul).wrapping_add(add);
            *v = x;
        }
    }
}

#[test]
fn store_then_load_round_trips_and_is_create_once() {
    let spec = spec(Dtype::Bf16, KvKind::KeyValue, 32, 16);
    let d = tempfile::tempdir().unwrap();
    let loader = Loader::open(d.path(), spec.clone(), b"tenant").unwrap();
    let toks = tokens(100, 7); // 3 full chunks + 4 tokens
    // The source keeps a token's heads apart (vLLM CPU): the store gathers them.
    let mut src = alloc(&spec, Kind::VllmCpu, 8, 16);
    // fill the source blocks with a pattern (the heap buffers do not move)
    fill_pattern(&mut src, 0, 31, 7);
    let table = [5u32, 2, 7, 0, 1, 3, 4];
    let map = BlockMap::Blocks(&table);
    let st = loader.store(&toks, &Dest::host(&src.layout, map)).unwrap();
    assert_eq!((st.written, st.present), (3, 0));
    let ns_json = d.path().join(spec.namespace_dir()).join("namespace.json");
    assert!(
        std::fs::read_to_string(ns_json)
            .unwrap()
            .contains("loader-test")
    );
    assert_eq!(loader.lookup(&toks), 96);
    // a second store writes nothing
    let st = loader.store(&toks, &Dest::host(&src.layout, map)).unwrap();
    assert_eq!((st.written, st.present), (0, 3));
    // the salt isolates: another tenant sees nothing
    let other = Loader::open(d.path(), spec.clone(), b"other").unwrap();
    assert_eq!(other.lookup(&toks), 0);

    // load into a different layout and compare row by row with the source
    let dst = alloc(&spec, Kind::FlashAttn, 6, 16);
    let t2 = [1u32, 0, 4, 5, 2, 3];
    let m2 = BlockMap::Blocks(&t2);
    let stats = loader
        .load_request(
            &LoadRequest {
                tokens: &toks,
                verify: Some(Verify::Full),
                ..Default::default()
            },
            &Dest::host(&dst.layout, m2),
        )
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.chunks, 3);
    for l in 0..3 {
        for p in 0..2 {
            for pos in 0..96 {
                assert_eq!(
                    row_at(&dst, l, p, slot(&m2, 16, pos).unwrap()),
                    row_at(&src, l, p, slot(&map, 16, pos).unwrap()),
                );
            }
        }
    }
}

/// A prompt's trailing partial chunk (vLLM reuses up to the last prompt token): stored with
/// `store_with_tail`, found by `lookup` of exactly these tokens and not by a prompt that
/// extends or changes the tail, loaded like any chunk up to any position inside it; missing,
/// it ends the load with the full chunks valid.
#[test]
fn trailing_partial_chunk_round_trips_and_is_found_only_by_its_tail() {
    let spec = spec(Dtype::Bf16, KvKind::KeyValue, 32, 16);
    let d = tempfile::tempdir().unwrap();
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let toks = tokens(100, 7); // 3 full chunks + 4 tokens
    let mut src = alloc(&spec, Kind::VllmCpu, 8, 16);
    fill_pattern(&mut src, 0, 29, 11);
    let table = [5u32, 2, 7, 0, 1, 3, 4];
    let map = BlockMap::Blocks(&table);
    // `store` keeps to full chunks: the tail is not found
    let st = loader.store(&toks, &Dest::host(&src.layout, map)).unwrap();
    assert_eq!((st.written, st.present), (3, 0));
    assert_eq!(loader.lookup(&toks), 96);
    // a load reaching into the missing tail fails at it, the full chunks valid
    let dst = alloc(&spec, Kind::FlashAttn, 7, 16);
    let t2 = [6u32, 1, 0, 4, 5, 2, 3];
    let m2 = BlockMap::Blocks(&t2);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(0..99),
        ..Default::default()
    };
    match loader
        .load_request(&req, &Dest::host(&dst.layout, m2))
        .unwrap()
        .wait()
    {
        Err(LoaderError::Chunk {
            chunk,
            valid_tokens,
            source,
            ..
        }) => {
            assert_eq!((chunk, valid_tokens), (3, 0..96));
            assert!(matches!(*source, ChunkError::Missing), "{source}");
        }
        other => panic!("expected a missing tail chunk, got {other:?}"),
    }

    let st = loader
        .store_with_tail(&toks, &Dest::host(&src.layout, map))
        .unwrap();
    assert_eq!((st.written, st.present), (1, 3));
    assert_eq!(loader.lookup(&toks), 100);
    let st = loader
        .store_with_tail(&toks, &Dest::host(&src.layout, map))
        .unwrap();
    assert_eq!((st.written, st.present), (0, 4), "create-once");
    // only the same tail finds it: not an extension, not a shorter or changed tail
    assert_eq!(loader.lookup(&tokens(110, 7)), 96);
    assert_eq!(loader.lookup(&toks[..99]), 96);
    let mut changed = toks.clone();
    changed[98] ^= 1;
    assert_eq!(loader.lookup(&changed), 96);
    // the file: 4 tokens chained to chunk 2, in a version-1 header
    let chunks = loader.prompt_chunks(&toks);
    let bytes = std::fs::read(loader.chunk_path(&chunks[3].key)).unwrap();
    let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
    assert_eq!(view.header.meta.tokens, toks[96..]);
    assert_eq!(view.header.meta.parent, Some(chunks[2].key));
    assert_eq!(view.header.meta.version(), kvfs_loader::format::VERSION_1);

    // load up to the last token (as vLLM does), checked against the source row by row
    let stats = loader
        .load_request(
            &LoadRequest {
                verify: Some(Verify::Full),
                ..req.clone()
            },
            &Dest::host(&dst.layout, m2),
        )
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((stats.chunks, stats.tokens), (4, 99));
    for l in 0..3 {
        for p in 0..2 {
            for pos in 0..99 {
                assert_eq!(
                    row_at(&dst, l, p, slot(&m2, 16, pos).unwrap()),
                    row_at(&src, l, p, slot(&map, 16, pos).unwrap()),
                    "layer {l} plane {p} position {pos}"
                );
            }
            let last = row_at(&dst, l, p, slot(&m2, 16, 99).unwrap());
            assert!(
                last.iter().all(|&b| b == SENTINEL),
                "position 99 was not requested"
            );
        }
    }
}

/// A store split in two: the snapshot copies the rows out, the engine may then overwrite its
/// blocks, and the later `store_snapshot` writes what the blocks held at the snapshot. Chunks
/// present at the snapshot are not copied; another namespace or salt refuses the snapshot.
#[test]
fn a_snapshot_stores_the_rows_of_its_time() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 32, 16);
    let d = tempfile::tempdir().unwrap();
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let toks = tokens(100, 3); // 3 full chunks + 4 tokens
    let mut src = alloc(&spec, Kind::VllmCpu, 8, 16);
    fill_pattern(&mut src, 1, 13, 5);
    let table = [3u32, 6, 1, 0, 2, 7, 4];
    let map = BlockMap::Blocks(&table);
    // chunk 0 is present already: the snapshot holds positions 32..100 only
    loader
        .store(&toks[..32], &Dest::host(&src.layout, map))
        .unwrap();
    let snap = loader
        .snapshot(&toks, &Dest::host(&src.layout, map), true)
        .unwrap();
    assert_eq!(snap.positions(), 32..100);
    assert_eq!(snap.bytes(), 3 * 2 * 68 * src.layout.row_bytes());
    let before: Vec<Vec<Vec<u8>>> = (0..3)
        .map(|l| {
            (0..100)
                .map(|pos| row_at(&src, l, 0, slot(&map, 16, pos).unwrap()))
                .collect()
        })
        .collect();
    let v_before: Vec<Vec<u8>> = (0..100)
        .map(|pos| row_at(&src, 2, 1, slot(&map, 16, pos).unwrap()))
        .collect();
    // the engine reuses its blocks
    for b in src.bufs.iter_mut() {
        b.fill(0x3C);
    }
    assert_eq!(
        loader.lookup(&toks),
        32,
        "nothing is visible before the store"
    );
    let other = Loader::open(d.path(), spec.clone(), b"tenant").unwrap();
    assert!(matches!(
        other.store_snapshot(&snap),
        Err(LoaderError::Invalid(_))
    ));
    let st = loader.store_snapshot(&snap).unwrap();
    assert_eq!((st.written, st.present), (3, 0));
    assert_eq!(loader.lookup(&toks), 100);
    let dst = alloc(&spec, Kind::FlashAttn, 8, 16);
    let m2 = BlockMap::Blocks(&table);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(32..100),
        verify: Some(Verify::Full),
        ..Default::default()
    };
    loader
        .load_request(&req, &Dest::host(&dst.layout, m2))
        .unwrap()
        .wait()
        .unwrap();
    for pos in 32..100 {
        for (l, rows) in before.iter().enumerate() {
            assert_eq!(
                row_at(&dst, l, 0, slot(&m2, 16, pos).unwrap()),
                rows[pos],
                "K of layer {l} at {pos}"
            );
        }
        assert_eq!(
            row_at(&dst, 2, 1, slot(&m2, 16, pos).unwrap()),
            v_before[pos]
        );
    }
    // everything present: an empty snapshot, an empty store
    let again = loader
        .snapshot(&toks, &Dest::host(&src.layout, map), true)
        .unwrap();
    assert_eq!((again.positions(), again.bytes()), (100..100, 0));
    assert_eq!(loader.store_snapshot(&again).unwrap(), Default::default());
}

#[test]
fn final_partial_block_and_prefix_inside_a_block() {
    // 300 cached tokens (3 chunks of 100), block size 16: the last block holds 12 tokens.
    let spec = spec(Dtype::F16, KvKind::KeyValue, 100, 20);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(300, 1);
    let files = write_chunks(d.path(), &spec, b"", &toks);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    assert_eq!(loader.lookup(&toks), 300);
    let table: Vec<u32> = (0..19).collect();
    let map = BlockMap::Blocks(&table);
    let mem = alloc(&spec, Kind::FlashAttn, 19, 16);
    loader
        .load(&toks, &Dest::host(&mem.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    check(&mem, &map, &spec, &files, 300, |_, p| p < 300);

    // a prefix ending inside block 15 (positions 240..256) fills only 240..250
    let mem = alloc(&spec, Kind::FlashAttn, 19, 16);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(0..250),
        ..Default::default()
    };
    let s = loader
        .load_request(&req, &Dest::host(&mem.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(s.tokens, 250);
    check(&mem, &map, &spec, &files, 300, |_, p| p < 250);
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

fn chunk_path(root: &Path, spec: &ModelSpec, toks: &[u32], i: usize) -> PathBuf {
    let keys = kvfs_loader::chunk_keys(
        &spec.namespace_id(),
        &SaltTag::NONE,
        spec.chunk_tokens as usize,
        toks,
    );
    Layout::Cache.chunk_path(root, &spec.namespace_dir(), &keys[i].key)
}

#[test]
fn corrupt_payload_fails_with_the_valid_prefix() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 32, 16);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(4 * 32, 3);
    let files = write_chunks(d.path(), &spec, b"", &toks);
    // layer 0, plane 0 of chunk 2
    flip(&chunk_path(d.path(), &spec, &toks, 2), 4096 + 100);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let table: Vec<u32> = (0..16).map(|i| 15 - i).collect();
    let map = BlockMap::Blocks(&table);
    let mem = alloc(&spec, Kind::FlashAttn, 16, 8);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(4..128),
        verify: Some(Verify::Full),
        ..Default::default()
    };
    let h = loader
        .load_request(&req, &Dest::host(&mem.layout, map))
        .unwrap();
    let e = h.wait_layer(0).unwrap_err();
    let LoaderError::Chunk {
        chunk,
        valid_tokens,
        valid_blocks,
        source,
        ..
    } = e
    else {
        panic!("{e}")
    };
    assert_eq!(chunk, 2);
    assert_eq!(valid_tokens, 4..64);
    // blocks 0..8 cover positions 0..64; block 0 is only partly requested (4..8) but all of
    // its requested slots are valid
    assert_eq!(valid_blocks, table[..8].to_vec());
    assert!(
        matches!(
            &*source,
            ChunkError::Format(FormatError::PayloadDigest { .. })
        ),
        "{source}"
    );
    drop(h);
    // the valid prefix really is valid
    let v: Vec<_> = files
        .iter()
        .map(|b| ChunkView::parse(b, Verify::Header).unwrap())
        .collect();
    for p in 4..64 {
        let s = slot(&map, 8, p).unwrap();
        let t = p % 32;
        assert_eq!(
            row_at(&mem, 1, 1, s),
            &v[p / 32].plane(1, 1).unwrap()[t * 128..(t + 1) * 128]
        );
    }

    // a corrupt header fails even with header-only verification
    flip(&chunk_path(d.path(), &spec, &toks, 1), 60);
    let mem = alloc(&spec, Kind::FlashAttn, 16, 8);
    let e = loader
        .load(&toks, &Dest::host(&mem.layout, map))
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(
        matches!(&e, LoaderError::Chunk { chunk: 1, source, valid_tokens, .. }
            if matches!(**source, ChunkError::Format(FormatError::HeaderChecksum)) && *valid_tokens == (0..32)),
        "{e}"
    );
}

#[test]
fn missing_chunk_in_the_middle_ends_the_hit() {
    let spec = spec(Dtype::F32, KvKind::KeyValue, 16, 8);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(5 * 16, 9);
    write_chunks(d.path(), &spec, b"", &toks);
    std::fs::remove_file(chunk_path(d.path(), &spec, &toks, 2)).unwrap();
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    assert_eq!(loader.lookup(&toks), 32);
    assert_eq!(loader.lookup(&toks[..20]), 16);
    let table: Vec<u32> = (0..10).collect();
    let mem = alloc(&spec, Kind::FlashAttn, 10, 8);
    let e = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(
        matches!(&e, LoaderError::Chunk { chunk: 2, source, valid_tokens, valid_blocks, .. }
            if matches!(**source, ChunkError::Missing) && *valid_tokens == (0..32) && *valid_blocks == [0, 1, 2, 3]),
        "{e}"
    );
}

#[test]
fn bad_requests_are_refused_before_any_read() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 16, 8);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(40, 2);
    write_chunks(d.path(), &spec, b"", &toks);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 4, 8);
    let table = [0u32, 1, 2, 3];
    let dest = Dest::host(&mem.layout, BlockMap::Blocks(&table));
    // beyond the sequence (past the full chunks is the trailing partial chunk, below)
    let req = LoadRequest {
        tokens: &toks,
        range: Some(0..41),
        ..Default::default()
    };
    assert!(matches!(
        loader.load_request(&req, &dest),
        Err(LoaderError::Invalid(_))
    ));
    // a selective load that reaches into the partial chunk
    let sel = Selection::same_for_all(3, vec![0]);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(0..40),
        selection: Some(&sel),
        ..Default::default()
    };
    assert!(matches!(
        loader.load_request(&req, &dest),
        Err(LoaderError::Invalid(_))
    ));
    // block table too short / block out of range
    let short = [0u32, 1];
    assert!(matches!(
        loader.load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&short))),
        Err(LoaderError::Layout(_))
    ));
    let bad = [0u32, 1, 9, 2];
    assert!(matches!(
        loader.load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&bad))),
        Err(LoaderError::Layout(_))
    ));
    // a layout of another shape
    let other = spec_with_heads(&spec, 4);
    let mem2 = alloc(&other, Kind::FlashAttn, 4, 8);
    assert!(matches!(
        loader.load(&toks, &Dest::host(&mem2.layout, BlockMap::Blocks(&table))),
        Err(LoaderError::Layout(_))
    ));
    // full verification of a selective load
    let sel = Selection::same_for_all(3, vec![0]);
    let req = LoadRequest {
        tokens: &toks,
        selection: Some(&sel),
        verify: Some(Verify::Full),
        ..Default::default()
    };
    assert!(matches!(
        loader.load_request(&req, &dest),
        Err(LoaderError::Invalid(_))
    ));
    // a selection with the wrong number of layers
    let sel = Selection::same_for_all(2, vec![0]);
    let req = LoadRequest {
        tokens: &toks,
        selection: Some(&sel),
        ..Default::default()
    };
    assert!(matches!(
        loader.load_request(&req, &dest),
        Err(LoaderError::Invalid(_))
    ));
    // a store from a slot mapping with padding
    let pool = alloc(&spec, Kind::Pool, 40, 1);
    let slots: Vec<i64> = (0..32).map(|i| if i == 5 { -1 } else { i }).collect();
    assert!(matches!(
        loader.store(&toks, &Dest::host(&pool.layout, BlockMap::Slots(&slots))),
        Err(LoaderError::Invalid(_))
    ));
    // nothing was touched
    check(&mem, &BlockMap::Blocks(&table), &spec, &[], 0, |_, _| false);
    // a missing directory and an invalid spec
    assert!(matches!(
        Loader::open(&d.path().join("nope"), spec.clone(), b""),
        Err(LoaderError::Io { .. })
    ));
    let mut bad_spec = spec.clone();
    bad_spec.num_layers = 0;
    assert!(matches!(
        Loader::open(d.path(), bad_spec, b""),
        Err(LoaderError::Spec(_))
    ));
}

fn spec_with_heads(s: &ModelSpec, heads: u32) -> ModelSpec {
    let mut s = s.clone();
    s.num_kv_heads = heads;
    s
}

#[test]
fn a_chunk_of_another_model_under_the_right_name_is_refused() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 16, 8);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(16, 4);
    write_chunks(d.path(), &spec, b"", &toks);
    // overwrite the chunk with one of another namespace (same tokens)
    let other = spec_with_heads(&spec, 1);
    let (_, bytes) = synth_chunk(&other, None, SaltTag::NONE, toks.clone()).unwrap();
    std::fs::write(chunk_path(d.path(), &spec, &toks, 0), bytes).unwrap();
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 2, 8);
    let e = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&[0, 1])))
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(
        matches!(&e, LoaderError::Chunk { source, .. }
            if matches!(**source, ChunkError::Format(FormatError::NamespaceMismatch { .. }))),
        "{e}"
    );
}

#[test]
fn layer_wise_wait_and_drop_mid_load() {
    let spec = spec(Dtype::F32, KvKind::KeyValue, 64, 16);
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(8 * 64, 5);
    let files = write_chunks(d.path(), &spec, b"", &toks);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let table: Vec<u32> = (0..32).collect();
    let map = BlockMap::Blocks(&table);
    let mem = alloc(&spec, Kind::FlashAttn, 32, 16);
    let h = loader.load(&toks, &Dest::host(&mem.layout, map)).unwrap();
    h.wait_layer(0).unwrap();
    // layer 0 is complete now, whatever the state of the others
    let v = ChunkView::parse(&files[7], Verify::Header).unwrap();
    let s = slot(&map, 16, 7 * 64 + 63).unwrap();
    assert_eq!(
        row_at(&mem, 0, 1, s),
        &v.plane(0, 1).unwrap()[63 * 256..64 * 256]
    );
    h.wait_layer(2).unwrap();
    assert!(h.wait_layer(3).is_err(), "out-of-range layer");
    let stats = h.wait().unwrap();
    assert!(stats.layer_ready[0] <= stats.elapsed);
    assert_eq!(stats.layer_ready.len(), 3);
    // dropping a handle waits for in-flight reads (no write after drop)
    let mem2 = alloc(&spec, Kind::FlashAttn, 32, 16);
    drop(loader.load(&toks, &Dest::host(&mem2.layout, map)).unwrap());
}

#[test]
fn o_direct_is_used_where_the_file_system_allows() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 64, 16);
    let toks = tokens(128, 6);
    let table: Vec<u32> = (0..8).collect();
    // /work and /tmp are ext4 here: O_DIRECT works
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let files = write_chunks(d.path(), &spec, b"", &toks);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 8, 16);
    let stats = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((stats.direct_files, stats.buffered_files), (2, 0));
    check(
        &mem,
        &BlockMap::Blocks(&table),
        &spec,
        &files,
        128,
        |_, p| p < 128,
    );

    // The chunks were just written, so their pages are cached and served from memory; once
    // evicted, the same load reads them with O_DIRECT, with the same bytes.
    evict_pages(d.path());
    let mem = alloc(&spec, Kind::FlashAttn, 8, 16);
    let stats = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((stats.direct_files, stats.buffered_files), (2, 0));
    check(
        &mem,
        &BlockMap::Blocks(&table),
        &spec,
        &files,
        128,
        |_, p| p < 128,
    );

    // tmpfs refused O_DIRECT before Linux 6.6 (EINVAL at open): there the loader falls back
    // to buffered reads; either way every chunk is read once and the bytes are right
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping the tmpfs fallback half: /dev/shm is missing");
        return;
    }
    let d = tempfile::tempdir_in(shm).unwrap();
    let files = write_chunks(d.path(), &spec, b"", &toks);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 8, 16);
    let stats = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.direct_files + stats.buffered_files, 2);
    check(
        &mem,
        &BlockMap::Blocks(&table),
        &spec,
        &files,
        128,
        |_, p| p < 128,
    );
}

/// A directory that looks like a kvfs mount (flat layout, `.kvfs/stats.json`): chunks are
/// read from the file named by `user.kvfs.backing` when it is set, and stored by create,
/// write, close.
#[test]
fn flat_layout_reads_backing_files_and_stores_through_the_mount() {
    let spec = spec(Dtype::F16, KvKind::KeyValue, 32, 16);
    let cache = tempfile::tempdir().unwrap();
    let mount = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(mount.path().join(".kvfs")).unwrap();
    std::fs::write(mount.path().join(".kvfs/stats.json"), b"{}").unwrap();
    let toks = tokens(64, 8);
    let files = write_chunks(cache.path(), &spec, b"", &toks);
    let keys = kvfs_loader::chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 32, &toks);
    let ns = spec.namespace_dir();
    for (i, k) in keys.iter().enumerate() {
        let flat = Layout::Flat.chunk_path(mount.path(), &ns, &k.key);
        std::fs::create_dir_all(flat.parent().unwrap()).unwrap();
        std::fs::write(&flat, &files[i]).unwrap();
        let backing = Layout::Cache.chunk_path(cache.path(), &ns, &k.key);
        let set = std::process::Command::new("setfattr")
            .args(["-n", "user.kvfs.backing", "-v"])
            .arg(&backing)
            .arg(&flat)
            .status();
        if !matches!(set, Ok(s) if s.success()) {
            let why = "setfattr (package attr) is unavailable or xattrs are unsupported here";
            require::need("setfattr", Err(why.to_string()));
            return;
        }
    }
    let loader = Loader::open(mount.path(), spec.clone(), b"").unwrap();
    assert_eq!(loader.dir_layout(), Layout::Flat);
    assert_eq!(loader.lookup(&toks), 64);
    let table = [3u32, 2, 1, 0];
    let mem = alloc(&spec, Kind::FlashAttn, 4, 16);
    let stats = loader
        .load(&toks, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.backing_files, 2);
    check(
        &mem,
        &BlockMap::Blocks(&table),
        &spec,
        &files,
        64,
        |_, p| p < 64,
    );

    // store a longer sequence through the "mount": only the new chunk is written, flat
    let more = tokens(96, 8);
    assert_eq!(&more[..64], &toks[..]);
    let src = alloc(&spec, Kind::FlashAttn, 6, 16);
    let t6 = [0u32, 1, 2, 3, 4, 5];
    let st = loader
        .store(&more, &Dest::host(&src.layout, BlockMap::Blocks(&t6)))
        .unwrap();
    assert_eq!((st.written, st.present), (1, 2));
    let k2 = kvfs_loader::chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 32, &more)[2].key;
    let written = std::fs::read(Layout::Flat.chunk_path(mount.path(), &ns, &k2)).unwrap();
    ChunkView::parse(&written, Verify::Full).unwrap();
    assert!(mount.path().join(&ns).join("namespace.json").exists());
}

// ---- Coded chunks (codecs, format version 2) ----

/// KV-like elements (a per-channel offset and a smooth wave per token) for coded chunks, so
/// the lossless codec finds real structure; raw bytes of `dtype`.
fn kv_like(meta: &kvfs_loader::ChunkMeta, l: u32, p: u32, dst: &mut [u8]) {
    let n = dst.len() / meta.dtype.size();
    let ch = (meta.num_heads * meta.head_dim) as usize;
    let salt = meta.key.0[0] as f32;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let (t, c) = (i / ch, i % ch);
            let base = if c % 13 == 0 { 5.0 } else { 0.4 };
            base * ((t as f32 * 0.31 + c as f32 * 1.7 + (l * 2 + p) as f32 + salt).sin())
        })
        .collect();
    kvfs_loader::codec::from_f32(meta.dtype, &v, dst);
}

/// Writes chunks coded with `spec.codec` and returns each one decoded to a raw chunk: the
/// reference a load must reproduce.
fn write_coded_chunks(root: &Path, spec: &ModelSpec, toks: &[u32]) -> Vec<Vec<u8>> {
    let ct = spec.chunk_tokens as usize;
    let mut parent = None;
    let mut out = Vec::new();
    for c in toks.chunks_exact(ct) {
        let meta = kvfs_loader::ChunkMeta::for_spec(spec, parent, SaltTag::NONE, c.to_vec());
        let bytes = kvfs_loader::format::encode_chunk_coded(&meta, spec.codec, |l, p, d| {
            kv_like(&meta, l, p, d)
        })
        .unwrap();
        let path = Layout::Cache.chunk_path(root, &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
        out.push(kvfs_loader::codec::stored::transcode(&bytes, kvfs_loader::Codec::Raw).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Loads of coded chunks place exactly the decoded rows, for every codec, layout, float
    /// dtype, block size, range, I/O mode and verification level.
    #[test]
    fn coded_loads_match_their_decoded_chunks(
        codec in prop::sample::select(vec![
            kvfs_loader::Codec::Lossless, kvfs_loader::Codec::Fp8,
            kvfs_loader::Codec::Kivi4, kvfs_loader::Codec::Kivi2, kvfs_loader::Codec::Int8,
            kvfs_loader::Codec::Hq4,
        ]),
        kind in prop_oneof![Just(Kind::FlashAttn), Just(Kind::Mla), Just(Kind::VllmCpu)],
        dtype in prop::sample::select(vec![Dtype::F16, Dtype::Bf16, Dtype::F32]),
        block_size in prop::sample::select(vec![1usize, 8, 16]),
        chunks in 1usize..3,
        start_frac in 0.0f64..1.0,
        end_frac in 0.0f64..1.0,
        direct in any::<bool>(),
        full_verify in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kv = if kind == Kind::Mla { KvKind::MlaLatent } else { KvKind::KeyValue };
        let mut spec = spec(dtype, kv, 48, 16);
        if kv == KvKind::MlaLatent && codec == kvfs_loader::Codec::Hq4 {
            // hq4 rotates power-of-two rows: a 64-wide latent here (48 is refused).
            spec.head_dim = 64;
        }
        spec.codec = codec;
        let d = tempfile::tempdir().unwrap();
        let toks = tokens(chunks * 48 + 3, seed as u32);
        let files = write_coded_chunks(d.path(), &spec, &toks);
        let full = chunks * 48;
        let end = ((full as f64 * end_frac) as usize).max(1);
        let start = (end as f64 * start_frac) as usize;
        let io = if direct { IoMode::Direct } else { IoMode::Buffered };
        let loader = Loader::open_with(d.path(), spec.clone(), b"", opts(io)).unwrap();
        prop_assert_eq!(loader.lookup(&toks), full);
        let nb = full.div_ceil(block_size);
        let mem = alloc(&spec, kind, nb + 2, block_size);
        let table = shuffled_blocks(nb, nb + 2, seed);
        let map = BlockMap::Blocks(&table);
        let verify = Some(if full_verify { Verify::Full } else { Verify::Header });
        let req = LoadRequest { tokens: &toks, range: Some(start..end), verify, ..Default::default() };
        let stats = loader.load_request(&req, &Dest::host(&mem.layout, map)).unwrap().wait().unwrap();
        prop_assert_eq!(stats.tokens, end - start);
        prop_assert_eq!(stats.bytes_needed, ((end - start) * spec.bytes_per_token() as usize) as u64);
        check(&mem, &map, &spec, &files, full, |_, p| (start..end).contains(&p));
    }
}

/// A selective load of a coded chunk reads the stored bytes of exactly the chosen groups
/// (buffered I/O: no alignment widening), for a codec of variable (lossless) and of fixed
/// (int8, hq4) group size.
#[test]
fn selective_coded_loads_read_only_the_chosen_groups() {
    for codec in [
        kvfs_loader::Codec::Lossless,
        kvfs_loader::Codec::Int8,
        kvfs_loader::Codec::Hq4,
    ] {
        selective_coded_load_reads_only_the_chosen_groups(codec);
    }
}

fn selective_coded_load_reads_only_the_chosen_groups(codec: kvfs_loader::Codec) {
    let mut spec = spec(Dtype::Bf16, KvKind::KeyValue, 64, 16);
    spec.codec = codec;
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(2 * 64, 5);
    let files = write_coded_chunks(d.path(), &spec, &toks);
    let loader = Loader::open_with(d.path(), spec.clone(), b"", opts(IoMode::Buffered)).unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 8, 16);
    let table: Vec<u32> = (0..8).rev().collect();
    let map = BlockMap::Blocks(&table);
    let sel = Selection::new(vec![vec![0, 3, 5], vec![], vec![7]]);
    let req = LoadRequest {
        tokens: &toks,
        selection: Some(&sel),
        ..Default::default()
    };
    let stats = loader
        .load_request(&req, &Dest::host(&mem.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    let chosen = |layer: usize, p: usize| sel.groups(layer).contains(&((p / 16) as u32));
    check(&mem, &map, &spec, &files, 2 * 64, chosen);
    // Stored bytes of the chosen groups, from the files' own group tables.
    let mut want = 0;
    for (c, path) in (0..2).map(|c| (c, chunk_path(d.path(), &spec, &toks, c))) {
        let bytes = std::fs::read(path).unwrap();
        let h = kvfs_loader::ChunkHeader::parse(&bytes).unwrap();
        let t = h.stored().unwrap();
        for layer in 0..3u32 {
            for &g in sel.groups(layer as usize) {
                let (chunk, local) = (g as usize / 4, g % 4);
                if chunk == c {
                    for plane in 0..2 {
                        let r = t.groups_range(layer, plane, local..local + 1);
                        want += r.end - r.start;
                    }
                }
            }
        }
    }
    assert_eq!(stats.bytes_read, want, "{codec}");
    assert!(
        stats.bytes_read < stats.bytes_needed,
        "{codec}: the codec shrank what was read"
    );
}

/// A group that does not decode is a typed error naming the place; a corrupt stored layer
/// under full verification names the codec.
#[test]
fn corrupt_coded_chunks_fail_with_typed_errors() {
    let mut spec = spec(Dtype::Bf16, KvKind::KeyValue, 32, 16);
    spec.codec = kvfs_loader::Codec::Lossless;
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(2 * 32, 9);
    write_coded_chunks(d.path(), &spec, &toks);
    let path = chunk_path(d.path(), &spec, &toks, 1);
    let h = kvfs_loader::ChunkHeader::parse(&std::fs::read(&path).unwrap()).unwrap();
    // Byte 0 of group 0 is its mode (raw or coded); no other value is defined.
    flip(&path, h.layer_span(0).start);
    let loader = Loader::open_with(d.path(), spec.clone(), b"", opts(IoMode::Buffered)).unwrap();
    for (verify, want_full) in [(Verify::Header, false), (Verify::Full, true)] {
        let mem = alloc(&spec, Kind::FlashAttn, 8, 8);
        let table: Vec<u32> = (0..8).collect();
        let req = LoadRequest {
            tokens: &toks,
            verify: Some(verify),
            ..Default::default()
        };
        let e = loader
            .load_request(&req, &Dest::host(&mem.layout, BlockMap::Blocks(&table)))
            .unwrap()
            .wait()
            .unwrap_err();
        let LoaderError::Chunk {
            chunk,
            valid_tokens,
            source,
            ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!((*chunk, valid_tokens.clone()), (1, 0..32));
        if want_full {
            assert!(
                matches!(
                    &**source,
                    ChunkError::Format(FormatError::StoredDigest {
                        codec: kvfs_loader::Codec::Lossless,
                        layer: 0
                    })
                ),
                "{source}"
            );
        } else {
            assert!(
                matches!(
                    &**source,
                    ChunkError::Format(FormatError::Decode {
                        layer: 0,
                        plane: 0,
                        group: 0,
                        ..
                    })
                ),
                "{source}"
            );
        }
    }
}

/// A loader whose spec has a lossy codec stores coded chunks, and loads them back decoded.
#[test]
fn a_lossy_namespace_stores_and_loads_coded_chunks() {
    let mut spec = spec(Dtype::F16, KvKind::KeyValue, 32, 16);
    spec.codec = kvfs_loader::Codec::Fp8;
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(64, 2);
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let src = alloc(&spec, Kind::FlashAttn, 8, 8);
    let table: Vec<u32> = (0..8).collect();
    let map = BlockMap::Blocks(&table);
    // Fill the source blocks with KV-like f16 values.
    let mut src = src;
    for b in &mut src.bufs {
        let v: Vec<f32> = (0..b.len() / 2)
            .map(|i| ((i as f32) * 0.01).sin() * 3.0)
            .collect();
        kvfs_loader::codec::from_f32(Dtype::F16, &v, b);
    }
    loader.store(&toks, &Dest::host(&src.layout, map)).unwrap();
    let path = chunk_path(d.path(), &spec, &toks, 1);
    let bytes = std::fs::read(&path).unwrap();
    let h = kvfs_loader::ChunkHeader::parse(&bytes).unwrap();
    assert_eq!(h.codec, kvfs_loader::Codec::Fp8);
    assert_eq!(h.meta.namespace, spec.namespace_id());
    let decoded = kvfs_loader::codec::stored::transcode(&bytes, kvfs_loader::Codec::Raw).unwrap();
    let dst = alloc(&spec, Kind::FlashAttn, 8, 8);
    loader
        .load(&toks, &Dest::host(&dst.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    let first = std::fs::read(chunk_path(d.path(), &spec, &toks, 0)).unwrap();
    let first = kvfs_loader::codec::stored::transcode(&first, kvfs_loader::Codec::Raw).unwrap();
    check(&dst, &map, &spec, &[first, decoded], 64, |_, _| true);
}

/// Every regular file under `p` (`p` itself if it is one).
/// Drops every chunk file under `root` from the page cache, so the loader reads it with
/// O_DIRECT (it serves cached pages from memory).
fn evict_pages(root: &Path) {
    for c in walk(root) {
        let file = std::fs::File::open(&c).unwrap();
        file.sync_all().unwrap();
        // SAFETY: a valid descriptor; advice only.
        let r = unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        assert!(!kvfs_loader::io::page_cached(&file, 0, 4096));
    }
}

/// Coded groups are not page-aligned, so under O_DIRECT a layer's K plane ends in the page
/// where its V plane starts: a whole load reads each layer's stored span once, that shared
/// page included, not once per plane.
#[test]
fn a_coded_load_under_o_direct_reads_each_page_once() {
    let mut spec = spec(Dtype::Bf16, KvKind::KeyValue, 64, 16);
    spec.codec = kvfs_loader::Codec::Int8;
    // /work and /tmp are ext4 here: O_DIRECT works
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let toks = tokens(2 * 64, 11);
    let files = write_coded_chunks(d.path(), &spec, &toks);
    let mut want = 0;
    for c in 0..2 {
        let bytes = std::fs::read(chunk_path(d.path(), &spec, &toks, c)).unwrap();
        let h = kvfs_loader::ChunkHeader::parse(&bytes).unwrap();
        let t = h.stored().unwrap();
        for layer in 0..3u32 {
            let k_end = t.plane_range(layer, 0).end;
            assert_ne!(
                k_end % 4096,
                0,
                "the test needs a K plane ending inside a page"
            );
            let span = t.layer_span(layer);
            want += span.end - span.start;
        }
    }
    evict_pages(d.path());
    let loader = Loader::open_with(d.path(), spec.clone(), b"", opts(IoMode::Direct)).unwrap();
    let mem = alloc(&spec, Kind::FlashAttn, 8, 16);
    let table: Vec<u32> = (0..8).collect();
    let map = BlockMap::Blocks(&table);
    let stats = loader
        .load(&toks, &Dest::host(&mem.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((stats.direct_files, stats.buffered_files), (2, 0));
    check(&mem, &map, &spec, &files, 2 * 64, |_, _| true);
    assert_eq!(
        stats.bytes_read, want,
        "each layer's stored span, read once"
    );
}

fn walk(p: &Path) -> Vec<PathBuf> {
    if p.is_file() {
        return vec![p.to_path_buf()];
    }
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .flat_map(|e| walk(&e.path()))
        .collect()
}

/// Issue 14: a prefetching selective load guided by the importance in the chunk headers
/// reads exactly the chosen groups, under every prefetch mode, and refuses bad requests
/// with typed errors.
#[test]
fn importance_guided_prefetching_load_reads_exactly_the_chosen_groups() {
    use kvfs_loader::format::{encode_chunk_with, synth_fill};
    use kvfs_loader::importance::Importance;
    use kvfs_loader::prefetch::{Periods, Prefetch, PrefetchError};
    use kvfs_loader::{ChunkMeta, encode_chunk};

    let dir = tempfile::tempdir().unwrap();
    // 3 layers, 128-token chunks in 32-token groups of 4096 bytes per plane: 3 chunks, 12
    // groups; importance differs per chunk and layer
    let spec = spec(Dtype::F16, KvKind::KeyValue, 128, 32);
    let toks = tokens(3 * 128, 5);
    let mut parent = None;
    let mut files = Vec::new();
    for (c, t) in toks.chunks_exact(128).enumerate() {
        let meta = ChunkMeta::for_spec(&spec, parent, SaltTag::NONE, t.to_vec());
        let scores = (0..3 * 4)
            .map(|i| ((i * 5 + c * 3) % 7) as f32 / 40.0)
            .collect();
        let imp = Importance::new(3, 4, 32, scores).unwrap();
        let bytes =
            encode_chunk_with(&meta, Some(&imp), |l, p, d| synth_fill(&meta.key, l, p, d)).unwrap();
        let path = Layout::Cache.chunk_path(dir.path(), &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
        files.push(bytes);
    }
    let loader = Loader::open_with(dir.path(), spec.clone(), b"", opts(IoMode::Direct)).unwrap();
    assert_eq!(loader.chunk_headers(&toks, 384).unwrap().len(), 3);
    let sel = loader.importance_selection(&toks, 384, 0.25).unwrap();
    for layer in 0..3 {
        assert_eq!(sel.groups(layer).len(), 3, "a quarter of 12 groups");
    }
    let table: Vec<u32> = (0..24).rev().collect();
    for mode in [Prefetch::Off, Prefetch::IntraPeriod, Prefetch::Full] {
        let mem = alloc(&spec, Kind::FlashAttn, 24, 16);
        let map = BlockMap::Blocks(&table);
        let req = LoadRequest {
            tokens: &toks,
            range: Some(0..384),
            selection: Some(&sel),
            verify: None,
        };
        let periods = Periods::uniform(3, 2).unwrap();
        let mut load = loader
            .load_prefetching(&req, Dest::host(&mem.layout, map), periods, mode)
            .unwrap();
        for layer in 0..3 {
            load.wait_layer(layer).unwrap();
        }
        let stats = load.finish().unwrap();
        // 3 layers x 3 groups x 2 planes x 4096 bytes, nothing more
        assert_eq!(stats.bytes_read, 3 * 3 * 2 * 4096, "{mode:?}");
        assert_eq!(stats.read_amplification(), 1.0);
        let in_sel = |layer: usize, p: usize| sel.groups(layer).contains(&((p / 32) as u32));
        check(&mem, &BlockMap::Blocks(&table), &spec, &files, 384, in_sel);
    }

    // typed errors
    for bad in [0.0, 1.5, f64::NAN] {
        assert!(matches!(
            loader.importance_selection(&toks, 384, bad),
            Err(PrefetchError::Budget(_))
        ));
    }
    let mem = alloc(&spec, Kind::FlashAttn, 24, 16);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(0..384),
        selection: Some(&sel),
        verify: None,
    };
    let wrong = Periods::uniform(5, 2).unwrap();
    assert!(matches!(
        loader.load_prefetching(
            &req,
            Dest::host(&mem.layout, BlockMap::Blocks(&table)),
            wrong,
            Prefetch::Full
        ),
        Err(PrefetchError::Periods(_))
    ));
    let no_sel = LoadRequest {
        selection: None,
        ..req.clone()
    };
    let periods = Periods::uniform(3, 1).unwrap();
    assert!(matches!(
        loader.load_prefetching(
            &no_sel,
            Dest::host(&mem.layout, BlockMap::Blocks(&table)),
            periods,
            Prefetch::Off
        ),
        Err(PrefetchError::Loader(LoaderError::Invalid(_)))
    ));
    // a prefix whose chunks carry no importance
    let plain = tempfile::tempdir().unwrap();
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, toks[..128].to_vec());
    let v1 = encode_chunk(&meta, |l, p, d| synth_fill(&meta.key, l, p, d)).unwrap();
    let path = Layout::Cache.chunk_path(plain.path(), &spec.namespace_dir(), &meta.key);
    dir::commit_file(&path, &v1, false).unwrap();
    let l2 = Loader::open(plain.path(), spec.clone(), b"").unwrap();
    assert!(matches!(
        l2.importance_selection(&toks, 128, 0.5),
        Err(PrefetchError::NoImportance { chunk: 0, .. })
    ));
    // beyond the stored chunks: the header is missing
    assert!(matches!(
        l2.importance_selection(&toks, 256, 0.5),
        Err(PrefetchError::Header { chunk: 1, .. })
    ));
}
