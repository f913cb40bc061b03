//! `kvfs doctor`: prints [`crate::doctor::report`] for the cache directory (or `--dir`).
//!
//! The command only reads the environment (`KVFS_GPU_PATH` forces a path, as for loads); it
//! exits 0, or 1 when a forced path is unavailable, so scripts can check a machine with
//! `KVFS_GPU_PATH=gds kvfs doctor`. A `KVFS_GPU_PATH` that names no path is a usage error (2).

use super::{CliError, Ctx};
use crate::doctor::report;
use kvfs_gds::{GdsError, ProbeOptions};
use std::path::PathBuf;

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

/// Runs `kvfs doctor`.
pub fn doctor(ctx: &Ctx, args: DoctorArgs) -> Result<i32, CliError> {
    let mut opts = ProbeOptions::from_env().map_err(|e| match e {
        GdsError::InvalidForcedPath { .. } => CliError::Usage(format!("KVFS_GPU_PATH: {e}")),
        e => CliError::Failed(e.to_string()),
    })?;
    opts.device = args.device;
    let dir = args.dir.unwrap_or_else(|| ctx.cache_dir.clone());
    let r = report(&dir, opts);
    out!("{}", r.text);
    Ok(if r.forced_unavailable { 1 } else { 0 })
}
