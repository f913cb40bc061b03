//! Device paths: the CUDA staging sink, the cuFile (GDS) engine and [`GpuLoader`].
//!
//! Both device paths end in the same place: the wanted bytes of a [`Fill`] sit in a
//! *device* staging slot, and the scatter kernel ([`KERNEL_SRC`], compiled at run time by
//! NVRTC) copies every [`ScatterRun`] clipped to the fill's windows to its destination
//! block. One thread block per run, 16-byte vector copies when aligned; the run table is
//! uploaded once per load, and each window is one launch (`runs_overlapping` gives its run
//! range), so a 16 MiB fill costs one copy and a handful of launches, not one memcpy per
//! block per layer. Without NVRTC the same windows are scattered with asynchronous
//! device-to-device copies queued back to back on the stream (correct, slower).
//!
//! - **Staging** ([`CudaSink`] in a [`Ring`]): O_DIRECT reads land in pinned host buffers
//!   (`cuMemHostAlloc`); each is copied with `cuMemcpyHtoDAsync` into its device slot and an
//!   event is recorded right after the copy, so the ring refills that host buffer as soon as
//!   the copy is done while the kernel still runs: disk reads overlap copies and scatters.
//! - **GDS / compat** ([`GdsEngine`]): cuFile reads whole aligned pieces into two device
//!   slots registered once with `cuFileBufRegister`; files are registered once and cached by
//!   descriptor and inode; fills of several pieces go through the batch API. The read of
//!   fill `i + 1` overlaps the scatter of fill `i`.
//! - **Layer-wise**: after the fill that completes layer `l`, an event is recorded on the
//!   loader's stream; [`GpuLoader::wait_layer`] makes an engine stream wait for it
//!   (`cuStreamWaitEvent`) and [`GpuLoader::layer_event`] exposes the raw event.
//! - **Store**: the gather kernel (the scatter read backwards) fills a device slot, then
//!   the bytes go to the file (staging: copy to pinned memory and O_DIRECT write; GDS:
//!   `cuFileWrite`).
//!
//! Nothing here runs on a machine without CUDA: [`GpuLoader::new`] probes first and a
//! host-only machine gets [`GpuPath::HostOnly`] (or a typed error when a device path was
//! forced). The GPU behaviour is exercised by `tests/gpu.rs` through `scripts/gpu-check`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use tracing::{debug, info, warn};

use crate::cufile::{self, CuFile, CuFileIoParams, FileHandle};
use crate::error::{GdsError, Result};
use crate::plan::{Fill, ReadExtent, WriteExtent, plan_fills, stream_len};
use crate::probe::{GpuPath, Probe, ProbeOptions, guarded, select};
use crate::ring::{IoStats, Ring, Sink};
use crate::scatter::{ScatterPlan, ScatterRun};

/// CUDA C source of the scatter and gather kernels (compiled with NVRTC at run time).
///
/// `runs` is the plan's run table (`{src, dst, len}` as u64). A launch covers one window
/// `[win_start, win_start + win_len)` of the source stream whose bytes are at `win`; block
/// `k` handles run `first + k` (grid-stride over `count`), clipped to the window.
pub const KERNEL_SRC: &str = r#"
typedef unsigned long long u64;
struct Run { u64 src; u64 dst; u64 len; };
struct alignas(16) V16 { u64 a; u64 b; };

