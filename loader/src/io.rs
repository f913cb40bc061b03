//! File I/O for the loader: O_DIRECT with a logged fallback, aligned buffers, reader threads.
//!
//! - [`open_chunk_file`] opens with `O_DIRECT` when asked; a file system that refuses it
//!   (tmpfs, some FUSE mounts) answers `EINVAL` at open or at the first read, and the file is
//!   read through a buffered descriptor instead, with a log line saying which path and why.
//!   Direct reads are always issued with offset, length and buffer aligned to
//!   [`DIRECT_ALIGN`]; a read that cannot be aligned goes through the buffered twin, so the
//!   direct descriptor stays direct for the aligned reads other threads make.
//! - **Page-cache hits are not re-read from the device.** O_DIRECT goes to the device even when
//!   every byte is in the page cache (a chunk just stored, or read by another process): on
//!   the bench VM that is 0.6 GB/s instead of ~7 GB/s from memory. So before a direct read,
//!   [`page_cached`] asks the kernel (`cachestat(2)`, Linux 6.5+; no I/O, no readahead, unlike
//!   a `RWF_NOWAIT` probe) whether the whole range is resident; if so it is read through the
//!   buffered twin, else O_DIRECT as before (a cold load still reads the device once and does
//!   not fill the cache). Kernels without `cachestat` always read direct.
//! - The pieces under that policy (aligned buffers, the open with its fall back, the read loop,
//!   the fall-back log and counter) are kvfs-direct's, the O_DIRECT stack kvfs-gds uses too.
//! - [`backing_path`] reads the `user.kvfs.backing` extended attribute a kvfs mount sets on a
//!   chunk: the NVMe file behind it, which can be read with O_DIRECT (FUSE cannot serve that).
//! - [`AlignedBuf`] (kvfs-direct's) is a page-aligned, growable buffer; each reader thread
//!   keeps one for its whole life, so a load allocates nothing per read.
//! - [`Pool`] is a handful of std threads fed from one FIFO queue. Positioned reads block, so
//!   several threads are what keeps several reads in flight (the queue depth); a load
//!   submits its jobs layer by layer, so the FIFO order is also the layer order that
//!   layer-wise loading wants. No async runtime, no rayon: an engine links this.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use kvfs_direct::read_exact_at;
pub use kvfs_direct::{AlignedBuf, DIRECT_ALIGN, aligned};

/// Extended attribute a kvfs mount sets to the local file behind a chunk.
pub use crate::identity::BACKING_XATTR;

/// How chunk files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// O_DIRECT where the file system allows, buffered (logged) where it does not.
    #[default]
    Direct,
    /// Through the page cache.
    Buffered,
}

/// An open chunk file: the O_DIRECT descriptor if there is one, and a buffered one opened on
/// demand (fallback, or reads that cannot be aligned).
#[derive(Debug)]
pub struct ChunkFile {
    pub path: PathBuf,
    direct: Option<File>,
    buffered: OnceLock<io::Result<File>>,
}

/// Opens a chunk file for reading in `mode` (see the module docs for the fallback).
pub fn open_chunk_file(path: &Path, mode: IoMode) -> io::Result<ChunkFile> {
    let mut f = ChunkFile {
        path: path.to_path_buf(),
        direct: None,
        buffered: OnceLock::new(),
    };
    if mode == IoMode::Direct {
        let opened =
            kvfs_direct::open_with(path, OpenOptions::new().read(true)).map_err(|e| match e {
                kvfs_direct::DirectError::Io { source, .. } => source,
                e => io::Error::other(e),
            })?;
        if opened.direct {
            f.direct = Some(opened.file);
        } else {
            // The buffered descriptor the fall back opened is the one reads will use.
            f.buffered.set(Ok(opened.file)).expect("fresh OnceLock");
        }
    }
    if f.direct.is_none() && f.buffered.get().is_none() {
        f.buffered.set(File::open(path)).expect("fresh OnceLock");
        if let Some(Err(e)) = f.buffered.get() {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
    }
    Ok(f)
}

impl ChunkFile {
    /// Whether reads go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn buffered(&self) -> io::Result<&File> {
        match self.buffered.get_or_init(|| File::open(&self.path)) {
            Ok(f) => Ok(f),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> io::Result<u64> {
        match &self.direct {
            Some(d) => Ok(d.metadata()?.len()),
            None => Ok(self.buffered()?.metadata()?.len()),
        }
    }

    /// Fills `buf` from `offset`. Direct when the file is open direct, offset, length and
    /// address are aligned and the range is not all in the page cache; otherwise (or if the
    /// direct read answers EINVAL) buffered. A short
    /// read (end of file) is an `UnexpectedEof` error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(d) = &self.direct
            && aligned(buf.as_ptr() as usize, buf.len(), offset)
            && !page_cached(d, offset, buf.len() as u64)
        {
            match read_exact_at(d, buf, offset) {
                Err(e) if kvfs_direct::is_einval(&e) => kvfs_direct::note_fallback(&format!(
                    "{}: O_DIRECT refused at read ({e}); reading buffered",
                    self.path.display()
                )),
                r => return r,
            }
        }
        read_exact_at(self.buffered()?, buf, offset)
    }
}

/// `cachestat(2)`'s system call number (the same on every architecture; libc lacks it for
/// x86_64 glibc).
const SYS_CACHESTAT: libc::c_long = 451;

/// Cleared once the kernel answers that it has no `cachestat` (older than 6.5, or a seccomp
/// filter): then every check says "not cached" without a system call.
static CACHESTAT_WORKS: AtomicBool = AtomicBool::new(true);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether every page of `file`'s bytes `offset .. offset + len` is in the page cache
/// (`cachestat(2)`: a count, no I/O). `false` when the kernel cannot say.
pub fn page_cached(file: &File, offset: u64, len: u64) -> bool {
    if len == 0 || !CACHESTAT_WORKS.load(Ordering::Relaxed) {
        return false;
    }
    let page = 4096u64;
    let pages = (offset + len).div_ceil(page) - offset / page;
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: `range` and `stat` are live, properly laid out (`repr(C)`, the kernel's
    // `struct cachestat_range` and `struct cachestat`) for the call; the descriptor is open.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            CACHESTAT_WORKS.store(false, Ordering::Relaxed);
            tracing::debug!(error = %e, "no cachestat(2): page-cache hits are read direct");
        }
        return false;
    }
    stat.nr_cache >= pages
}

