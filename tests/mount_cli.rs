//! `kvfs mount` end to end: the real binary on real kernel FUSE mounts, used through coreutils,
//! Python, getfattr and a second `kvfs` process writing the same cache directory.
//!
//! Needs /dev/fuse and root (fuser mounts without fusermount), and getfattr/setfattr for the
//! xattr checks: see `support/require.rs` (a skip line, or a failure under
//! `KVFS_REQUIRE=fuse,setfattr`). Each test mounts into its own temporary directory and a
//! guard always unmounts (lazily) and reaps the daemon, even when an assertion fails.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support {
    pub mod mount;
    pub mod require;
}

use support::mount::Mount;

const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");

fn kvfs(cache: &Path, args: &[&str]) -> Output {
    Command::new(KVFS)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("KVFS_LOG", "warn")
        .output()
        .expect("run kvfs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Env {
    _tmp: tempfile::TempDir,
    cache: PathBuf,
    mnt: PathBuf,
    src: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    let src = tmp.path().join("src");
    fs::create_dir_all(&mnt).unwrap();
    Env {
        cache,
        mnt,
        src,
        _tmp: tmp,
    }
}

/// Chunk files (path in `cache`) of one namespace, by file name.
fn chunk_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "kvc") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn tiny_ns() -> String {
    kvfs_loader::ModelSpec::preset("tiny")
        .unwrap()
        .namespace_dir()
}

