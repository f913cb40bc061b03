//! `kvfs mount` end to end: the real binary on real kernel FUSE mounts, used through coreutils,
//! Python, getfattr and a second `kvfs` process writing the same cache directory.
//!
//! Needs /dev/fuse and root (fuser mounts without fusermount); every test prints a skip line
//! and passes when they are missing. Each test mounts into its own temporary directory and a
//! guard always unmounts (lazily) and reaps the daemon, even when an assertion fails.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support {
    pub mod mount;
}

use support::mount::Mount;

const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");

fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new("/dev/fuse").exists() || !root {
        eprintln!("skipping: needs /dev/fuse and root to mount FUSE without fusermount");
        return false;
    }
    true
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping the {tool} checks: {tool} is not installed");
    }
    ok
}

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
    if !fuse_available() {
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
    if have("getfattr") {
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
    if !fuse_available() {
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
    if !fuse_available() {
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
    if !fuse_available() {
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
    if !fuse_available() {
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
