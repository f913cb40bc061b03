//! Issue 18's scale benchmark driver (run by `scripts/bench-scale`, which documents it).
//!
//! - `build ROOT N`: writes N chunks of the `scale-micro` preset straight into a cache
//!   directory with the loader's writer (`synth_chunk` + `dir::commit_file`), on every core:
//!   one 32-chunk chained prompt (for `lookup`) and N - 32 one-chunk prompts. No index is
//!   made: the store's maintenance pass builds it, timed by `index`.
//! - `index ROOT`: opens the store and waits for the background pass that builds the index.
//! - `ops ROOT KVFS REPS [--cold]`: times each operation REPS times and prints one JSON object
//!   of medians in microseconds: in-process `open`, `get`, `stat`, `lookup32`, `put_evict`,
//!   `info` (namespace totals), `ls_first` (first line of a listing), `ls_all`; and as
//!   commands (`KVFS` binary) `cli_get`, `cli_info`, `cli_ls_first`, `mount_start`,
//!   `find_mount`, with the mount daemon's resident memory (`daemon_rss_kib`, after `find`).
//!   With `--cold` the page cache is dropped before every timed operation (root only), and
//!   the whole listing and the `find` (warm figures) are not repeated.

use kvfs::config::Limit;
use kvfs::store::{FsyncPolicy, Store, StoreConfig};
use kvfs_loader::dir::{self, Layout};
use kvfs_loader::loader::Loader;
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use std::io::{BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROMPT_CHUNKS: usize = 32;

fn spec() -> ModelSpec {
    ModelSpec::preset("scale-micro").expect("preset")
}

/// Tokens of the one-chunk prompt `i` (distinct for every i).
fn single_tokens(i: u64, per: usize) -> Vec<u32> {
    let mut t: Vec<u32> = (0..per as u32).map(|j| 100 + j).collect();
    t[0] = i as u32;
    t[1] = (i >> 32) as u32;
    t
}

fn single_key(spec: &ModelSpec, i: u64) -> ChunkKey {
    let per = spec.chunk_tokens as usize;
    ChunkKey::derive(
        &spec.namespace_id(),
        None,
        &SaltTag::NONE,
        &single_tokens(i, per),
    )
}

fn prompt_tokens(spec: &ModelSpec) -> Vec<u32> {
    kvfs::synth::prompt_tokens(7, PROMPT_CHUNKS * spec.chunk_tokens as usize)
}

fn cfg(root: &Path, capacity: u64) -> StoreConfig {
    let mut c = StoreConfig::new(root);
    c.capacity = Limit::Bytes(capacity);
    c.min_free = Limit::Bytes(0);
    c.fsync = FsyncPolicy::Never;
    c.memory_bytes = 0;
    c
}

fn build(root: &Path, n: u64) {
    let spec = spec();
    let ns = spec.namespace_dir();
    kvfs::store::prepare_root(root, dir::Access::default()).unwrap();
    dir::create_dirs(&root.join(&ns)).unwrap();
    dir::commit_file(
        &root.join(&ns).join("namespace.json"),
        spec.to_json().as_bytes(),
        false,
    )
    .unwrap();
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let singles = n.saturating_sub(PROMPT_CHUNKS as u64);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (spec, ns) = (&spec, &ns);
            s.spawn(move || {
                let per = spec.chunk_tokens as usize;
                let mut i = t;
                while i < singles {
                    let (meta, bytes) =
                        synth_chunk(spec, None, SaltTag::NONE, single_tokens(i, per)).unwrap();
                    let p = Layout::Cache.chunk_path(root, ns, &meta.key);
                    if let Err(e) = dir::commit_file(&p, &bytes, false) {
                        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
                        dir::create_dirs(p.parent().unwrap()).unwrap();
                        dir::commit_file(&p, &bytes, false).unwrap();
                    }
                    i += threads;
                }
            });
        }
    });
    // The prompt last: the newest files, so the evicting puts of `ops` (coldest first, by
    // file time after the index is built) take singles, never the prompt.
    let mut parent = None;
    for tokens in prompt_tokens(&spec).chunks_exact(spec.chunk_tokens as usize) {
        let (meta, bytes) = synth_chunk(&spec, parent, SaltTag::NONE, tokens.to_vec()).unwrap();
        parent = Some(meta.key);
        let p = Layout::Cache.chunk_path(root, &ns, &meta.key);
        dir::create_dirs(p.parent().unwrap()).unwrap();
        dir::commit_file(&p, &bytes, false).unwrap();
    }
    println!(
        "{{\"built\": {n}, \"seconds\": {:.1}}}",
        t.elapsed().as_secs_f64()
    );
}

