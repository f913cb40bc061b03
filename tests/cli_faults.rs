//! The real `kvfs` binary against bad input and faults: malformed keys and namespaces,
//! corrupt and truncated chunks, quarantine, and `kill -9` of writers mid-way.

mod support {
    pub mod cli;
    pub mod store;
}

use support::store::temporaries;

use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, chunk_keys};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::cli::kvfs;

fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Synthesizes `chunks` tiny chunks; returns the namespace dir and the keys.
fn synth_tiny(cache: &Path, chunks: usize) -> (String, Vec<ChunkKey>) {
    let mut c = kvfs(cache);
    c.args([
        "--fsync",
        "never",
        "synth",
        "--model",
        "tiny",
        "--tokens",
        &(256 * chunks).to_string(),
    ]);
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let spec = ModelSpec::preset("tiny").unwrap();
    let tokens = kvfs::synth::prompt_tokens(0, 256 * chunks);
    let keys = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens)
        .into_iter()
        .map(|r| r.key)
        .collect();
    (spec.namespace_dir(), keys)
}

fn path_of(cache: &Path, ns: &str, k: &ChunkKey) -> PathBuf {
    kvfs_loader::dir::Layout::Cache.chunk_path(cache, ns, k)
}

#[test]
fn malformed_keys_and_namespaces_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let (ns, keys) = synth_tiny(d.path(), 1);
    let k = keys[0].to_hex();
    for args in [
        vec!["get", "../../etc/passwd"],
        vec!["get", "xyz"],
        vec!["stat", &k[..63]],
        vec!["rm", "ABCD"],
        vec!["get", "../x-0123456789abcdef/0000"],
        vec!["ls", "../../etc"],
        vec!["ls", "a/b"],
        vec![
            "put",
            "--namespace",
            "../evil-0123456789abcdef",
            "/dev/null",
        ],
    ] {
        let mut c = kvfs(d.path());
        c.args(&args);
        let o = run(c);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.starts_with("kvfs: error: "), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{args:?}: one line: {e}");
    }
    let mut c = kvfs(d.path());
    c.args(["get", &format!("{}/{k}", ns.replace('-', "_"))]);
    assert_eq!(code(&run(c)), 2);
    // A well-formed key that is not there is a plain failure.
    let mut c = kvfs(d.path());
    c.args(["stat", &"0".repeat(64)]);
    assert_eq!(code(&run(c)), 1);
    // Nothing was created or lost.
    assert!(path_of(d.path(), &ns, &keys[0]).is_file());
    assert!(!d.path().join("..").join("evil-0123456789abcdef").exists());
}

#[test]
fn corrupt_chunk_is_not_served_and_is_quarantined() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    let (ns, keys) = synth_tiny(cache, 3);
    let p = path_of(cache, &ns, &keys[1]);
    let mut b = fs::read(&p).unwrap();
    let len = b.len();
    b[len - 100] ^= 0xff;
    fs::remove_file(&p).unwrap();
    fs::write(&p, &b).unwrap();

    // get checks the payload before writing anything.
    let mut c = kvfs(cache);
    c.args(["get", &keys[1].to_hex()]);
    let o = run(c);
    assert_eq!(code(&o), 1);
    assert!(o.stdout.is_empty(), "not a byte written");
    assert!(
        stderr(&o).contains("payload digest mismatch"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(&p.display().to_string()),
        "names the file"
    );
    let dst = cache.join("out.kvc");
    let mut c = kvfs(cache);
    c.args(["get", &keys[1].to_hex(), "-o"]).arg(&dst);
    assert_eq!(code(&run(c)), 1);
    assert!(!dst.exists());

    let mut c = kvfs(cache);
    c.arg("verify");
    let o = run(c);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("BAD {}", p.display())), "{out}");
    assert!(out.contains("verified 3 files: 2 ok"), "{out}");
    assert!(stderr(&o).contains("quarantined"));
    let q = cache
        .join(".quarantine")
        .join(&ns)
        .join(keys[1].file_name());
    assert_eq!(fs::read(&q).unwrap(), b);
    assert!(!p.exists());
    // The rest is intact and the cache verifies clean now.
    let mut c = kvfs(cache);
    c.arg("verify");
    assert_eq!(code(&run(c)), 0);
    let mut c = kvfs(cache);
    c.args(["get", &keys[0].to_hex()]);
    assert_eq!(
        run(c).stdout,
        fs::read(path_of(cache, &ns, &keys[0])).unwrap()
    );
}