fn errno_of<T>(r: io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn coreutils_python_and_xattrs() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "1024"],
    ));
    ok(kvfs(
        &e.src,
        &[
            "synth", "--model", "tiny", "--tokens", "1024", "--seed", "9",
        ],
    ));
    let m = Mount::start(&e.cache, &e.mnt, &[]);
    let ns = tiny_ns();
    let nsdir = e.mnt.join(&ns);

    // ls and cat: the view holds exactly the cache's chunks, byte for byte.
    let ls = ok(Command::new("ls").arg(&nsdir).output().unwrap());
    let cached = chunk_files(&e.cache);
    assert_eq!(ls.lines().count(), cached.len());
    for f in &cached {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(ls.contains(name), "{name} not listed");
        let cat = Command::new("cat").arg(nsdir.join(name)).output().unwrap();
        assert!(
            cat.stdout == fs::read(f).unwrap(),
            "cat {name}: wrong bytes"
        );
        let size = ok(Command::new("stat")
            .args(["-c", "%s"])
            .arg(nsdir.join(name))
            .output()
            .unwrap());
        assert_eq!(size.trim(), fs::metadata(f).unwrap().len().to_string());
    }

    // xattrs, with getfattr where installed.
    let first = &cached[0];
    let first_view = nsdir.join(first.file_name().unwrap());
    if support::require::setfattr() {
        let get = |name: &str| {
            ok(Command::new("getfattr")
                .args(["--only-values", "-n", name])
                .arg(&first_view)
                .output()
                .unwrap())
        };
        assert_eq!(get("user.kvfs.tokens"), "256");
        assert_eq!(get("user.kvfs.tier"), "disk");
        assert_eq!(
            PathBuf::from(get("user.kvfs.backing")),
            first.canonicalize().unwrap()
        );
        assert_eq!(get("user.kvfs.digest").len(), 64);
        let parent = get("user.kvfs.parent");
        assert!(parent.is_empty() || parent.len() == 64, "{parent}");
    }

    // cp a new chunk in: visible, stored in the cache, same bytes.
    let new = chunk_files(&e.src)[0].clone();
    let name = new.file_name().unwrap().to_str().unwrap().to_string();
    ok(Command::new("cp").arg(&new).arg(&nsdir).output().unwrap());
    assert!(fs::read(nsdir.join(&name)).unwrap() == fs::read(&new).unwrap());
    assert!(
        chunk_files(&e.cache)
            .iter()
            .any(|p| p.file_name().unwrap() == name.as_str())
    );
    // Copying it again: EEXIST.
    let again = Command::new("cp").arg(&new).arg(&nsdir).output().unwrap();
    assert!(!again.status.success());

    // An invalid chunk and a truncated one: cp fails, nothing is left.
    let other = chunk_files(&e.src)[1].clone();
    let other_name = other.file_name().unwrap().to_str().unwrap().to_string();
    let bad = e.src.join("bad.kvc");
    let bytes = fs::read(&other).unwrap();
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let cp = Command::new("cp")
        .arg(&bad)
        .arg(nsdir.join(&other_name))
        .output()
        .unwrap();
    assert!(!cp.status.success(), "a truncated chunk was accepted");
    assert!(!nsdir.join(&other_name).exists());
    fs::write(&bad, b"definitely not a chunk").unwrap();
    let cp = Command::new("cp")
        .arg(&bad)
        .arg(nsdir.join(&other_name))
        .output()
        .unwrap();
    assert!(!cp.status.success(), "garbage was accepted");
    assert!(!nsdir.join(&other_name).exists());
    // A whole chunk with one payload byte flipped: only the digest check catches it.
    let mut corrupt = bytes.clone();
    let at = corrupt.len() - 4096 - 100;
    corrupt[at] ^= 0x40;
    fs::write(&bad, &corrupt).unwrap();
    let cp = Command::new("cp")
        .arg(&bad)
        .arg(nsdir.join(&other_name))
        .output()
        .unwrap();
    assert!(!cp.status.success(), "a corrupt payload was accepted");
    assert!(
        String::from_utf8_lossy(&cp.stderr).contains("Invalid argument"),
        "{}",
        String::from_utf8_lossy(&cp.stderr)
    );
    assert!(!nsdir.join(&other_name).exists());
    assert!(
        fs::read_dir(e.cache.join(".incoming"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "temporary files left behind"
    );

    // Python open/read/write, close errors included.
    let py = r#"
import sys
src, dst, bad = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(src, 'rb').read()
with open(dst, 'wb') as f:
    f.write(data)
assert open(dst, 'rb').read() == data
try:
    with open(bad, 'wb') as f:
        f.write(b'junk')
    print('accepted')
except OSError as e:
    print('errno', e.errno)
"#;
    let out = ok(Command::new("python3")
        .arg("-c")
        .arg(py)
        .arg(&other)
        .arg(nsdir.join(&other_name))
        .arg(nsdir.join(format!("{}.kvc", "ab".repeat(32))))
        .output()
        .unwrap());
    assert_eq!(out.trim(), format!("errno {}", libc::EINVAL));

    // rm evicts from the cache.
    ok(Command::new("rm").arg(nsdir.join(&name)).output().unwrap());
    assert!(!nsdir.join(&name).exists());
    assert!(
        !chunk_files(&e.cache)
            .iter()
            .any(|p| p.file_name().unwrap() == name.as_str())
    );
    // Rename and chmod are refused.
    assert_eq!(
        errno_of(fs::rename(&first_view, nsdir.join("x.kvc"))),
        libc::EPERM
    );
    // mkdir makes a namespace; a bad name is refused.
    fs::create_dir(e.mnt.join("my-model-0123456789abcdef")).unwrap();
    assert!(e.cache.join("my-model-0123456789abcdef").is_dir());
    assert_eq!(
        errno_of(fs::create_dir(e.mnt.join("Bad Name"))),
        libc::EINVAL
    );

    // statfs: df shows the mount.
    let df = ok(Command::new("df").arg(&e.mnt).output().unwrap());
    assert!(df.contains("kvfs"), "{df}");
    let stats = fs::read_to_string(e.mnt.join(".kvfs/stats.json")).unwrap();
    assert!(stats.contains("\"puts\""), "{stats}");
    drop(m);
}

#[test]
fn parallel_readers_passthrough_and_fallback() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "25600"],
    ));
    let cached = Arc::new(chunk_files(&e.cache));
    assert_eq!(cached.len(), 100);
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::start(&e.cache, &e.mnt, extra);
        let nsdir = e.mnt.join(tiny_ns());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let cached = cached.clone();
                let nsdir = nsdir.clone();
                std::thread::spawn(move || {
                    for i in 0..cached.len() {
                        let f = &cached[(i + t * 13) % cached.len()];
                        let got = fs::read(nsdir.join(f.file_name().unwrap())).unwrap();
                        assert!(got == fs::read(f).unwrap(), "{} wrong bytes", f.display());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let info = m.info();
        if extra.is_empty() {
            // This kernel (6.9+) with root: passthrough must really be used.
            let negotiated = info.contains("\"passthrough\": true");
            eprintln!("passthrough negotiated: {negotiated}");
            if negotiated {
                assert!(!info.contains("\"opens_passthrough\": 0,"), "{info}");
            }
        } else {
            assert!(info.contains("\"passthrough\": false"), "{info}");
            assert!(!info.contains("\"opens_cached\": 0,"), "{info}");
        }
        drop(m);
    }
}

#[test]
fn cli_writer_while_serving() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "512"],
    ));
    let m = Mount::start(&e.cache, &e.mnt, &[]);
    let nsdir = e.mnt.join(tiny_ns());
    assert_eq!(fs::read_dir(&nsdir).unwrap().count(), 2);
    // Another process writes the same cache directory: synth, then put.
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "512", "--seed", "3"],
    ));
    ok(kvfs(
        &e.src,
        &["synth", "--model", "tiny", "--tokens", "256", "--seed", "4"],
    ));
    let put = chunk_files(&e.src)[0].clone();
    ok(kvfs(&e.cache, &["put", put.to_str().unwrap()]));
    let names: Vec<String> = fs::read_dir(&nsdir)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    let put_name = put.file_name().unwrap().to_str().unwrap();
    assert!(names.iter().any(|n| n == put_name));
    assert!(fs::read(nsdir.join(put_name)).unwrap() == fs::read(&put).unwrap());
    drop(m);
}