__device__ __forceinline__ void copy_bytes(unsigned char* d, const unsigned char* s, u64 n) {
    if ((((u64)d | (u64)s | n) & 15ull) == 0) {
        V16* d16 = (V16*)d;
        const V16* s16 = (const V16*)s;
        u64 n16 = n >> 4;
        for (u64 i = threadIdx.x; i < n16; i += blockDim.x) d16[i] = s16[i];
    } else {
        for (u64 i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
    }
}

__device__ __forceinline__ bool clip(const Run& r, u64 win_start, u64 win_len, u64* lo, u64* hi) {
    u64 end = win_start + win_len;
    u64 rend = r.src + r.len;
    *lo = r.src > win_start ? r.src : win_start;
    *hi = rend < end ? rend : end;
    return *lo < *hi;
}

extern "C" __global__ void kvfs_scatter(const unsigned char* win, u64 win_start, u64 win_len,
                                        const Run* runs, unsigned int first, unsigned int count) {
    for (unsigned int k = blockIdx.x; k < count; k += gridDim.x) {
        Run r = runs[first + k];
        u64 lo, hi;
        if (!clip(r, win_start, win_len, &lo, &hi)) continue;
        copy_bytes((unsigned char*)(r.dst + (lo - r.src)), win + (lo - win_start), hi - lo);
    }
}

extern "C" __global__ void kvfs_gather(unsigned char* win, u64 win_start, u64 win_len,
                                       const Run* runs, unsigned int first, unsigned int count) {
    for (unsigned int k = blockIdx.x; k < count; k += gridDim.x) {
        Run r = runs[first + k];
        u64 lo, hi;
        if (!clip(r, win_start, win_len, &lo, &hi)) continue;
        copy_bytes(win + (lo - win_start), (const unsigned char*)(r.dst + (lo - r.src)), hi - lo);
    }
}
"#;

/// A raw `CUevent`, for engines that wait on layer readiness themselves.
pub type RawEvent = *mut c_void;
/// A raw `CUstream` of the engine.
pub type RawStream = *mut c_void;

/// Fills of at least this many pieces use cuFile's batch API.
pub const BATCH_MIN_PIECES: usize = 4;
/// Requests per cuFile batch (cuFile's default `max_batch_io_size` is 128).
pub const BATCH_MAX: usize = 128;

fn cuda_err(op: &'static str) -> impl FnOnce(DriverError) -> GdsError {
    move |e| GdsError::Cuda {
        op,
        msg: e.to_string(),
    }
}

/// The compiled kernels.
struct Kernels {
    scatter: CudaFunction,
    gather: CudaFunction,
}

/// A CUDA context, the loader's stream and the kernels.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
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

    fn bind(&self) -> Result<()> {
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
    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        self.synchronize()?;
        // SAFETY: the caller passes a device address with src.len() bytes.
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(cuda_err("cuMemcpyHtoD"))?;
        // From pageable memory the call may return before the DMA is done.
        self.ctx_synchronize()
    }

    /// Waits for all work in the context (every stream, including the legacy one).
    pub fn ctx_synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(cuda_err("cuCtxSynchronize"))
    }

    /// Synchronous device-to-host copy (tests, benchmarks).
    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        self.synchronize()?;
        // SAFETY: the caller passes a device address with dst.len() bytes.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(cuda_err("cuMemcpyDtoH"))
    }

    /// Asynchronous copy from pinned memory on the loader's stream.
    pub fn htod_async(&self, dst: u64, src: &PinnedBuf) -> Result<()> {
        self.bind()?;
        // SAFETY: src is pinned and outlives the copy (callers synchronize before dropping
        // it); dst has src.len bytes.
        unsafe { cu::memcpy_htod_async(dst, src.as_ref(), self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyHtoDAsync"))
    }

    /// Waits for all work on the loader's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    fn event(&self) -> Result<CudaEvent> {
        self.ctx.new_event(None).map_err(cuda_err("cuEventCreate"))
    }

    /// An event with timing enabled (layer events, so benchmarks can time them).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("cuEventCreate"))
    }

    /// Records `ev` on the loader's stream (e.g. a start mark for timing).
    pub fn record(&self, ev: &CudaEvent) -> Result<()> {
        ev.record(&self.stream).map_err(cuda_err("cuEventRecord"))
    }

    /// Scatters (or gathers, `gather = true`) the runs `first..first+count` clipped to the
    /// window at device address `win`.
    fn launch_window(
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
    ptr: u64,
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
struct RunTable {
    buf: Option<DeviceBuf>,
}

impl RunTable {
    fn upload(&mut self, dev: &Arc<Device>, plan: &ScatterPlan) -> Result<u64> {
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

/// Per-layer events, re-recorded by each load.
struct LayerEvents {
    events: Vec<CudaEvent>,
    recorded: usize,
}

impl LayerEvents {
    fn record(&mut self, dev: &Device, layer: usize) -> Result<()> {
        while self.events.len() <= layer {
            self.events.push(dev.timing_event()?);
        }
        self.events[layer]
            .record(&dev.stream)
            .map_err(cuda_err("cuEventRecord"))?;
        self.recorded = self.recorded.max(layer + 1);
        Ok(())
    }

    fn raw(&self, layer: usize) -> Option<RawEvent> {
        (layer < self.recorded).then(|| self.events[layer].cu_event() as RawEvent)
    }
}

/// The staging path's sink: pinned host buffers -> device slots -> scatter kernel.
pub struct CudaSink {
    dev: Arc<Device>,
    slots: Vec<DeviceBuf>,
    slot_events: Vec<Option<CudaEvent>>,
    runs: RunTable,
    runs_ptr: u64,
    layers: LayerEvents,
}

impl CudaSink {
    /// A sink on `dev`.
    pub fn new(dev: Arc<Device>) -> Self {
        CudaSink {
            dev,
            slots: Vec::new(),
            slot_events: Vec::new(),
            runs: RunTable { buf: None },
            runs_ptr: 0,
            layers: LayerEvents {
                events: Vec::new(),
                recorded: 0,
            },
        }
    }
}

impl Sink for CudaSink {
    type Buffer = PinnedBuf;

    fn alloc_buffer(&mut self, len: usize) -> Result<PinnedBuf> {
        self.slots.push(self.dev.alloc(len)?);
        self.slot_events.push(None);
        self.dev.alloc_pinned(len)
    }

    fn begin(&mut self, plan: &ScatterPlan) -> Result<()> {
        self.runs_ptr = self.runs.upload(&self.dev, plan)?;
        self.layers.recorded = 0;
        Ok(())
    }

    fn submit(
        &mut self,
        slot: usize,
        buf: &PinnedBuf,
        fill: &Fill,
        plan: &ScatterPlan,
    ) -> Result<()> {
        self.dev.bind()?;
        let dslot = self.slots[slot].ptr;
        let used = fill.used as usize;
        // SAFETY: buf is pinned and is not refilled before wait_slot(slot) has synchronized
        // the event recorded just below; the device slot holds buf.len >= used bytes.
        unsafe { cu::memcpy_htod_async(dslot, &buf.as_ref()[..used], self.dev.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        let ev = match self.slot_events[slot].take() {
            Some(e) => e,
            None => self.dev.event()?,
        };
        ev.record(&self.dev.stream)
            .map_err(cuda_err("cuEventRecord"))?;
        self.slot_events[slot] = Some(ev);
        for p in &fill.pieces {
            let win = dslot + p.buf_offset + p.skip;
            self.dev
                .launch_window(false, win, p.stream_offset, p.len, self.runs_ptr, plan)?;
        }
        Ok(())
    }

    fn wait_slot(&mut self, slot: usize) -> Result<()> {
        if let Some(e) = &self.slot_events[slot] {
            e.synchronize().map_err(cuda_err("cuEventSynchronize"))?;
        }
        Ok(())
    }

    fn layer_ready(&mut self, layer: usize) -> Result<()> {
        self.layers.record(&self.dev, layer)
    }

    fn gather(&mut self, buf: &mut PinnedBuf, fill: &Fill, plan: &ScatterPlan) -> Result<()> {
        self.dev.bind()?;
        let dslot = self.slots[0].ptr;
        for p in &fill.pieces {
            let win = dslot + p.buf_offset + p.skip;
            self.dev
                .launch_window(true, win, p.stream_offset, p.len, self.runs_ptr, plan)?;
        }
        for p in &fill.pieces {
            let r = p.data_range();
            let dst = &mut buf.as_mut()[r];
            // SAFETY: buf is pinned and we synchronize below before returning it.
            unsafe {
                cu::memcpy_dtoh_async(
                    dst,
                    dslot + p.buf_offset + p.skip,
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        }
        self.dev.synchronize()
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The cuFile path: reads into registered device slots, then the same scatter.
pub struct GdsEngine {
    dev: Arc<Device>,
    lib: &'static CuFile,
    slots: Vec<DeviceBuf>,
    slot_events: Vec<Option<CudaEvent>>,
    buf_size: u64,
    runs: RunTable,
    layers: LayerEvents,
    handles: HashMap<RawFd, (u64, u64, FileHandle)>,
}

/// Most file registrations kept before the cache is flushed.
const MAX_HANDLES: usize = 1024;

impl GdsEngine {
    /// Two device slots of `buf_size` bytes, registered with cuFile.
    pub fn new(dev: Arc<Device>, buf_size: usize) -> Result<Self> {
        crate::plan::check_buf_size(buf_size as u64)?;
        let lib = cufile::library().map_err(|msg| GdsError::CuFile {
            op: "dlopen",
            code: -1,
            cu_code: 0,
            msg,
        })?;
        lib.driver_open()?;
        let mut slots = Vec::new();
        for _ in 0..2 {
            let s = dev.alloc(buf_size)?;
            // SAFETY: s is a live device allocation of buf_size bytes, deregistered in Drop.
            unsafe { lib.buf_register(s.ptr, buf_size) }?;
            slots.push(s);
        }
        Ok(GdsEngine {
            dev,
            lib,
            slots,
            slot_events: vec![None, None],
            buf_size: buf_size as u64,
            runs: RunTable { buf: None },
            layers: LayerEvents {
                events: Vec::new(),
                recorded: 0,
            },
            handles: HashMap::new(),
        })
    }

    /// Registers `fd` with cuFile once; re-registers if the descriptor now names another
    /// file (closed and reused).
    fn handle(&mut self, fd: RawFd) -> Result<&FileHandle> {
        // SAFETY: fstat into a zeroed struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(GdsError::io("fstat", 0, std::io::Error::last_os_error()));
        }
        let id = (st.st_dev, st.st_ino);
        let stale = matches!(self.handles.get(&fd), Some((d, i, _)) if (*d, *i) != id);
        if stale || self.handles.len() >= MAX_HANDLES {
            let old: Vec<RawFd> = if stale {
                vec![fd]
            } else {
                self.handles.keys().copied().collect()
            };
            for k in old {
                if let Some((_, _, h)) = self.handles.remove(&k) {
                    self.lib.handle_deregister(h);
                }
            }
        }
        if !self.handles.contains_key(&fd) {
            let h = self.lib.handle_register(fd)?;
            self.handles.insert(fd, (id.0, id.1, h));
        }
        Ok(&self.handles[&fd].2)
    }

    /// Drops the cached registration of `fd` (call before closing a descriptor you loaded
    /// from, if you want the registration released at once).
    pub fn forget_file(&mut self, fd: RawFd) {
        if let Some((_, _, h)) = self.handles.remove(&fd) {
            self.lib.handle_deregister(h);
        }
    }

    fn read_fill(&mut self, slot: usize, fill: &Fill, stats: &mut IoStats) -> Result<()> {
        let base = self.slots[slot].ptr;
        let lib = self.lib;
        if fill.pieces.len() >= BATCH_MIN_PIECES && lib.has_batch() {
            let mut params = Vec::with_capacity(fill.pieces.len());
            for p in &fill.pieces {
                let fh = self.handle(p.file)?.0;
                params.push(CuFileIoParams {
                    mode: cufile::BATCH_MODE,
                    dev_ptr_base: base as *mut c_void,
                    file_offset: p.file_offset as i64,
                    dev_ptr_offset: p.buf_offset as i64,
                    size: p.io_len as usize,
                    fh,
                    opcode: cufile::OP_READ,
                    cookie: std::ptr::null_mut(),
                });
            }
            let mut got = Vec::with_capacity(params.len());
            for part in params.chunks_mut(BATCH_MAX) {
                let b = lib.batch_setup(part.len() as u32)?;
                // SAFETY: base is registered device memory of buf_size >= every piece's end;
                // the handles are live (cached).
                let res = unsafe { lib.batch_run(&b, part) };
                lib.batch_destroy(b);
                got.extend(res?);
            }
            for (p, n) in fill.pieces.iter().zip(got) {
                check_read(p.file_offset, p.skip, p.len, n as u64)?;
            }
        } else {
            for p in &fill.pieces {
                let fh = self.handle(p.file)?;
                // SAFETY: as above.
                let n =
                    unsafe { lib.read(fh, base, p.io_len as usize, p.file_offset, p.buf_offset) }?;
                check_read(p.file_offset, p.skip, p.len, n as u64)?;
            }
        }
        for p in &fill.pieces {
            stats.transfers += 1;
            stats.io_bytes += p.io_len;
            stats.data_bytes += p.len;
        }
        Ok(())
    }

    /// Loads `extents` into device destinations per `plan`.
    pub fn load_extents(&mut self, extents: &[ReadExtent], plan: &ScatterPlan) -> Result<IoStats> {
        let total = stream_len(extents);
        if plan.src_len() > total {
            return Err(GdsError::PlanExceedsExtents {
                plan_len: plan.src_len(),
                extents_len: total,
            });
        }
        let fills = plan_fills(extents, self.buf_size)?;
        let runs_ptr = self.runs.upload(&self.dev, plan)?;
        self.layers.recorded = 0;
        let mut stats = IoStats::default();
        let mut layers_done = 0;
        for (i, fill) in fills.iter().enumerate() {
            let slot = i % self.slots.len();
            if let Some(e) = &self.slot_events[slot] {
                e.synchronize().map_err(cuda_err("cuEventSynchronize"))?;
            }
            self.dev.bind()?;
            self.read_fill(slot, fill, &mut stats)?;
            let base = self.slots[slot].ptr;
            for p in &fill.pieces {
                self.dev.launch_window(
                    false,
                    base + p.buf_offset + p.skip,
                    p.stream_offset,
                    p.len,
                    runs_ptr,
                    plan,
                )?;
            }
            let ev = match self.slot_events[slot].take() {
                Some(e) => e,
                None => self.dev.event()?,
            };
            ev.record(&self.dev.stream)
                .map_err(cuda_err("cuEventRecord"))?;
            self.slot_events[slot] = Some(ev);
            stats.fills += 1;
            let now = plan.layers_complete_at(fill.stream_end());
            while layers_done < now {
                self.layers.record(&self.dev, layers_done)?;
                layers_done += 1;
            }
        }
        while layers_done < plan.layers() {
            self.layers.record(&self.dev, layers_done)?;
            layers_done += 1;
        }
        Ok(stats)
    }

    /// Gathers device bytes per `plan` and writes them to `extents` with cuFileWrite.
    pub fn store_extents(
        &mut self,
        extents: &[WriteExtent],
        plan: &ScatterPlan,
    ) -> Result<IoStats> {
        crate::ring::check_store_request(extents, plan)?;
        let ends = crate::ring::file_ends(extents)?;
        let fills = plan_fills(extents, self.buf_size)?;
        let runs_ptr = self.runs.upload(&self.dev, plan)?;
        let mut stats = IoStats::default();
        let base = self.slots[0].ptr;
        for fill in &fills {
            self.dev.bind()?;
            // SAFETY: the slot is ours; zero padding so the block tails written are zeros.
            unsafe {
                cu::memset_d8_async(base, 0, fill.used as usize, self.dev.stream.cu_stream())
            }
            .map_err(cuda_err("cuMemsetD8Async"))?;
            for p in &fill.pieces {
                self.dev.launch_window(
                    true,
                    base + p.buf_offset + p.skip,
                    p.stream_offset,
                    p.len,
                    runs_ptr,
                    plan,
                )?;
            }
            self.dev.synchronize()?;
            let lib = self.lib;
            for p in &fill.pieces {
                let fh = self.handle(p.file)?;
                // SAFETY: base is registered device memory holding the gathered piece.
                let n =
                    unsafe { lib.write(fh, base, p.io_len as usize, p.file_offset, p.buf_offset) }?;
                if (n as u64) < p.io_len {
                    return Err(GdsError::io(
                        "cuFileWrite",
                        p.file_offset,
                        std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            format!("short write {n}"),
                        ),
                    ));
                }
                stats.transfers += 1;
                stats.io_bytes += p.io_len;
                stats.data_bytes += p.len;
            }
            stats.fills += 1;
        }
        crate::ring::trim_files(&ends)?;
        Ok(stats)
    }
}

fn check_read(file_offset: u64, skip: u64, len: u64, got: u64) -> Result<()> {
    if got < skip + len {
        return Err(GdsError::ShortRead {
            offset: file_offset + skip,
            wanted: len,
            got: got.saturating_sub(skip),
        });
    }
    Ok(())
}

impl Drop for GdsEngine {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        for (_, (_, _, h)) in self.handles.drain() {
            self.lib.handle_deregister(h);
        }
        for s in &self.slots {
            // SAFETY: registered in new(), still allocated (slots drop after this).
            let _ = unsafe { self.lib.buf_deregister(s.ptr) };
        }
    }
}

/// Options of [`GpuLoader`].
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Probe inputs (forcing, probe directory, device).
    pub probe: ProbeOptions,
    /// Staging ring slots (>= 2).
    pub slots: usize,
    /// Bytes per staging buffer (multiple of 4096).
    pub buf_size: usize,
    /// Threads reading each fill on the staging path.
    pub readers: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            probe: ProbeOptions::default(),
            slots: 3,
            buf_size: 16 << 20,
            readers: std::thread::available_parallelism().map_or(4, |n| n.get().min(8)),
        }
    }
}

enum Engine {
    Host,
    Staging(Box<Ring<CudaSink>>),
    Gds(Box<GdsEngine>),
}

/// Loads file extents into device memory (and stores them back) on the path the probe
/// chose: "extents in, device destinations out".
pub struct GpuLoader {
    probe: Probe,
    dev: Option<Arc<Device>>,
    engine: Engine,
}

impl GpuLoader {
    /// Probes (honouring a forced path, which is an error if unavailable) and sets up the
    /// chosen path.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let probe = select(&opts.probe)?;
        let (dev, engine) = match probe.path {
            GpuPath::HostOnly => (None, Engine::Host),
            GpuPath::Staging => {
                let dev = Device::open(probe.device)?;
                let mut ring = Ring::new(CudaSink::new(dev.clone()), opts.slots, opts.buf_size)?;
                ring.set_readers(opts.readers);
                (Some(dev), Engine::Staging(Box::new(ring)))
            }
            GpuPath::Gds | GpuPath::Compat => {
                let dev = Device::open(probe.device)?;
                let g = GdsEngine::new(dev.clone(), opts.buf_size)?;
                (Some(dev), Engine::Gds(Box::new(g)))
            }
        };
        info!(path = %probe.path, kernels = dev.as_ref().is_some_and(|d| d.has_kernels()), "GPU loader ready");
        Ok(GpuLoader { probe, dev, engine })
    }

    /// [`GpuLoader::new`] with defaults and `KVFS_GPU_PATH` read from the environment.
    pub fn from_env() -> Result<Self> {
        Self::new(&GpuOptions {
            probe: ProbeOptions::from_env()?,
            ..Default::default()
        })
    }

    /// The probe report.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The path in use.
    pub fn path(&self) -> GpuPath {
        self.probe.path
    }

    /// The device, unless host-only.
    pub fn device(&self) -> Option<&Arc<Device>> {
        self.dev.as_ref()
    }

    /// Reads `extents` (their bytes in order form the source stream) and scatters them to
    /// the device addresses of `scatter`. Returns when all reads are issued; the copies
    /// complete on the loader's stream (see [`GpuLoader::wait_layer`],
    /// [`GpuLoader::synchronize`]).
    pub fn load_extents(
        &mut self,
        extents: &[ReadExtent],
        scatter: &ScatterPlan,
    ) -> Result<IoStats> {
        let stats = match &mut self.engine {
            Engine::Host => return Err(GdsError::NoDevice { op: "load_extents" }),
            Engine::Staging(r) => r.load_extents(extents, scatter)?,
            Engine::Gds(g) => g.load_extents(extents, scatter)?,
        };
        debug!(?stats, path = %self.probe.path, "device load issued");
        Ok(stats)
    }

    /// Gathers device bytes per `gather` and writes them to `extents` (offsets aligned to
    /// 4096). Synchronous.
    pub fn store_extents(
        &mut self,
        extents: &[WriteExtent],
        gather: &ScatterPlan,
    ) -> Result<IoStats> {
        match &mut self.engine {
            Engine::Host => Err(GdsError::NoDevice {
                op: "store_extents",
            }),
            Engine::Staging(r) => r.store_extents(extents, gather),
            Engine::Gds(g) => g.store_extents(extents, gather),
        }
    }

    /// The event recorded after layer `layer` of the last load was scattered.
    pub fn layer_event(&self, layer: usize) -> Option<RawEvent> {
        match &self.engine {
            Engine::Host => None,
            Engine::Staging(r) => r.sink().layers.raw(layer),
            Engine::Gds(g) => g.layers.raw(layer),
        }
    }

    /// Makes `stream` (an engine's `CUstream`) wait until layer `layer` of the last load is
    /// in place, without blocking the host.
    ///
    /// # Safety
    /// `stream` must be a live stream of the loader's device context.
    pub unsafe fn wait_layer(&self, layer: usize, stream: RawStream) -> Result<()> {
        let ev = self.layer_event(layer).ok_or_else(|| {
            GdsError::Config(format!("layer {layer} has no event (not loaded yet?)"))
        })?;
        if let Some(d) = &self.dev {
            d.bind()?;
        }
        // SAFETY: ev is a live event of ours; stream per the caller's contract.
        unsafe {
            cu::stream::wait_event(
                stream as sys::CUstream,
                ev as sys::CUevent,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(cuda_err("cuStreamWaitEvent"))
    }

    /// Blocks until every queued copy of the loader is done.
    pub fn synchronize(&self) -> Result<()> {
        match &self.dev {
            Some(d) => d.synchronize(),
            None => Ok(()),
        }
    }
}
