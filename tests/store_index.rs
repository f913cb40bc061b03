//! The disk tier's persistent index (src/store/index.rs) against real files and real
//! processes: priorities and recency survive a restart; a truncated or garbage index is set
//! aside and rebuilt while every chunk stays readable; a writer killed mid-put loses and
//! misreports nothing; two processes sharing one cache keep one usage figure and one bound.
//!
//! The child processes are this test binary run again with `KVFS_INDEX_CHILD` set (see
//! [`child`]), so no helper binary is needed.

use kvfs::store::{Store, StoreConfig};
use kvfs_loader::ChunkKey;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INDEX: &str = ".kvfs-index.sqlite";

mod support {
    pub mod store;
}

use support::store::{chunks, ns};

fn cfg(root: &Path, capacity: u64) -> StoreConfig {
    support::store::config(root, capacity, 0)
}

/// Every chunk file under the namespace: (key, length).
fn files_on_disk(root: &Path) -> Vec<(ChunkKey, u64)> {
    let mut out = Vec::new();
    let Ok(fans) = fs::read_dir(root.join(ns())) else {
        return out;
    };
    for fan in fans.flatten() {
        if !fan.file_type().unwrap().is_dir() {
            continue;
        }
        for f in fs::read_dir(fan.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Ok(k) = ChunkKey::from_file_name(&name) {
                out.push((k, f.metadata().unwrap().len()));
            }
        }
    }
    out
}

/// Entry point of the child processes: `KVFS_INDEX_CHILD=<job>:<root>:<seed>:<capacity>`.
/// `put-forever` puts chunks until killed; `put-all` puts 24 and exits.
#[test]
fn child() {
    let Ok(job) = std::env::var("KVFS_INDEX_CHILD") else {
        return; // run as a test of its own: nothing to do
    };
    let mut parts = job.splitn(4, ':');
    let (what, root, seed, cap) = (
        parts.next().unwrap(),
        PathBuf::from(parts.next().unwrap()),
        parts.next().unwrap().parse::<u64>().unwrap(),
        parts.next().unwrap().parse::<u64>().unwrap(),
    );
    let store = Store::open(cfg(&root, cap)).unwrap();
    let ns = ns();
    match what {
        "put-forever" => {
            for round in 0.. {
                for (_, b) in chunks(8, seed * 1000 + round) {
                    store.put(&ns, &b).unwrap();
                }
            }
        }
        "put-all" => {
            for (_, b) in chunks(24, seed) {
                store.put(&ns, &b).unwrap();
            }
        }
        other => panic!("unknown child job {other}"),
    }
}

fn spawn_child(job: &str, root: &Path, seed: u64, capacity: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(
            "KVFS_INDEX_CHILD",
            format!("{job}:{}:{seed}:{capacity}", root.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ok()
}

/// What a user relies on after any crash: every file is served, and the store's usage and
/// namespace totals count exactly the files there are.
fn assert_accounts_for_every_file(store: &Store, root: &Path) {
    let ns = ns();
    let files = files_on_disk(root);
    assert!(!files.is_empty());
    for (k, len) in &files {
        assert_eq!(store.stat(&ns, k).unwrap().len, *len, "chunk {k} is served");
        assert_eq!(store.get(&ns, k).unwrap().len() as u64, *len);
    }
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    assert_eq!(
        store.capacity().used_bytes,
        bytes,
        "usage counts every file, once"
    );
    let info = store
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|n| n.dir == ns)
        .unwrap();
    assert_eq!(
        (info.chunks, info.bytes),
        (files.len() as u64, bytes),
        "namespace totals count every file"
    );
}

#[test]
fn priorities_and_recency_survive_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(6, 1);
    let len = cs[0].1.len() as u64;
    {
        let store = Store::open(cfg(d.path(), 4 * len)).unwrap();
        for (_, b) in &cs[..4] {
            store.put(&ns, b).unwrap();
        }
        store.set_priority(&ns, &cs[0].0, 9); // the oldest, but kept
        store.get(&ns, &cs[1].0).unwrap(); // now the most recently used
    }
    // Recency as the last run left it, not as file times say: chunk 1 was read last.
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let f = fs::File::options()
        .write(true)
        .open(
            d.path()
                .join(&ns)
                .join(&cs[1].0.to_hex()[..2])
                .join(cs[1].0.file_name()),
        )
        .unwrap();
    f.set_times(fs::FileTimes::new().set_accessed(old).set_modified(old))
        .unwrap();
    drop(f);

    let store = Store::open(cfg(d.path(), 4 * len)).unwrap();
    assert_eq!(store.stat(&ns, &cs[0].0).unwrap().priority, 9);
    store.put(&ns, &cs[4].1).unwrap();
    assert!(
        !store.contains(&ns, &cs[2].0),
        "the least recent of priority 0 went first"
    );
    store.put(&ns, &cs[5].1).unwrap();
    assert!(!store.contains(&ns, &cs[3].0), "then the next");
    assert!(
        store.contains(&ns, &cs[0].0),
        "priority 9 was kept after the restart"
    );
    assert!(
        store.contains(&ns, &cs[1].0),
        "the chunk read last run was kept"
    );
}

