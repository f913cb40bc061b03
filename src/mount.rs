//! `kvfs mount` and `kvfs umount`: the tiered store shown as a file system.
//!
//! [`StoreBackend`] implements kvfs-fs's [`ChunkBackend`] for the [`Store`]; the FUSE adapter
//! itself (the view, write-once commits, passthrough) lives in the `kvfs-fs` crate, which knows
//! nothing of tiers.
//!
//! `kvfs mount DIR` runs in the foreground: it blocks SIGINT, SIGTERM and SIGHUP in every
//! thread before any thread exists, mounts, and a dedicated thread waits for one of them and
//! unmounts (lazily if files are still open), which ends the session and the process. A
//! `kvfs umount DIR` (or `umount DIR`) ends it the same way. `--daemon` re-executes the same
//! command line without `--daemon` in a new session (`setsid`), with its output sent to
//! `--log-file`, waits until the mount answers (`DIR/.kvfs/mount.json` exists) and exits, leaving
//! the pid in the pid file. A directory whose daemon died (`stat` fails with ENOTCONN) is
//! detached and mounted again; a live mount point or a non-empty directory is refused.
//!
//! Files written through the mount are buffered in `<cache-dir>/.incoming/` (same file
//! system as the disk tier) and checked in full at close by kvfs-fs; a valid one is then
//! taken in by `Store::adopt_file`: room is reserved first (a chunk that cannot be kept within
//! the bounds fails the writer's `close()` with ENOSPC, and nothing is evicted for it or
//! after it), then it is hard-linked into the disk tier (create-once, fsync per policy),
//! never copied, indexed, and handed to the remote tier's write-behind queue. Such commits
//! are counted in `/.kvfs/mount.json` (`commits`), not in the store's `puts`.
//!
//! Chunk files are opened regular files only (`kvfs_fs::open_regular`: no symlink, device or
//! FIFO), and kvfs-fs checks each in full at open before serving it; one that fails is
//! quarantined through `Store::quarantine_chunk`.
//!
//! Reads served by passthrough never reach this process, so they are not counted in
//! `stats.json`; reads that do (no passthrough, or chunks that are not local) are counted by
//! the store when it serves them.

use crate::cli::{CliError, Ctx};
use crate::config;
use crate::store::{Store, StoreError, Tier};
use kvfs_fs::{
    BackendError, Capacity, ChunkBackend, ChunkInfo, Committed, MountError, MountOptions,
    open_regular,
};
use kvfs_loader::dir::Commit;
use kvfs_loader::{ChunkHeader, ChunkKey, FormatError};
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Directory under the cache root where files written through the mount are buffered.
pub const INCOMING_DIR: &str = ".incoming";

/// Arguments of `kvfs mount`.
#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// Empty directory to mount on (conventionally /kvfs).
    pub dir: PathBuf,
    /// Detach: run in the background (new session) once the mount answers.
    #[arg(long)]
    pub daemon: bool,
    /// Write the serving process's pid here (removed when it exits). With --daemon the
    /// default is <cache-dir>/.kvfs-mount.pid.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Where a --daemon sends its log (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Refuse every change (EROFS).
    #[arg(long)]
    pub read_only: bool,
    /// Let other users use the mount (FUSE allow_other; permissions are then checked by the
    /// kernel against --uid/--gid/--umask).
    #[arg(long)]
    pub allow_other: bool,
    /// Owner shown for files and directories (default: the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group shown for files and directories (default: the mounting group).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Octal mask cleared from the modes shown (directories 0777, chunks 0444).
    #[arg(long, value_name = "OCTAL", default_value = "022", value_parser = parse_octal)]
    pub umask: u32,
    /// Worker threads serving requests.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Never use FUSE passthrough, even where the kernel offers it (reads then go through
    /// this process and the page cache).
    #[arg(long)]
    pub no_passthrough: bool,
}

/// Arguments of `kvfs umount`.
#[derive(Debug, Clone, clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    pub dir: PathBuf,
    /// Detach even while files are open (MNT_DETACH); the daemon exits when they are closed.
    #[arg(long)]
    pub lazy: bool,
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal mode mask (like 022)"))
}

/// The tiered store as the backend of a mount.
pub struct StoreBackend {
    store: Store,
    incoming: PathBuf,
}

