//! `kvfs status`: a running daemon's figures, read from its metrics endpoint
//! (`kvfs mount --metrics-addr`, or the `metrics_addr` setting) and printed as a short
//! summary: hit rate by tier, the upload queue, errors, disk use. `--json` prints the same
//! figures as JSON ([`crate::metrics::scrape::Summary`]).
//!
//! Exit codes: 0 when the daemon answered; 1 when it could not be reached or answered with
//! something that is not metrics; 2 when no address is given or it does not parse.

use super::{CliError, Ctx};
use crate::metrics::scrape::{self, Summary};
use crate::metrics::serve::parse_addr;
use crate::units::human_bytes;
use std::time::Duration;

/// Arguments of `kvfs status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The daemon's metrics address (HOST:PORT, or PORT on loopback); default: the
    /// `metrics_addr` setting.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the daemon's answer.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
}

/// Runs `kvfs status`.
pub fn status(ctx: &Ctx, args: StatusArgs) -> Result<i32, CliError> {
    let Some(addr) = args
        .metrics_addr
        .or_else(|| ctx.config.metrics_addr.clone())
    else {
        return Err(CliError::Usage(
            "no metrics address: pass --metrics-addr or set metrics_addr (the daemon must run with it)".into(),
        ));
    };
    let addr = parse_addr(&addr).map_err(|e| CliError::Usage(e.to_string()))?;
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(CliError::Usage(
            "--timeout must be a positive number of seconds".into(),
        ));
    }
    let text = scrape::fetch(addr, Duration::from_secs_f64(args.timeout))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let samples = scrape::parse(&text).map_err(|e| CliError::Failed(e.to_string()))?;
    if !samples.iter().any(|s| s.name == "kvfs_lookups_total")
        && !samples
            .iter()
            .any(|s| s.name == "kvfs_verify_failures_total")
    {
        return Err(CliError::Failed(format!(
            "{addr} answered, but not with kvfs metrics"
        )));
    }
    let s = Summary::of(&samples);
    if args.json {
        let doc = serde_json::to_string_pretty(&s).map_err(|e| CliError::Failed(e.to_string()))?;
        outln!("{doc}");
    } else {
        out!("{}", render(&addr.to_string(), &s));
    }
    Ok(0)
}

/// The human summary.
pub fn render(addr: &str, s: &Summary) -> String {
    let n = |v: f64| format!("{}", v.round() as u64);
    let bytes = |v: f64| human_bytes(v.max(0.0) as u64);
    let rate = s
        .hit_rate
        .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
    let queue = match (s.upload_queue_depth, s.upload_queue_oldest_seconds) {
        (Some(d), Some(age)) if d > 0.0 => format!("{} waiting, oldest {age:.1} s", n(d)),
        (Some(_), _) => "empty".to_string(),
        (None, _) => "no S3 tier".to_string(),
    };
    format!(
        "kvfs daemon at {addr}\n\
         hit rate    {rate} of {lookups} lookups (memory {m}, disk {d}, remote {r}; {miss} misses)\n\
         read        {read}; {committed} chunks committed, {evicted} evicted\n\
         upload      {queue}\n\
         errors      {verify} verification failures ({quarantined} quarantined), {s3e} of {s3} S3 requests failed, {fe} of {fo} FUSE requests failed\n\
         disk        {used} of {cap}\n",
        lookups = n(s.lookups),
        m = n(s.hits_memory),
        d = n(s.hits_disk),
        r = n(s.hits_remote),
        miss = n(s.misses),
        read = bytes(s.read_bytes),
        committed = n(s.chunks_committed),
        evicted = n(s.evictions),
        verify = n(s.verify_failures),
        quarantined = n(s.quarantined),
        s3e = n(s.s3_errors),
        s3 = n(s.s3_requests),
        fe = n(s.fuse_errors),
        fo = n(s.fuse_operations),
        used = bytes(s.disk_used_bytes),
        cap = bytes(s.disk_capacity_bytes),
    )
}
