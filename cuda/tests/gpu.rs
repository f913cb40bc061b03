//! The CUDA back end on a GPU, run by `scripts/gpu-check` once per forced path
//! (`KVFS_GPU_PATH=gds|compat|staging`): `.kvc` chunks loaded into device blocks through
//! `CudaBackend` equal the host loader's blocks byte for byte over random layouts, block
//! tables, ranges and selections; the staged `Backend` path (`Verify::Full`) and stores from
//! device blocks agree too; and an engine stream that waits for layer 0's event sees layer 0
//! complete while later layers may still be loading.
//!
//! `#[ignore]`d so that `cargo test` passes where there is no GPU. A forced `gds` or `compat`
//! that this GPU machine cannot provide (no cuFile, no nvidia-fs) prints why and skips: a GPU
//! without GDS is a normal configuration. No CUDA at all, or no staging, fails.

use std::sync::Arc;

use cudarc::driver::result as cu;
use kvfs_cuda::{CudaBackend, CudaError, GpuOptions, ProbeOptions};
use kvfs_gds::GdsError;
use kvfs_gds::cuda::DeviceBuf;
use kvfs_loader::format::Verify;
use kvfs_loader::layout::{BlockMap, KvLayout};
use kvfs_loader::loader::{Dest, LoadRequest};
use kvfs_loader::{Dtype, IoMode};

mod common;
use common::{
    Kind, Rng, SENTINEL, arena_len, drop_from_cache, layout_at, open, random_case, spec, tokens,
    write_chunks,
};

/// Test files live on a real disk file system (cuFile wants O_DIRECT).
fn test_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(common::test_root()).unwrap()
}

