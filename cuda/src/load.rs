//! [`DeviceLoad`]: a device load in progress, and its layer-wise readiness.
//!
//! The load runs on a thread of its own that holds the backend's [`GpuLoader`] for the
//! whole load: it issues the reads (O_DIRECT into the pinned ring, or cuFile into the
//! registered device slots), queues the copies and scatter kernels on the loader's stream,
//! and records one CUDA event per layer as soon as the fill completing that layer is queued.
//! A hook on the loader (`GpuLoader::set_layer_hook`) publishes each event here, so:
//!
//! - [`DeviceLoad::wait_layer`] with an engine stream returns as soon as layer `l`'s event
//!   is *recorded*, after making that stream wait for it on the GPU (`cuStreamWaitEvent`):
//!   the engine's kernels for layer `l` queue behind exactly the copies of layer `l`, while
//!   later layers are still being read; without a stream it blocks the host until the copies
//!   are done (`cuEventSynchronize`);
//! - [`DeviceLoad::layer_event`] hands out the raw `CUevent` for engines that wait themselves
//!   (torch: `torch.cuda.Event`-style external waits);
//! - [`DeviceLoad::wait`] joins the thread, which synchronises the loader's stream last, so
//!   every byte is in place when it returns. Dropping the handle waits the same way, so no
//!   copy lands in engine memory after the handle is gone.
//!
//! A chunk that could not be opened (found when the plan was built) ends the load before it,
//! as on the host path: the chunks before it are loaded, and `wait`/`wait_layer` return the
//! loader's `LoaderError::Chunk` (after the load is done, so its valid prefix is in place).
//! A device or I/O failure during the load is [`CudaError::LoadFailed`] for every waiter.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvfs_gds::cuda::{RawEvent, RawStream};
use kvfs_gds::{GdsError, GpuPath, IoStats};

use crate::backend::CudaBackend;
use crate::error::{CudaError, Result};
use crate::plan::{DevicePlan, Failure};

/// Figures of a finished device load.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLoadStats {
    /// The path that moved the bytes.
    pub path: GpuPath,
    /// Chunks the request covered.
    pub chunks: usize,
    /// Chunk files read, and of those opened with O_DIRECT.
    pub files: usize,
    pub direct_files: usize,
    /// Token positions in the request.
    pub tokens: usize,
    /// Bytes placed in device memory.
    pub bytes_needed: u64,
    /// Reads, transfers and bytes as kvfs-gds counted them (4096-byte widening included).
    pub io: IoStats,
    /// From the start of the load to every byte in place (stream synchronised).
    pub elapsed: Duration,
    /// From the start of the load to each layer's event being recorded.
    pub layer_issued: Vec<Duration>,
}

