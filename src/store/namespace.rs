//! Namespace directories: creating one (with its `namespace.json`), listing them with their
//! chunk counts and bytes, and listing the chunks of one.

use super::put::is_no_space;
use super::{FsyncPolicy, NAMESPACE_JSON, Store, StoreError, check_ns, check_ns_id, disk};
use kvfs_loader::{ChunkKey, ModelSpec, dir};
use serde::Serialize;
use std::ops::ControlFlow;

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

    /// Every namespace directory with its chunk count and bytes. The counts come from the
    /// disk tier's index (per-namespace totals), so this costs the same at any number of
    /// chunks; files not indexed yet (committed by an engine's loader straight into the
    /// cache, or during the index's rebuild) are counted once a read or the maintenance pass
    /// finds them.
    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, StoreError> {
        let dirs =
            disk::list_namespace_dirs(self.root()).map_err(|e| StoreError::io(self.root(), e))?;
        let totals = self.inner.disk.index().totals()?;
        Ok(dirs
            .into_iter()
            .map(|dir| {
                let (chunks, bytes) = totals.get(&dir).copied().unwrap_or((0, 0));
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

    /// Calls `f` with every chunk file of one namespace (key, length), in key order, as the
    /// directories are read: one fan-out directory's names (`<ns>/<xx>/`) are held at a time
    /// and each file is stat'ed just before it is handed out, so a listing of a million
    /// chunks starts after one directory read and holds a few thousand names. `f` returning
    /// `Break` stops the walk. Reads the files, the truth, not the index.
    pub fn for_each_chunk(
        &self,
        ns_dir: &str,
        mut f: impl FnMut(ChunkKey, u64) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        check_ns(ns_dir)?;
        let root = self.root();
        let ns_path = root.join(ns_dir);
        for fan in disk::fan_dirs(root, ns_dir).map_err(|e| StoreError::io(&ns_path, e))? {
            let keys =
                disk::fan_keys(root, ns_dir, &fan).map_err(|e| StoreError::io(&ns_path, e))?;
            for key in keys {
                let path = self.inner.disk.path(ns_dir, &key);
                let md = match std::fs::symlink_metadata(&path) {
                    Ok(md) if md.is_file() => md,
                    Ok(_) => continue,
                    // Evicted since the directory was read.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(&path, e)),
                };
                if f(key, md.len()).is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The keys of the chunks of `ns_dir` on disk whose first byte is `page` (one fan-out
    /// directory), sorted: a page of a streamed listing (the mount's READDIR). Names only.
    pub fn chunk_page(&self, ns_dir: &str, page: u8) -> Result<Vec<ChunkKey>, StoreError> {
        check_ns(ns_dir)?;
        disk::fan_keys(self.root(), ns_dir, &format!("{page:02x}"))
            .map_err(|e| StoreError::io(&self.root().join(ns_dir), e))
    }

    /// The chunks of one namespace on disk, sorted by key (a whole listing in memory; see
    /// [`Store::for_each_chunk`] for one that streams).
    pub fn chunks(&self, ns_dir: &str) -> Result<Vec<(ChunkKey, u64)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_chunk(ns_dir, |k, len| {
            out.push((k, len));
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }
}