/// The local file behind a chunk on a kvfs mount (`user.kvfs.backing`), if the file system
/// names one that exists. Any failure (no attribute, not a mount, unreadable) is `None`.
pub fn backing_path(path: &Path) -> Option<PathBuf> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let c_name = CString::new(BACKING_XATTR).expect("no NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and live across the call; `buf` is writable for
    // `buf.len()` bytes, which is the size we pass.
    let n = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    buf.truncate(n as usize);
    while buf.last() == Some(&0) {
        buf.pop();
    }
    let p = PathBuf::from(std::ffi::OsStr::from_bytes(&buf));
    (p.is_absolute() && p.is_file()).then_some(p)
}

/// A unit of work for a reader thread, given the thread's buffer.
pub type Job = Box<dyn FnOnce(&mut AlignedBuf) + Send>;

struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

/// A fixed set of reader threads taking jobs from one FIFO queue. Each thread owns one
/// [`AlignedBuf`] that every job it runs reuses. Dropping the pool finishes queued jobs and
/// joins the threads.
pub struct Pool {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(threads: usize) -> io::Result<Pool> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let q = queue.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("kvfs-read-{i}"))
                    .spawn(move || worker(&q))?,
            );
        }
        Ok(Pool {
            queue,
            threads: handles,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Queues jobs, in order.
    pub fn submit_all(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut q = self.queue.jobs.lock().unwrap();
        q.0.extend(jobs);
        drop(q);
        self.queue.ready.notify_all();
    }
}

fn worker(q: &Queue) {
    let mut buf = AlignedBuf::new();
    loop {
        let job = {
            let mut g = q.jobs.lock().unwrap();
            loop {
                if let Some(j) = g.0.pop_front() {
                    break j;
                }
                if g.1 {
                    return;
                }
                g = q.ready.wait(g).unwrap();
            }
        };
        job(&mut buf);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue.jobs.lock().unwrap().1 = true;
        self.queue.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_page_aligned_and_grows() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.slice(10).as_ptr() as usize % DIRECT_ALIGN, 0);
        let s = b.slice(3 * DIRECT_ALIGN + 1);
        s[3 * DIRECT_ALIGN] = 7;
        assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.slice(0).is_empty());
    }

    #[test]
    fn reads_whole_ranges_and_reports_eof() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = open_chunk_file(&p, IoMode::Direct).unwrap();
        let mut b = AlignedBuf::new();
        let s = b.slice(DIRECT_ALIGN);
        f.read_exact_at(s, DIRECT_ALIGN as u64).unwrap();
        assert_eq!(s, &data[DIRECT_ALIGN..2 * DIRECT_ALIGN]);
        // unaligned: served buffered
        let mut small = [0u8; 10];
        f.read_exact_at(&mut small, 5).unwrap();
        assert_eq!(small, data[5..15]);
        let e = f
            .read_exact_at(b.slice(DIRECT_ALIGN), 3 * DIRECT_ALIGN as u64)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn page_cached_sees_written_pages_and_evicted_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data = vec![7u8; 4 * DIRECT_ALIGN];
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        if !page_cached(&f, 0, data.len() as u64) {
            // Only a kernel without cachestat(2) (before 6.5) may say no to freshly written
            // pages; the loader then reads direct, as it did before the check existed.
            eprintln!("no cachestat(2) on this kernel: only the fallback is checked");
            assert!(
                !CACHESTAT_WORKS.load(Ordering::Relaxed),
                "written pages not resident"
            );
            return;
        }
        // evict: write back, then drop the file's clean pages
        f.sync_all().unwrap();
        // SAFETY: a valid descriptor; advice only.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(!page_cached(&f, 0, data.len() as u64));
        assert!(!page_cached(&f, 0, 0), "an empty range is never a hit");
        // a direct read of the evicted range still returns the bytes
        let cf = open_chunk_file(&p, IoMode::Direct).unwrap();
        let mut b = AlignedBuf::new();
        let s = b.slice(2 * DIRECT_ALIGN);
        cf.read_exact_at(s, DIRECT_ALIGN as u64).unwrap();
        assert_eq!(s, &data[DIRECT_ALIGN..3 * DIRECT_ALIGN]);
    }

    #[test]
    fn no_backing_attribute_is_none() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        assert_eq!(backing_path(&p), None);
        assert_eq!(backing_path(&d.path().join("missing")), None);
    }

    #[test]
    fn pool_runs_jobs_in_order_per_thread() {
        let pool = Pool::new(1).unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        pool.submit_all((0..10).map(|i| {
            let out = out.clone();
            Box::new(move |_: &mut AlignedBuf| out.lock().unwrap().push(i)) as Job
        }));
        drop(pool);
        assert_eq!(*out.lock().unwrap(), (0..10).collect::<Vec<_>>());
    }
}
