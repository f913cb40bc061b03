//! The real `kvfs` binary for tests: a command on one cache directory with a clean
//! environment, and walks of what it left on disk.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `kvfs --cache-dir CACHE` with nothing from the caller's environment (HOME inside CACHE).
pub fn kvfs(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    c.env_clear()
        .env("HOME", cache.join("home"))
        .arg("--cache-dir")
        .arg(cache);
    c
}

/// Every file under `root`, recursively (none if `root` does not exist).
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The `.kvc` files under `root`.
pub fn chunk_files(root: &Path) -> Vec<PathBuf> {
    files_under(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "kvc"))
        .collect()
}

/// Permission bits of `p` (with set-group-id).
pub fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}
