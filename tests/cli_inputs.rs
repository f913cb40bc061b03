//! The real `kvfs` binary against inputs a new user or an adversary gives it: closed pipes,
//! huge numbers, zero and negative sizes, empty variables, broken config files, and a cache
//! directory other users could read.

mod support {
    pub mod cli;
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use support::cli::{chunk_files, files_under, kvfs, mode_of};

fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn synth_tiny(cache: &Path, chunks: usize) {
    let mut c = kvfs(cache);
    c.args(["--fsync", "never", "synth", "--model", "tiny", "--tokens"])
        .arg((256 * chunks).to_string());
    let o = run(c);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `kvfs info | head -1`, `kvfs ls NS | head -1`: the reader is gone before kvfs writes.
/// The command must end as `cat` would (quietly, by SIGPIPE or with success), never panic
/// with exit code 101.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    synth_tiny(&cache, 3);
    let ns = kvfs_loader::ModelSpec::preset("tiny")
        .unwrap()
        .namespace_dir();
    for args in [vec!["info"], vec!["ls"], vec!["ls", ns.as_str()]] {
        let mut c = kvfs(&cache);
        c.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take()); // the reader goes away before the first line
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?}: {err}");
        assert!(
            o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {:?} {err}",
            o.status
        );
    }
}

/// A token count whose chunks cannot fit is refused before anything grows with it (it used
/// to abort on a 400 GB allocation).
#[test]
fn synth_refuses_more_tokens_than_the_cache_can_hold() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let mut c = kvfs(&cache);
    c.args(["synth", "--model", "tiny", "--tokens", "99999999999"]);
    let o = run(c);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("more than the cache can hold"),
        "{}",
        stderr(&o)
    );
    assert!(chunk_files(&cache).is_empty());
}

/// `--capacity 0` (or `0%`, from a flag, the environment or the file) would make `gc` empty
/// the cache: it is refused and nothing is evicted.
#[test]
fn a_zero_capacity_is_refused_and_evicts_nothing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    synth_tiny(&cache, 2);
    for v in ["0", "0%"] {
        let mut c = kvfs(&cache);
        c.args(["--capacity", v, "gc"]);
        let o = run(c);
        assert_eq!(o.status.code(), Some(1), "{v}");
        assert!(stderr(&o).contains("capacity of 0"), "{v}: {}", stderr(&o));
        let mut c = kvfs(&cache);
        c.env("KVFS_CAPACITY", v).arg("gc");
        let o = run(c);
        assert!(stderr(&o).contains("capacity of 0"), "{v}: {}", stderr(&o));
    }
    assert_eq!(chunk_files(&cache).len(), 2);
}

#[test]
fn config_errors_say_what_and_where() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let cfg = t.path().join("kvfs.toml");
    fs::write(&cfg, "capacity = -5\n").unwrap();
    let mut c = kvfs(&cache);
    c.arg("--config").arg(&cfg).arg("info");
    let o = run(c);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("cannot be negative") && err.contains("line 1"),
        "{err}"
    );
    assert!(!err.contains("untagged"), "{err}");

    fs::write(&cfg, "fsync = \"never\"\nmemory = \"1GiB\"\ncapacity\n").unwrap();
    let mut c = kvfs(&cache);
    c.arg("--config").arg(&cfg).arg("info");
    let err = stderr(&run(c));
    assert!(err.contains("line 3"), "{err}");

    // Set but empty is not "the default": the user meant something.
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    c.env_clear()
        .env("HOME", t.path().join("home"))
        .env("KVFS_CACHE_DIR", "")
        .arg("info");
    let o = run(c);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("KVFS_CACHE_DIR"), "{}", stderr(&o));
    assert!(!t.path().join("home/.cache/kvfs").exists());
}

/// Chunk headers hold prompts' token ids: a new cache is private to its owner, and an old one
/// that other users could read is tightened at open with a log line.
#[test]
fn the_cache_directory_is_private_by_default() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    synth_tiny(&cache, 1);
    assert_eq!(mode_of(&cache), 0o700);
    let files = chunk_files(&cache);
    assert_eq!(files.len(), 1);
    for f in &files {
        assert_eq!(mode_of(f), 0o600, "{}", f.display());
        assert_eq!(mode_of(f.parent().unwrap()), 0o700);
    }

    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    let o = run({
        let mut c = kvfs(&cache);
        c.arg("info");
        c
    });
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("permissions"), "{}", stderr(&o));
    assert_eq!(mode_of(&cache), 0o700);

    // A new, empty directory made by hand becomes private without a word.
    let fresh = t.path().join("fresh");
    fs::create_dir(&fresh).unwrap();
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).unwrap();
    let o = run({
        let mut c = kvfs(&fresh);
        c.arg("info");
        c
    });
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert_eq!(mode_of(&fresh), 0o700);

    // A cache shared with a group, by configuration.
    let shared = t.path().join("shared");
    let mut c = kvfs(&shared);
    c.env("KVFS_GROUP_ACCESS", "1").args([
        "--fsync", "never", "synth", "--model", "tiny", "--tokens", "256",
    ]);
    let o = run(c);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode_of(&shared), 0o2770);
    for f in chunk_files(&shared) {
        assert_eq!(mode_of(&f), 0o640, "{}", f.display());
    }
}

/// Log lines written to a file or a pipe carry no terminal colour codes.
#[test]
fn logs_to_a_pipe_are_plain_text() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    // An old, world-readable cache: opening it logs a warning as it tightens it.
    synth_tiny(&cache, 1);
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = kvfs(&cache);
    c.arg("info");
    let o = run(c);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("WARN"), "no log line to check: {err:?}");
    assert!(!err.contains('\x1b'), "{err:?}");
}

/// A failure is said once (not a log line and then the same error again), and a valid chunk
/// filed in the wrong fan-out directory is called that, not "not a valid chunk file name".
#[test]
fn a_failure_is_reported_once_and_a_misplaced_chunk_is_named_as_such() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    synth_tiny(&cache, 2);
    let mut files = chunk_files(&cache);
    files.sort();
    // A flipped payload byte: `get` fails with one line.
    let bad = &files[0];
    let mut b = fs::read(bad).unwrap();
    b[5000] ^= 1;
    fs::write(bad, &b).unwrap();
    let key = bad.file_stem().unwrap().to_str().unwrap().to_string();
    let o = run({
        let mut c = kvfs(&cache);
        c.args(["get", &key]);
        c
    });
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("payload digest"), "{err}");

    // A good chunk moved to another fan-out directory.
    let good = &files[1];
    let elsewhere = good.parent().unwrap().with_file_name("zz");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::rename(good, elsewhere.join(good.file_name().unwrap())).unwrap();
    let o = run({
        let mut c = kvfs(&cache);
        c.arg("verify");
        c
    });
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("wrong directory"), "{out}");
    // The quarantine is as private as the cache.
    let q = cache.join(".quarantine");
    assert_eq!(mode_of(&q), 0o700);
    for f in files_under(&q) {
        assert_eq!(mode_of(&f) & 0o077, 0, "{}", f.display());
        assert_eq!(mode_of(f.parent().unwrap()), 0o700, "{}", f.display());
    }
    assert!(!out.contains("not a valid chunk file name"), "{out}");
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}