#[test]
fn put_of_bad_files_fails_and_stores_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let (ns, keys) = synth_tiny(src.path(), 1);
    let good = fs::read(path_of(src.path(), &ns, &keys[0])).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        (
            "magic",
            [b"NOTACHNK".as_slice(), &good[8..]].concat(),
            "bad magic",
        ),
        (
            "header",
            {
                let mut b = good.clone();
                b[260] ^= 1;
                b
            },
            "header checksum",
        ),
        (
            "payload",
            {
                let mut b = good.clone();
                b[5000] ^= 1;
                b
            },
            "payload digest",
        ),
    ];
    for (what, bytes, msg) in cases {
        let f = src.path().join(format!("{what}.kvc"));
        fs::write(&f, &bytes).unwrap();
        let mut c = kvfs(d.path());
        c.args(["put", "--model", "tiny"]).arg(&f);
        let o = run(c);
        assert_eq!(code(&o), 1, "{what}");
        let e = stderr(&o);
        assert!(e.starts_with("kvfs: error: invalid chunk"), "{what}: {e}");
        assert!(e.contains(msg), "{what}: {e}");
        assert_eq!(e.lines().count(), 1);
        // Same from stdin.
        let mut c = kvfs(d.path());
        let mut child = c
            .args(["put", "--namespace", &ns])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // kvfs refuses a bad header before reading the payload, so it may close the pipe
        // before all of it is written.
        match child.stdin.take().unwrap().write_all(&bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => panic!("{what}: {e}"),
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), 1, "{what} from stdin");
        assert!(
            stderr(&o).contains(msg),
            "{what} from stdin: {}",
            stderr(&o)
        );
    }
    let mut c = kvfs(d.path());
    c.arg("info").arg("--json");
    let j: serde_json::Value = serde_json::from_slice(&run(c).stdout).unwrap();
    assert_eq!(j["capacity"]["used_bytes"], 0, "nothing stored");
}

/// Waits until `cond` holds, for at most `limit`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn count_chunks(root: &Path, ns: &str) -> usize {
    let Ok(fans) = fs::read_dir(root.join(ns)) else {
        return 0;
    };
    fans.flatten()
        .filter(|f| f.file_type().is_ok_and(|t| t.is_dir()))
        .map(|f| {
            fs::read_dir(f.path())
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".kvc"))
                        .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn kill_9_during_synth_leaves_only_valid_chunks() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let ns = spec.namespace_dir();
    // 64 chunks of 32 MiB: far more than are written before the kill.
    let mut child = kvfs(cache)
        .args(["synth", "--model", "llama-3-8b", "--tokens", "16384"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = wait_for(Duration::from_secs(60), || count_chunks(cache, &ns) >= 2);
    // Kill while it is writing the next one (a temporary file exists) when we can see that.
    wait_for(Duration::from_millis(500), || {
        !temporaries(cache).is_empty()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(started, "synth wrote two chunks within a minute");
    let visible = count_chunks(cache, &ns);
    assert!((2..64).contains(&visible), "{visible}");

    // `verify` runs the index maintenance pass, which sweeps the dead writer's temporaries
    // (a plain open no longer walks the cache); everything visible verifies.
    let mut c = kvfs(cache);
    c.arg("verify");
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    assert!(temporaries(cache).is_empty(), "temporaries are gone");
    assert_eq!(
        count_chunks(cache, &ns),
        visible,
        "nothing committed was lost"
    );
    // The visible chunks are a prefix of the prompt's chain.
    let tokens = kvfs::synth::prompt_tokens(0, 16384);
    let refs = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    for r in &refs[..visible] {
        assert!(path_of(cache, &ns, &r.key).is_file());
    }
}

#[test]
fn kill_9_during_put_from_stdin_leaves_nothing() {
    let src = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let spec = ModelSpec::preset("smollm2-135m").unwrap();
    let tokens = kvfs::synth::prompt_tokens(1, 256);
    let (meta, bytes) = kvfs_loader::synth_chunk(&spec, None, SaltTag::NONE, tokens).unwrap();
    let _ = src;
    let mut child = kvfs(d.path())
        .args(["put", "--model", "smollm2-135m"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let p = path_of(d.path(), &spec.namespace_dir(), &meta.key);
    assert!(!p.exists(), "no partial chunk is visible");
    let mut c = kvfs(d.path());
    c.arg("verify");
    assert_eq!(code(&run(c)), 0);
    assert!(temporaries(d.path()).is_empty());
}

#[test]
fn a_key_in_two_namespaces_needs_ns_slash_key() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    let (ns, keys) = synth_tiny(cache, 1);
    // The same chunk copied under another directory with the same namespace suffix.
    let suffix = ns.rsplit_once('-').unwrap().1;
    let other = format!("copy-{suffix}");
    let src = path_of(cache, &ns, &keys[0]);
    let dst = path_of(cache, &other, &keys[0]);
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(&src, &dst).unwrap();
    let mut c = kvfs(cache);
    c.args(["get", &keys[0].to_hex()]);
    let o = run(c);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("NS/KEY"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    for n in [&ns, &other] {
        let mut c = kvfs(cache);
        c.args(["get", &format!("{n}/{}", keys[0])]);
        let o = run(c);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_eq!(o.stdout, fs::read(&src).unwrap());
    }
}

/// A bad `[s3]` URL is a configuration error of the commands that open the store (exit 1,
/// saying which setting), and nothing else: `doctor` never opens the tier.
#[test]
fn a_bad_s3_url_fails_the_store_commands_only() {
    let d = tempfile::tempdir().unwrap();
    let mut c = kvfs(d.path());
    c.args(["--s3", "s3://Not_A_Bucket", "ls"]);
    let o = run(c);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("s3"), "{}", stderr(&o));
    assert!(stderr(&o).contains("Not_A_Bucket"), "{}", stderr(&o));
    let mut c = kvfs(d.path());
    c.args(["--s3", "s3://Not_A_Bucket", "doctor"]);
    let o = run(c);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
