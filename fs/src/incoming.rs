//! Chunks being written through the mount: create, write, close.
//!
//! A file created under `/<namespace>/` is buffered in a temporary file in the backend's
//! incoming directory (on disk, not in RAM: chunks are tens of MiB), named with the
//! `kvfs_loader::dir::TMP_PREFIX` so `sweep_temporaries` clears what a crashed daemon left.
//! Nothing is visible under the chunk's name while it is written.
//!
//! When the writer is done (see `KvFs::flush`: the file is complete, or the closing process
//! holds no other descriptor of it; else at the last release) the file is checked in full: it
//! must parse as a chunk (`ChunkHeader::read_from`, which also checks the size), its header
//! key must equal the key in its name, its namespace id must end in the 16 hex digits of the
//! directory's name, and every payload digest must match (checked here, or by the backend's
//! commit when it says it verifies, so the payload is hashed once). A valid file is handed to
//! the backend's `commit` (atomic, create-once, refused with ENOSPC when the store cannot
//! keep it); anything else fails the `close()` with **EINVAL** and the temporary file is
//! removed at once, so nothing is left. Later flushes (of `dup`ed descriptors) repeat the
//! first outcome; `release` removes the temporary file if it still exists.

use crate::backend::{BackendError, ChunkBackend, Committed};
use kvfs_loader::{ChunkHeader, ChunkKey, FormatError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a file being written stands.
#[derive(Debug, Clone)]
pub enum WriteState {
    /// Accepting writes.
    Open,
    /// Checked and committed; further writes are refused with EPERM.
    Committed,
    /// Rejected with this error; the temporary file is gone.
    Failed(Arc<BackendError>),
}

impl WriteState {
    pub fn is_open(&self) -> bool {
        matches!(self, WriteState::Open)
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// One file being written through the mount.
pub struct Incoming {
    pub ns: Arc<str>,
    pub key: ChunkKey,
    path: PathBuf,
    file: Option<File>,
    pub state: WriteState,
}

impl Incoming {
    /// Creates the temporary file for `key` in `dir`.
    pub fn create(dir: &Path, ns: Arc<str>, key: ChunkKey) -> io::Result<Incoming> {
        kvfs_loader::dir::create_dirs(dir)?;
        let path = kvfs_loader::dir::temp_path_for(&dir.join(key.file_name()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Incoming {
            ns,
            key,
            path,
            file: Some(file),
            state: WriteState::Open,
        })
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<usize> {
        match (&self.state, &self.file) {
            (WriteState::Open, Some(f)) => f.write_all_at(data, offset).map(|()| data.len()),
            (WriteState::Failed(_), _) | (WriteState::Open, None) => Err(errno(libc::EIO)),
            (WriteState::Committed, _) => Err(errno(libc::EPERM)),
        }
    }

    /// Whether the file already holds a whole chunk by its header (header parses, size
    /// matches); the payload is not checked here.
    pub fn is_complete(&self) -> bool {
        self.file
            .as_ref()
            .is_some_and(|f| ChunkHeader::read_from(f).is_ok())
    }

    /// Current size of the file being written.
    pub fn written_len(&self) -> u64 {
        self.file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    }

    /// Sets the size (`ftruncate` of a file still being written).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match (&self.state, &self.file) {
            (WriteState::Open, Some(f)) => f.set_len(len),
            _ => Err(errno(libc::EPERM)),
        }
    }

    /// Checks and commits the file (first call), or repeats the first outcome.
    pub fn finish(&mut self, backend: &dyn ChunkBackend) -> Result<(), Arc<BackendError>> {
        match &self.state {
            WriteState::Committed => return Ok(()),
            WriteState::Failed(e) => return Err(e.clone()),
            WriteState::Open => {}
        }
        let result = match &self.file {
            Some(f) => self.check_and_commit(f, backend),
            None => Err(BackendError::Other("file already closed".into())),
        };
        self.discard();
        match result {
            Ok(outcome) => {
                tracing::debug!(ns = %self.ns, key = %self.key, ?outcome, "chunk committed");
                self.state = WriteState::Committed;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(ns = %self.ns, key = %self.key, error = %e, "chunk rejected at close");
                let e = Arc::new(e);
                self.state = WriteState::Failed(e.clone());
                Err(e)
            }
        }
    }

    fn check_and_commit(
        &self,
        f: &File,
        backend: &dyn ChunkBackend,
    ) -> Result<Committed, BackendError> {
        check_chunk_file(f, &self.ns, &self.key, !backend.verifies_commits())?;
        backend.commit(&self.ns, &self.key, &self.path)
    }

    /// Removes the temporary file (idempotent).
    pub fn discard(&mut self) {
        if self.file.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary file");
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Checks that `f` holds a complete chunk that may be stored as `key` in the namespace
/// directory `ns`: header, size, key and namespace, and with `payload` every payload digest.
/// Errors are `FormatError`s (mapped to EINVAL).
pub fn check_chunk_file(
    f: &File,
    ns: &str,
    key: &ChunkKey,
    payload: bool,
) -> Result<ChunkHeader, FormatError> {
    let header = ChunkHeader::read_from(f)?;
    kvfs_loader::check_identity(&header, ns, key)?;
    if payload {
        header.verify_file_payload(f)?;
    }
    Ok(header)
}

/// Whether process `pid` still holds a descriptor of the file `<ns>/<key>.kvc` of a mount
/// (other than the one it is closing: the kernel removes a descriptor from the process's table
/// before it sends the FLUSH). Read from `/proc/<pid>/fd` (links, so the mount itself is not
/// asked); `false` when that cannot be read (pid 0, the process is exiting, or gone).
/// Matched by the path's tail, so a descriptor of the same name on another kvfs mount counts
/// too; that only defers an incomplete file's check to its last release (logged, not
/// returned), never commits a half-written one.
pub fn held_elsewhere(pid: u32, ns: &str, key: &ChunkKey) -> bool {
    if pid == 0 {
        return false;
    }
    let suffix = format!("/{ns}/{}", key.file_name());
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .ends_with(suffix.as_bytes())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_elsewhere_sees_an_open_descriptor_of_the_same_name() {
        let d = tempfile::tempdir().unwrap();
        let ns = "m-0123456789abcdef";
        let key = ChunkKey([9; 32]);
        std::fs::create_dir(d.path().join(ns)).unwrap();
        let path = d.path().join(ns).join(key.file_name());
        let pid = std::process::id();
        assert!(!held_elsewhere(pid, ns, &key));
        let f = File::create(&path).unwrap();
        assert!(held_elsewhere(pid, ns, &key));
        assert!(!held_elsewhere(pid, ns, &ChunkKey([8; 32])));
        assert!(!held_elsewhere(0, ns, &key));
        drop(f);
        assert!(!held_elsewhere(pid, ns, &key));
    }

    /// Bytes all over the header (checksummed, padding included) and a stride of the payload
    /// (digests, zero padding): any one flipped bit fails the check.
    #[test]
    fn every_flipped_byte_fails_the_check() {
        use crate::testing::conformance::{chunk, namespace};
        let (key, bytes) = chunk(1);
        let ns = namespace();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.kvc");
        std::fs::write(&path, &bytes).unwrap();
        check_chunk_file(&File::open(&path).unwrap(), &ns, &key, true).unwrap();
        let header_len = ChunkHeader::parse(&bytes).unwrap().header_len() as usize;
        // Every byte of the fixed header fields, then strides (debug builds hash slowly).
        let offsets = (0..256)
            .chain((256..header_len).step_by(7))
            .chain((header_len..bytes.len()).step_by(127));
        let mut flipped = bytes.clone();
        for (n, at) in offsets.enumerate() {
            let bit = 1u8 << (n % 8);
            flipped[at] ^= bit;
            std::fs::write(&path, &flipped).unwrap();
            let r = check_chunk_file(&File::open(&path).unwrap(), &ns, &key, true);
            assert!(r.is_err(), "flip of bit {bit:#x} at {at} passed the check");
            flipped[at] ^= bit;
        }
    }
}
