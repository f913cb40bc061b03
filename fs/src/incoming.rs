//! Chunks being written through the mount: create, write, close.
//!
//! A file created under `/<namespace>/` is buffered in a temporary file in the backend's
//! incoming directory (on disk, not in RAM: chunks are tens of MiB), named with the
//! `kvfs_loader::dir::TMP_PREFIX` so `sweep_temporaries` clears what a crashed daemon left.
//! Nothing is visible under the chunk's name while it is written.
//!
//! On the first `flush` (the kernel sends one for every `close()`, and `close()` returns its
//! error) the file is checked in full: it must parse as a chunk (`ChunkHeader::read_from`,
//! which also checks the size), its header key must equal the key in its name, its namespace
//! id must end in the 16 hex digits of the directory's name, and every payload digest must
//! match (checked here, or by the backend's commit when it says it verifies, so the payload
//! is hashed once). A valid file is handed to the backend's `commit` (atomic, create-once); anything else
//! fails the `close()` with **EINVAL** and the temporary file is removed at once, so nothing is
//! left. Later flushes (of `dup`ed descriptors) repeat the first outcome; `release` removes
//! the temporary file if it still exists.

use crate::backend::{BackendError, ChunkBackend, Committed};
use kvfs_loader::{ChunkHeader, ChunkKey, FormatError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a file being written stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    /// Accepting writes.
    Open,
    /// Checked and committed; further writes are refused with EPERM.
    Committed,
    /// Rejected with this errno; the temporary file is gone.
    Failed(i32),
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
        std::fs::create_dir_all(dir)?;
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
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize, i32> {
        match (self.state, &self.file) {
            (WriteState::Open, Some(f)) => f
                .write_all_at(data, offset)
                .map(|()| data.len())
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            (WriteState::Failed(_), _) | (WriteState::Open, None) => Err(libc::EIO),
            (WriteState::Committed, _) => Err(libc::EPERM),
        }
    }

    /// Current size of the file being written.
    pub fn written_len(&self) -> u64 {
        self.file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len())
    }

    /// Sets the size (`ftruncate` of a file still being written).
    pub fn set_len(&self, len: u64) -> Result<(), i32> {
        match (self.state, &self.file) {
            (WriteState::Open, Some(f)) => f
                .set_len(len)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            _ => Err(libc::EPERM),
        }
    }

    /// Checks and commits the file (first call), or repeats the first outcome.
    pub fn finish(&mut self, backend: &dyn ChunkBackend) -> Result<(), i32> {
        match self.state {
            WriteState::Committed => return Ok(()),
            WriteState::Failed(errno) => return Err(errno),
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
                let errno = e.errno();
                tracing::warn!(ns = %self.ns, key = %self.key, error = %e, "chunk rejected at close");
                self.state = WriteState::Failed(errno);
                Err(errno)
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
