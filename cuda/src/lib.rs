//! kvfs-cuda: the loader's CUDA back end, `.kvc` chunks into GPU KV blocks.
//!
//! kvfs-loader knows chunks, keys and layouts and links no CUDA; kvfs-gds moves file
//! extents into device memory (GDS or pinned staging, CUDA loaded at run time) and knows no
//! chunk format. This crate is the one place that knows both, so an engine that does not want
//! CUDA links kvfs-loader alone, and one that does adds this crate (still with no link-time
//! CUDA: everything goes through kvfs-gds's `dlopen`).
//!
//! - [`plan`]: a load request -> [`DevicePlan`] (extents + scatter plan, layer-major, layer
//!   marks), built and checked on the host with the loader's own header checks;
//! - [`backend`]: [`CudaBackend`], chosen by the probe (GDS, then staging, then
//!   [`CudaError::Unavailable`] naming why), which runs plans through `GpuLoader` and is also
//!   the loader's [`kvfs_loader::Backend`] for device memory (the staged, verified path);
//! - [`load`](mod@load): [`DeviceLoad`], a load in progress with one CUDA event per layer that
//!   an engine stream can wait on (`cuStreamWaitEvent`) or that an engine takes raw.
//!
//! It owns loading chunks into device memory; it must not know stores, tiers, mounts or S3.

pub mod backend;
pub mod error;
pub mod load;
pub mod plan;

pub use backend::{CudaBackend, device_path};
pub use error::{CudaError, Result};
pub use kvfs_gds::cuda::{RawEvent, RawStream};
pub use kvfs_gds::{GpuOptions, GpuPath, ProbeOptions};
pub use load::{DeviceLoad, DeviceLoadStats};
pub use plan::DevicePlan;
