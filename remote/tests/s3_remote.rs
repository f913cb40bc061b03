//! The remote tier against a real S3 server over HTTP: the in-process s3s server by default,
//! Garage (or any server) when `KVFS_TEST_S3_ENDPOINT` is set (see `scripts/garage env`).

#[path = "../../tests/support/s3_server.rs"]
mod s3_server;

use hyper::Method;
use kvfs_loader::dir::{Layout, commit_file};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use kvfs_remote::{Backpressure, PutOutcome, Remote, RemoteError};
use s3_server::{Fault, FaultProxy, InProcessS3, S3Target, closed_port_endpoint};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn spec() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

/// A chain of `n` small chunks (16 tokens each): (key, bytes).
fn chain(n: usize, seed: u32) -> Vec<(ChunkKey, Vec<u8>)> {
    let spec = spec();
    let mut parent = None;
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..16)
                .map(|t| seed.wrapping_mul(7919) + (i as u32) * 16 + t)
                .collect();
            let (meta, bytes) = synth_chunk(&spec, parent, SaltTag::NONE, tokens).unwrap();
            parent = Some(meta.key);
            (meta.key, bytes)
        })
        .collect()
}

fn ns() -> String {
    spec().namespace_dir()
}

/// Commits chunks into a cache dir the way the store does, returns their paths.
fn commit_local(root: &Path, chunks: &[(ChunkKey, Vec<u8>)]) -> Vec<std::path::PathBuf> {
    chunks
        .iter()
        .map(|(k, b)| {
            let p = Layout::Cache.chunk_path(root, &ns(), k);
            commit_file(&p, b, false).unwrap();
            p
        })
        .collect()
}