#[test]
fn kill_9_then_remount_serves_everything() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "2560"],
    ));
    let mut m = Mount::start(&e.cache, &e.mnt, &[]);
    let nsdir = e.mnt.join(tiny_ns());
    assert_eq!(fs::read_dir(&nsdir).unwrap().count(), 10);
    m.crash();
    assert_eq!(
        errno_of(fs::metadata(&e.mnt)),
        libc::ENOTCONN,
        "a dead daemon's mount answers ENOTCONN"
    );
    let m2 = Mount::start(&e.cache, &e.mnt, &[]);
    for f in chunk_files(&e.cache) {
        let got = fs::read(nsdir.join(f.file_name().unwrap())).unwrap();
        assert!(got == fs::read(&f).unwrap());
    }
    drop(m2);
    drop(m);
}

#[test]
fn refuses_busy_directories_and_stops_cleanly() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    // Non-empty directory.
    let full = e.src.join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("f"), b"x").unwrap();
    let out = kvfs(&e.cache, &["mount", full.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // Already mounted.
    let mut m = Mount::start(&e.cache, &e.mnt, &[]);
    let out = kvfs(&e.cache, &["mount", e.mnt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already a mount point"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM unmounts and exits 0.
    // SAFETY: kill has no memory effects; the pid is our child's.
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) }, 0);
    assert!(
        m.wait_exit(Duration::from_secs(20)),
        "daemon failed on SIGTERM"
    );
    let canonical = e.mnt.canonicalize().unwrap();
    assert!(!kvfs_fs::is_mount_point(&canonical).unwrap());

    // `kvfs umount` does the same; a --daemon mount leaves and removes its pid file.
    let pid_file = e.src.join("kvfs.pid");
    let out = ok(kvfs(
        &e.cache,
        &[
            "mount",
            e.mnt.to_str().unwrap(),
            "--daemon",
            "--read-only",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
    ));
    let pid: i32 = out.trim().parse().unwrap();
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert!(kvfs_fs::is_mount_point(&canonical).unwrap());
    // Read-only: creating a namespace fails with EROFS.
    assert_eq!(
        errno_of(fs::create_dir(e.mnt.join("m-0123456789abcdef"))),
        libc::EROFS
    );
    ok(kvfs(&e.cache, &["umount", e.mnt.to_str().unwrap()]));
    assert!(!kvfs_fs::is_mount_point(&canonical).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let alive = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "daemon still running after umount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_file.exists(), "pid file left behind");
    // Unmounting something that is not mounted is an error.
    let out = kvfs(&e.cache, &["umount", e.mnt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

/// `kvfs --cache-dir CACHE GLOBAL... mount DIR EXTRA...`
fn mount_with(cache: &Path, dir: &Path, global: &[&str], extra: &[&str]) -> Mount {
    let mut cmd = Command::new(KVFS);
    cmd.arg("--cache-dir")
        .arg(cache)
        .args(global)
        .arg("mount")
        .arg(dir)
        .args(extra);
    Mount::spawn(cmd, dir)
}

fn mount_counter(m: &Mount, name: &str) -> u64 {
    let info: serde_json::Value = serde_json::from_str(&m.info()).unwrap();
    info[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {info}"))
}

/// `cat >`, `dd of=`, `tee` and `cp` each write a chunk through the mount: the shell and `dd`
/// close a duplicate of the still-empty file before they write, which must neither commit
/// nor reject it.
#[test]
fn shell_tools_write_chunks() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.src,
        &["synth", "--model", "tiny", "--tokens", "1024"],
    ));
    let m = Mount::start(&e.cache, &e.mnt, &[]);
    let nsdir = e.mnt.join(tiny_ns());
    fs::create_dir(&nsdir).unwrap();
    let sources = chunk_files(&e.src);
    assert_eq!(sources.len(), 4);
    let tools = [
        ("cat", r#"cat "$1" > "$2""#),
        ("dd", r#"dd if="$1" of="$2" bs=64k status=none"#),
        ("tee", r#"tee "$2" < "$1" > /dev/null"#),
        ("cp", r#"cp "$1" "$2""#),
    ];
    for ((tool, script), src) in tools.iter().zip(&sources) {
        let dst = nsdir.join(src.file_name().unwrap());
        let out = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(src)
            .arg(&dst)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            fs::read(&dst).unwrap() == fs::read(src).unwrap(),
            "{tool}: wrong bytes through the mount"
        );
    }
    let names = |files: Vec<PathBuf>| -> Vec<_> {
        files
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(chunk_files(&e.cache)), names(sources));
    assert_eq!(mount_counter(&m, "commits"), 4);
    assert_eq!(mount_counter(&m, "rejected"), 0);
    assert_eq!(
        fs::read_dir(e.cache.join(".incoming")).unwrap().count(),
        0,
        "temporary files remain"
    );
}

/// A chunk the cache cannot keep within `--capacity` fails the writer with ENOSPC, is not
/// kept, and costs nothing already held; one that fits after evicting colder chunks is kept.
#[test]
fn a_chunk_that_cannot_be_kept_is_enospc_and_nothing_is_evicted_for_it() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.src,
        &["synth", "--model", "tiny", "--tokens", "512"],
    ));
    // A chunk of a bigger model (about 12 MB against 256 KiB).
    ok(kvfs(
        &e.src,
        &["synth", "--model", "smollm2-135m", "--tokens", "256"],
    ));
    let mut sources = chunk_files(&e.src);
    sources.sort_by_key(|p| fs::metadata(p).unwrap().len());
    let (small, big) = (&sources[..2], sources.last().unwrap());
    let small_len = fs::metadata(&small[0]).unwrap().len();
    let big_len = fs::metadata(big).unwrap().len();
    assert!(big_len > 3 * small_len, "{big_len} vs {small_len}");
    // Room for one small chunk and a half.
    let cap = (small_len * 3 / 2).to_string();
    let m = mount_with(&e.cache, &e.mnt, &["--capacity", &cap], &[]);
    let nsdir = e.mnt.join(tiny_ns());
    fs::create_dir(&nsdir).unwrap();
    let big_ns = e.mnt.join(
        kvfs_loader::ModelSpec::preset("smollm2-135m")
            .unwrap()
            .namespace_dir(),
    );
    fs::create_dir(&big_ns).unwrap();
    ok(Command::new("cp")
        .arg(&small[0])
        .arg(&nsdir)
        .output()
        .unwrap());
    let cp = Command::new("cp").arg(big).arg(&big_ns).output().unwrap();
    assert!(
        !cp.status.success(),
        "a chunk over the capacity was accepted"
    );
    let err = String::from_utf8_lossy(&cp.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!big_ns.join(big.file_name().unwrap()).exists());
    // What was held before is still held and served.
    let first = nsdir.join(small[0].file_name().unwrap());
    assert!(fs::read(&first).unwrap() == fs::read(&small[0]).unwrap());
    let stats: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(e.mnt.join(".kvfs/stats.json")).unwrap()).unwrap();
    assert_eq!(stats["stats"]["evictions"], 0, "{stats}");
    // A second small chunk fits only by evicting the first: the new one is the one kept.
    ok(Command::new("cp")
        .arg(&small[1])
        .arg(&nsdir)
        .output()
        .unwrap());
    let second = nsdir.join(small[1].file_name().unwrap());
    assert!(fs::read(&second).unwrap() == fs::read(&small[1]).unwrap());
    let held = chunk_files(&e.cache);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].file_name(), small[1].file_name());
    assert_eq!(mount_counter(&m, "commits"), 2);
    assert_eq!(mount_counter(&m, "rejected"), 1);
}

