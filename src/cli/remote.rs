//! The S3 parts of the command line: `kvfs sync push|pull`, `kvfs ls --remote` and the
//! remote line of `kvfs stat`, over [`kvfs_remote::Remote`] opened from the `[s3]` settings
//! ([`crate::remote_tier::S3Settings`]).
//!
//! `sync` is resumable: re-running skips what is done. Every command here resumes the
//! persistent upload queue left by earlier processes (push drains it); pull verifies every
//! chunk before it is committed; `push --verify` reads the bucket back and repairs damaged
//! objects from this cache.

use super::{CliError, Ctx};
use crate::remote_tier::{S3Settings, resume_at_exit};
use crate::store::StoreError;
use crate::units::human_bytes;
use clap::{Args, Subcommand};
use kvfs_loader::ChunkKey;
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_remote::{Remote, RemoteError, SyncEvent};
use std::ops::ControlFlow;
use std::time::Duration;

fn settings(ctx: &Ctx) -> Result<&S3Settings, CliError> {
    ctx.config
        .s3
        .as_ref()
        .filter(|s| !s.url.is_empty())
        .ok_or_else(|| {
            CliError::Usage(
                "no S3 bucket: give --s3 s3://bucket/prefix, KVFS_S3 or [s3] url".into(),
            )
        })
}

fn remote_failed(e: RemoteError) -> CliError {
    CliError::Failed(e.to_string())
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    pub direction: SyncDirection,
}

#[derive(Debug, Subcommand)]
pub enum SyncDirection {
    /// Upload local chunks the bucket lacks (and finish uploads queued by earlier runs).
    Push(SyncScope),
    /// Download chunks the cache lacks, each verified before it is committed.
    Pull(SyncScope),
}

#[derive(Debug, Args)]
pub struct SyncScope {
    /// Only this namespace directory.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// (push) Then read every object of the bucket back and verify it in full, repairing
    /// damaged ones from this cache where it has them.
    #[arg(long)]
    pub verify: bool,
}

/// `kvfs sync push|pull [--namespace NS]`: resumable (re-running skips what is done).
pub fn sync(ctx: &Ctx, a: SyncArgs) -> Result<i32, CliError> {
    let s = settings(ctx)?;
    let (push, scope) = match a.direction {
        SyncDirection::Push(s) => (true, s),
        SyncDirection::Pull(s) => (false, s),
    };
    if let Some(ns) = &scope.namespace {
        validate_namespace_dir(ns).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    std::fs::create_dir_all(&ctx.cache_dir).map_err(|e| {
        CliError::Store(StoreError::Io {
            path: ctx.cache_dir.clone(),
            source: e,
        })
    })?;
    // Push drains the persistent upload queue; pull resumes it too.
    let remote = open_for_command(ctx, s)?;
    let bar = if scope.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .expect("static template"),
    );
    bar.set_message(if push { "push" } else { "pull" });
    let failures = std::sync::Mutex::new(Vec::new());
    let on_event = |e: SyncEvent| match e {
        SyncEvent::Planned { bytes, .. } => bar.set_length(bytes),
        SyncEvent::Transferred { bytes, .. } => bar.inc(bytes),
        SyncEvent::Failed { ns_dir, key, error } => {
            failures
                .lock()
                .unwrap()
                .push(format!("failed: {ns_dir}/{key}: {error}"));
        }
        SyncEvent::Damaged { ns_dir, key, cause } => failures.lock().unwrap().push(format!(
            "damaged in the bucket (no local copy to repair it): {ns_dir}/{key}: {cause}"
        )),
        SyncEvent::Repaired { ns_dir, key } => {
            eprintln!("kvfs: repaired damaged object {ns_dir}/{key} in the bucket")
        }
    };
    let ns = scope.namespace.as_deref();
    let mut report = if push {
        remote.push(&ctx.cache_dir, ns, &on_event)
    } else {
        remote.pull(&ctx.cache_dir, ns, &on_event)
    }
    .map_err(remote_failed)?;
    if push && scope.verify {
        bar.set_message("verify");
        bar.set_position(0);
        let scrub = remote
            .scrub(&ctx.cache_dir, ns, &on_event)
            .map_err(remote_failed)?;
        report.transferred += scrub.transferred;
        report.bytes += scrub.bytes;
        report.repaired += scrub.repaired;
        report.damaged += scrub.damaged;
        report.verified += scrub.verified;
        report.failed += scrub.failed;
    }
    let mut queued_left = 0;
    if push && remote.pending_uploads() > 0 {
        bar.set_message(format!("queued uploads: {}", remote.pending_uploads()));
        if !remote.wait_uploaded(Duration::from_secs(s.drain_on_exit_s.max(60))) {
            queued_left = remote.pending_uploads();
        }
    } else if !push {
        resume_at_exit(&remote, Duration::from_secs(s.drain_on_exit_s));
    }
    bar.finish_and_clear();
    for f in failures.lock().unwrap().iter() {
        eprintln!("kvfs: {f}");
    }
    let mut extra = String::new();
    if report.repaired > 0 {
        extra += &format!(", {} damaged objects repaired", report.repaired);
    }
    if scope.verify && push {
        extra += &format!(", {} verified in the bucket", report.verified);
    }
    if report.damaged > 0 {
        extra += &format!(", {} damaged objects left", report.damaged);
    }
    outln!(
        "{}: {} chunks ({}) transferred, {} already there, {} failed{extra}{}",
        if push { "push" } else { "pull" },
        report.transferred,
        human_bytes(report.bytes),
        report.skipped,
        report.failed,
        if queued_left > 0 {
            format!(", {queued_left} queued uploads left (run again)")
        } else {
            String::new()
        }
    );
    Ok(
        if report.failed > 0 || report.damaged > 0 || queued_left > 0 {
            1
        } else {
            0
        },
    )
}