#[derive(Default)]
struct State {
    /// Raw events by layer, once recorded (as addresses: raw pointers are not `Send`).
    events: Vec<Option<usize>>,
    issued: Vec<Option<Duration>>,
    done: Option<std::result::Result<IoStats, Arc<GdsError>>>,
    elapsed: Duration,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A device load in progress; see the module docs.
pub struct DeviceLoad {
    backend: Arc<CudaBackend>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    failure: Option<Failure>,
    layers: usize,
    figures: Figures,
}

/// What the plan knew of the load (for [`DeviceLoadStats`]).
struct Figures {
    chunks: usize,
    files: usize,
    direct_files: usize,
    tokens: usize,
    bytes_needed: u64,
}

impl DeviceLoad {
    /// Starts `plan` on its own thread.
    ///
    /// # Safety
    /// As [`CudaBackend::load`] for every destination of `plan`.
    pub(crate) unsafe fn start(backend: Arc<CudaBackend>, plan: DevicePlan) -> Result<DeviceLoad> {
        let layers = plan.scatter().layers();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                events: vec![None; layers],
                issued: vec![None; layers],
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        let failure = plan.failure_info();
        let figures = Figures {
            chunks: plan.chunks(),
            files: plan.files(),
            direct_files: plan.direct_files(),
            tokens: plan.tokens(),
            bytes_needed: plan.bytes_needed(),
        };
        let (b, sh) = (backend.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("kvfs-cuda-load".into())
            // SAFETY: forwarded from this function's contract.
            .spawn(move || unsafe { run(&b, &sh, plan) })
            .map_err(|_| CudaError::Handle("cannot spawn the load thread"))?;
        Ok(DeviceLoad {
            backend,
            shared,
            thread: Some(thread),
            failure,
            layers,
            figures,
        })
    }

    /// Layers of the load (the model's).
    pub fn num_layers(&self) -> usize {
        self.layers
    }

    /// Whether every copy of the load is done.
    pub fn is_done(&self) -> bool {
        self.shared.lock().done.is_some()
    }

    /// Blocks until layer `layer`'s event is recorded or the load ended; returns the event,
    /// or `None` when the load ended without one (it finished: the data is in place).
    fn recorded(&self, layer: usize) -> Result<Option<RawEvent>> {
        if layer >= self.layers {
            return Err(CudaError::Handle("layer out of range"));
        }
        let mut st = self.shared.lock();
        loop {
            match &st.done {
                Some(Err(e)) => return Err(CudaError::LoadFailed(e.clone())),
                Some(Ok(_)) => return Ok(None),
                None => {}
            }
            if let Some(ev) = st.events[layer] {
                return Ok(Some(ev as RawEvent));
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the whole load is done (its stream synchronised).
    fn finished(&self) -> Result<IoStats> {
        let mut st = self.shared.lock();
        loop {
            match &st.done {
                Some(Ok(s)) => return Ok(*s),
                Some(Err(e)) => return Err(CudaError::LoadFailed(e.clone())),
                None => {
                    st = self
                        .shared
                        .changed
                        .wait(st)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }

    /// Makes layer `layer` usable: with `stream` (an engine's `CUstream` of the same
    /// context), that stream waits on the GPU for the layer's copies and the host returns at
    /// once; without, the host blocks until they are done. A chunk failure is returned once
    /// the load is done (its valid prefix in place).
    ///
    /// # Safety
    /// `stream`, if given, must be a live stream of the backend's device context.
    pub unsafe fn wait_layer(&self, layer: usize, stream: Option<RawStream>) -> Result<()> {
        if let Some(f) = &self.failure {
            self.finished()?;
            return Err(f.error().into());
        }
        let Some(ev) = self.recorded(layer)? else {
            return Ok(());
        };
        let dev = self.backend.device();
        // SAFETY: `ev` is one of the backend's layer events, alive as long as the backend
        // (held by this handle); `stream` per the caller's contract. If another load has
        // re-recorded the event since, the wait covers that later point of the same stream,
        // which is after this load's copies.
        match stream {
            Some(s) => unsafe { dev.wait_event(s, ev) }?,
            None => unsafe { dev.event_synchronize(ev) }?,
        }
        Ok(())
    }

    /// The raw `CUevent` recorded after layer `layer`'s copies (blocks until it is
    /// recorded), or `None` when the load already finished (the data is in place). The
    /// event belongs to the backend and is re-recorded by its next load: wait on it before
    /// starting another.
    pub fn layer_event(&self, layer: usize) -> Result<Option<RawEvent>> {
        self.recorded(layer)
    }

    /// Waits for the whole load and returns its figures, or the chunk failure that ended it.
    pub fn wait(mut self) -> Result<DeviceLoadStats> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| CudaError::Handle("the load thread panicked"))?;
        }
        let metrics = kvfs_loader::metrics::global();
        let io = self.finished().inspect_err(|_| metrics.load_failed())?;
        if let Some(f) = &self.failure {
            metrics.load_failed();
            return Err(f.error().into());
        }
        let st = self.shared.lock();
        let f = &self.figures;
        // Counted with the loader's other loads; layers are issued, not known in place, here.
        metrics.load_finished(f.chunks, f.tokens, io.io_bytes, st.elapsed, &[]);
        Ok(DeviceLoadStats {
            path: self.backend.path(),
            chunks: f.chunks,
            files: f.files,
            direct_files: f.direct_files,
            tokens: f.tokens,
            bytes_needed: f.bytes_needed,
            io,
            elapsed: st.elapsed,
            layer_issued: st.issued.iter().map(|d| d.unwrap_or_default()).collect(),
        })
    }
}

impl Drop for DeviceLoad {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The load thread: runs the plan on the backend's loader, publishing layer events.
///
/// # Safety
/// As [`CudaBackend::load`] for every destination of `plan`.
unsafe fn run(backend: &CudaBackend, shared: &Arc<Shared>, plan: DevicePlan) {
    let started = Instant::now();
    let mut gl = backend.gpu.lock().unwrap_or_else(|p| p.into_inner());
    let sh = shared.clone();
    gl.set_layer_hook(Some(Box::new(move |layer, ev| {
        let mut st = sh.lock();
        if layer < st.events.len() {
            st.events[layer] = Some(ev as usize);
            st.issued[layer] = Some(started.elapsed());
        }
        drop(st);
        sh.changed.notify_all();
    })));
    // SAFETY: forwarded from this function's contract.
    let result = unsafe { gl.load_extents(plan.extents(), plan.scatter()) }
        .and_then(|stats| gl.synchronize().map(|()| stats));
    gl.set_layer_hook(None);
    drop(gl);
    // The plan (and the chunk files the extents name) lives until every read is done.
    drop(plan);
    let mut st = shared.lock();
    st.elapsed = started.elapsed();
    st.done = Some(result.map_err(Arc::new));
    drop(st);
    shared.changed.notify_all();
}
