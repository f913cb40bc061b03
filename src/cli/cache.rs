//! Commands on the whole cache: `ls`, `verify`, `gc`, `info`.
//!
//! `verify` checks every file in full (header, size, key against name and namespace, every
//! payload digest) with a progress bar on stderr (hidden when stderr is not a terminal),
//! moves bad files to `<cache-dir>/.quarantine/<ns>/` and exits 1 if it found any.

use super::{CliError, Ctx};
use crate::units::human_bytes;
use clap::Args;
use kvfs_loader::spec::validate_namespace_dir;

#[derive(Debug, Args)]
pub struct LsArgs {
    /// A namespace directory: list its chunks (key and size) instead of the namespaces.
    #[arg(value_name = "NS")]
    pub namespace: Option<String>,
    /// List the S3 bucket (--s3 / [s3]) instead of the local cache.
    #[arg(long)]
    pub remote: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {}

#[derive(Debug, Args)]
pub struct GcArgs {}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn ls(ctx: &Ctx, a: LsArgs) -> Result<i32, CliError> {
    if a.remote {
        return super::remote::ls_remote(ctx, a.namespace.as_deref());
    }
    let store = ctx.open_store()?;
    match a.namespace {
        None => {
            for ns in store.namespaces()? {
                outln!(
                    "{}\t{} chunks\t{}",
                    ns.dir,
                    ns.chunks,
                    human_bytes(ns.bytes)
                );
            }
        }
        Some(ns) => {
            let ns = ns.trim_end_matches('/').to_string();
            validate_namespace_dir(&ns).map_err(|e| CliError::Usage(e.to_string()))?;
            if !store.root().join(&ns).is_dir() {
                return Err(CliError::Failed(format!(
                    "no namespace {ns} under {}",
                    store.root().display()
                )));
            }
            // Streams: each fan-out directory is printed as it is read.
            store.for_each_chunk(&ns, |key, len| {
                outln!("{key}\t{len}");
                std::ops::ControlFlow::Continue(())
            })?;
        }
    }
    Ok(0)
}

pub fn verify(ctx: &Ctx, _a: VerifyArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chunks {elapsed}")
            .expect("static template"),
    );
    let report = store.verify_all(&|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    for b in &report.bad {
        match &b.quarantined_to {
            Some(q) => outln!(
                "BAD {}: {} (moved to {})",
                b.path.display(),
                b.error,
                q.display()
            ),
            None => outln!("BAD {}: {} (could not be moved)", b.path.display(), b.error),
        }
    }
    outln!(
        "verified {} files: {} ok ({}), {} bad",
        report.checked,
        report.ok,
        human_bytes(report.bytes),
        report.bad.len()
    );
    if report.bad.is_empty() {
        Ok(0)
    } else {
        Err(CliError::Failed(format!(
            "{} bad chunk files quarantined under {}",
            report.bad.len(),
            store.root().join(crate::store::QUARANTINE_DIR).display()
        )))
    }
}

pub fn gc(ctx: &Ctx, _a: GcArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let r = store.gc()?;
    outln!(
        "evicted {} chunks ({}); using {} of {}",
        r.evicted,
        human_bytes(r.freed_bytes),
        human_bytes(r.used_bytes),
        human_bytes(r.limit_bytes)
    );
    Ok(0)
}

pub fn info(ctx: &Ctx, a: InfoArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let namespaces = store.namespaces()?;
    let cap = store.capacity();
    let queue = crate::remote_tier::queue_summary(store.root());
    if a.json {
        let v = serde_json::json!({
            "cache_dir": store.root(),
            "namespaces": namespaces,
            "capacity": cap,
            "config": ctx.config,
            "upload_queue": {
                "pending": queue.0,
                "oldest_age_s": queue.1.map(|d| d.as_secs()),
            },
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(0);
    }
    outln!("cache dir:  {}", store.root().display());
    outln!(
        "capacity:   {} used of {} ({} configured)",
        human_bytes(cap.used_bytes),
        human_bytes(cap.limit_bytes),
        ctx.config.capacity
    );
    outln!(
        "free space: {} of {} (keeping at least {})",
        human_bytes(cap.fs_free_bytes),
        human_bytes(cap.fs_total_bytes),
        human_bytes(cap.min_free_bytes)
    );
    outln!(
        "settings:   memory {}, fsync {:?}, verify_reads {}",
        ctx.config.memory,
        ctx.config.fsync,
        ctx.config.verify_reads
    );
    match queue {
        (0, _) => outln!("uploads:    none queued for S3"),
        (n, oldest) => outln!(
            "uploads:    {n} queued for S3, oldest queued {}s ago",
            oldest.map_or(0, |d| d.as_secs())
        ),
    }
    outln!("namespaces: {}", namespaces.len());
    for ns in &namespaces {
        outln!(
            "  {}\t{} chunks\t{}{}",
            ns.dir,
            ns.chunks,
            human_bytes(ns.bytes),
            if ns.has_spec {
                ""
            } else {
                "\t(no namespace.json)"
            }
        );
    }
    Ok(0)
}
