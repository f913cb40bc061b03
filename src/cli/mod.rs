//! The `kvfs` command line.
//!
//! One [`Command`] variant per command; each command group lives in its own module
//! ([`chunks`]: put, get, stat, rm; [`cache`]: ls, verify, gc, info; [`synth`]; [`demo`];
//! [`mount`]: mount, umount and the daemon; [`doctor`]; [`remote`]: sync and the S3 parts of
//! ls and stat). A new command is one variant here plus one arm in [`run`].
//!
//! This is the only module that knows the CLI's [`Ctx`] and [`CliError`]: the library modules
//! it calls (the store, the mount backend, the S3 tier, the doctor's report) return their
//! own errors, which the handlers here turn into exit codes.
//!
//! Global options (`--cache-dir`, `--config`, and one flag per setting) override the
//! environment, which overrides the config file (see [`crate::config`]).
//!
//! Exit codes: 0 success, 1 failure, 2 usage (bad arguments, including a KEY or namespace
//! that is not well-formed). Errors print as one line on stderr: `kvfs: error: ...`.
//! Logs go to stderr through `tracing`, filtered by `KVFS_LOG` (default `warn`).

/// `println!` for command output: a reader that went away (`kvfs ls | head -1`) ends the
/// command quietly with status 0, as `ls` would, instead of a panic (exit 101).
///
/// The process keeps ignoring SIGPIPE, as Rust sets it up: hyper writes to S3 sockets with
/// `writev`, which has no `MSG_NOSIGNAL`, so restoring the default action would let a server
/// that closes a connection kill a `sync` mid-way.
macro_rules! outln {
    () => {
        $crate::cli::print_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::print_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::print_out(format_args!($($arg)*))
    };
}

pub mod cache;
pub mod chunks;
pub mod demo;
pub mod doctor;
pub mod importance;
pub mod mount;
pub mod remote;
pub mod synth;

use crate::config::{self, Config, ConfigError, Overrides};
use crate::remote_tier;
use crate::store::{FsyncPolicy, Store, StoreConfig, StoreError};
use crate::units::{Limit, Size};
use clap::{Parser, Subcommand};
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::Layout;
use kvfs_loader::spec::validate_namespace_dir;
use std::path::PathBuf;

/// kvfs: a content-addressed KV-cache chunk store for LLM inference.
///
/// Chunks are `.kvc` files named by their key under
/// `<cache-dir>/<namespace>/<key[0..2]>/<key>.kvc`. Settings come from flags, then
/// KVFS_* environment variables, then the config file.
#[derive(Debug, Parser)]
#[command(name = "kvfs", version, propagate_version = true)]
pub struct Cli {
    /// Cache directory (env KVFS_CACHE_DIR; default $XDG_CACHE_HOME/kvfs or ~/.cache/kvfs).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "DIR"
    )]
    pub cache_dir: Option<PathBuf>,
    /// Config file (env KVFS_CONFIG; default ~/.config/kvfs/config.toml if present).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Disk tier capacity: bytes (64GiB) or a share of the file system (10%). Env KVFS_CAPACITY.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "SIZE"
    )]
    pub capacity: Option<Limit>,
    /// Memory tier size (1GiB; 0 disables it). Env KVFS_MEMORY.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "SIZE"
    )]
    pub memory: Option<Size>,
    /// Free space to leave on the file system (5%, 10GiB; 0 = none). Env KVFS_MIN_FREE.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "SIZE"
    )]
    pub min_free: Option<Limit>,
    /// fsync policy for committed chunks: always or never. Env KVFS_FSYNC.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "POLICY"
    )]
    pub fsync: Option<FsyncPolicy>,
    /// Check payload digests on every read, not only when bytes enter a tier. Env
    /// KVFS_VERIFY_READS.
    #[arg(long, global = true, help_heading = "Global options")]
    pub verify_reads: bool,
    /// S3 remote tier: s3://bucket/prefix (env KVFS_S3; or the [s3] table). See docs/S3.md.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "URL"
    )]
    pub s3: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands. Keep one variant per command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the main job end to end on the local cache: one request stores a long prefix's KV
    /// blocks as chunks, a second loads them into fresh paged blocks and checks every byte.
    Demo(demo::DemoArgs),
    /// Store a .kvc chunk file (or one read from stdin) after verifying it in full.
    Put(chunks::PutArgs),
    /// Write a chunk to a file or stdout; its payload digest is checked before any byte is
    /// written.
    Get(chunks::GetArgs),
    /// List namespaces, or the chunks of one namespace.
    Ls(cache::LsArgs),
    /// Show a chunk's header fields, tier, size and backing path.
    Stat(chunks::StatArgs),
    /// Verify every chunk in the cache; move bad files to <cache-dir>/.quarantine/ and exit
    /// non-zero if there were any.
    Verify(cache::VerifyArgs),
    /// Remove a chunk.
    Rm(chunks::RmArgs),
    /// Enforce the capacity and free-space bounds now (evicts lowest priority, then least
    /// recently used).
    Gc(cache::GcArgs),
    /// Namespaces, chunk counts, bytes, capacity and free space.
    Info(cache::InfoArgs),
    /// Write deterministic synthetic chunks for a model shape and token count.
    Synth(synth::SynthArgs),
    /// Mount the cache as a file system (/<namespace>/<key>.kvc); see docs/MOUNT.md.
    Mount(mount::MountArgs),
    /// Unmount a kvfs mount (the daemon serving it exits).
    Umount(mount::UmountArgs),
    /// Report the GPU path loads would take (GDS, staging, host) and why, and whether the
    /// cache directory takes O_DIRECT. KVFS_GPU_PATH forces a path.
    Doctor(doctor::DoctorArgs),
    /// Copy chunks between the cache and the S3 bucket (push or pull); resumable.
    Sync(remote::SyncArgs),
}