#[test]
fn upload_fetch_round_trip_and_misses() {
    let t = S3Target::new();
    let r = Remote::open(t.config(), None).unwrap();
    let c = chain(2, 1);
    assert_eq!(
        r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        r.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
    assert_eq!(
        r.object_size(&ns(), &c[0].0).unwrap(),
        Some(c[0].1.len() as u64)
    );
    // A miss is remembered: the second ask sends nothing.
    assert_eq!(r.fetch(&ns(), &c[1].0).unwrap(), None);
    let before = r.stats();
    assert_eq!(r.fetch(&ns(), &c[1].0).unwrap(), None);
    let after = r.stats();
    assert_eq!(after.fetches, before.fetches, "negative cache must answer");
    assert_eq!(after.negative_hits, before.negative_hits + 1);
    // Uploading the key forgets the miss.
    r.upload(&ns(), &c[1].0, c[1].1.clone()).unwrap();
    assert_eq!(
        r.fetch(&ns(), &c[1].0).unwrap().as_deref(),
        Some(&c[1].1[..])
    );
    // Same key again: idempotent success.
    assert_eq!(
        r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(r.list_chunks(&ns()).unwrap().len(), 2);
    assert_eq!(r.list_namespaces().unwrap(), vec![ns()]);
}

#[test]
fn negative_cache_expires() {
    let t = S3Target::new();
    let mut cfg = t.config();
    cfg.negative_ttl = Duration::from_millis(200);
    let writer = Remote::open(t.config(), None).unwrap();
    let reader = Remote::open(cfg, None).unwrap();
    let c = chain(1, 2);
    assert_eq!(reader.fetch(&ns(), &c[0].0).unwrap(), None);
    writer.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        reader.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
}

#[test]
fn bad_names_are_typed_errors() {
    let t = S3Target::new();
    let r = Remote::open(t.config(), None).unwrap();
    for bad in ["../etc", "x", "Model-0123456789abcdef", ""] {
        assert!(
            matches!(r.fetch(bad, &ChunkKey([0; 32])), Err(RemoteError::Name(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        r.committed(&ns(), &ChunkKey([0; 32]), Path::new("/nonexistent")),
        Err(RemoteError::NoQueue)
    ));
}

#[test]
fn invalid_objects_are_never_served() {
    let t = S3Target::new();
    let r = Remote::open(t.config(), None).unwrap();
    let c = chain(3, 3);
    // 1. Chunk 1's bytes stored under chunk 0's name.
    r.upload(&ns(), &c[0].0, c[1].1.clone()).unwrap();
    // 2. Chunk 1 truncated.
    r.upload(&ns(), &c[1].0, c[1].1[..c[1].1.len() - 4096].to_vec())
        .unwrap();
    // 3. Chunk 2 with one payload bit flipped.
    let mut bad = c[2].1.clone();
    let n = bad.len();
    bad[n - 5000] ^= 1;
    r.upload(&ns(), &c[2].0, bad).unwrap();
    // 4. A valid chunk of this namespace stored under another namespace's directory.
    let other = ModelSpec::preset("llama-3-8b").unwrap().namespace_dir();
    r.upload(&other, &c[0].0, c[0].1.clone()).unwrap();
    for (ns_dir, key) in [
        (ns(), c[0].0),
        (ns(), c[1].0),
        (ns(), c[2].0),
        (other, c[0].0),
    ] {
        assert_eq!(r.fetch(&ns_dir, &key).unwrap(), None, "{ns_dir}/{key}");
    }
    assert_eq!(r.stats().corrupt, 4);
    // A writer that finds a wrong-size object under its key replaces it.
    assert_eq!(
        r.upload(&ns(), &c[1].0, c[1].1.clone()).unwrap(),
        PutOutcome::Replaced
    );
    r.forget_miss(&ns(), &c[1].0);
    assert_eq!(
        r.fetch(&ns(), &c[1].0).unwrap().as_deref(),
        Some(&c[1].1[..])
    );
}

#[test]
fn concurrent_misses_share_one_fetch() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let r = Arc::new(Remote::open(t.config_via(&proxy.endpoint), None).unwrap());
    let c = chain(1, 4);
    r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap();
    // Slow GETs so that all callers overlap.
    proxy.arm(
        Some(Method::GET),
        Fault::Delay(Duration::from_millis(500)),
        100,
    );
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (r, b, key) = (r.clone(), barrier.clone(), c[0].0);
            std::thread::spawn(move || {
                b.wait();
                r.fetch(&ns(), &key).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().as_deref(), Some(&c[0].1[..]));
    }
    let s = r.stats();
    assert_eq!(s.fetches, 1, "{s:?}");
    assert_eq!(s.coalesced, n as u64 - 1, "{s:?}");
}

#[test]
fn two_hosts_write_the_same_key_at_once() {
    let t = S3Target::new();
    let a = Arc::new(Remote::open(t.config(), None).unwrap());
    let b = Arc::new(Remote::open(t.config(), None).unwrap());
    let c = chain(20, 5);
    let barrier = Arc::new(Barrier::new(2));
    let run = |r: Arc<Remote>, chunks: Vec<(ChunkKey, Vec<u8>)>, bar: Arc<Barrier>| {
        std::thread::spawn(move || {
            bar.wait();
            chunks
                .into_iter()
                .map(|(k, bytes)| r.upload(&ns(), &k, bytes).unwrap())
                .collect::<Vec<_>>()
        })
    };
    let ha = run(a.clone(), c.clone(), barrier.clone());
    let hb = run(b.clone(), c.clone(), barrier);
    let (oa, ob) = (ha.join().unwrap(), hb.join().unwrap());
    for (x, y) in oa.iter().zip(&ob) {
        // Exactly one of the two created each object (conditional put), or with a server
        // that races HEAD-then-PUT both did: either way the object is whole.
        assert!(
            matches!(
                (x, y),
                (PutOutcome::Created, PutOutcome::AlreadyPresent)
                    | (PutOutcome::AlreadyPresent, PutOutcome::Created)
                    | (PutOutcome::Created, PutOutcome::Created)
            ),
            "{x:?} {y:?}"
        );
    }
    let reader = Remote::open(t.config(), None).unwrap();
    for (k, bytes) in &c {
        assert_eq!(reader.fetch(&ns(), k).unwrap().as_deref(), Some(&bytes[..]));
    }
}

#[test]
fn server_without_conditional_put_falls_back() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    proxy.always(Fault::NoConditionalPut);
    let r = Remote::open(t.config_via(&proxy.endpoint), None).unwrap();
    let c = chain(2, 6);
    assert_eq!(
        r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(
        r.upload(&ns(), &c[1].0, c[1].1.clone()).unwrap(),
        PutOutcome::Created
    );
    assert!(r.stats().conditional_fallbacks >= 2, "{:?}", r.stats());
    assert_eq!(
        r.fetch(&ns(), &c[1].0).unwrap().as_deref(),
        Some(&c[1].1[..])
    );
}

#[test]
fn write_behind_queue_uploads_and_writes_namespace_json() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let json = spec().to_json();
    std::fs::create_dir_all(dir.path().join(ns())).unwrap();
    std::fs::write(dir.path().join(ns()).join("namespace.json"), &json).unwrap();
    let r = Remote::open(t.config(), Some(dir.path())).unwrap();
    let c = chain(30, 7);
    for ((k, _), p) in c.iter().zip(commit_local(dir.path(), &c)) {
        r.committed(&ns(), k, &p).unwrap();
    }
    assert!(
        r.wait_uploaded(Duration::from_secs(30)),
        "pending {}",
        r.pending_uploads()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join(".uploads"))
            .unwrap()
            .count(),
        0
    );
    let reader = Remote::open(t.config(), None).unwrap();
    for (k, bytes) in &c {
        assert_eq!(reader.fetch(&ns(), k).unwrap().as_deref(), Some(&bytes[..]));
    }
    assert_eq!(
        reader.namespace_json(&ns()).unwrap().as_deref(),
        Some(json.as_bytes())
    );
}

#[test]
fn write_through_uploads_before_returning() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = t.config();
    cfg.write_through = true;
    let r = Remote::open(cfg, Some(dir.path())).unwrap();
    let c = chain(3, 8);
    let reader = Remote::open(t.config(), None).unwrap();
    for ((k, bytes), p) in c.iter().zip(commit_local(dir.path(), &c)) {
        r.committed(&ns(), k, &p).unwrap();
        assert_eq!(
            reader.object_size(&ns(), k).unwrap(),
            Some(bytes.len() as u64)
        );
    }
    // Without a namespace.json locally, one is built from a chunk header.
    let json = String::from_utf8(reader.namespace_json(&ns()).unwrap().unwrap()).unwrap();
    assert!(json.contains(&spec().namespace_id().to_hex()), "{json}");
}

#[test]
fn outage_queues_then_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let down = closed_port_endpoint();
    let t = S3Target::new();
    let mut cfg = t.config_via(&down);
    cfg.request_timeout = Duration::from_secs(2);
    let c = chain(40, 9);
    {
        let r = Remote::open(cfg.clone(), Some(dir.path())).unwrap();
        for ((k, _), p) in c.iter().zip(commit_local(dir.path(), &c)) {
            r.committed(&ns(), k, &p).unwrap();
        }
        // Reads fail with an error (not a wrong answer) while the server is away.
        assert!(r.fetch(&ns(), &c[0].0).is_err());
        assert_eq!(r.pending_uploads(), 40);
        assert!(!r.wait_uploaded(Duration::from_millis(300)));
    } // "process exit" with everything still queued
    assert_eq!(
        std::fs::read_dir(dir.path().join(".uploads"))
            .unwrap()
            .count(),
        40
    );
    // The server comes back (here: reachable under the real endpoint); a new process resumes.
    let r = Remote::open(t.config(), Some(dir.path())).unwrap();
    assert!(
        r.wait_uploaded(Duration::from_secs(60)),
        "pending {}",
        r.pending_uploads()
    );
    for (k, bytes) in &c {
        assert_eq!(r.fetch(&ns(), k).unwrap().as_deref(), Some(&bytes[..]));
    }
}

