//! kvfs: a content-addressed KV-cache chunk store for LLM serving.
//!
//! - [`store`]: the tiered store (memory over local disk, with a seam for a remote tier);
//! - [`units`]: sizes and limits (`64GiB`, `10%`);
//! - [`config`]: settings from a TOML file, the environment and flags;
//! - [`remote_tier`]: the S3 remote tier behind the store's seam, and its `[s3]` settings;
//! - [`mount`]: the store as the backend of a kvfs-fs mount;
//! - [`synth`]: deterministic synthetic prompts and chunks;
//! - [`doctor`]: the GPU path probe and O_DIRECT report;
//! - [`cli`]: the `kvfs` command line (`src/main.rs` only calls [`cli::main`]).
//!
//! Chunk identity, the `.kvc` format and atomic commits live in `kvfs-loader`.

pub mod cli;
pub mod config;
pub mod doctor;
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