#[test]
fn a_truncated_index_is_set_aside_and_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    {
        let store = Store::open(cfg(d.path(), 1 << 30)).unwrap();
        for (_, b) in chunks(40, 2) {
            store.put(&ns, &b).unwrap();
        }
    }
    let index = d.path().join(INDEX);
    let len = fs::metadata(&index).unwrap().len();
    assert!(len > 8192, "the index holds pages ({len} bytes)");
    fs::OpenOptions::new()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let store = Store::open(cfg(d.path(), 1 << 30)).unwrap();
    // Reads do not wait for the rebuild.
    let (k, len) = files_on_disk(d.path())[0];
    assert_eq!(store.get(&ns, &k).unwrap().len() as u64, len);
    store.wait_for_index();
    assert!(d.path().join(format!("{INDEX}.damaged")).is_file());
    assert_accounts_for_every_file(&store, d.path());
}

#[test]
fn a_garbage_index_is_set_aside_and_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    {
        let store = Store::open(cfg(d.path(), 1 << 30)).unwrap();
        for (_, b) in chunks(10, 3) {
            store.put(&ns, &b).unwrap();
        }
    }
    fs::write(d.path().join(INDEX), vec![0x5a; 64 << 10]).unwrap();
    let store = Store::open(cfg(d.path(), 1 << 30)).unwrap();
    store.wait_for_index();
    assert_accounts_for_every_file(&store, d.path());
}

#[test]
fn a_writer_killed_mid_put_loses_and_misreports_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for round in 0..3 {
        let mut c = spawn_child("put-forever", d.path(), round, 1 << 30);
        let target = seen + 5 + round as usize * 3;
        let grew = wait_for(Duration::from_secs(60), || {
            files_on_disk(d.path()).len() >= target
        });
        c.kill().unwrap(); // SIGKILL, anywhere in a put or an index transaction
        c.wait().unwrap();
        assert!(grew, "the child wrote chunks");
        seen = files_on_disk(d.path()).len();
    }
    let store = Store::open(cfg(d.path(), 1 << 30)).unwrap();
    // No pass is due (the first child built the index): what the index says after the kills
    // is what their transactions and the dead-writer recovery left.
    assert_accounts_for_every_file(&store, d.path());
    drop(store);

    // The dead writers' reservations are gone: a store bounded to exactly the current use
    // plus one chunk takes one more chunk without evicting anything.
    let used: u64 = files_on_disk(d.path()).iter().map(|f| f.1).sum();
    let extra = chunks(1, 99);
    let store = Store::open(cfg(d.path(), used + extra[0].1.len() as u64)).unwrap();
    let out = store.put(&ns(), &extra[0].1).unwrap();
    assert_eq!(
        out.evicted, 0,
        "no reservation of a dead writer holds space"
    );
}

#[test]
fn two_processes_share_one_usage_figure_and_bound() {
    let d = tempfile::tempdir().unwrap();
    let len = chunks(1, 0)[0].1.len() as u64;
    let cap = 6 * len;
    // Create the index first so that neither child races the other to build it.
    drop(Store::open(cfg(d.path(), cap)).unwrap());
    let mut a = spawn_child("put-all", d.path(), 10, cap);
    let mut b = spawn_child("put-all", d.path(), 20, cap);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let files = files_on_disk(d.path());
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    assert!(
        bytes <= cap,
        "two processes kept one bound: {bytes} bytes on disk, bound {cap}"
    );
    assert_eq!(files.len(), 6, "48 puts into room for 6 leave 6");
    let store = Store::open(cfg(d.path(), cap)).unwrap();
    assert_accounts_for_every_file(&store, d.path());
}