/// Damaged, swapped, empty and planted files in the cache directory are never served: `open`
/// fails with EIO, and the file is quarantined.
#[test]
fn bad_files_in_the_cache_are_eio_and_quarantined() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "tiny", "--tokens", "1536"],
    ));
    let files = chunk_files(&e.cache);
    assert_eq!(files.len(), 6);
    let good: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    let elsewhere = e.src.with_extension("copy");
    fs::write(&elsewhere, &good[4]).unwrap();
    // 0: truncated; 1: a byte appended; 2: another chunk's bytes; 3: empty; 4: a symlink to a
    // valid copy elsewhere; 5: untouched.
    let plant = || {
        fs::write(&files[0], &good[0][..good[0].len() - 1]).unwrap();
        let mut longer = good[1].clone();
        longer.push(0);
        fs::write(&files[1], &longer).unwrap();
        fs::write(&files[2], &good[5]).unwrap();
        fs::write(&files[3], b"").unwrap();
        let _ = fs::remove_file(&files[4]);
        std::os::unix::fs::symlink(&elsewhere, &files[4]).unwrap();
    };
    for extra in [&[][..], &["--no-passthrough"][..]] {
        plant();
        let m = Mount::start(&e.cache, &e.mnt, extra);
        let nsdir = e.mnt.join(tiny_ns());
        for (i, f) in files.iter().enumerate().take(5) {
            let r = fs::read(nsdir.join(f.file_name().unwrap()));
            assert_eq!(errno_of(r), libc::EIO, "file {i} ({extra:?})");
        }
        assert!(fs::read(nsdir.join(files[5].file_name().unwrap())).unwrap() == good[5]);
        assert_eq!(mount_counter(&m, "verify_failures"), 5, "{extra:?}");
        // All five moved aside, the good one kept.
        assert_eq!(chunk_files(&e.cache), vec![files[5].clone()], "{extra:?}");
        drop(m);
    }
    let quarantine = e.cache.join(".quarantine").join(tiny_ns());
    assert_eq!(fs::read_dir(&quarantine).unwrap().count(), 10);
    assert!(
        fs::read(&elsewhere).unwrap() == good[4],
        "a symlink's target was touched"
    );
}

