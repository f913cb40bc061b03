//! The C ABI tests' shared steps: compile a C program against `include/kvfs.h` and the
//! `libkvfs_loader.so` cargo built for this very test run, run it against that library, and
//! open a loader as C would.
//!
//! kvfs-loader is `crate-type = ["rlib", "cdylib"]`, so building a test builds the cdylib too,
//! into `target/<profile>/deps/`, the directory that holds the test's executable. Programs
//! are linked with `-L` and `-rpath` to that directory, and run with `LD_LIBRARY_PATH` naming
//! it alone (cargo sets one that may list a stale copy in `target/<profile>/`, and it would
//! win over the rpath), so they never pick up an installed or stale copy.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use kvfs_loader::ffi::{KVFS_OK, KvfsLoader, kvfs_open};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where this test run's cdylib is.
pub fn cdylib_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Compiles `source` into `exe` with `cc`, warnings as errors, linked to this run's cdylib.
pub fn compile(cc: &str, source: &Path, exe: &Path) {
    let libdir = cdylib_dir();
    let so = libdir.join("libkvfs_loader.so");
    assert!(
        so.exists(),
        "{} is missing: cargo builds it with this test (crate-type cdylib)",
        so.display()
    );
    let out = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(crate_dir().join("include"))
        .arg(source)
        .arg("-L")
        .arg(&libdir)
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-lkvfs_loader")
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command running `exe` against this run's cdylib alone.
pub fn command(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env("LD_LIBRARY_PATH", cdylib_dir());
    c
}

/// Opens the loader of preset `preset` on `root` through the C ABI.
pub fn open_preset(root: &Path, preset: &str) -> *mut KvfsLoader {
    let dir = CString::new(root.to_str().unwrap()).unwrap();
    let preset = CString::new(preset).unwrap();
    let mut l: *mut KvfsLoader = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    let rc = unsafe {
        kvfs_open(
            dir.as_ptr(),
            preset.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            &mut l,
        )
    };
    assert_eq!(rc, KVFS_OK);
    l
}