impl StoreBackend {
    pub fn new(store: Store) -> StoreBackend {
        let incoming = store.root().join(INCOMING_DIR);
        StoreBackend { store, incoming }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn has_remote(&self) -> bool {
        self.store.config().remote.is_some()
    }

    /// Stat, fetching a chunk that is only remote (so that the open that follows a lookup
    /// finds it local).
    fn stat_or_fetch(
        &self,
        ns: &str,
        key: &ChunkKey,
    ) -> Result<Option<crate::ChunkStat>, BackendError> {
        match self.store.stat(ns, key) {
            Ok(s) => Ok(Some(s)),
            Err(StoreError::NotFound { .. }) if self.has_remote() => {
                match self.store.get(ns, key) {
                    Ok(_) => self.store.stat(ns, key).map(Some).map_err(to_backend),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(to_backend(e)),
                }
            }
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_backend(e)),
        }
    }
}

/// The store's errors as the adapter's (each becomes one errno).
fn to_backend(e: StoreError) -> BackendError {
    match e {
        StoreError::NotFound { .. } => BackendError::NotFound,
        StoreError::Format { source, .. } => BackendError::Invalid(source),
        StoreError::BadNamespace(n) => BackendError::BadName(n),
        StoreError::NamespaceMismatch {
            ns_dir,
            chunk_namespace,
        } => BackendError::Invalid(FormatError::NamespaceMismatch {
            expected: ns_dir,
            found: chunk_namespace,
        }),
        StoreError::NoSpace { .. } => BackendError::NoSpace,
        StoreError::Io { source, .. } => BackendError::Io(source),
        e @ StoreError::Remote(_) => BackendError::Other(e.to_string()),
    }
}

impl ChunkBackend for StoreBackend {
    fn namespaces(&self) -> Result<Vec<String>, BackendError> {
        Ok(self
            .store
            .namespaces()
            .map_err(to_backend)?
            .into_iter()
            .map(|n| n.dir)
            .collect())
    }

    fn namespace_exists(&self, ns: &str) -> Result<bool, BackendError> {
        // One stat, not a rescan of the whole cache (this runs on every lookup). With a remote
        // tier, a namespace this host has never seen may hold chunks in the bucket: it must
        // resolve so that a lookup of `<ns>/<key>.kvc` under it can fetch (a fresh host).
        Ok(kvfs_loader::spec::validate_namespace_dir(ns).is_ok()
            && (self.has_remote() || self.store.root().join(ns).is_dir()))
    }

    fn create_namespace(&self, ns: &str) -> Result<(), BackendError> {
        if self.namespace_exists(ns)? {
            return Err(BackendError::AlreadyExists);
        }
        self.store.create_namespace(ns, None).map_err(to_backend)
    }

    fn chunks(&self, ns: &str) -> Result<Vec<(ChunkKey, u64)>, BackendError> {
        self.store.chunks(ns).map_err(to_backend)
    }

    /// The disk tier's file metadata when it has the chunk (no header read: `find` over
    /// 100,000 chunks must not read 100,000 headers); the store's `stat` otherwise (a chunk
    /// only in memory, or only remote, which it fetches).
    fn stat(&self, ns: &str, key: &ChunkKey) -> Result<Option<ChunkInfo>, BackendError> {
        let path = self.store.backing_path(ns, key);
        // Not followed: a symlink planted in the cache is not a disk-tier chunk (its open
        // is refused, and it is quarantined).
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => {
                return Ok(Some(ChunkInfo {
                    len: md.len(),
                    mtime: md.modified().unwrap_or_else(|_| SystemTime::now()),
                    tier: Tier::Disk.to_string(),
                    // Absolute, whatever the cache directory was given as.
                    backing: Some(std::path::absolute(&path).unwrap_or(path)),
                }));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.stat_or_fetch(ns, key)?.map(|s| {
            let local = s.tier != Tier::Remote && s.path.is_file();
            ChunkInfo {
                len: s.len,
                mtime: s.mtime.unwrap_or_else(SystemTime::now),
                tier: s.tier.to_string(),
                // Absolute, whatever the cache directory was given as.
                backing: local.then(|| std::path::absolute(&s.path).unwrap_or(s.path)),
            }
        }))
    }

    fn tier(&self, ns: &str, key: &ChunkKey) -> Result<Option<String>, BackendError> {
        Ok(self.stat_or_fetch(ns, key)?.map(|s| s.tier.to_string()))
    }