/// Property: a byte flipped anywhere in a chunk file (header or payload) is never served.
/// Every open through the mount fails with EIO, whatever the byte and bit.
#[test]
fn random_byte_flips_through_the_mount_are_eio() {
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if !support::require::fuse() {
        return;
    }
    const CASES: u32 = 24;
    let e = env();
    ok(kvfs(
        &e.cache,
        &[
            "synth",
            "--model",
            "tiny",
            "--tokens",
            &(256 * CASES).to_string(),
        ],
    ));
    let files = chunk_files(&e.cache);
    assert_eq!(files.len(), CASES as usize);
    let m = Mount::start(&e.cache, &e.mnt, &[]);
    let nsdir = e.mnt.join(tiny_ns());
    let next = AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: CASES,
        // Each case uses up a fresh chunk (never read before, so no page cache holds it).
        max_shrink_iters: 0,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(pos in 0.0f64..1.0, bit in 0u8..8, in_header in any::<bool>())| {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let file = &files[i];
        let mut bytes = fs::read(file).unwrap();
        // Half the flips in the first 4 KiB (the header and its padding), half anywhere.
        let span = if in_header { 4096.min(bytes.len()) } else { bytes.len() };
        let at = ((pos * span as f64) as usize).min(span - 1);
        bytes[at] ^= 1 << bit;
        fs::write(file, &bytes).unwrap();
        let r = fs::read(nsdir.join(file.file_name().unwrap()));
        prop_assert_eq!(errno_of(r), libc::EIO, "flip at {} bit {} served", at, bit);
    });
    assert_eq!(mount_counter(&m, "verify_failures"), CASES as u64);
    let quarantine = e.cache.join(".quarantine").join(tiny_ns());
    assert_eq!(fs::read_dir(&quarantine).unwrap().count(), CASES as usize);
}

