//! The S3 remote tier through the store and the `kvfs` binary: two hosts (two cache
//! directories) on one bucket, an unreachable bucket, `kill -9` with 1,000 uploads queued,
//! and the `sync`, `ls --remote` and `stat` commands. Runs against the in-process S3 server,
//! or Garage when `KVFS_TEST_S3_ENDPOINT` is set (see `scripts/garage env`).

mod support {
    pub mod s3_server;
}

use hyper::Method;
use kvfs::remote_tier::S3Tier;
use kvfs::{Store, StoreConfig, StoreError, Tier};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use kvfs_remote::Remote;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use support::s3_server::{Fault, FaultProxy, InProcessS3, S3Target, closed_port_endpoint};

fn spec() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

fn ns() -> String {
    spec().namespace_dir()
}

fn chain(n: usize, seed: u32) -> Vec<(ChunkKey, Vec<u8>)> {
    let mut parent = None;
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..16)
                .map(|t| seed * 100_003 + i as u32 * 16 + t)
                .collect();
            let (meta, bytes) = synth_chunk(&spec(), parent, SaltTag::NONE, tokens).unwrap();
            parent = Some(meta.key);
            (meta.key, bytes)
        })
        .collect()
}

/// A store on `root` with the remote tier of `cfg` (a "host").
fn host(root: &Path, cfg: kvfs_remote::S3Config) -> (Store, Arc<Remote>) {
    host_with(root, cfg, |_| {})
}

fn host_with(
    root: &Path,
    cfg: kvfs_remote::S3Config,
    tune: impl FnOnce(&mut StoreConfig),
) -> (Store, Arc<Remote>) {
    let remote = Arc::new(Remote::open(cfg, Some(root)).unwrap());
    let mut sc = StoreConfig::new(root);
    tune(&mut sc);
    sc.remote = Some(Arc::new(S3Tier::new(
        remote.clone(),
        Duration::from_secs(30),
    )));
    (Store::open(sc).unwrap(), remote)
}

#[test]
fn a_chunk_written_on_one_host_is_a_hit_on_another() {
    let t = S3Target::new();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ra) = host(a_dir.path(), t.config());
    let (b, rb) = host(b_dir.path(), t.config());
    let c = chain(8, 1);
    a.create_namespace(&ns(), Some(&spec())).unwrap();
    for (_, bytes) in &c {
        a.put(&ns(), bytes).unwrap();
    }
    assert!(ra.wait_uploaded(Duration::from_secs(30)));
    for (k, bytes) in &c {
        assert_eq!(&b.get(&ns(), k).unwrap()[..], &bytes[..]);
        assert!(b.backing_path(&ns(), k).exists(), "filled the disk tier");
        assert_eq!(
            b.stat(&ns(), k).unwrap().tier,
            Tier::Memory,
            "and the memory tier"
        );
    }
    assert_eq!(b.stats().remote_hits, 8);
    assert_eq!(rb.stats().hits, 8);
    // B fetched, so nothing is echoed back as an upload.
    assert_eq!(rb.pending_uploads(), 0);
    assert_eq!(rb.stats().uploads, 0);
    // A key nobody wrote: a plain miss.
    assert!(matches!(
        b.get(&ns(), &ChunkKey([9; 32])),
        Err(StoreError::NotFound { .. })
    ));
    let json = rb
        .namespace_json(&ns())
        .unwrap()
        .expect("namespace.json uploaded");
    assert_eq!(String::from_utf8(json).unwrap(), spec().to_json());
}

#[test]
fn two_hosts_write_the_same_chunks_at_once() {
    let t = S3Target::new();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ra) = host(a_dir.path(), t.config());
    let (b, rb) = host(b_dir.path(), t.config());
    let c = Arc::new(chain(25, 2));
    let barrier = Arc::new(Barrier::new(2));
    std::thread::scope(|s| {
        for st in [&a, &b] {
            let (c, barrier) = (c.clone(), barrier.clone());
            s.spawn(move || {
                barrier.wait();
                for (_, bytes) in c.iter() {
                    st.put(&ns(), bytes).unwrap();
                }
            });
        }
    });
    assert!(ra.wait_uploaded(Duration::from_secs(30)));
    assert!(rb.wait_uploaded(Duration::from_secs(30)));
    let listed = ra.list_chunks(&ns()).unwrap();
    assert_eq!(listed.len(), 25);
    let (third, _r) = host(tempfile::tempdir().unwrap().keep().as_path(), t.config());
    for (k, bytes) in c.iter() {
        assert_eq!(&third.get(&ns(), k).unwrap()[..], &bytes[..]);
    }
}