/// A command's failure; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments: exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the command line of this process; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvfs: error: {}", one_line(&e));
            e.exit_code()
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &CliError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    // Store errors already print their source; only add causes that say something new.
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s.replace('\n', " ")
}

/// Writes command output to stdout (see [`outln!`]).
pub fn print_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("kvfs: error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Logs go to stderr, coloured only when stderr is a terminal: a `--log-file`, a pipe or a
/// journal gets plain text.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one parsed command line; `Ok` carries the exit code.
pub fn run(cli: Cli) -> Result<i32, CliError> {
    let ctx = Ctx::new(&cli)?;
    match cli.command {
        Command::Demo(a) => demo::demo(&ctx, a),
        Command::Put(a) => chunks::put(&ctx, a),
        Command::Get(a) => chunks::get(&ctx, a),
        Command::Ls(a) => cache::ls(&ctx, a),
        Command::Stat(a) => chunks::stat(&ctx, a),
        Command::Verify(a) => cache::verify(&ctx, a),
        Command::Rm(a) => chunks::rm(&ctx, a),
        Command::Gc(a) => cache::gc(&ctx, a),
        Command::Info(a) => cache::info(&ctx, a),
        Command::Synth(a) => synth::synth(&ctx, a),
        Command::Mount(a) => mount::mount(&ctx, a),
        Command::Umount(a) => mount::umount(&ctx, a),
        Command::Doctor(a) => doctor::doctor(&ctx, a),
        Command::Sync(a) => remote::sync(&ctx, a),
    }
}

/// What every command gets: the resolved configuration; the store opens on demand.
pub struct Ctx {
    pub config: Config,
    pub cache_dir: PathBuf,
}

impl Ctx {
    fn new(cli: &Cli) -> Result<Ctx, CliError> {
        let flags = Overrides {
            cache_dir: cli.cache_dir.clone(),
            capacity: cli.capacity,
            memory: cli.memory,
            min_free: cli.min_free,
            fsync: cli.fsync,
            verify_reads: cli.verify_reads.then_some(true),
            group_access: None,
            s3: cli.s3.clone(),
        };
        let config = Config::load(cli.config.as_deref(), &flags, &config::process_env)?;
        let cache_dir = config.cache_dir(&config::process_env)?;
        Ok(Ctx { config, cache_dir })
    }

    /// The store's settings with the S3 tier attached when one is configured (this opens
    /// it: the only place the CLI does).
    pub fn store_config(&self) -> Result<StoreConfig, CliError> {
        let mut sc = self.config.store_config(&config::process_env)?;
        if let Some(s3) = &self.config.s3 {
            // The tier makes its upload queue under the root: make the root private first.
            crate::store::prepare_root(&sc.root, sc.access)?;
            sc.remote =
                remote_tier::attach(Some(s3), &sc.root).map_err(|e| ConfigError::Invalid {
                    origin: "s3".into(),
                    value: s3.url.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(sc)
    }

    /// Opens the store. A one-shot command has no use for the memory tier, so it is off.
    pub fn open_store(&self) -> Result<Store, CliError> {
        let mut sc = self.store_config()?;
        sc.memory_bytes = 0;
        Ok(Store::open(sc)?)
    }
}

/// A chunk named on the command line, resolved to its namespace directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkArg {
    pub ns_dir: String,
    pub key: ChunkKey,
}

/// Resolves `KEY`, `KEY.kvc` or `NS/KEY`: a bare key is looked up in every namespace
/// directory; it must be found in exactly one.
pub fn resolve_chunk(store: &Store, arg: &str) -> Result<ChunkArg, CliError> {
    let parse_key = |s: &str| {
        let s = s.strip_suffix(".kvc").unwrap_or(s);
        ChunkKey::from_hex(s).map_err(|e| CliError::Usage(e.to_string()))
    };
    if let Some((ns, key)) = arg.split_once('/') {
        validate_namespace_dir(ns).map_err(|e| CliError::Usage(e.to_string()))?;
        return Ok(ChunkArg {
            ns_dir: ns.to_string(),
            key: parse_key(key)?,
        });
    }
    let key = parse_key(arg)?;
    let dirs = crate::store::disk::list_namespace_dirs(store.root()).map_err(|e| {
        CliError::Store(StoreError::Io {
            path: store.root().to_path_buf(),
            source: e,
        })
    })?;
    let mut found: Vec<String> = dirs
        .into_iter()
        .filter(|ns| Layout::Cache.chunk_path(store.root(), ns, &key).exists())
        .collect();
    // A host that has never seen the chunk's namespace asks the bucket, as a mount does.
    let remote = store.config().remote.as_ref();
    if found.is_empty()
        && let Some(remote) = remote
    {
        found = remote.namespaces_holding(&key)?;
    }
    match found.len() {
        0 => Err(CliError::Failed(format!(
            "chunk {key} not found in any namespace under {}{}",
            store.root().display(),
            if remote.is_some() {
                " nor in the bucket"
            } else {
                ""
            }
        ))),
        1 => Ok(ChunkArg {
            ns_dir: found.into_iter().next().expect("one"),
            key,
        }),
        _ => Err(CliError::Usage(format!(
            "chunk {key} is in several namespaces ({}); name one as NS/KEY",
            found.join(", ")
        ))),
    }
}