    fn header(&self, ns: &str, key: &ChunkKey) -> Result<ChunkHeader, BackendError> {
        match self.stat_or_fetch(ns, key)? {
            Some(s) => Ok(s.header),
            None => Err(BackendError::NotFound),
        }
    }

    fn read_at(
        &self,
        ns: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BackendError> {
        self.store.read_at(ns, key, offset, buf).map_err(to_backend)
    }

    fn open_local(&self, ns: &str, key: &ChunkKey) -> Result<Option<File>, BackendError> {
        let path = self.store.backing_path(ns, key);
        match open_regular(&path)? {
            Some(f) => Ok(Some(f)),
            // Only remote (or only in memory): fetch it to disk, then open that.
            None if self.stat_or_fetch(ns, key)?.is_some() => open_regular(&path),
            None => Ok(None),
        }
    }

    fn quarantine(&self, ns: &str, key: &ChunkKey, reason: &str) -> Option<PathBuf> {
        self.store.quarantine_chunk(ns, key, reason)
    }

    fn incoming_dir(&self) -> PathBuf {
        self.incoming.clone()
    }

    /// The adapter has verified the file in full (one pass over bytes still in the page
    /// cache); the store reserves room for it, then links it into the disk tier.
    fn commit(&self, ns: &str, key: &ChunkKey, path: &Path) -> Result<Committed, BackendError> {
        match self.store.adopt_file(ns, key, path).map_err(to_backend)? {
            Commit::Created => Ok(Committed::Created),
            Commit::AlreadyExists => Ok(Committed::AlreadyExists),
        }
    }

    fn remove(&self, ns: &str, key: &ChunkKey) -> Result<bool, BackendError> {
        self.store.remove(ns, key).map_err(to_backend)
    }

    fn capacity(&self) -> Result<Capacity, BackendError> {
        let c = self.store.capacity();
        let chunks = self
            .store
            .namespaces()
            .map_err(to_backend)?
            .iter()
            .map(|n| n.chunks)
            .sum();
        let within_limit = c.limit_bytes.saturating_sub(c.used_bytes);
        let on_fs = c.fs_free_bytes.saturating_sub(c.min_free_bytes);
        Ok(Capacity {
            total_bytes: c.limit_bytes,
            used_bytes: c.used_bytes,
            free_bytes: within_limit.min(on_fs),
            chunks,
        })
    }

    fn stats_json(&self) -> Result<String, BackendError> {
        let doc = serde_json::json!({
            "stats": self.store.stats(),
            "capacity": self.store.capacity(),
        });
        serde_json::to_string_pretty(&doc).map_err(|e| BackendError::Other(e.to_string()))
    }
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

fn mount_options(args: &MountArgs) -> MountOptions {
    let d = MountOptions::default();
    MountOptions {
        read_only: args.read_only,
        allow_other: args.allow_other,
        uid: args.uid.unwrap_or(d.uid),
        gid: args.gid.unwrap_or(d.gid),
        umask: args.umask,
        threads: args.threads.max(1),
        passthrough: !args.no_passthrough,
        fsname: d.fsname,
    }
}

/// `kvfs mount DIR`.
pub fn mount(ctx: &Ctx, args: MountArgs) -> Result<i32, CliError> {
    if args.threads == 0 {
        return Err(CliError::Usage("--threads must be at least 1".into()));
    }
    if args.daemon {
        return daemonize(ctx, &args);
    }
    // Before any thread exists, so that every thread inherits the mask and only the waiter
    // below ever sees these signals.
    let signals = block_stop_signals().map_err(failed)?;
    let dir = kvfs_fs::prepare_mountpoint(&args.dir).map_err(|e| match e {
        MountError::NotEmpty(_) | MountError::AlreadyMounted(_) | MountError::NotADirectory(_) => {
            CliError::Failed(e.to_string())
        }
        e => failed(e),
    })?;
    let store = Store::open(ctx.config.store_config(&config::process_env)?)?;
    let backend = Arc::new(StoreBackend::new(store));
    let opts = mount_options(&args);
    let mut session = kvfs_fs::mount(backend, &dir, &opts)
        .map_err(|e| failed(format!("cannot mount on {}: {e}", dir.display())))?;
    let mut unmounter = session.unmount_callable();
    let waiter_dir = dir.clone();
    std::thread::Builder::new()
        .name("kvfs-signals".into())
        .spawn(move || {
            let sig = wait_for_signal(&signals);
            tracing::info!(signal = sig, dir = %waiter_dir.display(), "unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::warn!(error = %e, "unmount failed (files open?); detaching lazily");
                let _ = kvfs_fs::unmount(&waiter_dir, true);
            }
        })
        .map_err(failed)?;
    let pid_file = args.pid_file.clone();
    if let Some(p) = &pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| failed(format!("cannot write pid file {}: {e}", p.display())))?;
    }
    tracing::info!(dir = %dir.display(), cache = %ctx.cache_dir.display(), "serving");
    let result = session.run();
    if let Some(p) = &pid_file {
        let _ = std::fs::remove_file(p);
    }
    result.map_err(|e| failed(format!("FUSE session on {} failed: {e}", dir.display())))?;
    Ok(0)
}