fn index(root: &Path) {
    let t = Instant::now();
    let store = Store::open(cfg(root, u64::MAX / 4)).unwrap();
    store.wait_for_index();
    let secs = t.elapsed().as_secs_f64();
    let used = store.capacity().used_bytes;
    drop(store); // checkpoints the journal into the database file
    let index_bytes: u64 = [".kvfs-index.sqlite", ".kvfs-index.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(root.join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "{{\"index_build_seconds\": {secs:.1}, \"used_bytes\": {used}, \"index_bytes\": {index_bytes}}}"
    );
}

/// K puts into a store bounded to what it holds (each evicts), timed one by one (for a
/// profiler: `perf record scale_bench puts ROOT K`).
fn puts(root: &Path, k: u64) {
    let spec = spec();
    let ns = spec.namespace_dir();
    let used = Store::open(cfg(root, u64::MAX / 4))
        .unwrap()
        .capacity()
        .used_bytes;
    let full = Store::open(cfg(root, used)).unwrap();
    let mut times = Vec::new();
    for r in 0..k {
        let (_, bytes) = synth_chunk(
            &spec,
            None,
            SaltTag::NONE,
            single_tokens(
                20_000_000_000 + (std::process::id() as u64) * 100_000 + r,
                spec.chunk_tokens as usize,
            ),
        )
        .unwrap();
        let t = Instant::now();
        assert!(full.put(&ns, &bytes).unwrap().evicted >= 1);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"puts\": {k}, \"median_us\": {:.0}}}",
        times[times.len() / 2]
    );
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache needs root");
}

/// Median in microseconds of `reps` timed runs of `f` (`cold`: page cache dropped first).
fn median(reps: usize, cold: bool, mut f: impl FnMut(usize)) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|r| {
            if cold {
                drop_caches();
            }
            let t = Instant::now();
            f(r);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(cmd: &mut Command) {
    let s = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(s.success(), "{cmd:?} failed");
}

fn ops(root: &Path, kvfs: &Path, reps: usize, cold: bool) {
    let spec = spec();
    let ns = spec.namespace_dir();
    let probe = Store::open(cfg(root, u64::MAX / 4)).unwrap();
    probe.wait_for_index();
    let n = probe.namespaces().unwrap()[0].chunks;
    let used = probe.capacity().used_bytes;
    drop(probe);
    let singles = n - PROMPT_CHUNKS as u64;
    // Keys spread over the newer half of the cache, a different one per repetition (the
    // evicting puts take the oldest files).
    let half = singles / 2;
    let key_of = |r: usize| single_key(&spec, half + (r as u64 * 7919 + 13) % half);
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        out.insert(k.to_string(), serde_json::json!((v * 10.0).round() / 10.0));
    };

    put(
        "open",
        median(reps, cold, |_| {
            drop(Store::open(cfg(root, used * 2)).unwrap())
        }),
    );
    let store = Store::open(cfg(root, used * 2)).unwrap();
    put(
        "get",
        median(reps, cold, |r| {
            assert!(!store.get(&ns, &key_of(r)).unwrap().is_empty())
        }),
    );
    put(
        "stat",
        median(reps, cold, |r| {
            assert!(store.stat(&ns, &key_of(r + reps)).unwrap().len > 0)
        }),
    );
    let tokens = prompt_tokens(&spec);
    put(
        "lookup32",
        median(reps, cold, |_| {
            let l = Loader::open(root, spec.clone(), b"").unwrap();
            assert_eq!(l.lookup(&tokens), tokens.len());
        }),
    );
    put(
        "info",
        median(reps, cold, |_| {
            assert!(store.namespaces().unwrap()[0].chunks >= n)
        }),
    );
    put(
        "ls_first",
        median(reps, cold, |_| {
            let mut seen = 0;
            store
                .for_each_chunk(&ns, |_, _| {
                    seen += 1;
                    ControlFlow::Break(())
                })
                .unwrap();
            assert_eq!(seen, 1);
        }),
    );
    // The whole listing and `find` are measured warm only: a cold walk of a million files
    // measures the disk, not kvfs, and takes minutes.
    put(
        "ls_all",
        median(1, false, |_| {
            let mut seen = 0u64;
            store
                .for_each_chunk(&ns, |_, _| {
                    seen += 1;
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(seen, n);
        }),
    );
    drop(store);
    // A store bounded to what it holds: every new chunk evicts one.
    let full = Store::open(cfg(root, used)).unwrap();
    put(
        "put_evict",
        median(reps, cold, |r| {
            let (_, bytes) = synth_chunk(
                &spec,
                None,
                SaltTag::NONE,
                single_tokens(
                    10_000_000_000 + u64::from(std::process::id()) * 100_000 + r as u64,
                    spec.chunk_tokens as usize,
                ),
            )
            .unwrap();
            let o = full.put(&ns, &bytes).unwrap();
            assert!(o.evicted >= 1, "the put evicted");
        }),
    );
    drop(full);

    let cli = || {
        let mut c = Command::new(kvfs);
        c.arg("--cache-dir").arg(root).env("KVFS_LOG", "error");
        c
    };
    put(
        "cli_get",
        median(reps, cold, |r| {
            run(cli().args([
                "get",
                &format!("{ns}/{}", key_of(r + 2 * reps).to_hex()),
                "-o",
                "/dev/null",
            ]));
        }),
    );
    put("cli_info", median(reps, cold, |_| run(cli().arg("info"))));
    put(
        "cli_ls_first",
        median(reps, cold, |_| {
            let mut c = cli()
                .args(["ls", &ns])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(c.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.contains('\t'));
            let _ = c.kill();
            let _ = c.wait();
        }),
    );
    // The mount: start (`mount --daemon` returns once the mount answers), `find` over it,
    // the daemon's peak memory after the find.
    let mnt = PathBuf::from(format!("{}.mnt", root.display()));
    std::fs::create_dir_all(&mnt).unwrap();
    let pid_file = PathBuf::from(format!("{}.pid", root.display()));
    let mut rss = 0u64;
    let (mut starts, mut finds) = (Vec::new(), Vec::new());
    // A find over a million entries is long enough to average itself: one run there.
    let mount_reps = if n >= 200_000 { 1 } else { reps.clamp(1, 3) };
    for _ in 0..mount_reps {
        if cold {
            drop_caches();
        }
        let t = Instant::now();
        run(cli()
            .arg("mount")
            .arg(&mnt)
            .arg("--daemon")
            .arg("--pid-file")
            .arg(&pid_file));
        starts.push(t.elapsed().as_secs_f64() * 1e6);
        if cold {
            // The mount start is the cold figure; the find below is the warm one's.
            // The kernel may still hold the last directory handle for a moment after `find`.
            run(cli().arg("umount").arg("--lazy").arg(&mnt));
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let t = Instant::now();
        let mut c = Command::new("find")
            .arg(&mnt)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = String::new();
        c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        c.wait().unwrap();
        finds.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(s.lines().count() as u64 >= n, "find saw every chunk");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
        rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        // The kernel may still hold the last directory handle for a moment after `find`.
        run(cli().arg("umount").arg("--lazy").arg(&mnt));
        std::thread::sleep(Duration::from_millis(300));
    }
    let mid = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    put("mount_start", mid(starts));
    if !finds.is_empty() {
        put("find_mount", mid(finds));
    }
    out.insert("daemon_peak_rss_kib".into(), serde_json::json!(rss));
    out.insert("chunks".into(), serde_json::json!(n));
    out.insert("cold".into(), serde_json::json!(cold));
    println!("{}", serde_json::Value::Object(out));
    let _ = std::fs::remove_dir(&mnt);
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("build") => build(Path::new(&a[2]), a[3].parse().unwrap()),
        Some("index") => index(Path::new(&a[2])),
        Some("puts") => puts(Path::new(&a[2]), a[3].parse().unwrap()),
        Some("ops") => ops(
            Path::new(&a[2]),
            Path::new(&a[3]),
            a[4].parse().unwrap(),
            a.get(5).is_some_and(|f| f == "--cold"),
        ),
        _ => {
            eprintln!("usage: scale_bench build ROOT N | index ROOT | ops ROOT KVFS REPS [--cold]");
            std::process::exit(2);
        }
    }
}
