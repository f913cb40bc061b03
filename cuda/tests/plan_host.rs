//! The device load plan, run on the CPU: for random layouts, block tables, ranges and
//! selections, a [`DevicePlan`] executed by kvfs-gds's staging ring with a host sink places
//! exactly the bytes the host loader places (`Loader::load` into host memory), byte for
//! byte, and touches nothing else. On a GPU the same plan goes to `GpuLoader::load_extents`
//! (`tests/gpu.rs`), whose ring and kernels kvfs-gds checks against the same host sink; so
//! this is the CPU half of "device blocks equal host blocks".
//!
//! Also: layer marks (every layer is reported ready, in order), a missing or corrupt chunk
//! ends the plan where the host loader's load ends (same `LoaderError::Chunk` prefix, later
//! chunks untouched), and bad requests are typed errors before any file is read.

use kvfs_cuda::{CudaError, DevicePlan};
use kvfs_gds::{HostSink, Ring, ScatterPlan, ScatterRun};
use kvfs_loader::format::Verify;
use kvfs_loader::layout::{BlockMap, KvLayout, LayoutError};
use kvfs_loader::loader::{ChunkError, Dest, LoadRequest, LoaderError};
use kvfs_loader::{Dtype, IoMode, ModelSpec, Selection};
use std::ops::Range;
use std::path::Path;

mod common;
use common::{
    Kind, Rng, SENTINEL, arena_len, drop_from_cache, layout_at, open, random_case, spec, tokens,
    write_chunks,
};

/// One host arena holding every layer, and a layout over it.
struct Arena {
    bytes: Vec<u8>,
    layout: KvLayout,
}

fn arena(spec: &ModelSpec, kind: Kind, num_blocks: usize, block_size: usize) -> Arena {
    let mut bytes = vec![SENTINEL; arena_len(spec, num_blocks, block_size)];
    // SAFETY: the layout covers `bytes`, which lives in the returned Arena with it and is
    // only read after loads have finished.
    let layout = unsafe { layout_at(spec, kind, num_blocks, block_size, bytes.as_mut_ptr()) };
    Arena { bytes, layout }
}

/// The plan with destinations made offsets into `arena` (what a host sink addresses).
fn relative(plan: &DevicePlan, arena: &Arena) -> ScatterPlan {
    let base = arena.bytes.as_ptr() as u64;
    let runs = plan
        .scatter()
        .runs()
        .iter()
        .map(|r| ScatterRun {
            dst: r.dst - base,
            ..*r
        })
        .collect();
    ScatterPlan::new(runs, plan.scatter().layer_ends().to_vec()).unwrap()
}

/// Runs `plan` through a staging ring with a host sink into `arena`; returns the layers the
/// sink saw become ready.
fn run_on_host(plan: &DevicePlan, arena: &mut Arena, slots: usize, buf: usize) -> Vec<usize> {
    let rel = relative(plan, arena);
    let mut ring = Ring::new(HostSink::new(&mut arena.bytes), slots, buf).unwrap();
    let stats = ring.load_extents(plan.extents(), &rel).unwrap();
    assert_eq!(stats.data_bytes, plan.bytes_read());
    ring.into_sink().ready_layers().to_vec()
}

