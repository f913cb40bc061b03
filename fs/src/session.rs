//! The session: the mount point checks, and the calls that mount, serve and unmount.
//!
//! [`prepare_mountpoint`] is what `kvfs mount` runs before mounting: a directory left behind
//! by a crashed daemon answers `ENOTCONN` to `stat`; it is lazily unmounted
//! (`umount2(MNT_DETACH)`) and reused. A live mount or a non-empty directory is refused with a
//! typed [`MountError`], so a typo cannot hide an existing directory's files under the cache.
//!
//! [`mount`] and [`spawn`] build the file system ([`KvFs`] inside [`FuseFs`]) and fuser's
//! session from [`MountOptions::fuser_config`].

use crate::backend::ChunkBackend;
use crate::core::KvFs;
use crate::fuse::FuseFs;
use crate::options::MountOptions;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a directory cannot be mounted on.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}: no such directory")]
    Missing(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} is not empty; kvfs mounts only on an empty directory")]
    NotEmpty(PathBuf),
    #[error("{0} is already a mount point (unmount it first: kvfs umount {0})")]
    AlreadyMounted(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `dir` (canonical) is a mount point, according to /proc/self/mountinfo.
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = dir.as_os_str().as_bytes();
    Ok(info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    }))
}

/// The `major:minor` device of the mount at `dir` (canonical), from /proc/self/mountinfo.
fn mount_device(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.as_os_str().as_bytes();
    info.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (unescape_mountinfo(mp) == want).then(|| dev.to_string())
    })
}

/// Readahead of the mount's backing device info, in KiB. The kernel starts a FUSE mount at
/// 128 KiB (it offers no more at INIT); chunks are read front to back in large pieces, so a
/// larger window means fewer, larger READ requests when reads are not passed through. Best
/// effort: found through /proc/self/mountinfo (touching the mount itself before its session
/// runs would deadlock) and written to `/sys/class/bdi/<dev>/read_ahead_kb`.
pub const READAHEAD_KB: u32 = 1024;

fn tune_readahead(dir: &Path) {
    let Some(dev) = mount_device(dir) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, READAHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(%knob, kb = READAHEAD_KB, "readahead raised"),
        Err(e) => tracing::debug!(%knob, error = %e, "cannot raise readahead"),
    }
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts `dir`; `lazy` detaches it even while files are open (`MNT_DETACH`).
pub fn unmount(dir: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks `dir` is fit to mount on and returns its canonical path. A stale kvfs mount (its
/// daemon died: `stat` fails with ENOTCONN) is lazily unmounted first.
pub fn prepare_mountpoint(dir: &Path) -> Result<PathBuf, MountError> {
    match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(dir = %dir.display(), "stale mount (its daemon is gone); detaching it");
            unmount(dir, true).map_err(io_at(dir))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::Missing(dir.to_path_buf()));
        }
        Err(e) => return Err(io_at(dir)(e)),
        Ok(_) => {}
    }
    let canonical = dir.canonicalize().map_err(io_at(dir))?;
    let meta = std::fs::metadata(&canonical).map_err(io_at(dir))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(canonical));
    }
    if is_mount_point(&canonical).map_err(io_at(dir))? {
        return Err(MountError::AlreadyMounted(canonical));
    }
    if std::fs::read_dir(&canonical)
        .map_err(io_at(dir))?
        .next()
        .is_some()
    {
        return Err(MountError::NotEmpty(canonical));
    }
    Ok(canonical)
}

/// Mounts `backend` on `dir` (already checked with [`prepare_mountpoint`]) and returns the
/// session; `Session::run` serves until the file system is unmounted.
pub fn mount(
    backend: Arc<dyn ChunkBackend>,
    dir: &Path,
    opts: &MountOptions,
) -> io::Result<fuser::Session<FuseFs>> {
    let fs = FuseFs::new(Arc::new(KvFs::new(backend, opts.clone())));
    let unmounter = fs.unmounter_slot();
    let mut session = fuser::Session::new(fs, dir, &opts.fuser_config())?;
    // The file system unmounts through the session's own handle when the session ends, so
    // fuser does not unmount a second time (see `FuseFs::destroy`).
    *unmounter.lock().unwrap() = Some(session.unmount_callable());
    // Not `dir.canonicalize()`: that would stat the new mount before its session serves.
    tune_readahead(dir);
    Ok(session)
}

/// Mounts `backend` on `dir` and serves it from background threads until the returned
/// session is dropped or unmounted.
pub fn spawn(
    backend: Arc<dyn ChunkBackend>,
    dir: &Path,
    opts: &MountOptions,
) -> io::Result<fuser::BackgroundSession> {
    mount(backend, dir, opts)?.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(r"/x\0"), b"/x\\0");
    }

    #[test]
    fn refuses_non_empty_and_missing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert!(matches!(
            prepare_mountpoint(d.path()),
            Err(MountError::NotEmpty(_))
        ));
        assert!(matches!(
            prepare_mountpoint(&d.path().join("nope")),
            Err(MountError::Missing(_))
        ));
        assert!(matches!(
            prepare_mountpoint(&d.path().join("f")),
            Err(MountError::NotADirectory(_))
        ));
        let empty = d.path().join("e");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(
            prepare_mountpoint(&empty).unwrap(),
            empty.canonicalize().unwrap()
        );
    }

    #[test]
    fn refuses_a_mount_point() {
        // `/proc` is a mount point on every Linux system.
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        assert!(matches!(
            prepare_mountpoint(Path::new("/proc")),
            Err(MountError::AlreadyMounted(_))
        ));
    }
}
