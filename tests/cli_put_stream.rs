//! `kvfs put` streams: memory stays bounded whatever the input, input that is not a chunk
//! is refused from its first bytes, and a short or overlong input stores nothing.

mod support {
    pub mod cli;
}

use kvfs_loader::{ModelSpec, SaltTag, synth_chunk};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kvfs(cache: &Path) -> Command {
    let mut c = support::cli::kvfs(cache);
    c.args(["--fsync", "never"]);
    c
}

fn chunk_files(root: &Path) -> usize {
    support::cli::chunk_files(root).len()
}

/// Runs `c` to its end; returns its exit code, stderr and peak resident memory in bytes
/// (from `wait4`, for this child alone).
fn run_measured(mut c: Command, stdin: Option<&Path>) -> (i32, String, u64) {
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    match stdin {
        Some(p) => c.stdin(fs::File::open(p).unwrap()),
        None => c.stdin(Stdio::null()),
    };
    // Reaped below by wait4, which std's `wait` cannot do (it gives no rusage).
    #[allow(clippy::zombie_processes)]
    let mut child = c.spawn().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our own unwaited child; status and usage point to live locals.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, err, usage.ru_maxrss as u64 * 1024)
}

/// A 32 MiB Llama-3-8B chunk, from a file and from stdin: the process's peak memory grows by
/// a small fraction of the chunk's size over `kvfs info`'s, measured the same way (it used
/// to hold the whole input, then a copy).
#[test]
fn put_holds_a_fraction_of_a_large_chunk_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let f = t.path().join("big.kvc");
    let (len, key) = {
        let (meta, bytes) = synth_chunk(&spec, None, SaltTag::NONE, (0..256).collect()).unwrap();
        fs::write(&f, &bytes).unwrap();
        (bytes.len() as u64, meta.key)
    };
    assert!(len >= 32 << 20);
    let measure = |cache: &Path, args: &[&str], stdin: Option<&Path>| {
        let mut c = kvfs(cache);
        c.args(args);
        run_measured(c, stdin)
    };
    let (code, err, baseline) = measure(&cache, &["info"], None);
    assert_eq!(code, 0, "{err}");
    let f_arg = f.to_str().unwrap();
    let (code, err, rss) = measure(&cache, &["put", "--model", "llama-3-8b", f_arg], None);
    assert_eq!(code, 0, "{err}");
    let grew = rss.saturating_sub(baseline);
    assert!(
        grew < len / 4,
        "put grew {grew} B over info ({baseline} B) for a {len} B chunk"
    );
    assert_eq!(chunk_files(&cache), 1);

    let cache2 = t.path().join("c2");
    let (code, err, rss) = measure(&cache2, &["put", "--model", "llama-3-8b", "-"], Some(&f));
    assert_eq!(code, 0, "{err}");
    let grew = rss.saturating_sub(baseline);
    assert!(
        grew < len / 4,
        "stdin: put grew {grew} B over info ({baseline} B)"
    );
    let stored = kvfs_loader::dir::Layout::Cache.chunk_path(&cache2, &spec.namespace_dir(), &key);
    assert_eq!(fs::read(stored).unwrap(), fs::read(&f).unwrap());
}

/// `kvfs put /dev/zero` is refused from its first bytes instead of reading forever.
#[test]
fn endless_input_that_is_not_a_chunk_is_refused_at_once() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let mut c = kvfs(&cache);
    c.args(["put", "--model", "tiny", "/dev/zero"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("kvfs put /dev/zero still reading after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad magic"), "{err}");
    assert_eq!(chunk_files(&cache), 0);
}

/// A chunk cut short, or followed by more bytes than its header declares, stores nothing and
/// leaves no temporary file.
#[test]
fn short_or_overlong_input_stores_nothing() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("c");
    let spec = ModelSpec::preset("tiny").unwrap();
    let (_, bytes) = synth_chunk(&spec, None, SaltTag::NONE, (0..256).collect()).unwrap();
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"more");
    for (what, input, msg) in [
        ("short", bytes[..bytes.len() - 1].to_vec(), "truncated"),
        ("header only", bytes[..4096].to_vec(), "truncated"),
        ("overlong", longer, "goes on past"),
    ] {
        let mut c = kvfs(&cache);
        let mut child = c
            .args(["put", "--model", "tiny"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // kvfs stops reading once it knows the input is bad; the rest may meet a closed pipe.
        match child.stdin.take().unwrap().write_all(&input) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => panic!("{what}: {e}"),
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{what}: {err}");
        assert_eq!(chunk_files(&cache), 0, "{what}");
    }
    let leftovers: Vec<_> = support::cli::files_under(&cache)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
