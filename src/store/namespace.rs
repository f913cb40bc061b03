//! Namespace directories: creating one (with its `namespace.json`), listing them with their
//! chunk counts and bytes, and listing the chunks of one.

use super::put::is_no_space;
use super::{FsyncPolicy, NAMESPACE_JSON, Store, StoreError, check_ns, check_ns_id, disk};
use kvfs_loader::{ChunkKey, ModelSpec, dir};
use serde::Serialize;

/// One namespace directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    pub dir: String,
    pub chunks: u64,
    pub bytes: u64,
    /// Whether `namespace.json` (the model spec) is present.
    pub has_spec: bool,
}

impl Store {
    /// Creates a namespace directory, writing `namespace.json` when a spec is given (its
    /// namespace id must match the directory's suffix). Idempotent.
    pub fn create_namespace(
        &self,
        ns_dir: &str,
        spec: Option<&ModelSpec>,
    ) -> Result<(), StoreError> {
        check_ns(ns_dir)?;
        let dir_path = self.root().join(ns_dir);
        if let Some(spec) = spec {
            spec.validate()?;
            check_ns_id(ns_dir, &spec.namespace_id())?;
        }
        kvfs_loader::dir::create_dirs(&dir_path).map_err(|e| StoreError::io(&dir_path, e))?;
        if let Some(spec) = spec {
            let p = dir_path.join(NAMESPACE_JSON);
            let fsync = self.inner.cfg.fsync == FsyncPolicy::Always;
            dir::commit_file(&p, spec.to_json().as_bytes(), fsync).map_err(|e| {
                if is_no_space(&e) {
                    StoreError::NoSpace {
                        needed: spec.to_json().len() as u64,
                        available: 0,
                    }
                } else {
                    StoreError::io(&p, e)
                }
            })?;
        }
        Ok(())
    }

    /// Every namespace directory with its chunk count and bytes (rescans the disk).
    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, StoreError> {
        let disk = &self.inner.disk;
        disk.rescan()?;
        let dirs =
            disk::list_namespace_dirs(self.root()).map_err(|e| StoreError::io(self.root(), e))?;
        let idx = disk.index();
        Ok(dirs
            .into_iter()
            .map(|dir| {
                let (chunks, bytes) = idx.namespaces.get(&dir).map_or((0, 0), |c| {
                    (c.len() as u64, c.values().map(|e| e.len).sum())
                });
                let has_spec = self.root().join(&dir).join(NAMESPACE_JSON).is_file();
                NamespaceInfo {
                    dir,
                    chunks,
                    bytes,
                    has_spec,
                }
            })
            .collect())
    }

    /// The chunks of one namespace on disk, sorted by key (rescans that namespace).
    pub fn chunks(&self, ns_dir: &str) -> Result<Vec<(ChunkKey, u64)>, StoreError> {
        check_ns(ns_dir)?;
        self.inner.disk.rescan_namespace(ns_dir)?;
        let idx = self.inner.disk.index();
        let mut out: Vec<(ChunkKey, u64)> = idx
            .namespaces
            .get(ns_dir)
            .map(|c| c.iter().map(|(k, e)| (*k, e.len)).collect())
            .unwrap_or_default();
        out.sort_unstable();
        Ok(out)
    }
}