#[test]
fn uploads_resume_when_the_same_endpoint_comes_back() {
    // Only meaningful with the in-process server: bring it up on a port that was closed.
    if std::env::var("KVFS_TEST_S3_ENDPOINT").is_ok() {
        eprintln!("skipping: needs the in-process server (it restarts it on a fixed port)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoint = closed_port_endpoint();
    let t = S3Target::new();
    let mut cfg = t.config_via(&endpoint);
    cfg.request_timeout = Duration::from_secs(2);
    let r = Remote::open(cfg, Some(dir.path())).unwrap();
    let c = chain(10, 10);
    for ((k, _), p) in c.iter().zip(commit_local(dir.path(), &c)) {
        r.committed(&ns(), k, &p).unwrap();
    }
    // Local work goes on meanwhile.
    let more = chain(15, 10);
    for ((k, _), p) in more[10..].iter().zip(commit_local(dir.path(), &more[10..])) {
        r.committed(&ns(), k, &p).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.pending_uploads(), 15);
    let server = InProcessS3::start_at(endpoint.trim_start_matches("http://"));
    assert!(
        r.wait_uploaded(Duration::from_secs(60)),
        "pending {}",
        r.pending_uploads()
    );
    for (k, _) in &more {
        let p = server
            .root
            .path()
            .join(s3_server::TEST_BUCKET)
            .join(&t.prefix)
            .join(ns())
            .join(k.file_name());
        assert!(p.exists(), "{}", p.display());
    }
}

#[test]
fn backpressure_fails_or_blocks_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let t = S3Target::new();
    let mut cfg = t.config_via(&closed_port_endpoint());
    cfg.max_queued = 2;
    cfg.when_full = Backpressure::Fail;
    let c = chain(4, 11);
    let paths = commit_local(dir.path(), &c);
    let r = Remote::open(cfg.clone(), Some(dir.path())).unwrap();
    r.committed(&ns(), &c[0].0, &paths[0]).unwrap();
    r.committed(&ns(), &c[1].0, &paths[1]).unwrap();
    assert!(matches!(
        r.committed(&ns(), &c[2].0, &paths[2]),
        Err(RemoteError::QueueFull { pending: 2 })
    ));
    drop(r);
    cfg.when_full = Backpressure::Block;
    cfg.block_timeout = Duration::from_millis(300);
    let r = Remote::open(cfg, Some(dir.path())).unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        r.committed(&ns(), &c[3].0, &paths[3]),
        Err(RemoteError::QueueFull { .. })
    ));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    // Nothing committed locally was touched.
    for ((_, bytes), p) in c.iter().zip(&paths) {
        assert_eq!(&std::fs::read(p).unwrap(), bytes);
    }
}

#[test]
fn prefix_lookup_counts_leading_chunks_in_few_round_trips() {
    let t = S3Target::new();
    let r = Remote::open(t.config(), None).unwrap();
    let c = chain(512, 12);
    let keys: Vec<ChunkKey> = c.iter().map(|(k, _)| *k).collect();
    let none = r.prefix_lookup(&ns(), &keys).unwrap();
    assert_eq!(none.present, 0);
    assert_eq!(none.round_trips, 1);
    let hole = c[100].0;
    std::thread::scope(|s| {
        for part in c[..300].chunks(75) {
            let r = &r;
            s.spawn(move || {
                for (k, b) in part {
                    if *k != hole {
                        r.upload(&ns(), k, b.clone()).unwrap();
                    }
                }
            });
        }
    });
    // A hole at 100 (write-behind order is not guaranteed): the answer is 100, not 300.
    let holed = r.prefix_lookup(&ns(), &keys).unwrap();
    assert_eq!(holed.present, 100, "{holed:?}");
    r.upload(&ns(), &c[100].0, c[100].1.clone()).unwrap();
    let partial = r.prefix_lookup(&ns(), &keys).unwrap();
    assert_eq!(partial.present, 300, "{partial:?}");
    assert!(partial.round_trips <= 8, "{partial:?}");
    assert_eq!(r.prefix_lookup(&ns(), &keys[..0]).unwrap().present, 0);
    assert_eq!(r.prefix_lookup(&ns(), &keys[..1]).unwrap().present, 1);
}

