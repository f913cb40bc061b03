//! [`CudaBackend`]: the loader's back end for KV blocks in GPU memory.
//!
//! **Selection.** [`CudaBackend::open`] runs kvfs-gds's probe once: GDS when cuFile and
//! `nvidia-fs` work, otherwise the pinned staging ring when a CUDA device is there (a forced
//! `KVFS_GPU_PATH` that the machine cannot provide is kvfs-gds's `PathUnavailable`, never a
//! silent fall back). A machine with no device path gets [`CudaError::Unavailable`] with the
//! probe's reasons ("libcuda.so.1 not found", "no CUDA device", "KVFS_GPU_PATH=host"), which
//! an engine prints before using host memory. [`device_path`] is that decision on a probe
//! report alone, so it is tested without CUDA.
//!
//! **Two ways in.** The fast one is [`CudaBackend::load`]: the whole request becomes one
//! [`DevicePlan`] (extents + scatter plan, layer marks) handed to
//! [`GpuLoader::load_extents`], so bytes move in large aligned reads and one scatter kernel
//! launch per piece window, with a CUDA event per layer ([`DeviceLoad`]). The other is the
//! loader's own [`Backend`] trait, which `CudaBackend` implements (`host_addressable` false,
//! so the loader stages every range through its aligned host buffers, then one synchronous
//! host-to-device copy per contiguous piece): it serves what the fast path does not
//! (`Verify::Full`, whose digests need host bytes) and [`Loader::store`] from device blocks.
//!
//! The device pointers come from the same [`KvLayout`] (base pointers and strides) that
//! describes host blocks; the layout type does not know where its memory is, so the calls
//! that move bytes are `unsafe` and say what the caller promises.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use kvfs_gds::cuda::Device;
use kvfs_gds::{GpuLoader, GpuOptions, GpuPath, Probe, ProbeOptions};
use kvfs_loader::{Backend, BlockMap, KvLayout, LoadRequest, Loader};
use tracing::info;

use crate::error::{CudaError, Result};
use crate::load::DeviceLoad;
use crate::plan::DevicePlan;

/// The device path a probe report allows, or why there is none.
pub fn device_path(probe: &Probe) -> Result<GpuPath> {
    if probe.path.uses_device() {
        Ok(probe.path)
    } else {
        Err(CudaError::Unavailable {
            reasons: probe.reasons.clone(),
        })
    }
}

/// Loads `.kvc` chunks into GPU KV blocks (and is the loader's [`Backend`] for device memory).
pub struct CudaBackend {
    path: GpuPath,
    probe: Probe,
    dev: Arc<Device>,
    pub(crate) gpu: Mutex<GpuLoader>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("path", &self.path)
            .field("device", &self.probe.device)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Probes (a forced path must be available) and opens the chosen device path.
    pub fn open(opts: &GpuOptions) -> Result<Arc<CudaBackend>> {
        let gpu = GpuLoader::new(opts)?;
        let path = device_path(gpu.probe())?;
        let dev = gpu
            .device()
            .cloned()
            .ok_or_else(|| CudaError::Unavailable {
                reasons: gpu.probe().reasons.clone(),
            })?;
        info!(%path, device = gpu.probe().device, "kvfs CUDA back end ready");
        Ok(Arc::new(CudaBackend {
            path,
            probe: gpu.probe().clone(),
            dev,
            gpu: Mutex::new(gpu),
        }))
    }

    /// [`CudaBackend::open`] with default options, `KVFS_GPU_PATH` read from the environment.
    pub fn from_env() -> Result<Arc<CudaBackend>> {
        CudaBackend::open(&GpuOptions {
            probe: ProbeOptions::from_env()?,
            ..Default::default()
        })
    }

    /// The path in use (`gds`, `compat` or `staging`).
    pub fn path(&self) -> GpuPath {
        self.path
    }

    /// The probe report: the chosen path and why.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The device (its context, stream, allocations and copies).
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Starts loading `req` into the device blocks `layout` describes, positions mapped by
    /// `map`. The request is checked and every chunk opened and its header checked before
    /// this returns; the reads, copies and scatters then run on a thread of the load (one
    /// load at a time per backend), and [`DeviceLoad`] says when each layer may be used.
    ///
    /// # Safety
    /// Every region of `layout` must be device memory of this backend's device (the primary
    /// context, as torch and vLLM use), writable, allocated until the load is done
    /// ([`DeviceLoad::wait`] or dropping it), and not used by anything else meanwhile except
    /// through the layer waits of [`DeviceLoad`].
    pub unsafe fn load(
        self: &Arc<Self>,
        loader: &Loader,
        req: &LoadRequest<'_>,
        layout: &KvLayout,
        map: &BlockMap<'_>,
    ) -> Result<DeviceLoad> {
        let plan = DevicePlan::build(loader, req, layout, map)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { DeviceLoad::start(self.clone(), plan) }
    }
}

impl Backend for CudaBackend {
    fn host_addressable(&self) -> bool {
        false
    }

    unsafe fn copy_in(&self, dst: usize, src: &[u8]) -> io::Result<()> {
        // SAFETY: the loader's contract: `dst` lies in a layout region, which for this
        // back end is device memory of its context.
        unsafe { self.dev.htod(dst as u64, src) }.map_err(io::Error::other)
    }

    unsafe fn copy_out(&self, src: usize, dst: &mut [u8]) -> io::Result<()> {
        // SAFETY: as in copy_in, for reading `dst.len()` device bytes at `src`.
        unsafe { self.dev.dtoh(dst, src as u64) }.map_err(io::Error::other)
    }
}