#[test]
fn unreachable_bucket_keeps_local_work_going_and_uploads_resume() {
    if std::env::var("KVFS_TEST_S3_ENDPOINT").is_ok() {
        eprintln!("skipping: needs the in-process server (it starts it on a closed port)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoint = closed_port_endpoint();
    let t = S3Target::new();
    let (store, remote) = host(dir.path(), t.config_via(&endpoint));
    let c = chain(12, 3);
    for (_, bytes) in &c {
        store.put(&ns(), bytes).unwrap();
    }
    for (k, bytes) in &c {
        assert_eq!(&store.get(&ns(), k).unwrap()[..], &bytes[..]);
    }
    // A local miss cannot be answered: an error, quickly, not a hang and not a wrong answer.
    let t0 = Instant::now();
    assert!(matches!(
        store.get(&ns(), &ChunkKey([3; 32])),
        Err(StoreError::Remote(_))
    ));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(remote.pending_uploads(), 12);
    // The server comes up on that port: the queue drains by itself.
    let server = InProcessS3::start_at(endpoint.trim_start_matches("http://"));
    assert!(remote.wait_uploaded(Duration::from_secs(60)));
    let objects = server
        .root
        .path()
        .join(support::s3_server::TEST_BUCKET)
        .join(&t.prefix)
        .join(ns());
    for (k, _) in &c {
        assert!(objects.join(k.file_name()).exists());
    }
}

/// A chunk whose upload is still queued is the only copy: the disk tier must not evict it to
/// make room, even when that means refusing a put; once uploaded it is evictable again.
#[test]
fn chunks_waiting_for_upload_are_never_evicted() {
    if std::env::var("KVFS_TEST_S3_ENDPOINT").is_ok() {
        eprintln!("skipping: needs the in-process server (it starts it on a closed port)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let endpoint = closed_port_endpoint();
    let t = S3Target::new();
    let c = chain(4, 7);
    let chunk_len = c[0].1.len() as u64;
    let (store, remote) = host_with(dir.path(), t.config_via(&endpoint), |sc| {
        sc.capacity = kvfs::config::Limit::Bytes(3 * chunk_len);
        sc.min_free = kvfs::config::Limit::Bytes(0);
    });
    for (_, bytes) in &c[..3] {
        store.put(&ns(), bytes).unwrap();
    }
    assert_eq!(remote.pending_uploads(), 3);
    // Full, and every resident chunk is pinned by its queued upload: the put is refused.
    assert!(matches!(
        store.put(&ns(), &c[3].1),
        Err(StoreError::NoSpace { .. })
    ));
    for (k, bytes) in &c[..3] {
        assert_eq!(
            &store.get(&ns(), k).unwrap()[..],
            &bytes[..],
            "pinned chunk lost"
        );
    }
    // The bucket comes up, the uploads land, and the same put now evicts an uploaded chunk.
    let _server = InProcessS3::start_at(endpoint.trim_start_matches("http://"));
    assert!(remote.wait_uploaded(Duration::from_secs(60)));
    store.put(&ns(), &c[3].1).unwrap();
    for (k, bytes) in &c {
        assert_eq!(&store.get(&ns(), k).unwrap()[..], &bytes[..]);
    }
}

#[test]
fn damaged_remote_objects_are_misses_through_the_store() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ra) = host(a_dir.path(), t.config());
    let mut cfg = t.config_via(&proxy.endpoint);
    cfg.negative_ttl = Duration::from_millis(1);
    let (b, rb) = host(b_dir.path(), cfg);
    let c = chain(3, 4);
    for (_, bytes) in &c {
        a.put(&ns(), bytes).unwrap();
    }
    assert!(ra.wait_uploaded(Duration::from_secs(30)));
    for fault in [Fault::Corrupt, Fault::ShortBody] {
        proxy.arm(Some(Method::GET), fault, 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.get(&ns(), &c[0].0).is_err(), "{fault:?}");
        assert!(
            !b.contains(&ns(), &c[0].0),
            "a damaged object never reaches the disk tier"
        );
    }
    assert_eq!(rb.stats().corrupt, 2);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(&b.get(&ns(), &c[0].0).unwrap()[..], &c[0].1[..]);
}

fn kvfs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    for v in [
        "KVFS_CONFIG",
        "KVFS_CACHE_DIR",
        "KVFS_S3",
        "AWS_ENDPOINT_URL",
    ] {
        c.env_remove(v);
    }
    c.env("KVFS_LOG", "warn");
    c
}

fn write_config(path: &Path, cache: &Path, t: &S3Target, endpoint: &str) {
    std::fs::write(
        path,
        format!(
            "cache_dir = {cache:?}\nfsync = \"never\"\nmemory = 0\n\n[s3]\nurl = \"s3://{}/{}\"\nendpoint = \"{endpoint}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nrequest_timeout_s = 30\nmax_retries = 2\ndrain_on_exit_s = 600\n",
            t.bucket, t.prefix, t.region, t.access_key, t.secret_key
        ),
    )
    .unwrap();
}

fn count_files(dir: &Path, suffix: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn kill_9_with_1000_uploads_queued_then_restart_uploads_all() {
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    // Every PUT is held for an hour, so none is acknowledged before the kill and the whole
    // 1,000 are still queued then, however slowly this machine writes the chunks. (A 2 s delay
    // made the count depend on the machine's speed: 898 of 1,000 on a loaded one.)
    proxy.arm(
        Some(Method::PUT),
        Fault::Delay(Duration::from_secs(3600)),
        100_000,
    );
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let slow = d.path().join("slow.toml");
    write_config(&slow, &cache, &t, &proxy.endpoint);
    let mut child = kvfs()
        .args([
            "--config",
            slow.to_str().unwrap(),
            "synth",
            "--model",
            "tiny",
        ])
        .args(["--tokens", &(256 * 1000).to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let uploads = cache.join(".uploads");
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_files(&cache.join(ns()), ".kvc") < 1000 || count_files(&uploads, ".up") < 1000 {
        assert!(
            Instant::now() < deadline,
            "synth did not write and queue 1000 chunks in time"
        );
        assert!(child.try_wait().unwrap().is_none(), "kvfs exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // All chunks are committed; the process now waits for its uploads. kill -9 it.
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    child.wait().unwrap();
    let queued = count_files(&uploads, ".up");
    assert_eq!(queued, 1000, "uploads queued at the kill");
    let reader = Remote::open(t.config(), None).unwrap();
    let before = reader.list_chunks(&ns()).map(|v| v.len()).unwrap_or(0);
    assert_eq!(before, 0, "no PUT reached the bucket before the kill");
    // Restart against the plain endpoint: `sync push` drains the queue and pushes the rest.
    proxy.clear();
    let fast = d.path().join("fast.toml");
    write_config(&fast, &cache, &t, &t.endpoint);
    let out = kvfs()
        .args([
            "--config",
            fast.to_str().unwrap(),
            "sync",
            "push",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count_files(&uploads, ".up"), 0);
    let listed = reader.list_chunks(&ns()).unwrap();
    assert_eq!(listed.len(), 1000);
    for (k, size) in listed.iter().step_by(97) {
        let bytes = reader.fetch(&ns(), k).unwrap().expect("uploaded chunk");
        assert_eq!(bytes.len() as u64, *size);
    }

    // The other commands on the same bucket: ls --remote, stat, sync pull on a new host.
    let ls = kvfs()
        .args(["--config", fast.to_str().unwrap(), "ls", "--remote"])
        .output()
        .unwrap();
    let ls = String::from_utf8(ls.stdout).unwrap();
    assert!(ls.contains(&ns()) && ls.contains("1000 chunks"), "{ls}");
    let key = listed[0].0.to_hex();
    let st = kvfs()
        .args([
            "--config",
            fast.to_str().unwrap(),
            "stat",
            &format!("{}/{key}", ns()),
        ])
        .output()
        .unwrap();
    let st = String::from_utf8(st.stdout).unwrap();
    assert!(st.contains("remote:         present"), "{st}");
    let other = d.path().join("other");
    let pull = kvfs()
        .args([
            "--config",
            fast.to_str().unwrap(),
            "--cache-dir",
            other.to_str().unwrap(),
        ])
        .args(["sync", "pull", "--quiet", "--namespace", &ns()])
        .output()
        .unwrap();
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    assert_eq!(count_files(&other.join(ns()), ".kvc"), 1000);
    assert!(other.join(ns()).join("namespace.json").exists());
}

#[test]
fn s3_flag_errors_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = kvfs()
        .args([
            "--cache-dir",
            d.path().to_str().unwrap(),
            "--s3",
            "http://not-s3",
            "ls",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://"), "{err}");
    let out = kvfs()
        .args(["--cache-dir", d.path().to_str().unwrap(), "sync", "pull"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "no bucket configured is a usage error"
    );
}

/// Queues uploads of `chunks` in `cache` from a "process" that cannot reach the bucket.
fn queue_while_down(t: &S3Target, cache: &Path, chunks: &[(ChunkKey, Vec<u8>)]) {
    let mut cfg = t.config_via(&closed_port_endpoint());
    cfg.request_timeout = Duration::from_secs(2);
    let r = Remote::open(cfg, Some(cache)).unwrap();
    for (k, b) in chunks {
        let p = kvfs_loader::dir::Layout::Cache.chunk_path(cache, &ns(), k);
        kvfs_loader::dir::commit_file(&p, b, false).unwrap();
        r.committed(&ns(), k, &p).unwrap();
    }
    assert_eq!(r.pending_uploads(), chunks.len());
}

#[test]
fn any_command_with_s3_finishes_uploads_left_queued_and_info_shows_them() {
    let t = S3Target::new();
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = chain(3, 40);
    queue_while_down(&t, &cache, &c);
    // The bucket is still unreachable: `info` shows the queue and does not hang on it.
    let down = d.path().join("down.toml");
    write_config(&down, &cache, &t, &closed_port_endpoint());
    let t0 = Instant::now();
    let info = kvfs()
        .args(["--config", down.to_str().unwrap(), "info"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(
        out.contains("uploads:    3 queued for S3, oldest queued"),
        "{out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let json = kvfs()
        .args(["--config", down.to_str().unwrap(), "info", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["upload_queue"]["pending"], 3, "{v}");
    assert!(v["upload_queue"]["oldest_age_s"].is_u64(), "{v}");
    // Any command with a reachable bucket (here a local `ls`) finishes them before it exits.
    let up = d.path().join("up.toml");
    write_config(&up, &cache, &t, &t.endpoint);
    let ls = kvfs()
        .args(["--config", up.to_str().unwrap(), "ls"])
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert_eq!(count_files(&cache.join(".uploads"), ".up"), 0);
    let reader = Remote::open(t.config(), None).unwrap();
    for (k, b) in &c {
        assert_eq!(reader.fetch(&ns(), k).unwrap().as_deref(), Some(&b[..]));
    }
    let info = kvfs()
        .args(["--config", up.to_str().unwrap(), "info"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("uploads:    none queued for S3"));
}

#[test]
fn a_missing_bucket_is_named_by_the_binary_not_reported_as_a_miss() {
    let t = S3Target::new();
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let cfg = d.path().join("missing.toml");
    write_config(&cfg, &cache, &t, &t.endpoint);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("s3://{}/", t.bucket), "s3://kvfs-no-such-bucket/");
    std::fs::write(&cfg, text).unwrap();
    let c = chain(1, 41);
    let name = format!("{}/{}", ns(), c[0].0);
    for args in [
        vec!["get", name.as_str(), "-o", "/dev/null"],
        vec!["ls", "--remote"],
        vec!["sync", "pull", "--quiet"],
    ] {
        let out = kvfs()
            .args(["--config", cfg.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("bucket `kvfs-no-such-bucket` does not exist"),
            "{args:?}: {err}"
        );
    }
}