#[test]
fn push_from_one_host_pull_on_another() {
    let t = S3Target::new();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c = chain(25, 13);
    commit_local(a.path(), &c);
    std::fs::write(a.path().join(ns()).join("namespace.json"), spec().to_json()).unwrap();
    let r = Remote::open(t.config(), None).unwrap();
    let events = std::sync::Mutex::new(0u64);
    let report = r
        .push(a.path(), None, &|_| *events.lock().unwrap() += 1)
        .unwrap();
    assert_eq!(
        (report.transferred, report.failed, report.skipped),
        (25, 0, 0)
    );
    assert_eq!(*events.lock().unwrap(), 26); // planned + 25
    assert_eq!(r.push(a.path(), Some(&ns()), &|_| {}).unwrap().skipped, 25);
    let pulled = r.pull(b.path(), None, &|_| {}).unwrap();
    assert_eq!((pulled.transferred, pulled.failed), (25, 0));
    for (k, bytes) in &c {
        assert_eq!(
            &std::fs::read(Layout::Cache.chunk_path(b.path(), &ns(), k)).unwrap(),
            bytes
        );
    }
    assert_eq!(
        std::fs::read_to_string(b.path().join(ns()).join("namespace.json")).unwrap(),
        spec().to_json()
    );
    // Resumable: a second pull transfers nothing.
    let again = r.pull(b.path(), Some(&ns()), &|_| {}).unwrap();
    assert_eq!((again.transferred, again.skipped), (0, 25));
}

#[test]
fn faults_never_serve_a_wrong_byte_nor_lose_an_upload() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = t.config_via(&proxy.endpoint);
    cfg.request_timeout = Duration::from_millis(1500);
    let faults = [
        Fault::Unavailable,
        Fault::Drop,
        Fault::CutBody,
        Fault::ShortBody,
        Fault::Corrupt,
        Fault::Delay(Duration::from_secs(3)),
    ];
    // Each fault alone, on a GET of a valid object: never a wrong byte.
    let clean = Remote::open(t.config(), None).unwrap();
    let c = chain(60, 14);
    for (k, b) in &c[..6] {
        clean.upload(&ns(), k, b.clone()).unwrap();
    }
    let mut cfg_nocache = cfg.clone();
    cfg_nocache.negative_ttl = Duration::from_millis(1);
    let reader = Remote::open(cfg_nocache, None).unwrap();
    for (f, (k, b)) in faults.iter().zip(&c[..6]) {
        proxy.arm(Some(Method::GET), *f, 3); // more than the client's retries
        // A fault may make this a miss or an error, never wrong bytes.
        if let Ok(Some(got)) = reader.fetch(&ns(), k) {
            assert_eq!(&got, b, "{f:?} served wrong bytes");
        }
        proxy.clear();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            reader.fetch(&ns(), k).unwrap().as_deref(),
            Some(&b[..]),
            "{f:?}"
        );
    }
    assert!(reader.stats().corrupt >= 2, "{:?}", reader.stats());
    // Random faults on everything while uploading through the queue: all chunks arrive.
    proxy.chaos(0.3, 42, &faults);
    let w = Remote::open(cfg, Some(dir.path())).unwrap();
    for ((k, _), p) in c[6..].iter().zip(commit_local(dir.path(), &c[6..])) {
        w.committed(&ns(), k, &p).unwrap();
    }
    let mut served = 0;
    for _ in 0..3 {
        for (k, b) in &c[..6] {
            if let Ok(Some(got)) = reader.fetch(&ns(), k) {
                assert_eq!(&got, b);
                served += 1;
            }
        }
    }
    assert!(served > 0);
    assert!(
        w.wait_uploaded(Duration::from_secs(120)),
        "pending {}",
        w.pending_uploads()
    );
    proxy.clear();
    for (k, b) in &c {
        assert_eq!(clean.fetch(&ns(), k).unwrap().as_deref(), Some(&b[..]));
    }
    assert!(
        proxy
            .faults_applied
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn called_inside_a_runtime_is_refused() {
    let t = S3Target::new();
    let r = Remote::open(t.config(), None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let res = rt.block_on(async { r.fetch(&ns(), &ChunkKey([1; 32])) });
    assert!(matches!(res, Err(RemoteError::InsideRuntime)));
}

#[test]
fn pull_never_commits_a_damaged_download_and_resumes() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let c = chain(6, 15);
    let clean = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        clean.upload(&ns(), k, b.clone()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = t.config_via(&proxy.endpoint);
    cfg.download_concurrency = 1;
    let r = Remote::open(cfg, None).unwrap();
    // One fault per GET (more than the client's retries for the first two).
    for f in [Fault::Corrupt, Fault::ShortBody, Fault::CutBody] {
        proxy.arm_path(Some(Method::GET), ".kvc", f, 3);
    }
    let first = r.pull(dir.path(), Some(&ns()), &|_| {}).unwrap();
    assert!(first.failed >= 2, "{first:?}");
    for (k, b) in &c {
        let p = Layout::Cache.chunk_path(dir.path(), &ns(), k);
        if let Ok(got) = std::fs::read(&p) {
            assert_eq!(&got, b, "a damaged download was committed");
        }
    }
    proxy.clear();
    let second = r.pull(dir.path(), Some(&ns()), &|_| {}).unwrap();
    assert_eq!(second.failed, 0);
    assert_eq!(first.transferred + second.transferred, 6);
    for (k, b) in &c {
        assert_eq!(
            &std::fs::read(Layout::Cache.chunk_path(dir.path(), &ns(), k)).unwrap(),
            b
        );
    }
    let leftovers = kvfs_loader::dir::sweep_temporaries(dir.path(), Duration::ZERO).unwrap();
    assert_eq!(leftovers, 0, "no temporary file may remain");
}

#[test]
fn two_processes_sharing_a_cache_dir_share_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let t = S3Target::new();
    // A cannot reach the bucket; B, on the same cache directory, can.
    let a = Remote::open(t.config_via(&closed_port_endpoint()), Some(dir.path())).unwrap();
    let c = chain(10, 16);
    for ((k, _), p) in c.iter().zip(commit_local(dir.path(), &c)) {
        a.committed(&ns(), k, &p).unwrap();
    }
    assert_eq!(a.pending_uploads(), 10);
    let b = Remote::open(t.config(), Some(dir.path())).unwrap();
    assert!(b.wait_uploaded(Duration::from_secs(60)));
    // A sees the queue drained too (the marker directory is the authority).
    assert!(a.wait_uploaded(Duration::from_secs(5)));
    for (k, bytes) in &c {
        assert_eq!(b.fetch(&ns(), k).unwrap().as_deref(), Some(&bytes[..]));
    }
}

// ---- The tier heals itself (issue 19) ----

/// The object store of `t` itself, to damage objects the way a broken writer would.
fn raw_store(t: &S3Target) -> object_store::aws::AmazonS3 {
    t.config().build_store().unwrap()
}

fn object_path(t: &S3Target, ns_dir: &str, name: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("{}/{ns_dir}/{name}", t.prefix))
}

