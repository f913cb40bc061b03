//! O_DIRECT file I/O with a logged, counted fall back to buffered I/O.
//!
//! Cold loads should bypass the page cache (the data goes to a GPU and would only evict hot
//! chunks), so files are opened with `O_DIRECT` where the file system allows it. Not all do:
//! procfs/sysfs refuse the flag at `open` with `EINVAL`, some FUSE and network file systems
//! accept it at `open` and refuse the first transfer, and a transfer whose buffer, offset or
//! length is not block aligned is refused too. In each case kvfs goes on buffered, logs the
//! reason ([`note_fallback`]: once per process at `warn`, since every file on such a file
//! system falls back, then at `debug`) and counts it ([`direct_fallbacks`]), rather than
//! failing the load.
//!
//! The transfer loops handle `EINTR` and short transfers; a read that hits end of file before
//! the wanted bytes is a [`DirectError::ShortRead`], never silently zero-filled data.
//!
//! Two ways to go on after a refused transfer, both built from these pieces:
//! - [`read_at_least`] and [`write_all_at`] clear `O_DIRECT` with `fcntl(F_SETFL)` on the
//!   caller's descriptor and retry, which affects every user of that open file description
//!   (kvfs-gds opens its own descriptors for each load, so this is the intended effect);
//! - a caller that shares one descriptor between reads that are aligned and reads that are
//!   not (kvfs-loader's chunk files) keeps a buffered twin descriptor instead, reads with
//!   [`read_exact_at`] and reports a refusal with [`note_fallback`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::buf::{AlignedBuf, DIRECT_ALIGN};
use crate::error::DirectError;

type Result<T> = std::result::Result<T, DirectError>;

/// Times a transfer fell back from O_DIRECT to buffered in this process.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Number of O_DIRECT transfers or opens that fell back to buffered I/O in this process.
pub fn direct_fallbacks() -> u64 {
    FALLBACKS.load(Ordering::Relaxed)
}

/// Counts a fall back from O_DIRECT to buffered I/O and logs `what`: at `warn` the first time
/// in this process (the file system cannot do direct I/O, so every file on it will fall
/// back), then at `debug`.
pub fn note_fallback(what: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{what}");
    } else {
        tracing::debug!("{what}");
    }
}

/// Whether `e` is the `EINVAL` a file system answers when it refuses O_DIRECT.
pub fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Fills `buf` from `offset` of `f`, handling `EINTR` and short reads; a file that ends first
/// is an `UnexpectedEof` error. No fall back: the caller decides what a refusal means.
pub fn read_exact_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file at offset {offset}"),
                ));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A file opened for kvfs I/O and whether O_DIRECT is in effect.
#[derive(Debug)]
pub struct OpenedFile {
    /// The file.
    pub file: File,
    /// Whether the descriptor has O_DIRECT.
    pub direct: bool,
    /// Why O_DIRECT is not in effect, if it was refused.
    pub fallback_reason: Option<String>,
}

/// Opens `path` for reading, with O_DIRECT if the file system takes it.
pub fn open_read(path: &Path) -> Result<OpenedFile> {
    open_with(path, OpenOptions::new().read(true))
}

/// Opens (creating, truncating) `path` for writing, with O_DIRECT if the file system takes it.
pub fn open_write(path: &Path) -> Result<OpenedFile> {
    open_with(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true),
    )
}

/// Opens `path` with `opts` plus O_DIRECT; where the file system refuses the flag (`EINVAL`),
/// opens it without, says why in [`OpenedFile::fallback_reason`], and logs and counts it.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<OpenedFile> {
    let mut direct_opts = opts.clone();
    direct_opts.custom_flags(libc::O_DIRECT);
    match direct_opts.open(path) {
        Ok(file) => Ok(OpenedFile {
            file,
            direct: true,
            fallback_reason: None,
        }),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let reason = format!(
                "{}: O_DIRECT refused at open ({e}); using buffered I/O",
                path.display()
            );
            note_fallback(&reason);
            let file = opts.open(path).map_err(|e| DirectError::io("open", 0, e))?;
            Ok(OpenedFile {
                file,
                direct: false,
                fallback_reason: Some(reason),
            })
        }
        Err(e) => Err(DirectError::io("open", 0, e)),
    }
}

