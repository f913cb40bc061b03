//! `kvfs doctor`: what this machine can do for kvfs, in one report.
//!
//! It prints the GPU path probe of `kvfs-gds` (which path loads would take — GDS, staging or
//! host only — and the reason for each step: libcuda, devices, NVRTC, cuFile, nvidia-fs),
//! and whether the cache directory takes O_DIRECT (checked cheaply by writing and reading
//! back one aligned block in a hidden temporary file). The cuFile registration is tried in
//! the cache directory too, since GDS support depends on the file system.
//!
//! The command only reads the environment (`KVFS_GPU_PATH` forces a path, as for loads);
//! it exits 0, or 1 when a forced path is unavailable, so scripts can check a machine with
//! `KVFS_GPU_PATH=gds kvfs doctor`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvfs_gds::direct::probe_direct_io;
use kvfs_gds::{GdsError, ProbeOptions};

use crate::cli::{CliError, Ctx};

/// Arguments of `kvfs doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Directory to check for O_DIRECT and cuFile instead of the cache directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// CUDA device ordinal to probe.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

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

/// Runs `kvfs doctor`.
pub fn doctor(ctx: &Ctx, args: DoctorArgs) -> Result<i32, CliError> {
    let mut opts = ProbeOptions::from_env().map_err(|e| match e {
        GdsError::InvalidForcedPath { .. } => CliError::Usage(format!("KVFS_GPU_PATH: {e}")),
        e => CliError::Failed(e.to_string()),
    })?;
    opts.device = args.device;
    let dir = args.dir.unwrap_or_else(|| ctx.cache_dir.clone());
    let r = report(&dir, opts);
    print!("{}", r.text);
    Ok(if r.forced_unavailable { 1 } else { 0 })
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