/// `kvfs ls --remote [NS]`: namespaces in the bucket, or the chunks of one.
pub fn ls_remote(ctx: &Ctx, namespace: Option<&str>) -> Result<i32, CliError> {
    let s = settings(ctx)?;
    let remote = open_for_command(ctx, s)?;
    let code = ls_remote_with(&remote, namespace);
    resume_at_exit(&remote, Duration::from_secs(s.drain_on_exit_s));
    code
}

fn ls_remote_with(remote: &Remote, namespace: Option<&str>) -> Result<i32, CliError> {
    match namespace {
        None => {
            // Counted as pages arrive: one page in memory, not the namespace.
            for ns in remote.list_namespaces().map_err(remote_failed)? {
                let (mut chunks, mut bytes) = (0u64, 0u64);
                remote
                    .for_each_chunk(&ns, |_, len| {
                        chunks += 1;
                        bytes += len;
                        ControlFlow::Continue(())
                    })
                    .map_err(remote_failed)?;
                outln!("{ns}\t{chunks} chunks\t{}", human_bytes(bytes));
            }
        }
        Some(ns) => {
            let ns = ns.trim_end_matches('/');
            validate_namespace_dir(ns).map_err(|e| CliError::Usage(e.to_string()))?;
            // Streams: each LIST page is printed as it arrives.
            remote
                .for_each_chunk(ns, |key, len| {
                    outln!("{key}\t{len}");
                    ControlFlow::Continue(())
                })
                .map_err(remote_failed)?;
        }
    }
    Ok(0)
}

/// Remote presence of a chunk for `kvfs stat`: `None` without S3, else a short text
/// (`present (N bytes)`, `absent`, `unknown (error)`).
pub fn remote_presence(ctx: &Ctx, ns_dir: &str, key: &ChunkKey) -> Option<String> {
    let s = ctx.config.s3.as_ref().filter(|s| !s.url.is_empty())?;
    let r = s
        .open(None)
        .and_then(|r| r.object_size(ns_dir, key))
        .map(|size| match size {
            Some(n) => format!("present ({n} bytes)"),
            None => "absent".to_string(),
        });
    Some(r.unwrap_or_else(|e| format!("unknown ({e})")))
}

/// Opens the tier for a command, with the upload queue when the cache directory exists, so
/// that every process with `--s3` resumes uploads earlier runs left.
fn open_for_command(ctx: &Ctx, s: &S3Settings) -> Result<Remote, CliError> {
    let root = ctx.cache_dir.is_dir().then_some(ctx.cache_dir.as_path());
    if let Some(root) = root {
        // The queue is made under the root: the root is made private first.
        crate::store::prepare_root(root, ctx.config.access())?;
    }
    s.open(root).map_err(remote_failed)
}