/// The back end for the path `KVFS_GPU_PATH` forces, probing cuFile in `dir`.
fn backend(dir: &std::path::Path) -> Option<Arc<CudaBackend>> {
    let mut probe = ProbeOptions::from_env().unwrap();
    probe.probe_dir = dir.to_path_buf();
    match CudaBackend::open(&GpuOptions {
        probe,
        ..Default::default()
    }) {
        Ok(b) => {
            eprintln!("{}", b.probe());
            Some(b)
        }
        Err(CudaError::Gpu(e @ GdsError::PathUnavailable { wanted, .. }))
            if wanted != "staging" && kvfs_gds::probe::cuda_library().is_ok() =>
        {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("CUDA back end unavailable: {e}"),
    }
}

/// A device arena of `len` bytes filled with the sentinel.
fn device_arena(b: &CudaBackend, len: usize) -> DeviceBuf {
    let buf = b.device().alloc(len).unwrap();
    // SAFETY: buf holds len device bytes of the backend's context, unused by anything else.
    unsafe { b.device().htod(buf.ptr(), &vec![SENTINEL; len]) }.unwrap();
    buf
}

fn read_back(b: &CudaBackend, buf: &DeviceBuf) -> Vec<u8> {
    let mut out = vec![0u8; buf.len()];
    // SAFETY: buf holds that many bytes; every load into it has completed.
    unsafe { b.device().dtoh(&mut out, buf.ptr()) }.unwrap();
    out
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check"]
fn device_loads_and_stores_match_the_host_loader() {
    let dir = test_dir();
    let Some(b) = backend(dir.path()) else {
        return;
    };
    let mut rng = Rng(0x6b76_6673_6770_7531);
    let mut case_no = 0;
    while case_no < 40 {
        let c = random_case(&mut rng);
        if c.kind == Kind::VllmCpu && case_no % 4 != 0 {
            continue; // element-strided K is a host layout; keep a few for coverage
        }
        case_no += 1;
        let root = dir.path().join(format!("case{case_no}"));
        std::fs::create_dir_all(&root).unwrap();
        let originals = write_chunks(&root, &c.spec, &c.toks);
        if c.io == IoMode::Direct && rng.below(2) == 0 {
            // O_DIRECT (and on the gds path cuFile's direct reads) rather than the page cache
            drop_from_cache(&originals);
        }
        let loader = open(&root, &c.spec, c.io);
        let map = BlockMap::Blocks(&c.table);
        let req = LoadRequest {
            tokens: &c.toks,
            range: Some(c.range.clone()),
            selection: c.selection.as_ref(),
            verify: None,
        };
        let len = arena_len(&c.spec, c.num_blocks, c.block_size);
        let mut host = vec![SENTINEL; len];
        // SAFETY: the layout covers `host`, read only after the load.
        let hl = unsafe {
            layout_at(
                &c.spec,
                c.kind,
                c.num_blocks,
                c.block_size,
                host.as_mut_ptr(),
            )
        };
        let hs = loader
            .load_request(&req, &Dest::host(&hl, map))
            .unwrap()
            .wait()
            .unwrap();

        // The direct device path.
        let arena = device_arena(&b, len);
        // SAFETY: the layout covers the device arena, which nothing else uses.
        let dl: KvLayout = unsafe {
            layout_at(
                &c.spec,
                c.kind,
                c.num_blocks,
                c.block_size,
                arena.ptr() as *mut u8,
            )
        };
        // SAFETY: dl's regions are device memory of b's context, alive until after wait.
        let ds = unsafe { b.load(&loader, &req, &dl, &map) }
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(ds.bytes_needed, hs.bytes_needed, "case {case_no}");
        assert_eq!(ds.layer_issued.len(), c.spec.num_layers as usize);
        assert!(
            read_back(&b, &arena) == host,
            "case {case_no} ({:?}, {:?}, range {:?}, selection {}, path {}): device differs from host",
            c.kind,
            c.spec.dtype,
            c.range,
            c.selection.is_some(),
            b.path()
        );

        // The staged path (the loader with CudaBackend as its Backend), verifying digests.
        if c.selection.is_none() {
            let staged = device_arena(&b, len);
            // SAFETY: as for `dl`.
            let sl = unsafe {
                layout_at(
                    &c.spec,
                    c.kind,
                    c.num_blocks,
                    c.block_size,
                    staged.ptr() as *mut u8,
                )
            };
            let dest = Dest {
                layout: &sl,
                map,
                backend: b.clone(),
            };
            let full = LoadRequest {
                verify: Some(Verify::Full),
                ..req.clone()
            };
            loader.load_request(&full, &dest).unwrap().wait().unwrap();
            assert!(
                read_back(&b, &staged) == host,
                "case {case_no}: staged path"
            );
        }

        // Store from device blocks: whole chunks come back byte-identical.
        let ct = c.spec.chunk_tokens as usize;
        if c.selection.is_none() && c.range.start == 0 && c.range.end >= ct {
            let n = c.range.end / ct;
            let out = dir.path().join(format!("store{case_no}"));
            std::fs::create_dir_all(&out).unwrap();
            let sloader = open(&out, &c.spec, IoMode::Direct);
            let src = Dest {
                layout: &dl,
                map,
                backend: b.clone(),
            };
            let st = sloader.store(&c.toks[..n * ct], &src).unwrap();
            assert_eq!(st.written, n, "case {case_no}");
            for (i, orig) in originals.iter().take(n).enumerate() {
                let name = orig.file_name().unwrap();
                let stored = std::fs::read_dir(&out)
                    .unwrap()
                    .flat_map(|ns| std::fs::read_dir(ns.unwrap().path()).into_iter().flatten())
                    .flat_map(|fan| std::fs::read_dir(fan.unwrap().path()).into_iter().flatten())
                    .map(|e| e.unwrap().path())
                    .find(|p| p.file_name() == Some(name))
                    .unwrap_or_else(|| panic!("case {case_no}: chunk {i} not stored"));
                assert!(
                    std::fs::read(stored).unwrap() == std::fs::read(orig).unwrap(),
                    "case {case_no}: chunk {i} stored from device differs"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check"]
fn an_engine_stream_waits_for_one_layer_while_later_ones_load() {
    let dir = test_dir();
    let Some(b) = backend(dir.path()) else {
        return;
    };
    // 8 layers x 32 chunks of 64 tokens, flash-attn, 8 heads x 128 bf16: 64 MiB, enough that
    // later layers are still in flight when layer 0 is ready.
    let mut s = spec(Kind::FlashAttn, Dtype::Bf16, 8, 64, 16);
    s.num_kv_heads = 8;
    s.head_dim = 128;
    let toks = tokens(32 * 64, 11);
    let root = dir.path().join("layers");
    std::fs::create_dir_all(&root).unwrap();
    let paths = write_chunks(&root, &s, &toks);
    drop_from_cache(&paths); // cold: later layers are still being read from the device
    let loader = open(&root, &s, IoMode::Direct);
    let (nb, bs) = (toks.len() / 16, 16);
    let mut table: Vec<u32> = (0..nb as u32).collect();
    Rng(5).shuffle(&mut table);
    let map = BlockMap::Blocks(&table);
    let req = LoadRequest {
        tokens: &toks,
        ..Default::default()
    };
    let len = arena_len(&s, nb, bs);
    let mut host = vec![SENTINEL; len];
    // SAFETY: covers `host`, read after the load.
    let hl = unsafe { layout_at(&s, Kind::FlashAttn, nb, bs, host.as_mut_ptr()) };
    loader
        .load_request(&req, &Dest::host(&hl, map))
        .unwrap()
        .wait()
        .unwrap();
    let per_layer = len / 8;

    let ctx = cudarc::driver::CudaContext::new(b.probe().device).unwrap();
    let engine = ctx.new_stream().unwrap();
    for (layer, raw_event) in [(0usize, false), (3, true)] {
        let arena = device_arena(&b, len);
        let snapshot = b.device().alloc(per_layer).unwrap();
        // SAFETY: covers the device arena.
        let dl = unsafe { layout_at(&s, Kind::FlashAttn, nb, bs, arena.ptr() as *mut u8) };
        // SAFETY: device memory of b's context, alive until the handle is waited for.
        let h = unsafe { b.load(&loader, &req, &dl, &map) }.unwrap();
        if raw_event {
            // The engine takes the raw event and waits itself (what torch would do).
            if let Some(ev) = h.layer_event(layer).unwrap() {
                // SAFETY: a live event of the backend; engine is a live stream of the same
                // (primary) context.
                unsafe {
                    cu::stream::wait_event(
                        engine.cu_stream(),
                        ev as _,
                        cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .unwrap();
            }
        } else {
            // SAFETY: engine is a live stream of the backend's (primary) context.
            unsafe { h.wait_layer(layer, Some(engine.cu_stream() as _)) }.unwrap();
        }
        let src = arena.ptr() + (layer * per_layer) as u64;
        // SAFETY: both ranges are per_layer device bytes; the copy is ordered after the
        // layer's copies by the wait above, on the engine stream.
        unsafe { cu::memcpy_dtod_async(snapshot.ptr(), src, per_layer, engine.cu_stream()) }
            .unwrap();
        engine.synchronize().unwrap();
        let mut got = vec![0u8; per_layer];
        // SAFETY: snapshot holds per_layer bytes, written by the synchronized copy.
        unsafe { b.device().dtoh(&mut got, snapshot.ptr()) }.unwrap();
        assert!(
            got == host[layer * per_layer..(layer + 1) * per_layer],
            "layer {layer} seen by the engine stream is incomplete (raw event: {raw_event})"
        );
        let st = h.wait().unwrap();
        eprintln!(
            "layer {layer}: recorded after {:?}, load done after {:?}",
            st.layer_issued[layer], st.elapsed
        );
    }
}
