//! kvfs: a content-addressed KV-cache chunk store for LLM serving.
//!
//! Owns the tiered store and its wiring into a daemon and a command line:
//! - [`store`]: the tiered store (memory over local disk, with a seam for a remote tier);
//! - [`units`]: sizes and limits (`64GiB`, `10%`);
//! - [`config`]: settings from a TOML file, the environment and flags;
//! - [`remote_tier`]: the S3 remote tier behind the store's seam, and its `[s3]` settings;
//! - [`mount`]: the store as the backend of a kvfs-fs mount;
//! - [`synth`]: deterministic synthetic prompts and chunks;
//! - [`doctor`]: the GPU path probe and O_DIRECT report;
//! - [`metrics`]: the Prometheus registry, the `/metrics` endpoint and its client (`kvfs
//!   status`); the store and the mount own their metrics and register them;
//! - [`cli`]: the `kvfs` command line (`src/main.rs` only calls [`cli::main`]), the only
//!   module that knows the CLI's context and error.
//!
//! It must not know the chunk format's bytes, key derivation or identity rules (kvfs-loader),
//! FUSE (kvfs-fs), S3 and async runtimes (kvfs-remote) or CUDA (kvfs-gds), beyond calling
//! them (the one exception: [`metrics`] serves HTTP on a one-thread tokio runtime of its own). Within it, library modules never import `cli`, and the store imports neither
//! `config` nor `remote_tier`.

pub mod cli;
pub mod config;
pub mod doctor;
pub mod metrics;
pub mod mount;
pub mod remote_tier;
pub mod store;
pub mod synth;
pub mod units;

pub use config::Config;
pub use store::{
    BadChunk, CapacityInfo, ChunkStat, FsyncPolicy, GcReport, NamespaceInfo, PutOutcome,
    RemoteTier, Store, StoreConfig, StoreError, StoreStats, Tier, VerifyReport,
};
