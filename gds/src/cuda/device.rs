//! The CUDA context of a load: its stream, the compiled kernels, device and pinned memory,
//! copies, and the launch of one scatter or gather window. Also the two per-load device
//! tables both device paths share: the plan's run table and the per-layer events.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use tracing::warn;

use super::{KERNEL_SRC, RawEvent, RawStream, cuda_err};
use crate::cufile;
use crate::error::{GdsError, Result};
use crate::probe::guarded;
use crate::scatter::{ScatterPlan, ScatterRun};

/// The compiled kernels.
struct Kernels {
    scatter: CudaFunction,
    gather: CudaFunction,
}

/// A CUDA context, the loader's stream and the kernels.
pub struct Device {
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    kernels: Option<Kernels>,
}

impl Device {
    /// Opens device `ordinal` and compiles the kernels (without NVRTC: logged, copies used).
    /// Call only after a probe found CUDA.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let ctx = guarded("CudaContext::new", || CudaContext::new(ordinal))
            .map_err(|msg| GdsError::Cuda {
                op: "cuCtxCreate",
                msg,
            })?
            .map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        // Check NVRTC with a plain dlopen first: cudarc's loader panics when it is missing.
        let nvrtc = cufile::dlopen_first(crate::probe::NVRTC_NAMES);
        let kernels = match nvrtc
            .map_err(GdsError::Nvrtc)
            .and_then(|_| Self::compile(&ctx))
        {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("scatter kernel unavailable, using async copies: {e}");
                None
            }
        };
        Ok(Arc::new(Device {
            ctx,
            stream,
            kernels,
        }))
    }

    fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let ptx = guarded("nvrtc", || cudarc::nvrtc::compile_ptx(KERNEL_SRC))
            .map_err(GdsError::Nvrtc)?
            .map_err(|e| GdsError::Nvrtc(e.to_string()))?;
        let module = ctx.load_module(ptx).map_err(cuda_err("cuModuleLoadData"))?;
        Ok(Kernels {
            scatter: module
                .load_function("kvfs_scatter")
                .map_err(cuda_err("cuModuleGetFunction"))?,
            gather: module
                .load_function("kvfs_gather")
                .map_err(cuda_err("cuModuleGetFunction"))?,
        })
    }

    /// Whether the NVRTC kernels are in use.
    pub fn has_kernels(&self) -> bool {
        self.kernels.is_some()
    }

    /// The loader's stream.
    pub fn raw_stream(&self) -> RawStream {
        self.stream.cu_stream() as RawStream
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("cuCtxSetCurrent"))
    }

    /// Allocates `len` bytes of device memory.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuf> {
        self.bind()?;
        // SAFETY: plain allocation; freed in DeviceBuf::drop.
        let ptr = unsafe { cu::malloc_sync(len.max(1)) }.map_err(cuda_err("cuMemAlloc"))?;
        Ok(DeviceBuf {
            ptr,
            len,
            dev: self.clone(),
        })
    }

    /// Allocates `len` bytes of pinned host memory.
    pub fn alloc_pinned(self: &Arc<Self>, len: usize) -> Result<PinnedBuf> {
        self.bind()?;
        // SAFETY: plain allocation of len bytes; freed in PinnedBuf::drop. cuMemHostAlloc
        // returns page-aligned memory, as O_DIRECT needs.
        let ptr = unsafe { cu::malloc_host(len.max(1), 0) }.map_err(cuda_err("cuMemHostAlloc"))?;
        // SAFETY: ptr points at len fresh bytes we own; zero them so reads are defined.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) };
        Ok(PinnedBuf {
            ptr: ptr as *mut u8,
            len,
            dev: self.clone(),
        })
    }

    /// Synchronous host-to-device copy (tests, benchmarks), complete on return.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must be device memory of this device's context, allocated and
    /// writable for the whole call, and not in use by any other copy or kernel meanwhile
    /// (a [`DeviceBuf`] of at least that length, say).
    pub unsafe fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        self.synchronize()?;
        // SAFETY: the caller guarantees dst has src.len() writable device bytes.
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(cuda_err("cuMemcpyHtoD"))?;
        // From pageable memory the call may return before the DMA is done.
        self.ctx_synchronize()
    }

    /// Waits for all work in the context (every stream, including the legacy one).
    pub fn ctx_synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(cuda_err("cuCtxSynchronize"))
    }

    /// Synchronous device-to-host copy (tests, benchmarks).
    ///
    /// # Safety
    /// `src..src + dst.len()` must be device memory of this device's context, allocated for
    /// the whole call and not written by any other copy or kernel meanwhile.
    pub unsafe fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        self.synchronize()?;
        // SAFETY: the caller guarantees src has dst.len() readable device bytes.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(cuda_err("cuMemcpyDtoH"))
    }

    /// Asynchronous copy from pinned memory on the loader's stream.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must be device memory of this device's context that stays
    /// allocated and is not otherwise used until the copy completes, and `src` must be
    /// neither dropped nor written until then: call [`Device::synchronize`] first.
    pub unsafe fn htod_async(&self, dst: u64, src: &PinnedBuf) -> Result<()> {
        self.bind()?;
        // SAFETY: per the caller's contract, src outlives the copy unchanged and dst has
        // src.len() writable device bytes.
        unsafe { cu::memcpy_htod_async(dst, src.as_ref(), self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyHtoDAsync"))
    }

    /// Waits for all work on the loader's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    pub(super) fn event(&self) -> Result<CudaEvent> {
        self.ctx.new_event(None).map_err(cuda_err("cuEventCreate"))
    }

    /// An event with timing enabled (layer events, so benchmarks can time them).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("cuEventCreate"))
    }

    /// Makes `stream` wait (on the GPU) for the work recorded by `ev`, without blocking the
    /// host.
    ///
    /// # Safety
    /// `ev` must be a live event of this device's context (a layer event of a loader still
    /// alive) and `stream` a live stream of the same context (or 0, the legacy stream).
    pub unsafe fn wait_event(&self, stream: RawStream, ev: RawEvent) -> Result<()> {
        self.bind()?;
        // SAFETY: ev and stream are live per the caller's contract.
        unsafe {
            cu::stream::wait_event(
                stream as sys::CUstream,
                ev as sys::CUevent,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(cuda_err("cuStreamWaitEvent"))
    }

    /// Blocks the host until the work recorded by `ev` is done.
    ///
    /// # Safety
    /// As [`Device::wait_event`] for `ev`.
    pub unsafe fn event_synchronize(&self, ev: RawEvent) -> Result<()> {
        self.bind()?;
        // SAFETY: ev is live per the caller's contract.
        unsafe { cu::event::synchronize(ev as sys::CUevent) }
            .map_err(cuda_err("cuEventSynchronize"))
    }

    /// Records `ev` on the loader's stream (e.g. a start mark for timing).
    pub fn record(&self, ev: &CudaEvent) -> Result<()> {
        ev.record(&self.stream).map_err(cuda_err("cuEventRecord"))
    }

    /// Scatters (or gathers, `gather = true`) the runs `first..first+count` clipped to the
    /// window at device address `win`.
    pub(super) fn launch_window(
        &self,
        gather: bool,
        win: u64,
        win_start: u64,
        win_len: u64,
        runs_dev: u64,
        plan: &ScatterPlan,
    ) -> Result<()> {
        let range = plan.runs_overlapping(win_start, win_start + win_len);
        if range.is_empty() {
            return Ok(());
        }
        match &self.kernels {
            Some(k) => {
                let f = if gather { &k.gather } else { &k.scatter };
                let first = range.start as u32;
                let count = range.len() as u32;
                let cfg = LaunchConfig {
                    grid_dim: (count.min(65_535), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(f);
                b.arg(&win)
                    .arg(&win_start)
                    .arg(&win_len)
                    .arg(&runs_dev)
                    .arg(&first)
                    .arg(&count);
                // SAFETY: the arguments match the kernel's parameter list (pointers passed as
                // u64); the run table holds plan.runs() and every destination run was
                // validated by the caller to be device memory it owns.
                unsafe { b.launch(cfg) }.map_err(cuda_err("cuLaunchKernel"))?;
            }
            None => {
                let mut err = None;
                plan.for_each_in_window(win_start, win_len, |off, dst, len| {
                    if err.is_some() {
                        return;
                    }
                    let (d, s) = if gather {
                        (win + off, dst)
                    } else {
                        (dst, win + off)
                    };
                    // SAFETY: both ranges are device memory (staging slot, caller's blocks).
                    let r = unsafe {
                        cu::memcpy_dtod_async(d, s, len as usize, self.stream.cu_stream())
                    };
                    if let Err(e) = r {
                        err = Some(cuda_err("cuMemcpyDtoDAsync")(e));
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

/// Device memory owned by kvfs-gds.
pub struct DeviceBuf {
    pub(super) ptr: u64,
    len: usize,
    dev: Arc<Device>,
}

impl DeviceBuf {
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        let _ = self.dev.synchronize();
        // SAFETY: ptr came from cuMemAlloc and the stream using it is idle.
        let _ = unsafe { cu::memory_free(self.ptr) };
    }
}

/// Pinned, page-aligned host memory (`cuMemHostAlloc`).
pub struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    dev: Arc<Device>,
}

// SAFETY: PinnedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for PinnedBuf {}

impl AsRef<[u8]> for PinnedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points at len initialised bytes (zeroed at allocation) owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl AsMut<[u8]> for PinnedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in as_ref; &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        let _ = self.dev.synchronize();
        // SAFETY: ptr came from cuMemHostAlloc and no copy reads it any more.
        let _ = unsafe { cu::free_host(self.ptr as *mut c_void) };
    }
}

/// The plan's run table in device memory, grown as needed.
pub(super) struct RunTable {
    pub(super) buf: Option<DeviceBuf>,
}

impl RunTable {
    pub(super) fn upload(&mut self, dev: &Arc<Device>, plan: &ScatterPlan) -> Result<u64> {
        let runs: &[ScatterRun] = plan.runs();
        let bytes = std::mem::size_of_val(runs);
        if self.buf.as_ref().is_none_or(|b| b.len < bytes) {
            self.buf = Some(dev.alloc(bytes.max(4096).next_power_of_two())?);
        }
        let ptr = self.buf.as_ref().expect("allocated above").ptr;
        if bytes > 0 {
            dev.bind()?;
            // The previous load's kernels may still read the table.
            dev.synchronize()?;
            // SAFETY: the table has room for `bytes`; ScatterRun is repr(C) {u64; 3}, the
            // layout of the kernel's Run.
            unsafe { cu::memcpy_htod_sync(ptr, runs) }.map_err(cuda_err("cuMemcpyHtoD"))?;
            // A copy from pageable memory may return before its DMA is done, and the loader's
            // stream is non-blocking (no implicit order with the legacy stream): wait for it.
            dev.ctx_synchronize()?;
        }
        Ok(ptr)
    }
}

/// Called with each layer and its raw event right after the event is recorded, on the
/// thread running the load (see [`GpuLoader::set_layer_hook`](super::GpuLoader::set_layer_hook)).
pub type LayerHook = Box<dyn FnMut(usize, RawEvent) + Send>;

/// Per-layer events, re-recorded by each load.
#[derive(Default)]
pub(super) struct LayerEvents {
    pub(super) events: Vec<CudaEvent>,
    pub(super) recorded: usize,
    pub(super) hook: Option<LayerHook>,
}

impl LayerEvents {
    pub(super) fn record(&mut self, dev: &Device, layer: usize) -> Result<()> {
        while self.events.len() <= layer {
            self.events.push(dev.timing_event()?);
        }
        self.events[layer]
            .record(&dev.stream)
            .map_err(cuda_err("cuEventRecord"))?;
        self.recorded = self.recorded.max(layer + 1);
        if let Some(hook) = &mut self.hook {
            hook(layer, self.events[layer].cu_event() as RawEvent);
        }
        Ok(())
    }

    pub(super) fn raw(&self, layer: usize) -> Option<RawEvent> {
        (layer < self.recorded).then(|| self.events[layer].cu_event() as RawEvent)
    }
}