#[test]
fn device_plans_place_what_the_host_loader_places() {
    let mut rng = Rng(0x6b76_6673_6375_6461);
    // Real files on a disk file system (tmpfs refuses O_DIRECT, which the Direct cases want
    // to exercise).
    for i in 0..60 {
        let c = random_case(&mut rng);
        let dir = tempfile::tempdir_in(common::test_root()).unwrap();
        let paths = write_chunks(dir.path(), &c.spec, &c.toks);
        if c.io == IoMode::Direct && rng.below(2) == 0 {
            drop_from_cache(&paths);
        }
        let loader = open(dir.path(), &c.spec, c.io);
        let block_size = c.block_size;
        let map = BlockMap::Blocks(&c.table);
        let req = LoadRequest {
            tokens: &c.toks,
            range: Some(c.range.clone()),
            selection: c.selection.as_ref(),
            verify: None,
        };
        let host = arena(&c.spec, c.kind, c.num_blocks, block_size);
        let stats = loader
            .load_request(&req, &Dest::host(&host.layout, map))
            .unwrap()
            .wait()
            .unwrap();
        let mut dev = arena(&c.spec, c.kind, c.num_blocks, block_size);
        let plan = DevicePlan::build(&loader, &req, &dev.layout, &map).unwrap();
        assert!(plan.failure().is_none());
        let ready = run_on_host(&plan, &mut dev, c.slots, c.buf);
        let layers = c.spec.num_layers as usize;
        assert_eq!(
            ready,
            (0..layers).collect::<Vec<_>>(),
            "case {i}: layer marks"
        );
        assert_eq!(plan.scatter().layers(), layers);
        assert_eq!(plan.bytes_needed(), stats.bytes_needed, "case {i}");
        assert_eq!(plan.tokens(), c.range.len());
        assert!(
            host.bytes == dev.bytes,
            "case {i} ({:?}, {:?}, range {:?}, selection {}): device plan and host loader differ",
            c.kind,
            c.spec.dtype,
            c.range,
            c.selection.is_some()
        );
        // The load did something (unless the selection chose nothing).
        if c.selection.is_none() {
            assert!(
                host.bytes.iter().any(|&b| b != SENTINEL),
                "case {i}: nothing loaded"
            );
        }
    }
}

/// A 4-chunk flash-attn case whose chunk 2 is then broken by `breakage`: the device plan
/// stops where the host load stops, with the same error, and leaves later chunks alone.
fn broken_chunk_case(breakage: impl Fn(&Path), want: impl Fn(&ChunkError) -> bool) {
    let s = spec(Kind::FlashAttn, Dtype::F16, 3, 16, 8);
    let dir = tempfile::tempdir_in(common::test_root()).unwrap();
    let toks = tokens(64, 7);
    let paths = write_chunks(dir.path(), &s, &toks);
    breakage(&paths[2]);
    let loader = open(dir.path(), &s, IoMode::Direct);
    let table: Vec<u32> = (0..16).rev().collect();
    let map = BlockMap::Blocks(&table);
    let req = LoadRequest {
        tokens: &toks,
        range: Some(4..64),
        ..Default::default()
    };
    let host = arena(&s, Kind::FlashAttn, 16, 4);
    let host_err = loader
        .load_request(&req, &Dest::host(&host.layout, map))
        .unwrap()
        .wait()
        .unwrap_err();
    let mut dev = arena(&s, Kind::FlashAttn, 16, 4);
    let plan = DevicePlan::build(&loader, &req, &dev.layout, &map).unwrap();
    let err = plan.failure().expect("the plan reports the broken chunk");
    let (
        LoaderError::Chunk {
            chunk,
            valid_tokens,
            valid_blocks,
            source,
            ..
        },
        LoaderError::Chunk {
            chunk: host_chunk,
            valid_tokens: host_tokens,
            valid_blocks: host_blocks,
            ..
        },
    ) = (&err, &host_err)
    else {
        panic!("want chunk errors, got {err:?} and {host_err:?}");
    };
    assert_eq!(
        (*chunk, valid_tokens, valid_blocks),
        (*host_chunk, host_tokens, host_blocks)
    );
    assert_eq!((*chunk, valid_tokens.clone()), (2, 4..32));
    assert!(want(source), "unexpected cause {source:?}");
    assert_eq!(
        plan.files(),
        2,
        "only the chunks before the broken one are read"
    );
    run_on_host(&plan, &mut dev, 2, 8192);
    // Positions 4..32 (blocks 1..8 of the table) are identical on both paths; the slots of
    // positions 32.. hold the sentinel on the device path.
    let row = dev.layout.row_bytes();
    for layer in 0..3 {
        for plane in 0..2 {
            for p in 0..64 {
                let slot = table[p / 4] as usize * 4 + p % 4;
                let at = dev.layout.slot_addr(layer, plane, slot) - dev.bytes.as_ptr() as usize;
                let d = &dev.bytes[at..at + row];
                if (4..32).contains(&p) {
                    let hat =
                        host.layout.slot_addr(layer, plane, slot) - host.bytes.as_ptr() as usize;
                    assert_eq!(d, &host.bytes[hat..hat + row], "layer {layer} position {p}");
                    assert!(d.iter().any(|&b| b != SENTINEL));
                } else {
                    assert!(d.iter().all(|&b| b == SENTINEL), "position {p} was written");
                }
            }
        }
    }
}

