//! The loader's process counters move with what an engine does, through the Rust API and the
//! C ABI: lookups and their hit tokens, loads with their bytes and latency (per request and
//! per layer), a failed load, stores. One test in its own binary: the counters are
//! process-wide, so nothing else may run beside it.

use kvfs_loader::dir::{self, Layout};
use kvfs_loader::ffi::{KVFS_ERR_INVALID, KVFS_OK, KvfsMetrics, kvfs_latency_bound, kvfs_metrics};
use kvfs_loader::layout::{BlockMap, KvLayout, RawRegion};
use kvfs_loader::loader::{Dest, Loader};
use kvfs_loader::metrics::{LATENCY_BOUNDS, global};
use kvfs_loader::{Dtype, ModelSpec, SaltTag, synth_chunk};

fn c_metrics() -> KvfsMetrics {
    let mut m = std::mem::MaybeUninit::<KvfsMetrics>::uninit();
    // SAFETY: `m` is writable memory for one KvfsMetrics.
    assert_eq!(unsafe { kvfs_metrics(m.as_mut_ptr()) }, KVFS_OK);
    // SAFETY: kvfs_metrics returned OK, so it wrote every field.
    unsafe { m.assume_init() }
}

#[test]
fn counters_follow_lookups_loads_failures_and_stores() {
    let mut spec = ModelSpec::new("kvfs/metrics-test", Dtype::F16, 3, 2, 32);
    spec.chunk_tokens = 16;
    spec.group_tokens = 16;
    let d = tempfile::tempdir().unwrap();
    let toks: Vec<u32> = (0..48).collect();
    let mut parent = None;
    let mut file_bytes = 0u64;
    // Two of the three chunks are cached.
    for c in toks.chunks_exact(16).take(2) {
        let (meta, bytes) = synth_chunk(&spec, parent, SaltTag::NONE, c.to_vec()).unwrap();
        let path = Layout::Cache.chunk_path(d.path(), &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
        file_bytes += bytes.len() as u64;
    }
    let loader = Loader::open(d.path(), spec.clone(), b"").unwrap();
    let before = global().snapshot();
    let c_before = c_metrics();

    assert_eq!(loader.lookup(&toks), 32);
    let row = 2 * 32 * 2;
    let (blocks, block_size) = (4, 16);
    let mut bufs: Vec<Vec<u8>> = (0..3)
        .map(|_| vec![0; 2 * blocks * block_size * row])
        .collect();
    let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
    // SAFETY: the buffers outlive every load below and are not read while loads run.
    let layout = unsafe {
        KvLayout::vllm_flash_attn(&regions, blocks, block_size, 2, 32, Dtype::F16).unwrap()
    };
    let table = [0u32, 1, 2, 3];
    let dest = Dest::host(&layout, BlockMap::Blocks(&table));
    let stats = loader.load(&toks[..32], &dest).unwrap().wait().unwrap();
    // The third chunk is not there: the load fails.
    assert!(loader.load(&toks, &dest).unwrap().wait().is_err());
    let st = loader.store(&toks, &dest).unwrap();
    assert_eq!(st.written, 1);

    let after = global().snapshot();
    assert_eq!(after.lookups - before.lookups, 1);
    assert_eq!(after.lookup_tokens - before.lookup_tokens, 48);
    assert_eq!(after.hit_tokens - before.hit_tokens, 32);
    assert_eq!(after.loads - before.loads, 1);
    assert_eq!(after.load_failures - before.load_failures, 1);
    assert_eq!(after.chunks_loaded - before.chunks_loaded, 2);
    assert_eq!(after.tokens_loaded - before.tokens_loaded, 32);
    assert_eq!(after.bytes_loaded - before.bytes_loaded, stats.bytes_read);
    assert!(stats.bytes_read > 0 && stats.bytes_read <= file_bytes);
    assert_eq!(after.load_seconds.count - before.load_seconds.count, 1);
    let per_bucket: u64 = after.load_seconds.buckets.iter().sum();
    assert_eq!(per_bucket, after.load_seconds.count);
    assert!(
        after.load_seconds.sum_seconds - before.load_seconds.sum_seconds
            >= stats.elapsed.as_secs_f64() * 0.999
    );
    // One observation per layer of the finished load.
    assert_eq!(
        after.layer_ready_seconds.count - before.layer_ready_seconds.count,
        3
    );
    assert_eq!(after.stores - before.stores, 1);
    assert_eq!(after.chunks_stored - before.chunks_stored, 1);
    assert_eq!(after.bytes_stored - before.bytes_stored, st.bytes_written);

    // The C ABI reports the same counters.
    let c = c_metrics();
    assert_eq!(c.lookups - c_before.lookups, 1);
    assert_eq!(c.hit_tokens - c_before.hit_tokens, 32);
    assert_eq!(c.loads, after.loads);
    assert_eq!(c.load_failures, after.load_failures);
    assert_eq!(c.bytes_loaded, after.bytes_loaded);
    assert_eq!(c.load_seconds.count, after.load_seconds.count);
    assert_eq!(c.load_seconds.buckets, after.load_seconds.buckets);
    assert_eq!(c.layer_ready_seconds.count, after.layer_ready_seconds.count);
    assert_eq!(c.chunks_stored, after.chunks_stored);
    assert_eq!(kvfs_latency_bound(0), LATENCY_BOUNDS[0]);
    assert_eq!(kvfs_latency_bound(LATENCY_BOUNDS.len()), f64::INFINITY);
    // SAFETY: NULL is refused before any write.
    assert_eq!(
        unsafe { kvfs_metrics(std::ptr::null_mut()) },
        KVFS_ERR_INVALID
    );
}
