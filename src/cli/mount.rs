//! `kvfs mount` and `kvfs umount`: the tiered store shown as a file system, served by this
//! process or by a daemon it starts.
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
//! What the mount serves is [`crate::mount::StoreBackend`] over the store this command opens.

use super::{CliError, Ctx};
use crate::metrics::{self, MetricsServer, serve::parse_addr};
use crate::mount::StoreBackend;
use crate::store::Store;
use kvfs_fs::{MountError, MountOptions};
use kvfs_loader::identity::{MOUNT_INFO_FILE, STATUS_DIR};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, or PORT on loopback);
    /// default: the `metrics_addr` setting, else no endpoint.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
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
    let metrics_addr = match args
        .metrics_addr
        .as_ref()
        .or(ctx.config.metrics_addr.as_ref())
    {
        Some(a) => Some(parse_addr(a).map_err(|e| CliError::Usage(e.to_string()))?),
        None => None,
    };
    let store = Store::open(ctx.store_config()?)?;
    let backend = Arc::new(StoreBackend::new(store));
    // Bound before the mount exists: an address in use fails the command, not a log line.
    let _metrics = match metrics_addr {
        Some(addr) => {
            let mut registry = metrics::registry();
            backend.register_metrics(&mut registry);
            Some(MetricsServer::start(addr, registry).map_err(failed)?)
        }
        None => None,
    };
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
    let ready = dir.join(STATUS_DIR).join(MOUNT_INFO_FILE);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().map_err(failed)? {
            return Err(failed(format!(
                "the mount daemon exited ({status}) before serving {}",
                dir.display()
            )));
        }
        if ready.exists() {
            outln!("{}", child.id());
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
}