/// Puts `bytes` at `name` of `ns_dir`, with `digest` as the payload-digest metadata.
fn raw_put(t: &S3Target, ns_dir: &str, name: &str, bytes: Vec<u8>, digest: Option<[u8; 32]>) {
    use object_store::{Attribute, AttributeValue, Attributes, ObjectStore, PutOptions};
    let mut attributes = Attributes::new();
    if let Some(d) = digest {
        attributes.insert(
            Attribute::Metadata(kvfs_remote::DIGEST_METADATA.into()),
            AttributeValue::from(ChunkKey(d).to_hex()),
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(raw_store(t).put_opts(
        &object_path(t, ns_dir, name),
        bytes.into(),
        PutOptions {
            attributes,
            ..Default::default()
        },
    ))
    .unwrap();
}

fn payload_digest(bytes: &[u8]) -> [u8; 32] {
    kvfs_loader::ChunkView::parse(bytes, kvfs_loader::Verify::Full)
        .unwrap()
        .header
        .payload_digest
}

fn flip(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = b.len();
    b[n - 100] ^= 0x20;
    b
}

#[test]
fn push_repairs_truncated_and_foreign_objects() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let c = chain(4, 20);
    commit_local(dir.path(), &c);
    std::fs::write(
        dir.path().join(ns()).join("namespace.json"),
        spec().to_json(),
    )
    .unwrap();
    let r = Remote::open(t.config(), None).unwrap();
    // A truncated object, and another chunk's (valid) bytes of the same size under a name.
    raw_put(
        &t,
        &ns(),
        &c[0].0.file_name(),
        c[0].1[..c[0].1.len() / 2].to_vec(),
        None,
    );
    raw_put(
        &t,
        &ns(),
        &c[1].0.file_name(),
        c[2].1.clone(),
        Some(payload_digest(&c[2].1)),
    );
    assert_eq!(c[1].1.len(), c[2].1.len());
    r.upload(&ns(), &c[2].0, c[2].1.clone()).unwrap();
    let first = r.push(dir.path(), None, &|_| {}).unwrap();
    assert_eq!(
        (
            first.repaired,
            first.transferred,
            first.skipped,
            first.failed
        ),
        (2, 3, 1, 0),
        "{first:?}"
    );
    assert_eq!(r.stats().repaired, 2);
    let reader = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        assert_eq!(reader.fetch(&ns(), k).unwrap().as_deref(), Some(&b[..]));
    }
    // Now everything matches by size and digest: nothing is sent, nothing is read back.
    let before = r.stats();
    let again = r.push(dir.path(), None, &|_| {}).unwrap();
    assert_eq!(
        (again.skipped, again.transferred, again.repaired),
        (4, 0, 0)
    );
    assert_eq!(r.stats().fetches, before.fetches);
}

