//! The adapter on a real kernel mount, over the in-memory backend, served in this process.
//!
//! Needs /dev/fuse and the right to mount (root): see tests/support/require.rs (a skip line,
//! or a failure under `KVFS_REQUIRE=fuse`).

use kvfs_fs::testing::{FaultyBackend, MemBackend};
use kvfs_fs::{ChunkBackend, MountOptions};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[path = "../../tests/support/require.rs"]
mod require;

struct Mounted {
    dir: tempfile::TempDir,
    _incoming: tempfile::TempDir,
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        let _ = kvfs_fs::unmount(self.dir.path(), true);
    }
}

fn mount_with(
    backend: Arc<dyn ChunkBackend>,
    incoming: tempfile::TempDir,
    opts: MountOptions,
) -> Mounted {
    let dir = tempfile::tempdir().unwrap();
    let session = kvfs_fs::spawn(backend, dir.path(), &opts).expect("mount");
    Mounted {
        dir,
        _incoming: incoming,
        session: Some(session),
    }
}

fn mem_mount(opts: MountOptions) -> (Arc<MemBackend>, Mounted, PathBuf) {
    let incoming = tempfile::tempdir().unwrap();
    let inc_path = incoming.path().to_path_buf();
    let backend = Arc::new(MemBackend::new(&inc_path, 1 << 30));
    let m = mount_with(backend.clone(), incoming, opts);
    (backend, m, inc_path)
}

fn spec() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

fn chunk(seed: u32) -> (ChunkKey, Vec<u8>) {
    let tokens: Vec<u32> = (0..256).map(|i| i * 7 + seed).collect();
    let (meta, bytes) = synth_chunk(&spec(), None, SaltTag::NONE, tokens).unwrap();
    (meta.key, bytes)
}

