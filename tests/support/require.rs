//! What a test needs from the machine, checked one way for every crate's tests.
//!
//! A test that needs something the machine may lack (`fuse`: /dev/fuse and root to mount;
//! `cc`: a C or C++ compiler; `setfattr`: the attr tools and user xattrs; `model`: the SmolLM2
//! weights; `s3`; `vllm`) asks here first. When the thing is missing, the test prints why
//! and returns, unless the environment variable `KVFS_REQUIRE` (comma-separated names, or
//! `all`) names it: then the test FAILS, so CI (`.ci/run` sets `KVFS_REQUIRE=all`) cannot
//! report a skipped suite as a pass. An unknown name in `KVFS_REQUIRE` fails too (a typo
//! must not turn a requirement off).
//!
//! Other crates' tests include this same file with `#[path = "../../tests/support/require.rs"]`.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// The names `KVFS_REQUIRE` may hold (besides `all`).
pub const NAMES: [&str; 6] = ["fuse", "cc", "setfattr", "model", "s3", "vllm"];

/// Whether the comma-separated list `list` (the value of `KVFS_REQUIRE`) requires `name`.
/// Panics on a name that is not one of [`NAMES`].
pub fn requires(list: &str, name: &str) -> bool {
    assert!(NAMES.contains(&name), "unknown requirement `{name}`");
    let mut hit = false;
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item != "all" && !NAMES.contains(&item) {
            panic!(
                "KVFS_REQUIRE names `{item}`, which is not one of all,{}",
                NAMES.join(",")
            );
        }
        hit |= item == "all" || item == name;
    }
    hit
}

/// Whether this run requires `name` (`KVFS_REQUIRE`).
pub fn required(name: &str) -> bool {
    requires(&std::env::var("KVFS_REQUIRE").unwrap_or_default(), name)
}

/// `Ok(())` when `name` is available: true. Missing (`Err(why)`): false after a skip line,
/// or a panic when `KVFS_REQUIRE` requires it.
pub fn need(name: &str, available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if required(name) => {
            panic!("KVFS_REQUIRE requires `{name}`, but it is missing: {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why} (KVFS_REQUIRE={name} makes this a failure)");
            false
        }
    }
}

/// /dev/fuse and root (fuser mounts without fusermount).
pub fn fuse() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let available = if !Path::new("/dev/fuse").exists() {
        Err("needs /dev/fuse to mount FUSE".to_string())
    } else if !root {
        Err("needs root to mount FUSE without fusermount".to_string())
    } else {
        Ok(())
    };
    need("fuse", available)
}

/// Whether `program args...` runs and exits successfully.
fn runs(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`{program} {}` failed ({s})", args.join(" "))),
        Err(e) => Err(format!("`{program}` cannot run ({e})")),
    }
}

/// A C (or C++) compiler, `compiler` (as `cc`, `c++`, or `$CC`).
pub fn cc(compiler: &str) -> bool {
    need("cc", runs(compiler, &["--version"]))
}

/// `setfattr` and `getfattr` (package attr).
pub fn setfattr() -> bool {
    need(
        "setfattr",
        runs("setfattr", &["--version"]).and_then(|()| runs("getfattr", &["--version"])),
    )
}

/// The model weights: `found` is the outcome of looking for them.
pub fn model<E: std::fmt::Display>(found: Result<(), E>) -> bool {
    need("model", found.map_err(|e| e.to_string()))
}

#[test]
fn kvfs_require_lists_names_or_all() {
    assert!(requires("fuse,cc", "cc"));
    assert!(requires(" fuse , model ", "model"));
    assert!(!requires("fuse", "cc"));
    assert!(!requires("", "fuse"));
    assert!(requires("all", "vllm"));
    assert!(std::panic::catch_unwind(|| requires("fuse,fusee", "fuse")).is_err());
}