#[test]
fn push_verify_finds_damage_under_a_correct_digest() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let c = chain(3, 21);
    // This host holds chunks 0 and 2; chunk 1 is only in the bucket.
    commit_local(dir.path(), &[c[0].clone(), c[2].clone()]);
    let r = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        r.upload(&ns(), k, b.clone()).unwrap();
    }
    // Bytes damaged at rest keep the digest the uploader recorded.
    for (k, b) in &c[..2] {
        raw_put(&t, &ns(), &k.file_name(), flip(b), Some(payload_digest(b)));
    }
    let push = r.push(dir.path(), None, &|_| {}).unwrap();
    assert_eq!(
        (push.skipped, push.repaired),
        (2, 0),
        "a push trusts matching digests"
    );
    let events = std::sync::Mutex::new(Vec::new());
    let scrub = r
        .scrub(dir.path(), None, &|e| events.lock().unwrap().push(e))
        .unwrap();
    assert_eq!(
        (scrub.repaired, scrub.damaged, scrub.verified, scrub.failed),
        (1, 1, 1, 0),
        "{scrub:?}"
    );
    let events = events.into_inner().unwrap();
    assert!(events.iter().any(|e| matches!(e,
        kvfs_remote::SyncEvent::Damaged { key, cause, .. } if *key == c[1].0 && cause.contains("digest"))),
        "{events:?}");
    let reader = Remote::open(t.config(), None).unwrap();
    assert_eq!(
        reader.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
    assert_eq!(reader.fetch(&ns(), &c[1].0).unwrap(), None, "still damaged");
    assert_eq!(reader.stats().corrupt, 1);
}

#[test]
fn a_reader_records_damage_and_its_next_commit_repairs_it() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let c = chain(1, 22);
    raw_put(&t, &ns(), &c[0].0.file_name(), flip(&c[0].1), None);
    let r = Remote::open(t.config(), Some(dir.path())).unwrap();
    // No verified copy here: a miss, counted and remembered.
    assert_eq!(r.fetch(&ns(), &c[0].0).unwrap(), None);
    assert_eq!(r.stats().corrupt, 1);
    // The engine computes the chunk and the store commits it: its upload repairs the object.
    let paths = commit_local(dir.path(), &c);
    r.committed(&ns(), &c[0].0, &paths[0]).unwrap();
    assert!(r.wait_uploaded(Duration::from_secs(30)));
    assert_eq!(r.stats().repaired, 1, "{:?}", r.stats());
    let reader = Remote::open(t.config(), None).unwrap();
    assert_eq!(
        reader.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
}

#[test]
fn a_repair_never_replaces_a_good_object_that_landed_first() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let c = chain(1, 23);
    let name = c[0].0.file_name();
    raw_put(&t, &ns(), &name, flip(&c[0].1), None);
    let a = Arc::new(Remote::open(t.config_via(&proxy.endpoint), None).unwrap());
    let b = Remote::open(t.config(), None).unwrap();
    // Both hosts see the damage.
    assert_eq!(a.fetch(&ns(), &c[0].0).unwrap(), None);
    assert_eq!(b.fetch(&ns(), &c[0].0).unwrap(), None);
    // A's overwrite is slow to arrive; B repairs first.
    proxy.arm_path(
        Some(Method::PUT),
        &name,
        Fault::Delay(Duration::from_secs(2)),
        1,
    );
    let h = {
        let (a, key, bytes) = (a.clone(), c[0].0, c[0].1.clone());
        std::thread::spawn(move || a.upload(&ns(), &key, bytes).unwrap())
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap(),
        PutOutcome::Replaced
    );
    let late = h.join().unwrap();
    assert_eq!(b.stats().repaired, 1);
    if t.in_process {
        // A's If-Match names the damaged object's ETag: refused (412), A looks again and
        // finds it good.
        assert_eq!(late, PutOutcome::AlreadyPresent);
        assert_eq!(
            (a.stats().repaired, a.stats().repair_races),
            (0, 1),
            "{:?}",
            a.stats()
        );
    } else {
        // Garage 2.5 ignores If-Match on PutObject (garage_api_s3 put.rs checks no
        // precondition): only the verified re-check guards, and an overwrite held up past it
        // lands. It can only write a verified chunk, which the read below checks.
        eprintln!("note: this server ignores If-Match on PUT; A's late repair was {late:?}");
    }
    let reader = Remote::open(t.config(), None).unwrap();
    assert_eq!(
        reader.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
}

#[test]
fn namespace_json_is_checked_before_commit_and_upload() {
    let t = S3Target::new();
    let c = chain(3, 24);
    let r = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        r.upload(&ns(), k, b.clone()).unwrap();
    }
    let other = ModelSpec::preset("llama-3-8b").unwrap();
    for bad in [b"not json at all".to_vec(), other.to_json().into_bytes()] {
        raw_put(&t, &ns(), "namespace.json", bad.clone(), None);
        let host = tempfile::tempdir().unwrap();
        let pulled = r.pull(host.path(), None, &|_| {}).unwrap();
        assert_eq!((pulled.transferred, pulled.failed), (3, 0));
        let got = std::fs::read(host.path().join(ns()).join("namespace.json")).unwrap();
        assert_ne!(got, bad, "a bad namespace.json was committed");
        kvfs_remote::nsjson::check(&got, &ns(), None).unwrap();
        assert!(String::from_utf8_lossy(&got).contains(&spec().namespace_id().to_hex()));
    }
    // A host with a bad local namespace.json pushes a checked one and replaces the bucket's.
    let host = tempfile::tempdir().unwrap();
    let more = chain(4, 24);
    commit_local(host.path(), &more);
    std::fs::write(host.path().join(ns()).join("namespace.json"), b"{}").unwrap();
    let pusher = Remote::open(t.config(), None).unwrap();
    assert_eq!(pusher.push(host.path(), None, &|_| {}).unwrap().failed, 0);
    let in_bucket = pusher.namespace_json(&ns()).unwrap().unwrap();
    kvfs_remote::nsjson::check(&in_bucket, &ns(), None).unwrap();
    // A valid one in the bucket is left as it is.
    let good = Remote::open(t.config(), None).unwrap();
    std::fs::write(
        host.path().join(ns()).join("namespace.json"),
        spec().to_json(),
    )
    .unwrap();
    good.push(host.path(), None, &|_| {}).unwrap();
    assert_eq!(good.namespace_json(&ns()).unwrap().unwrap(), in_bucket);
}

