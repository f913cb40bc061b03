//! Whole-cache verification: [`Store::verify_all`] checks every file of the disk tier in full
//! (name, key, namespace, header and payload digests) and moves bad ones to
//! `<root>/.quarantine/<ns>/`, never deleting them.

use super::stats::bump;
use super::{Store, StoreError, disk};
use kvfs_loader::format::ChunkHeader;
use kvfs_loader::{ChunkKey, FormatError, dir, identity};
use serde::Serialize;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// A file `verify_all` found bad.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub path: PathBuf,
    pub error: String,
    /// Where it was moved, if the move succeeded.
    pub quarantined_to: Option<PathBuf>,
}

/// Result of [`Store::verify_all`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub ok: u64,
    pub bytes: u64,
    pub bad: Vec<BadChunk>,
}

/// Name of the directory under the root where `verify` moves bad files.
pub const QUARANTINE_DIR: &str = ".quarantine";

impl Store {
    /// Checks every file of the disk tier in full; moves bad ones to `<root>/.quarantine/`.
    /// `progress(done, total)` is called after each file.
    pub fn verify_all(&self, progress: &dyn Fn(u64, u64)) -> Result<VerifyReport, StoreError> {
        // The full pass first: the index agrees with the files and dead writers'
        // temporaries are gone before the files are checked.
        self.inner.disk.resync()?;
        let root = self.root().to_path_buf();
        let mut files = Vec::new();
        for ns in disk::list_namespace_dirs(&root).map_err(|e| StoreError::io(&root, e))? {
            let ns_path = root.join(&ns);
            let fans = fs::read_dir(&ns_path).map_err(|e| StoreError::io(&ns_path, e))?;
            for fan in fans {
                let fan = fan.map_err(|e| StoreError::io(&ns_path, e))?;
                if !fan.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let fan_name = fan.file_name().to_string_lossy().into_owned();
                let entries =
                    fs::read_dir(fan.path()).map_err(|e| StoreError::io(&fan.path(), e))?;
                for f in entries {
                    let f = f.map_err(|e| StoreError::io(&fan.path(), e))?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(dir::TMP_PREFIX) {
                        continue;
                    }
                    files.push((ns.clone(), fan_name.clone(), name, f.path()));
                }
            }
        }
        let total = files.len() as u64;
        let mut report = VerifyReport::default();
        for (i, (ns, fan, name, path)) in files.into_iter().enumerate() {
            report.checked += 1;
            match self.verify_file(&ns, &fan, &name, &path) {
                Ok(len) => {
                    report.ok += 1;
                    report.bytes += len;
                }
                Err(e) => {
                    bump(&self.inner.counters.verify_failures, 1);
                    // Reported to the caller in `report.bad` (the CLI prints it): not logged
                    // twice.
                    tracing::debug!(path = %path.display(), error = %e, "bad chunk file");
                    if let Ok(key) = ChunkKey::from_file_name(&name) {
                        self.inner.memory.remove(&key);
                        self.inner.disk.index().forget(&ns, &key);
                    }
                    let quarantined_to = self.quarantine(&ns, &name, &path);
                    report.bad.push(BadChunk {
                        path,
                        error: e.to_string(),
                        quarantined_to,
                    });
                }
            }
            progress(i as u64 + 1, total);
        }
        Ok(report)
    }

    fn verify_file(
        &self,
        ns: &str,
        fan: &str,
        name: &str,
        path: &Path,
    ) -> Result<u64, FormatError> {
        let key = ChunkKey::from_file_name(name)?;
        if !key.to_hex().starts_with(fan) || fan.len() != 2 {
            return Err(FormatError::Misplaced {
                found: format!("{fan}/{name}"),
                expected: key.to_hex()[..2].to_string(),
            });
        }
        let f = File::open(path)?;
        let header = ChunkHeader::read_from(&f)?;
        identity::check_identity(&header, ns, &key)?;
        header.verify_file_payload(&f)?;
        Ok(header.file_len())
    }

    pub(super) fn quarantine(&self, ns: &str, name: &str, path: &Path) -> Option<PathBuf> {
        let qdir = self.root().join(QUARANTINE_DIR).join(ns);
        if let Err(e) = kvfs_loader::dir::create_dirs(&qdir) {
            tracing::error!(dir = %qdir.display(), error = %e, "cannot create quarantine directory");
            return None;
        }
        let mut target = qdir.join(name);
        let mut n = 1;
        while target.exists() {
            target = qdir.join(format!("{name}.{n}"));
            n += 1;
        }
        match fs::rename(path, &target) {
            Ok(()) => {
                self.inner.metrics.quarantined();
                Some(target)
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot quarantine");
                None
            }
        }
    }
}