/// `kvfs umount` (a plain `umount`, SIGTERM) end a foreground daemon cleanly: exit 0, and nothing
/// logged at warn level (it used to log "Failed to umount filesystem: Invalid argument" when
/// fuser unmounted a second time).
#[test]
fn umount_ends_the_daemon_without_a_warning() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    let mut m = Mount::start(&e.cache, &e.mnt, &[]);
    ok(kvfs(&e.cache, &["umount", e.mnt.to_str().unwrap()]));
    assert!(m.wait_exit(Duration::from_secs(20)), "{}", m.stderr());
    assert!(
        m.stderr().trim().is_empty(),
        "daemon logged: {}",
        m.stderr()
    );
    let mut m = Mount::start(&e.cache, &e.mnt, &[]);
    ok(Command::new("umount").arg(&e.mnt).output().unwrap());
    assert!(m.wait_exit(Duration::from_secs(20)), "{}", m.stderr());
    assert!(
        m.stderr().trim().is_empty(),
        "daemon logged: {}",
        m.stderr()
    );
}

#[test]
fn a_namespace_of_many_pages_lists_every_chunk_once_in_order() {
    if !support::require::fuse() {
        return;
    }
    let e = env();
    // 400 chunks of 8 KiB over the 256 listing pages: most pages hold one or more, some
    // none (both are walked).
    ok(kvfs(
        &e.cache,
        &["synth", "--model", "scale-micro", "--tokens", "6400"],
    ));
    let ns = kvfs_loader::ModelSpec::preset("scale-micro")
        .unwrap()
        .namespace_dir();
    let mut expected: Vec<String> = chunk_files(&e.cache)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 400);
    let m = Mount::start(&e.cache, &e.mnt, &[]);
    let nsdir = e.mnt.join(&ns);
    // READDIR through the kernel, resumed page after page by cookie.
    let listed: Vec<String> = fs::read_dir(&nsdir)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(listed, expected, "every chunk once, in key order");
    // READDIRPLUS (`ls -l` asks for attributes): the sizes are the files'.
    let ls = ok(Command::new("ls").arg("-l").arg(&nsdir).output().unwrap());
    let sizes: Vec<&str> = ls
        .lines()
        .filter(|l| l.ends_with(".kvc"))
        .map(|l| l.split_whitespace().nth(4).unwrap())
        .collect();
    assert_eq!(sizes.len(), 400);
    assert!(sizes.iter().all(|s| *s == "8192"), "{:?}", &sizes[..3]);
    drop(m);
}