#[test]
fn listings_skip_names_they_cannot_parse_and_never_escape() {
    let t = S3Target::new();
    if !t.in_process {
        eprintln!(
            "skipping: object names with control characters can only be planted in the in-process server's directory"
        );
        return;
    }
    let r = Remote::open(t.config(), None).unwrap();
    let c = chain(40, 25);
    for (k, b) in &c {
        r.upload(&ns(), k, b.clone()).unwrap();
    }
    let nsdir = t.object_file(&format!("{}/{}", t.prefix, ns())).unwrap();
    let bad_chunk = nsdir.join("b\u{1}d.kvc");
    std::fs::write(&bad_chunk, b"x").unwrap();
    std::fs::create_dir_all(nsdir.join("sub")).unwrap();
    std::fs::write(nsdir.join("sub").join(c[0].0.file_name()), &c[0].1).unwrap();
    let bad_ns = t
        .object_file(&format!("{}/evil\u{2}-0123456789abcdef", t.prefix))
        .unwrap();
    std::fs::create_dir_all(&bad_ns).unwrap();
    std::fs::write(bad_ns.join(c[1].0.file_name()), &c[1].1).unwrap();
    assert_eq!(r.list_namespaces().unwrap(), vec![ns()]);
    let listed: Vec<ChunkKey> = r
        .list_chunks(&ns())
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    let mut want: Vec<ChunkKey> = c.iter().map(|x| x.0).collect();
    want.sort();
    assert_eq!(listed, want);
    assert!(r.stats().skipped_names >= 3, "{:?}", r.stats());
    let outer = tempfile::tempdir().unwrap();
    let cache = outer.path().join("cache");
    let pulled = r.pull(&cache, None, &|_| {}).unwrap();
    assert_eq!((pulled.transferred, pulled.failed), (40, 0));
    // Nothing was written beside the cache directory.
    let beside: Vec<_> = std::fs::read_dir(outer.path()).unwrap().collect();
    assert_eq!(beside.len(), 1);
}

