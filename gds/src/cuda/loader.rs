//! [`GpuLoader`]: probes, then loads and stores extents on the chosen path (host only,
//! staging ring, or cuFile), and exposes per-layer readiness to an engine's stream.

use std::sync::Arc;

use tracing::{debug, info};

use super::device::{Device, LayerHook};
use super::gds::GdsEngine;
use super::staging::CudaSink;
use super::{RawEvent, RawStream};
use crate::error::{GdsError, Result};
use crate::plan::{ReadExtent, WriteExtent};
use crate::probe::{GpuPath, Probe, ProbeOptions, select};
use crate::ring::{IoStats, Ring};
use crate::scatter::ScatterPlan;

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
                // SAFETY: the ring only runs plans given to `load_extents`/`store_extents`,
                // which are unsafe fns whose callers promise the sink's contract.
                let sink = unsafe { CudaSink::new(dev.clone()) };
                let mut ring = Ring::new(sink, opts.slots, opts.buf_size)?;
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
    ///
    /// # Safety
    /// Every destination run of `scatter` must be device memory of the loader's device
    /// context (for example within [`DeviceBuf`](super::DeviceBuf)s from
    /// [`Device::alloc`]), writable, and used by nothing else until the load has completed
    /// ([`GpuLoader::synchronize`], or the layer events). On the host-only path nothing is
    /// written and the call fails with [`GdsError::NoDevice`].
    pub unsafe fn load_extents(
        &mut self,
        extents: &[ReadExtent],
        scatter: &ScatterPlan,
    ) -> Result<IoStats> {
        let stats = match &mut self.engine {
            Engine::Host => return Err(GdsError::NoDevice { op: "load_extents" }),
            Engine::Staging(r) => r.load_extents(extents, scatter)?,
            // SAFETY: the caller's contract is the engine's.
            Engine::Gds(g) => unsafe { g.load_extents(extents, scatter) }?,
        };
        debug!(?stats, path = %self.probe.path, "device load issued");
        Ok(stats)
    }

    /// Gathers device bytes per `gather` and writes them to `extents` (offsets aligned to
    /// 4096). Synchronous.
    ///
    /// # Safety
    /// Every destination run of `gather` (the bytes read) must be device memory of the
    /// loader's device context, allocated and not written by anything else until the call
    /// returns. On the host-only path nothing is read and the call fails with
    /// [`GdsError::NoDevice`].
    pub unsafe fn store_extents(
        &mut self,
        extents: &[WriteExtent],
        gather: &ScatterPlan,
    ) -> Result<IoStats> {
        match &mut self.engine {
            Engine::Host => Err(GdsError::NoDevice {
                op: "store_extents",
            }),
            Engine::Staging(r) => r.store_extents(extents, gather),
            // SAFETY: the caller's contract is the engine's.
            Engine::Gds(g) => unsafe { g.store_extents(extents, gather) },
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

    /// Installs (or with `None` removes) a hook called on the loading thread right after
    /// each layer's event is recorded, with the layer and its raw event: an engine that runs
    /// [`GpuLoader::load_extents`] on a thread of its own learns there when layer `l` may be
    /// waited on (the event is recorded; the copies behind it may still be running). No-op
    /// on the host-only path, which records no events.
    pub fn set_layer_hook(&mut self, hook: Option<LayerHook>) {
        match &mut self.engine {
            Engine::Host => {}
            Engine::Staging(r) => r.sink_mut().layers.hook = hook,
            Engine::Gds(g) => g.layers.hook = hook,
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
        let dev = self
            .dev
            .as_ref()
            .ok_or(GdsError::NoDevice { op: "wait_layer" })?;
        // SAFETY: ev is a live event of ours; stream per the caller's contract.
        unsafe { dev.wait_event(stream, ev) }
    }

    /// Blocks until every queued copy of the loader is done.
    pub fn synchronize(&self) -> Result<()> {
        match &self.dev {
            Some(d) => d.synchronize(),
            None => Ok(()),
        }
    }
}