/// Whether `fd` has O_DIRECT set.
pub fn is_direct(fd: RawFd) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags; an invalid fd gives -1.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl >= 0 && fl & libc::O_DIRECT != 0
}

/// Clears O_DIRECT on `fd`, logging why. Returns whether it was set.
fn drop_direct(fd: RawFd, op: &str, offset: u64, err: &io::Error) -> bool {
    // SAFETY: F_GETFL/F_SETFL only read and change the status flags of the descriptor.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || fl & libc::O_DIRECT == 0 {
        return false;
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_DIRECT) } < 0 {
        return false;
    }
    note_fallback(&format!(
        "fd {fd}: O_DIRECT {op} at offset {offset} refused ({err}); falling back to buffered I/O on this file"
    ));
    true
}

/// Borrows `fd` as a `File` without taking ownership.
fn borrow_file(fd: RawFd) -> std::mem::ManuallyDrop<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: the File is wrapped in ManuallyDrop, so it never closes the caller's fd; it is
    // used only for positional reads/writes while the caller keeps fd open.
    std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Reads into `buf` from `offset` until at least `need` bytes have arrived or the file ends.
/// Returns the byte count read (`>= need`), or [`DirectError::ShortRead`].
///
/// If the descriptor has O_DIRECT and the kernel refuses a transfer with `EINVAL`, the flag
/// is cleared and the read goes on buffered.
pub fn read_at_least(fd: RawFd, buf: &mut [u8], offset: u64, need: u64) -> Result<u64> {
    let f = borrow_file(fd);
    let direct_at_start = is_direct(fd);
    let mut fell_back = false;
    let mut done = 0usize;
    while (done as u64) < need {
        let at = offset + done as u64;
        match f.read_at(&mut buf[done..], at) {
            Ok(0) => {
                return Err(DirectError::ShortRead {
                    offset,
                    wanted: need,
                    got: done as u64,
                });
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Refused under O_DIRECT: clear the flag (or see that a concurrent reader of the
            // same descriptor already did) and retry once, buffered.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && !fell_back
                    && (drop_direct(fd, "read", at, &e) || (direct_at_start && !is_direct(fd))) =>
            {
                fell_back = true;
            }
            Err(e) => return Err(DirectError::io("pread", at, e)),
        }
    }
    Ok(done as u64)
}

/// Writes all of `buf` at `offset`, with the same O_DIRECT fall back as [`read_at_least`].
pub fn write_all_at(fd: RawFd, buf: &[u8], offset: u64) -> Result<()> {
    let f = borrow_file(fd);
    let direct_at_start = is_direct(fd);
    let mut fell_back = false;
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match f.write_at(&buf[done..], at) {
            Ok(0) => {
                return Err(DirectError::io(
                    "pwrite",
                    at,
                    io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && !fell_back
                    && (drop_direct(fd, "write", at, &e)
                        || (direct_at_start && !is_direct(fd))) =>
            {
                fell_back = true;
            }
            Err(e) => return Err(DirectError::io("pwrite", at, e)),
        }
    }
    Ok(())
}

/// Result of [`probe_direct_io`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectSupport {
    /// An aligned O_DIRECT write and read back worked.
    Supported,
    /// O_DIRECT is not usable there; the reason says why.
    Unsupported(String),
}

impl std::fmt::Display for DirectSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectSupport::Supported => write!(f, "supported"),
            DirectSupport::Unsupported(r) => write!(f, "unsupported: {r}"),
        }
    }
}