#[test]
fn each_operation_has_its_own_timeout() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let c = chain(1, 26);
    Remote::open(t.config(), None)
        .unwrap()
        .upload(&ns(), &c[0].0, c[0].1.clone())
        .unwrap();
    let mut cfg = t.config_via(&proxy.endpoint);
    cfg.list_timeout = Duration::from_secs(1);
    cfg.first_byte_timeout = Duration::from_secs(1);
    cfg.request_timeout = Duration::from_secs(60);
    cfg.negative_ttl = Duration::from_millis(1);
    let r = Remote::open(cfg, None).unwrap();
    // A server that accepts connections and never answers.
    proxy.always(Fault::Delay(Duration::from_secs(30)));
    let timed_out = |what: &str, e: RemoteError, op: &str, key: &str| {
        assert!(
            matches!(e.unshared(), RemoteError::Timeout { op: o, .. } if *o == op),
            "{what}: {e:?}"
        );
        assert!(e.to_string().contains(key), "{what}: {e}");
    };
    let t0 = Instant::now();
    timed_out(
        "head",
        r.object_size(&ns(), &c[0].0).unwrap_err(),
        "HEAD",
        "list_timeout_s",
    );
    timed_out(
        "list",
        r.list_chunks(&ns()).unwrap_err(),
        "LIST",
        "list_timeout_s",
    );
    timed_out(
        "get",
        r.fetch(&ns(), &c[0].0).unwrap_err(),
        "GET",
        "first_byte_timeout_s",
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    proxy.clear();
    assert_eq!(
        r.fetch(&ns(), &c[0].0).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
    let d = kvfs_remote::S3Config::from_url("s3://b").unwrap();
    assert!(d.list_timeout < d.request_timeout && d.first_byte_timeout < d.request_timeout);
}

#[test]
fn a_missing_bucket_and_refused_credentials_are_named_on_every_path() {
    let t = S3Target::new();
    let dir = tempfile::tempdir().unwrap();
    let c = chain(2, 27);
    let paths = commit_local(dir.path(), &c);
    let mut missing = t.config();
    missing.bucket = format!("kvfs-missing-{}", std::process::id());
    let mut denied = t.config();
    denied.secret_access_key = Some(kvfs_remote::Secret::new("not-the-secret"));
    for (cfg, what) in [(missing, "does not exist"), (denied, "access denied")] {
        let r = Remote::open(cfg, None).unwrap();
        let kind = |e: &RemoteError| match e.unshared() {
            RemoteError::NoSuchBucket { .. } => "does not exist",
            RemoteError::AccessDenied { .. } => "access denied",
            _ => "other",
        };
        let errors = [
            r.fetch(&ns(), &c[0].0).unwrap_err(),
            r.object_size(&ns(), &c[0].0).unwrap_err(),
            r.list_chunks(&ns()).unwrap_err(),
            r.list_namespaces().unwrap_err(),
            r.upload(&ns(), &c[0].0, c[0].1.clone()).unwrap_err(),
            r.prefix_lookup(&ns(), &[c[0].0]).unwrap_err(),
            r.push(dir.path(), None, &|_| {}).map(|_| ()).unwrap_err(),
            r.pull(dir.path(), None, &|_| {}).map(|_| ()).unwrap_err(),
        ];
        for (i, e) in errors.iter().enumerate() {
            assert_eq!(kind(e), what, "path {i}: {e:?}");
            assert!(e.to_string().contains(what), "path {i}: {e}");
            assert!(e.is_config() && !e.is_transient(), "path {i}");
        }
        let _ = &paths;
    }
}

#[test]
fn http_501_is_recognised_by_status_not_by_a_key_containing_501() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    // A chunk whose key (and so whose URL) contains "501".
    let c = (0..4000)
        .map(|seed| chain(1, 1000 + seed).remove(0))
        .find(|(k, _)| k.to_hex().contains("501"))
        .expect("a key with 501 in it");
    let r = Remote::open(t.config_via(&proxy.endpoint), None).unwrap();
    proxy.arm_path(Some(Method::PUT), &c.0.file_name(), Fault::Unavailable, 50);
    let e = r.upload(&ns(), &c.0, c.1.clone()).unwrap_err();
    assert!(
        e.to_string().contains("501"),
        "the error names the key: {e}"
    );
    assert!(e.is_transient());
    proxy.clear();
    // Conditional puts are still on: the next uploads use If-None-Match.
    r.upload(&ns(), &c.0, c.1.clone()).unwrap();
    let other = chain(1, 28);
    r.upload(&ns(), &other[0].0, other[0].1.clone()).unwrap();
    assert_eq!(r.stats().conditional_fallbacks, 0, "{:?}", r.stats());
    // A real 501 still turns them off.
    proxy.always(Fault::NoConditionalPut);
    let third = chain(1, 29);
    r.upload(&ns(), &third[0].0, third[0].1.clone()).unwrap();
    assert_eq!(r.stats().conditional_fallbacks, 1, "{:?}", r.stats());
}

#[test]
fn the_queue_counter_matches_its_directory_under_concurrent_commits() {
    let dir = tempfile::tempdir().unwrap();
    let t = S3Target::new();
    let mut cfg = t.config_via(&closed_port_endpoint());
    cfg.request_timeout = Duration::from_secs(1);
    let r = Arc::new(Remote::open(cfg, Some(dir.path())).unwrap());
    let c = chain(200, 30);
    let paths = commit_local(dir.path(), &c);
    // Every commit wakes the worker, which rescans the directory while others commit.
    let jobs: Vec<_> = c.iter().zip(&paths).collect();
    std::thread::scope(|s| {
        for part in jobs.chunks(50) {
            let r = &r;
            s.spawn(move || {
                for ((k, _), p) in part {
                    r.committed(&ns(), k, p).unwrap();
                }
            });
        }
    });
    assert_eq!(r.pending_uploads(), 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.pending_uploads(), 200);
    assert_eq!(kvfs_remote::queue::status(dir.path()).unwrap().pending, 200);
}

#[test]
fn a_listed_name_with_dot_dot_breaks_no_listing_on_any_server() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let c = chain(40, 31);
    let clean = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        clean.upload(&ns(), k, b.clone()).unwrap();
    }
    // Names no client library creates, but a server may hold (issue 19: `PREFIX/../evil.kvc`).
    for bad in [
        format!("{}/../evil.kvc", t.prefix),
        format!("{}/{}/../evil.kvc", t.prefix, ns()),
        format!("{}/{}//{}", t.prefix, ns(), c[0].0.file_name()),
        format!("{}/{}/{}", t.prefix, ns(), "8".repeat(30)),
    ] {
        proxy.plant_listed(&bad);
    }
    let r = Remote::open(t.config_via(&proxy.endpoint), None).unwrap();
    assert_eq!(r.list_namespaces().unwrap(), vec![ns()]);
    let listed: Vec<ChunkKey> = r
        .list_chunks(&ns())
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    let mut want: Vec<ChunkKey> = c.iter().map(|x| x.0).collect();
    want.sort();
    assert_eq!(listed, want);
    // One bad namespace prefix, two unparseable chunk names and one that is no chunk name.
    assert_eq!(r.stats().skipped_names, 4, "{:?}", r.stats());
    let outer = tempfile::tempdir().unwrap();
    let cache = outer.path().join("cache");
    let pulled = r.pull(&cache, None, &|_| {}).unwrap();
    assert_eq!((pulled.transferred, pulled.failed), (40, 0));
    assert_eq!(
        std::fs::read_dir(outer.path()).unwrap().count(),
        1,
        "nothing beside the cache"
    );
    assert!(!outer.path().join("evil.kvc").exists() && !cache.join("evil.kvc").exists());
}