#[test]
fn a_missing_chunk_ends_the_plan_where_the_host_load_ends() {
    broken_chunk_case(
        |p| std::fs::remove_file(p).unwrap(),
        |e| matches!(e, ChunkError::Missing),
    );
}

#[test]
fn a_corrupt_header_ends_the_plan_where_the_host_load_ends() {
    broken_chunk_case(
        |p| {
            let mut b = std::fs::read(p).unwrap();
            b[40] ^= 1;
            std::fs::write(p, b).unwrap();
        },
        |e| matches!(e, ChunkError::Format(_)),
    );
}

#[test]
fn bad_requests_are_typed_errors_before_any_read() {
    let s = spec(Kind::FlashAttn, Dtype::F16, 2, 16, 8);
    let dir = tempfile::tempdir_in(common::test_root()).unwrap();
    let toks = tokens(32, 3);
    write_chunks(dir.path(), &s, &toks);
    let loader = open(dir.path(), &s, IoMode::Direct);
    let mem = arena(&s, Kind::FlashAttn, 8, 4);
    let table: Vec<u32> = (0..8).collect();
    let map = BlockMap::Blocks(&table);
    let build = |req: &LoadRequest<'_>, layout: &KvLayout, map: &BlockMap<'_>| {
        DevicePlan::build(&loader, req, layout, map).unwrap_err()
    };
    let req = |range: Range<usize>| LoadRequest {
        tokens: &toks,
        range: Some(range),
        ..Default::default()
    };

    let e = build(&req(0..48), &mem.layout, &map);
    assert!(
        matches!(e, CudaError::Loader(LoaderError::Invalid(_))),
        "{e}"
    );

    let full = LoadRequest {
        verify: Some(Verify::Full),
        ..req(0..32)
    };
    let e = build(&full, &mem.layout, &map);
    assert!(
        matches!(e, CudaError::Unsupported(ref m) if m.contains("Verify::Full")),
        "{e}"
    );

    let short = BlockMap::Blocks(&table[..4]);
    let e = build(&req(0..32), &mem.layout, &short);
    assert!(
        matches!(
            e,
            CudaError::Loader(LoaderError::Layout(LayoutError::MapTooShort { .. }))
        ),
        "{e}"
    );

    let bad_ids = [0u32, 1, 2, 99, 4, 5, 6, 7];
    let e = build(&req(0..32), &mem.layout, &BlockMap::Blocks(&bad_ids));
    assert!(
        matches!(
            e,
            CudaError::Loader(LoaderError::Layout(LayoutError::BlockOutOfRange { .. }))
        ),
        "{e}"
    );

    let other = arena(
        &spec(Kind::FlashAttn, Dtype::F32, 2, 16, 8),
        Kind::FlashAttn,
        8,
        4,
    );
    let e = build(&req(0..32), &other.layout, &map);
    assert!(
        matches!(
            e,
            CudaError::Loader(LoaderError::Layout(LayoutError::SpecMismatch { .. }))
        ),
        "{e}"
    );

    let sel = Selection::same_for_all(5, vec![0]);
    let e = build(
        &LoadRequest {
            selection: Some(&sel),
            ..req(0..32)
        },
        &mem.layout,
        &map,
    );
    assert!(
        matches!(e, CudaError::Loader(LoaderError::Invalid(_))),
        "{e}"
    );
}

#[path = "../../tests/support/require.rs"]
mod require;