/// Writes a file and reports the error of `close()`, which Rust's `File` drop ignores.
fn write_and_close(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by `into_raw_fd`, so it is open and closed only here.
    if unsafe { libc::close(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno_of(r: io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

#[test]
fn view_status_and_xattrs() {
    if !require::fuse() {
        return;
    }
    let (backend, m, _) = mem_mount(MountOptions::default());
    let ns = spec().namespace_dir();
    let (key, bytes) = chunk(1);
    backend.insert(&ns, key, bytes.clone());

    // The status directory marks the mount for the loader.
    assert_eq!(
        kvfs_loader::dir::Layout::detect(m.path()),
        kvfs_loader::dir::Layout::Flat
    );
    let stats = fs::read_to_string(m.path().join(".kvfs/stats.json")).unwrap();
    assert!(stats.contains("\"hits\""), "{stats}");
    let info = fs::read_to_string(m.path().join(".kvfs/mount.json")).unwrap();
    assert!(info.contains("\"passthrough\""), "{info}");

    let names: Vec<String> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&ns) && names.contains(&".kvfs".to_string()),
        "{names:?}"
    );
    let chunk_path = m.path().join(&ns).join(key.file_name());
    let listed: Vec<_> = fs::read_dir(m.path().join(&ns)).unwrap().collect();
    assert_eq!(listed.len(), 1);
    let meta = fs::metadata(&chunk_path).unwrap();
    assert_eq!(meta.len(), bytes.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert!(fs::read(&chunk_path).unwrap() == bytes);

    assert_eq!(getxattr(&chunk_path, "user.kvfs.tokens").unwrap(), b"256");
    assert_eq!(getxattr(&chunk_path, "user.kvfs.parent").unwrap(), b"");
    assert_eq!(getxattr(&chunk_path, "user.kvfs.tier").unwrap(), b"memory");
    let header = kvfs_loader::ChunkHeader::parse(&bytes).unwrap();
    let digest: String = header
        .payload_digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        getxattr(&chunk_path, "user.kvfs.digest").unwrap(),
        digest.as_bytes()
    );
    // An in-memory chunk has no local file.
    assert_eq!(
        errno_of(getxattr(&chunk_path, "user.kvfs.backing")),
        libc::ENODATA
    );
    assert_eq!(errno_of(getxattr(&chunk_path, "user.other")), libc::ENODATA);

    // statfs reports the backend's capacity.
    let c = CString::new(m.path().as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs is plain data; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_blocks * st.f_frsize, 1 << 30);
    assert_eq!(st.f_files, 1);

    // A missing chunk and a bad name are simply absent.
    assert!(!m.path().join(&ns).join(chunk(2).0.file_name()).exists());
    assert!(!m.path().join(&ns).join("README").exists());
}

#[test]
fn write_once_commit_and_rejections() {
    if !require::fuse() {
        return;
    }
    let (backend, m, incoming) = mem_mount(MountOptions::default());
    let ns = spec().namespace_dir();
    fs::create_dir(m.path().join(&ns)).unwrap();
    assert_eq!(
        errno_of(fs::create_dir(m.path().join("Not A Namespace"))),
        libc::EINVAL
    );
    assert_eq!(errno_of(fs::create_dir(m.path().join(&ns))), libc::EEXIST);

    // A valid chunk commits and becomes visible.
    let (key, bytes) = chunk(3);
    let path = m.path().join(&ns).join(key.file_name());
    write_and_close(&path, &bytes).unwrap();
    assert!(backend.bytes(&ns, &key).unwrap().as_slice() == bytes.as_slice());
    assert!(fs::read(&path).unwrap() == bytes);

    // Existing names, rename, truncate, chmod, writes to committed chunks.
    assert_eq!(errno_of(write_and_close(&path, &bytes)), libc::EEXIST);
    assert_eq!(errno_of(fs::write(&path, &bytes)), libc::EEXIST);
    assert_eq!(
        errno_of(OpenOptions::new().append(true).open(&path)),
        libc::EPERM
    );
    let other = m.path().join(&ns).join(chunk(4).0.file_name());
    assert_eq!(errno_of(fs::rename(&path, &other)), libc::EPERM);
    assert_eq!(
        errno_of(fs::set_permissions(
            &path,
            fs::Permissions::from_mode(0o666)
        )),
        libc::EPERM
    );
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 10) }, -1);
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));

    // Invalid content fails close() with EINVAL and leaves nothing.
    let (k5, b5) = chunk(5);
    let p5 = m.path().join(&ns).join(k5.file_name());
    assert_eq!(errno_of(write_and_close(&p5, b"not a chunk")), libc::EINVAL);
    assert_eq!(
        errno_of(write_and_close(&p5, &b5[..b5.len() - 100])),
        libc::EINVAL
    );
    let mut corrupt = b5.clone();
    let last = corrupt.len() - 5000;
    corrupt[last] ^= 1;
    assert_eq!(errno_of(write_and_close(&p5, &corrupt)), libc::EINVAL);
    // A valid chunk under another chunk's name.
    assert_eq!(errno_of(write_and_close(&p5, &bytes)), libc::EINVAL);
    assert!(!p5.exists());
    assert!(backend.bytes(&ns, &k5).is_none());
    // ...in the wrong namespace directory.
    let other_ns = "other-0123456789abcdef";
    fs::create_dir(m.path().join(other_ns)).unwrap();
    assert_eq!(
        errno_of(write_and_close(
            &m.path().join(other_ns).join(k5.file_name()),
            &b5
        )),
        libc::EINVAL
    );
    // Names that are not chunk names, files outside a namespace.
    assert_eq!(
        errno_of(write_and_close(&m.path().join(&ns).join("x.txt"), b"x")),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(write_and_close(&m.path().join(k5.file_name()), &b5)),
        libc::EPERM
    );
    // Names longer than any file system allows.
    let long = m.path().join(&ns).join("a".repeat(300));
    assert_eq!(errno_of(write_and_close(&long, b"x")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::metadata(&long)), libc::ENAMETOOLONG);
    assert_eq!(
        errno_of(fs::create_dir(m.path().join("a".repeat(300)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        fs::read_dir(&incoming).unwrap().count(),
        0,
        "temporary files remain"
    );
    // And the right chunk still goes in afterwards.
    write_and_close(&p5, &b5).unwrap();
    assert!(fs::read(&p5).unwrap() == b5);

    // unlink evicts.
    fs::remove_file(&p5).unwrap();
    assert!(backend.bytes(&ns, &k5).is_none());
    assert_eq!(errno_of(fs::remove_file(&p5)), libc::ENOENT);
    assert_eq!(
        errno_of(fs::remove_dir(m.path().join(other_ns))),
        libc::EPERM
    );
    let info = fs::read_to_string(m.path().join(".kvfs/mount.json")).unwrap();
    assert!(info.contains("\"commits\": 2"), "{info}");
}

#[test]
fn failed_commit_fails_close_and_leaves_nothing() {
    if !require::fuse() {
        return;
    }
    let incoming = tempfile::tempdir().unwrap();
    let inc_path = incoming.path().to_path_buf();
    let faulty = Arc::new(FaultyBackend::new(MemBackend::new(&inc_path, 1 << 30)));
    let m = mount_with(faulty.clone(), incoming, MountOptions::default());
    let ns = spec().namespace_dir();
    fs::create_dir(m.path().join(&ns)).unwrap();
    let (key, bytes) = chunk(6);
    let path = m.path().join(&ns).join(key.file_name());
    faulty
        .fail_commits
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errno_of(write_and_close(&path, &bytes)), libc::ENOSPC);
    assert!(!path.exists());
    assert_eq!(fs::read_dir(&inc_path).unwrap().count(), 0);
    faulty
        .fail_commits
        .store(false, std::sync::atomic::Ordering::Relaxed);
    write_and_close(&path, &bytes).unwrap();
    assert!(
        fs::read(&path).unwrap() == bytes,
        "wrong bytes after commit"
    );
}

#[test]
fn read_only_mount_refuses_changes() {
    if !require::fuse() {
        return;
    }
    let opts = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    let (backend, m, _) = mem_mount(opts);
    let ns = spec().namespace_dir();
    let (key, bytes) = chunk(7);
    backend.insert(&ns, key, bytes.clone());
    let path = m.path().join(&ns).join(key.file_name());
    assert!(fs::read(&path).unwrap() == bytes);
    assert_eq!(errno_of(fs::remove_file(&path)), libc::EROFS);
    assert_eq!(
        errno_of(write_and_close(
            &m.path().join(&ns).join(chunk(8).0.file_name()),
            &bytes
        )),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::create_dir(m.path().join("x-0123456789abcdef"))),
        libc::EROFS
    );
}

#[test]
fn parallel_readers_get_the_right_bytes() {
    if !require::fuse() {
        return;
    }
    let (backend, m, _) = mem_mount(MountOptions::default());
    let ns = spec().namespace_dir();
    let chunks: Vec<(ChunkKey, Vec<u8>)> = (100..140).map(chunk).collect();
    for (k, b) in &chunks {
        backend.insert(&ns, *k, b.clone());
    }
    let chunks = Arc::new(chunks);
    let root = m.path().join(&ns);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let chunks = chunks.clone();
            let root = root.clone();
            std::thread::spawn(move || {
                for i in 0..chunks.len() {
                    let (k, b) = &chunks[(i + t * 5) % chunks.len()];
                    let mut got = Vec::new();
                    fs::File::open(root.join(k.file_name()))
                        .unwrap()
                        .read_to_end(&mut got)
                        .unwrap();
                    assert!(got == *b, "chunk {k} read wrong bytes");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
