//! GPU round trips, run on a CUDA machine by `scripts/gpu-check`, once per forced path
//! (`KVFS_GPU_PATH=gds|compat|staging`): random layouts are loaded from real files into
//! device memory and stored back, and compared byte for byte with the host path.
//!
//! These tests are `#[ignore]`d so that `cargo test` passes where there is no GPU. A forced
//! path the machine cannot provide (typically `gds` without the nvidia-fs module) prints
//! why and skips, as a GPU without GDS is a normal configuration.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use kvfs_gds::direct::open_write;
use kvfs_gds::{
    GdsError, GpuLoader, GpuOptions, GpuPath, HostSink, ProbeOptions, ReadExtent, Ring,
};

mod common;
use common::{Rng, make_files, random_case, stream_of};

/// The loader for the path `KVFS_GPU_PATH` forces, probing cuFile in `dir` (GDS support
/// depends on the file system, and /tmp may be tmpfs).
fn loader(dir: &std::path::Path) -> Option<GpuLoader> {
    let mut opts = GpuOptions {
        probe: ProbeOptions::from_env().unwrap(),
        ..Default::default()
    };
    opts.probe.probe_dir = dir.to_path_buf();
    match GpuLoader::new(&opts) {
        Ok(l) if l.path() == GpuPath::HostOnly => {
            panic!("no CUDA device: these tests need one\n{}", l.probe())
        }
        Ok(l) => {
            eprintln!("{}", l.probe());
            Some(l)
        }
        // cuFile or nvidia-fs missing on a GPU machine is a normal configuration: skip.
        // No CUDA at all, or staging unavailable, means these tests cannot run: fail.
        Err(e @ GdsError::PathUnavailable { wanted, .. })
            if wanted != "staging" && kvfs_gds::probe::cuda_library().is_ok() =>
        {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("GPU loader failed: {e}"),
    }
}

/// Test files live on a real disk file system (cuFile wants O_DIRECT): the current
/// directory, or `KVFS_GDS_TEST_DIR`.
fn test_dir() -> tempfile::TempDir {
    let base =
        std::env::var_os("KVFS_GDS_TEST_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from);
    tempfile::tempdir_in(base).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check"]
fn device_load_and_store_match_the_host_path() {
    let dir = test_dir();
    let Some(mut gl) = loader(dir.path()) else {
        return;
    };
    let dev = gl.device().unwrap().clone();
    let mut rng = Rng(0xc0ff_ee00_1234_5678);
    let files = make_files(dir.path(), &mut rng);
    for round in 0..40 {
        let case = random_case(&mut rng, &files);
        // Host reference.
        let mut want = vec![0u8; case.dst_len];
        Ring::new(HostSink::new(&mut want), 2, 8192)
            .unwrap()
            .load_extents(&case.extents, &case.plan)
            .unwrap();
        // Device: an arena pre-filled with zeros, same layout at the arena's address.
        let arena = dev.alloc(case.dst_len).unwrap();
        // SAFETY: the arena holds dst_len device bytes of the loader's context, and the plan
        // placed at its address stays inside it (random_case sizes dst_len to the plan).
        unsafe { dev.htod(arena.ptr(), &vec![0u8; case.dst_len]) }.unwrap();
        let plan = case.plan_at(arena.ptr());
        // SAFETY: as above; nothing else uses the arena until the synchronize below.
        unsafe { gl.load_extents(&case.extents, &plan) }.unwrap();
        for l in 0..plan.layers() {
            assert!(gl.layer_event(l).is_some(), "layer {l} has an event");
        }
        gl.synchronize().unwrap();
        let mut got = vec![0u8; case.dst_len];
        // SAFETY: the arena holds dst_len bytes; the load is synchronized.
        unsafe { dev.dtoh(&mut got, arena.ptr()) }.unwrap();
        assert!(
            got == want,
            "round {round} ({}): device load differs from host",
            gl.path()
        );

        // Store: random device bytes, gathered into two files at aligned offsets.
        let src: Vec<u8> = (0..case.dst_len).map(|_| rng.next() as u8).collect();
        // SAFETY: src has dst_len bytes, the arena's size.
        unsafe { dev.htod(arena.ptr(), &src) }.unwrap();
        let total = plan.src_len();
        let mut chunk = vec![0u8; total as usize];
        for r in case.plan.runs() {
            chunk[r.src as usize..(r.src + r.len) as usize]
                .copy_from_slice(&src[r.dst as usize..(r.dst + r.len) as usize]);
        }
        let p0 = dir.path().join(format!("s{round}a"));
        let p1 = dir.path().join(format!("s{round}b"));
        let (o0, o1) = (open_write(&p0).unwrap(), open_write(&p1).unwrap());
        let cut = rng.below(total + 1);
        let ext = [
            ReadExtent {
                file: o0.file.as_raw_fd(),
                offset: 8192,
                len: cut,
            },
            ReadExtent {
                file: o1.file.as_raw_fd(),
                offset: 0,
                len: total - cut,
            },
        ];
        // SAFETY: the plan's runs lie in the arena, which nothing writes during the store.
        unsafe { gl.store_extents(&ext, &plan) }.unwrap();
        drop((o0, o1));
        if cut > 0 {
            let a = std::fs::read(&p0).unwrap();
            assert_eq!(
                &a[8192..],
                &chunk[..cut as usize],
                "round {round}: stored file a"
            );
        }
        assert_eq!(
            std::fs::read(&p1).unwrap(),
            &chunk[cut as usize..],
            "round {round}: file b"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-check"]
fn engine_stream_waits_for_each_layer() {
    let dir = test_dir();
    let Some(mut gl) = loader(dir.path()) else {
        return;
    };
    let dev = gl.device().unwrap().clone();
    let mut rng = Rng(42);
    let files = make_files(dir.path(), &mut rng);
    let case = loop {
        let c = random_case(&mut rng, &files);
        if c.plan.layers() >= 2 {
            break c;
        }
    };
    let stream_bytes = stream_of(&case.extents, &files);
    let mut want = vec![0u8; case.dst_len];
    case.plan.apply_host(&stream_bytes, &mut want).unwrap();
    let arena = dev.alloc(case.dst_len).unwrap();
    // SAFETY: the arena holds dst_len device bytes; the plan placed at it stays inside.
    unsafe { dev.htod(arena.ptr(), &vec![0u8; case.dst_len]) }.unwrap();
    let plan = case.plan_at(arena.ptr());
    // SAFETY: as above; the arena is read only after the engine stream waited for the load.
    unsafe { gl.load_extents(&case.extents, &plan) }.unwrap();
    // An engine stream in the same (primary) context waits on the last layer only.
    let ctx = cudarc::driver::CudaContext::new(gl.probe().device).unwrap();
    let engine = ctx.new_stream().unwrap();
    let last = plan.layers() - 1;
    // SAFETY: engine is a live stream of the primary context the loader also uses.
    unsafe { gl.wait_layer(last, engine.cu_stream() as _) }.unwrap();
    engine.synchronize().unwrap();
    let mut got = vec![0u8; case.dst_len];
    // SAFETY: the arena holds dst_len bytes; the load is complete.
    unsafe { dev.dtoh(&mut got, arena.ptr()) }.unwrap();
    assert!(got == want);
}