/// On a kvfs mount (flat layout, `.kvfs/stats.json`) the device plan reads the local file
/// that `user.kvfs.backing` names, as the host loader does: here the files under the "mount"
/// are garbage, so a plan that read them would report a corrupt chunk.
#[test]
fn on_a_mount_the_plan_reads_the_backing_files() {
    let s = spec(Kind::FlashAttn, Dtype::F16, 2, 16, 8);
    let cache = tempfile::tempdir_in(common::test_root()).unwrap();
    let mount = tempfile::tempdir_in(common::test_root()).unwrap();
    std::fs::create_dir_all(mount.path().join(".kvfs")).unwrap();
    std::fs::write(mount.path().join(".kvfs/stats.json"), b"{}").unwrap();
    let toks = tokens(32, 9);
    let backing = write_chunks(cache.path(), &s, &toks);
    let keys = kvfs_loader::chunk_keys(&s.namespace_id(), &kvfs_loader::SaltTag::NONE, 16, &toks);
    for (k, b) in keys.iter().zip(&backing) {
        let flat =
            kvfs_loader::dir::Layout::Flat.chunk_path(mount.path(), &s.namespace_dir(), &k.key);
        std::fs::create_dir_all(flat.parent().unwrap()).unwrap();
        std::fs::write(&flat, vec![0xEEu8; 8192]).unwrap();
        let set = std::process::Command::new("setfattr")
            .args(["-n", "user.kvfs.backing", "-v"])
            .arg(b)
            .arg(&flat)
            .status();
        if !matches!(set, Ok(st) if st.success()) {
            let why = "setfattr (package attr) is unavailable or xattrs are unsupported here";
            require::need("setfattr", Err(why.to_string()));
            return;
        }
    }
    let loader = open(mount.path(), &s, IoMode::Direct);
    let table: Vec<u32> = vec![5, 1, 7, 3, 0, 2, 4, 6];
    let map = BlockMap::Blocks(&table);
    let req = LoadRequest {
        tokens: &toks,
        ..Default::default()
    };
    let host = arena(&s, Kind::FlashAttn, 8, 4);
    let stats = loader
        .load_request(&req, &Dest::host(&host.layout, map))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.backing_files, 2);
    let mut dev = arena(&s, Kind::FlashAttn, 8, 4);
    let plan = DevicePlan::build(&loader, &req, &dev.layout, &map).unwrap();
    assert!(plan.failure().is_none(), "{:?}", plan.failure());
    run_on_host(&plan, &mut dev, 2, 8192);
    assert!(dev.bytes == host.bytes);
}

/// O_DIRECT where the chunk is not in the page cache; the page cache where all of it is (the
/// host loader's rule), which the plan reports as buffered files.
#[test]
fn chunks_in_the_page_cache_are_read_through_it() {
    let s = spec(Kind::FlashAttn, Dtype::F16, 2, 16, 8);
    let dir = tempfile::tempdir_in(common::test_root()).unwrap();
    let toks = tokens(48, 21);
    let paths = write_chunks(dir.path(), &s, &toks);
    let loader = open(dir.path(), &s, IoMode::Direct);
    let mem = arena(&s, Kind::FlashAttn, 12, 4);
    let table: Vec<u32> = (0..12).collect();
    let req = LoadRequest {
        tokens: &toks,
        ..Default::default()
    };
    // Written just now: resident, unless the kernel cannot tell (no cachestat).
    let f = std::fs::File::open(&paths[0]).unwrap();
    let len = f.metadata().unwrap().len();
    let resident = kvfs_loader::io::page_cached(&f, 0, len);
    let plan = DevicePlan::build(&loader, &req, &mem.layout, &BlockMap::Blocks(&table)).unwrap();
    if resident {
        assert_eq!(
            plan.direct_files(),
            0,
            "resident chunks must be read through the cache"
        );
    }
    // Dropped from the cache: O_DIRECT (if the file system takes it).
    drop_from_cache(&paths);
    let direct_ok = kvfs_direct::open_with(&paths[0], std::fs::OpenOptions::new().read(true))
        .unwrap()
        .direct;
    let plan = DevicePlan::build(&loader, &req, &mem.layout, &BlockMap::Blocks(&table)).unwrap();
    if direct_ok {
        assert_eq!(plan.direct_files(), 3, "cold chunks are read with O_DIRECT");
    }
    assert!(
        resident || direct_ok,
        "neither case could be checked on this file system"
    );
}
