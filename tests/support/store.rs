//! Fixtures for the store's integration tests: the tiny model, chains of its chunks, a store
//! configuration without fsync, and what a store left on disk.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use kvfs::config::Limit;
use kvfs::store::{FsyncPolicy, StoreConfig};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use std::path::{Path, PathBuf};

pub fn tiny() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

/// The tiny model's namespace directory.
pub fn ns() -> String {
    tiny().namespace_dir()
}

/// `n` chained chunks of the tiny model for prompt `seed`.
pub fn chunks(n: usize, seed: u64) -> Vec<(ChunkKey, Vec<u8>)> {
    let spec = tiny();
    let tokens = kvfs::synth::prompt_tokens(seed, n * 256);
    let mut parent = None;
    tokens
        .chunks_exact(256)
        .map(|t| {
            let (meta, bytes) = synth_chunk(&spec, parent, SaltTag::NONE, t.to_vec()).unwrap();
            parent = Some(meta.key);
            (meta.key, bytes)
        })
        .collect()
}

/// A store on `root` bounded to `capacity` bytes on disk and `memory_bytes` in memory, with
/// no free-space floor and no fsync (tests do not survive power loss).
pub fn config(root: &Path, capacity: u64, memory_bytes: u64) -> StoreConfig {
    let mut c = StoreConfig::new(root);
    c.capacity = Limit::Bytes(capacity);
    c.min_free = Limit::Bytes(0);
    c.fsync = FsyncPolicy::Never;
    c.memory_bytes = memory_bytes;
    c
}

/// Every temporary file (`.tmp-*`) under `root`, recursively: what an unfinished write
/// leaves until it is swept.
pub fn temporaries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(e.path());
            }
        }
    }
    out
}