/// Checks whether files in `dir` can be written and read with O_DIRECT: creates a hidden
/// temporary file, writes and reads back one aligned block, and removes it. Cheap enough for
/// `kvfs doctor`.
pub fn probe_direct_io(dir: &Path) -> DirectSupport {
    let path = dir.join(format!(".kvfs-direct-probe-{}", std::process::id()));
    let res = (|| -> std::result::Result<(), String> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| format!("open O_DIRECT in {}: {e}", dir.display()))?;
        let mut b = AlignedBuf::zeroed(DIRECT_ALIGN).map_err(|e| e.to_string())?;
        b.fill(0x5a);
        f.write_all_at(&b, 0)
            .map_err(|e| format!("O_DIRECT write: {e}"))?;
        b.fill(0);
        f.read_exact_at(&mut b, 0)
            .map_err(|e| format!("O_DIRECT read: {e}"))?;
        if b.iter().any(|&x| x != 0x5a) {
            return Err("O_DIRECT read back different bytes".into());
        }
        let _ = f.as_raw_fd();
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    match res {
        Ok(()) => DirectSupport::Supported,
        Err(r) => DirectSupport::Unsupported(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_direct_on_a_real_file_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let o = open_read(&p).unwrap();
        if !o.direct {
            eprintln!("skipping the O_DIRECT half: {:?}", o.fallback_reason);
        }
        let mut b = AlignedBuf::zeroed(12_288).unwrap();
        let n = read_at_least(o.file.as_raw_fd(), &mut b, 0, 10_000).unwrap();
        assert_eq!(n, 10_000);
        assert!(b[..10_000].iter().all(|&x| x == 7));
        // Past the end: typed short read, nothing invented.
        let err = read_at_least(o.file.as_raw_fd(), &mut b, 8192, 4096).unwrap_err();
        assert!(
            matches!(err, DirectError::ShortRead { got: 1808, .. }),
            "{err}"
        );
    }

    #[test]
    fn open_falls_back_where_o_direct_is_refused() {
        // procfs refuses O_DIRECT at open with EINVAL: a real file system that does.
        let before = direct_fallbacks();
        let o = open_read(Path::new("/proc/version")).unwrap();
        assert!(!o.direct);
        assert!(o.fallback_reason.unwrap().contains("O_DIRECT refused"));
        assert!(direct_fallbacks() > before);
        let mut b = vec![0u8; 4096];
        let n = read_at_least(o.file.as_raw_fd(), &mut b, 0, 5).unwrap();
        assert!(n >= 5 && b.starts_with(b"Linux"));
    }

    #[test]
    fn transfer_refused_under_o_direct_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let o = open_read(&p).unwrap();
        if !o.direct {
            eprintln!(
                "skipping: O_DIRECT not available here: {:?}",
                o.fallback_reason
            );
            return;
        }
        let fd = o.file.as_raw_fd();
        // A misaligned buffer and offset: the kernel refuses it under O_DIRECT (EINVAL).
        let mut b = AlignedBuf::zeroed(16_384).unwrap();
        let before = direct_fallbacks();
        let n = read_at_least(fd, &mut b[1..], 3, 5000).unwrap();
        assert!(n >= 5000);
        assert_eq!(&b[1..5001], &data[3..5003]);
        assert!(!is_direct(fd), "O_DIRECT is cleared after the refusal");
        assert!(direct_fallbacks() > before);
    }

    #[test]
    fn writes_and_direct_probe() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe_direct_io(dir.path()), DirectSupport::Supported);
        assert!(matches!(
            probe_direct_io(Path::new("/proc")),
            DirectSupport::Unsupported(_)
        ));
        let o = open_write(&dir.path().join("w")).unwrap();
        let mut b = AlignedBuf::zeroed(8192).unwrap();
        b.fill(3);
        write_all_at(o.file.as_raw_fd(), &b, 4096).unwrap();
        let back = std::fs::read(dir.path().join("w")).unwrap();
        assert_eq!(back.len(), 12_288);
        assert!(back[4096..].iter().all(|&x| x == 3));
        // A misaligned write on an O_DIRECT descriptor falls back instead of failing.
        write_all_at(o.file.as_raw_fd(), &b[1..100], 7).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("w")).unwrap()[7..106],
            [3u8; 99]
        );
    }
}