/// `kvfs mount --daemon`: runs the same command without `--daemon` in a new session and
/// returns once it serves.
fn daemonize(ctx: &Ctx, args: &MountArgs) -> Result<i32, CliError> {
    // Check the mount point here too, so the common mistakes fail in the foreground.
    kvfs_fs::prepare_mountpoint(&args.dir).map_err(failed)?;
    let dir = std::path::absolute(&args.dir).map_err(failed)?;
    let pid_file = args
        .pid_file
        .clone()
        .unwrap_or_else(|| ctx.cache_dir.join(".kvfs-mount.pid"));
    let exe = std::env::current_exe().map_err(failed)?;
    let mut child_args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    if args.pid_file.is_none() {
        child_args.push("--pid-file".into());
        child_args.push(pid_file.clone().into_os_string());
    }
    let log: Stdio = match &args.log_file {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| failed(format!("cannot open log file {}: {e}", p.display())))?
            .into(),
        None => Stdio::null(),
    };
    let mut cmd = Command::new(exe);
    cmd.args(&child_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(failed)?;
    let ready = dir.join(".kvfs").join("mount.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().map_err(failed)? {
            return Err(failed(format!(
                "the mount daemon exited ({status}) before serving {}",
                dir.display()
            )));
        }
        if ready.exists() {
            println!("{}", child.id());
            return Ok(0);
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "the mount daemon (pid {}) did not serve {} within 60 s",
                child.id(),
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kvfs umount DIR`.
pub fn umount(_ctx: &Ctx, args: UmountArgs) -> Result<i32, CliError> {
    let dir = &args.dir;
    match std::fs::metadata(dir) {
        // The daemon died: only a lazy detach can remove the mount.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            kvfs_fs::unmount(dir, true).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
            return Ok(0);
        }
        Err(e) => return Err(failed(format!("{}: {e}", dir.display()))),
        Ok(_) => {}
    }
    let canonical = dir.canonicalize().map_err(failed)?;
    if !kvfs_fs::is_mount_point(&canonical).map_err(failed)? {
        return Err(failed(format!("{} is not mounted", canonical.display())));
    }
    match kvfs_fs::unmount(&canonical, args.lazy) {
        Ok(()) => Ok(0),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(failed(format!(
            "{} is busy (files are open); close them or use --lazy",
            canonical.display()
        ))),
        Err(e) => Err(failed(format!("{}: {e}", canonical.display()))),
    }
}

/// The signal set that stops a foreground mount.
struct StopSignals(libc::sigset_t);

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and the threads it starts).
fn block_stop_signals() -> io::Result<StopSignals> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(StopSignals(set))
}

/// Waits for one of the blocked stop signals; returns its number.
fn wait_for_signal(signals: &StopSignals) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: the set is initialised and `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_masks() {
        assert_eq!(parse_octal("022").unwrap(), 0o22);
        assert_eq!(parse_octal("0o777").unwrap(), 0o777);
        assert!(parse_octal("9").is_err());
        assert!(parse_octal("1777").is_err());
    }

    #[test]
    fn store_errors_keep_their_errno() {
        let nf = StoreError::NotFound {
            ns_dir: "x".into(),
            key: ChunkKey([0; 32]),
        };
        assert_eq!(to_backend(nf).errno(), libc::ENOENT);
        let ns = StoreError::NoSpace {
            needed: 1,
            available: 0,
        };
        assert_eq!(to_backend(ns).errno(), libc::ENOSPC);
        let bad = StoreError::from(FormatError::HeaderChecksum);
        assert_eq!(to_backend(bad).errno(), libc::EINVAL);
    }
}
