//! What this machine can do for kvfs, in one report (printed by `kvfs doctor`,
//! [`crate::cli::doctor`]).
//!
//! [`report`] holds the GPU path probe of `kvfs-gds` (which path loads would take — GDS, staging or
//! host only — and the reason for each step: libcuda, devices, NVRTC, cuFile, nvidia-fs),
//! and whether the cache directory takes O_DIRECT (checked cheaply by writing and reading
//! back one aligned block in a hidden temporary file). The cuFile registration is tried in
//! the cache directory too, since GDS support depends on the file system.
//! It takes the probe options from its caller and returns text; it knows nothing of the CLI.

use std::fmt::Write as _;
use std::path::Path;

use kvfs_gds::ProbeOptions;
use kvfs_gds::direct::probe_direct_io;

/// The report and whether a forced GPU path was unavailable.
#[derive(Debug)]
pub struct Report {
    /// Human-readable report.
    pub text: String,
    /// A path forced by `KVFS_GPU_PATH` cannot be provided.
    pub forced_unavailable: bool,
}

/// Builds the report for `dir` with probe options `opts` (their `probe_dir` is replaced by
/// `dir` when it exists).
pub fn report(dir: &Path, mut opts: ProbeOptions) -> Report {
    let mut text = String::new();
    let _ = writeln!(text, "kvfs {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(text, "cache dir: {}", dir.display());
    if dir.is_dir() {
        let _ = writeln!(text, "O_DIRECT: {}", probe_direct_io(dir));
        opts.probe_dir = dir.to_path_buf();
    } else {
        let _ = writeln!(text, "O_DIRECT: not checked (directory does not exist)");
    }
    let p = kvfs_gds::probe(&opts);
    let forced_unavailable = opts.force.is_some_and(|f| f != p.path);
    let _ = write!(text, "{p}");
    Report {
        text,
        forced_unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfs_gds::GpuPath;

    #[test]
    fn report_shows_direct_io_and_the_gpu_path() {
        let dir = tempfile::tempdir().unwrap();
        let r = report(dir.path(), ProbeOptions::default());
        assert!(r.text.contains("O_DIRECT: supported"), "{}", r.text);
        assert!(r.text.contains("GPU path: "), "{}", r.text);
        assert!(!r.forced_unavailable);
        if kvfs_gds::probe::cuda_library().is_err() {
            assert!(r.text.contains("GPU path: host"), "{}", r.text);
            assert!(r.text.contains("libcuda.so.1 not found"), "{}", r.text);
            let forced = ProbeOptions {
                force: Some(GpuPath::Gds),
                ..Default::default()
            };
            let r = report(dir.path(), forced);
            assert!(r.forced_unavailable);
            assert!(
                r.text.contains("KVFS_GPU_PATH=gds forced but unavailable"),
                "{}",
                r.text
            );
        } else {
            eprintln!("skipping the no-CUDA half: libcuda loads on this machine");
        }
        let missing = report(&dir.path().join("nope"), ProbeOptions::default());
        assert!(missing.text.contains("not checked"), "{}", missing.text);
    }
}
